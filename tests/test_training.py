"""Training, KD loss, scoring and routing profiles on the tiny model with fake rows."""

import pytest
import torch

from pipeline.data import collate
from pipeline.families import adapter_for
from pipeline.profiling import load_profile, profile_routing, save_profile
from pipeline.training import (
    evaluate_accuracy,
    kd_loss,
    model_forward,
    router_loss,
    score_classes,
    task_loss,
    train,
)
from tests.conftest import CLASS_TARGETS, N_EXPERTS, PAD_ID, train_settings

CPU = torch.device("cpu")


# ---------------------------------------------------------------- losses


def test_kd_loss_zero_for_identical_logits_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 10, generator=g)
    labels = torch.tensor([[1, 2, -100]] * 4)
    for temperature in (1.0, 2.0):
        assert float(kd_loss(logits, logits.clone(), labels, temperature)) == pytest.approx(0.0, abs=1e-6)
        assert float(kd_loss(logits, torch.randn(4, 3, 10, generator=g), labels, temperature)) > 0


def test_kd_loss_ignores_padded_target_positions():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(2, 3, 10, generator=g)
    teacher = student.clone()
    teacher[:, 2] = torch.randn(2, 10, generator=g)  # differs only where labels are -100
    labels = torch.tensor([[1, 2, -100], [3, 4, -100]])
    assert float(kd_loss(student, teacher, labels, 2.0)) == pytest.approx(0.0, abs=1e-6)


def test_task_loss_ignores_padding():
    logits = torch.zeros(1, 2, 5)
    logits[0, 0, 3] = 10.0
    labels = torch.tensor([[3, -100]])
    assert float(task_loss(logits, labels)) < 1e-3


def test_router_loss_weights_the_switch_losses(tiny_model, batch):
    with torch.no_grad():
        out = model_forward(tiny_model, batch)
    z = float(out.encoder_z_loss + out.decoder_z_loss)
    aux = float(out.encoder_aux_loss + out.decoder_aux_loss)
    assert z > 0 and aux > 0
    assert float(router_loss(out, 0.1, 0.01)) == pytest.approx(0.1 * z + 0.01 * aux, rel=1e-5)
    assert float(router_loss(out, 0.0, 0.0)) == 0.0


# ---------------------------------------------------------------- training


def test_a_few_steps_lower_the_loss(tiny_model, rows):
    b = collate(rows[:16], PAD_ID)
    tiny_model.train()
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-2)

    def loss():
        out = model_forward(tiny_model, b)
        return task_loss(out.logits, b["labels"]) + router_loss(out, 1e-3, 1e-3)

    first = float(loss().detach())
    for _ in range(8):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    assert torch.isfinite(value)
    assert float(loss().detach()) < first


def test_train_runs_and_keeps_the_best_model(tiny_model, rows):
    seen, hooked = [], []
    summary = train(
        tiny_model,
        rows,
        rows[:16],
        CLASS_TARGETS,
        PAD_ID,
        train_settings(epochs=2, eval_every_epochs=1.0),
        CPU,
        step_hook=lambda step, total: hooked.append((step, total)),
        log=lambda m, s: seen.append((s, m)),
        progress=False,
    )
    assert summary["total_steps"] == 6  # 48 rows / 16 per batch x 2 epochs
    assert hooked == [(s, 6) for s in range(6)]
    assert [h["step"] for h in summary["history"]] == [3, 6]
    assert 0.0 <= summary["best_dev_accuracy"] <= 1.0
    assert summary["best_step"] in (3, 6)
    assert any("dev_accuracy" in m for _, m in seen)
    acc = evaluate_accuracy(tiny_model, rows[:16], CLASS_TARGETS, PAD_ID, 16, CPU)
    assert acc == pytest.approx(summary["best_dev_accuracy"])


def test_evaluate_accuracy_is_a_fraction_and_restores_mode(tiny_model, rows):
    tiny_model.train()
    acc = evaluate_accuracy(tiny_model, rows, CLASS_TARGETS, PAD_ID, 7, CPU)
    assert 0.0 <= acc <= 1.0
    assert acc * len(rows) == pytest.approx(round(acc * len(rows)))
    assert tiny_model.training


def test_score_classes_are_log_likelihoods(tiny_model, batch):
    scores = score_classes(tiny_model, batch, CLASS_TARGETS)
    assert scores.shape == (len(batch["input_ids"]), len(CLASS_TARGETS))
    assert (scores <= 0).all()
    # The two classes' probabilities (over complete targets) cannot add up to more than one.
    assert (scores.exp().sum(-1) <= 1 + 1e-5).all()


# ---------------------------------------------------------------- routing profile


def test_profile_counts_real_tokens_only(tiny_model, rows, tmp_path):
    profiles = profile_routing(tiny_model, rows, PAD_ID, 16, CPU)
    layers = adapter_for(tiny_model).sparse_layers(tiny_model)
    assert list(profiles) == [ly.name for ly in layers]
    source_tokens = sum(len(r["input_ids"]) for r in rows)  # non-padding encoder tokens
    target_tokens = sum(len(r["labels"]) for r in rows)  # non-padding decoder tokens
    for ly in layers:
        p = profiles[ly.name]
        expected = target_tokens if ly.stack == "decoder" else source_tokens
        assert p.tokens == expected
        assert p.router_logits.shape == (expected, N_EXPERTS)
        assert p.counts.shape == (N_EXPERTS,)
        assert int(p.counts.sum()) <= expected
        assert (p.counts >= 0).all()
        assert float(p.frequency.sum()) <= 1.0 + 1e-6
    save_profile(profiles, tmp_path)
    again = load_profile(tmp_path)
    for n, p in profiles.items():
        assert torch.equal(again[n].counts, p.counts)
        assert again[n].tokens == p.tokens
        assert torch.equal(again[n].router_logits, p.router_logits)


