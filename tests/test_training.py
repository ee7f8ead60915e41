import torch

from pipeline.profiling import load_profile, profile_routing, save_profile
from pipeline.training import TrainSettings, evaluate_accuracy, kd_loss, train


def test_kd_loss_zero_for_identical_logits():
    logits = torch.randn(4, 3, 10)
    labels = torch.tensor([[1, 2, -100]] * 4)
    assert kd_loss(logits, logits, labels, 2.0).abs() < 1e-6
    assert kd_loss(logits, torch.randn(4, 3, 10), labels, 2.0) > 0


def test_training_lowers_loss_and_scores(tiny_model, rows):
    settings = TrainSettings(
        epochs=3,
        batch_size=16,
        eval_batch_size=16,
        lr=3e-3,
        weight_decay=0.0,
        warmup_steps=1,
        max_grad_norm=1.0,
        router_z_loss_coef=1e-3,
        router_aux_loss_coef=1e-3,
        eval_every_epochs=1.0,
    )
    seen = []
    summary = train(
        tiny_model,
        rows,
        rows,
        [[5, 1], [6, 1]],
        0,
        settings,
        torch.device("cpu"),
        log=lambda m, s: seen.append(m),
        progress=False,
    )
    assert summary["total_steps"] == 9
    assert 0.0 <= summary["best_dev_accuracy"] <= 1.0
    assert len(summary["history"]) == 3
    acc = evaluate_accuracy(tiny_model, rows, [[5, 1], [6, 1]], 0, 16, torch.device("cpu"))
    assert acc == max(h["dev_accuracy"] for h in summary["history"])


def test_profile_counts_real_tokens_only(tiny_model, rows, tmp_path):
    profiles = profile_routing(tiny_model, rows, 0, 16, torch.device("cpu"))
    source_tokens = sum(len(r["input_ids"]) for r in rows)
    target_tokens = sum(len(r["labels"]) for r in rows)
    for name, p in profiles.items():
        expected = target_tokens if name.startswith("decoder") else source_tokens
        assert p.tokens == expected
        assert p.router_logits.shape == (expected, 8)
        assert int(p.counts.sum()) <= expected
        assert abs(float(p.frequency.sum()) - 1.0) < 1e-6  # capacity 64 drops nothing here
    save_profile(profiles, tmp_path)
    again = load_profile(tmp_path)
    assert all(torch.equal(again[n].counts, p.counts) for n, p in profiles.items())