def test_padding_does_not_change_the_profile(tiny_model, rows):
    """Profiling one row at a time (no padding) and in padded batches gives the same counts."""
    alone = profile_routing(tiny_model, rows, PAD_ID, 1, CPU)
    padded = profile_routing(tiny_model, rows, PAD_ID, 16, CPU)
    for n in alone:
        assert torch.equal(alone[n].counts, padded[n].counts)
        assert alone[n].tokens == padded[n].tokens
        assert torch.allclose(alone[n].router_logits, padded[n].router_logits, atol=1e-4)


def test_profile_with_capacity_drops(tiny_dir, rows, tmp_path):
    """With a capacity of 1 token per expert and sequence, tokens are dropped: the profile counts
    only dispatched tokens, and right padding never takes a real token's slot."""
    from transformers import AutoConfig

    from pipeline.modeling import load_model

    cfg = AutoConfig.from_pretrained(str(tiny_dir))
    cfg.expert_capacity = 1
    cfg.save_pretrained(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    model = load_model(tmp_path)
    padded = profile_routing(model, rows, PAD_ID, 16, CPU)
    alone = profile_routing(model, rows, PAD_ID, 1, CPU)
    for name, p in padded.items():
        assert int(p.counts.sum()) < p.tokens
        assert (p.counts <= len(rows)).all()
        assert torch.equal(p.counts, alone[name].counts)


def test_profile_keeps_at_most_max_inputs_layer_inputs(tiny_model, rows):
    profiles = profile_routing(tiny_model, rows, PAD_ID, 16, CPU, max_inputs=40)
    for p in profiles.values():
        assert p.inputs.shape == (min(40, p.tokens), tiny_model.config.d_model)
        assert p.feature_sum.shape == (N_EXPERTS, tiny_model.config.d_model)


def test_profile_needs_rows(tiny_model):
    with pytest.raises(ValueError, match="no samples"):
        profile_routing(tiny_model, [], PAD_ID, 4, CPU)


# ---------------------------------------------------------------- non-finite runs and token ids


def test_a_nan_loss_stops_training_at_once_and_keeps_no_checkpoint(tiny_model, rows, tmp_path):
    from pipeline.checkpointing import STATE_FILE, Checkpointing, TrainingDivergedError

    with torch.no_grad():
        tiny_model.shared.weight[5] = float("nan")  # the class token every target starts with
    ckpt = Checkpointing(tmp_path / "ckpt", every_steps=1, resume=False, fingerprint="f")
    with pytest.raises(
        TrainingDivergedError, match=r"the loss is nan at step 1/3 \(epoch 1\).*learning rate"
    ):
        train(
            tiny_model,
            rows,
            rows[:8],
            CLASS_TARGETS,
            PAD_ID,
            train_settings(),
            CPU,
            progress=False,
            checkpointing=ckpt,
        )
    assert not (tmp_path / "ckpt" / STATE_FILE).exists()


def test_finite_training_is_unchanged_by_the_checks(tiny_model, rows):
    summary = train(tiny_model, rows, rows[:8], CLASS_TARGETS, PAD_ID, train_settings(), CPU, progress=False)
    assert summary["total_steps"] == 3 and summary["best_dev_accuracy"] is not None


def test_a_nan_state_is_never_saved(tmp_path):
    from pipeline.checkpointing import Checkpointing, TrainingDivergedError

    ckpt = Checkpointing(tmp_path / "ckpt", every_steps=1, resume=True, fingerprint="f")
    with pytest.raises(TrainingDivergedError, match=r"after step 4 1 of 2 values of weight w"):
        ckpt.save({"model": {"w": torch.tensor([1.0, float("inf")])}, "best_model": None, "step": 4})
    assert not (tmp_path / "ckpt").exists()


def test_a_resumed_nan_checkpoint_is_refused(tmp_path):
    from pipeline.checkpointing import STATE_FILE, Checkpointing, TrainingCheckpointError

    ckpt = Checkpointing(tmp_path / "ckpt", every_steps=1, resume=True, fingerprint="f")
    (tmp_path / "ckpt").mkdir()
    state = {"model": {"w": torch.tensor([float("nan")])}, "fingerprint": "f", "total_steps": 3, "step": 1}
    torch.save(state, tmp_path / "ckpt" / STATE_FILE)
    with pytest.raises(TrainingCheckpointError, match="holds non-finite weights.*delete it"):
        ckpt.load(3)


def test_token_ids_beyond_the_embedding_table_are_refused(tiny_model, rows):
    from pipeline.data import DataError
    from pipeline.training import check_token_ids

    check_token_ids(tiny_model, rows, CLASS_TARGETS)
    bad = [*rows, {"input_ids": [3, 100, 1], "labels": [5, 1], "label": 0}]
    with pytest.raises(DataError, match="holds token id 100, but the model's embedding table has 100 rows"):
        check_token_ids(tiny_model, bad)
    with pytest.raises(DataError, match="token id 120"):
        check_token_ids(tiny_model, rows, [[120, 1]])
    with pytest.raises(DataError, match="prepared train split"):
        train(tiny_model, bad, rows, CLASS_TARGETS, PAD_ID, train_settings(), CPU, progress=False)


def test_nan_class_scores_are_refused(tiny_model, rows):
    from pipeline.training import NonFiniteOutputError

    with torch.no_grad():
        tiny_model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteOutputError, match="class scores are NaN/inf on 16 of 16 rows"):
        evaluate_accuracy(tiny_model, rows[:16], CLASS_TARGETS, PAD_ID, 8, CPU)
