"""Task-specific expert pruning during training (Chen et al. 2022): schedule, additive mask, drop."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.expert_pruning import KD_PRUNERS, TaskSpecificPruner
from pipeline.families import adapter_for
from pipeline.merging import merge_model
from pipeline.modeling import build_model
from pipeline.registry import UnknownChoiceError
from pipeline.training import model_forward, train
from tests.conftest import CLASS_TARGETS, N_EXPERTS, PAD_ID, logits, profiles_for, train_settings
from tests.test_topk_families import FAMILIES as TOPK_CONFIGS

BUDGET_OF = {0: 3, 1: 2, 2: 5}


def _singletons(model):
    """The merge stage's output under group.method=task-specific: every expert its own group."""
    adapter = adapter_for(model)
    layers = adapter.sparse_layers(model)
    groups = {
        "layers": {
            ly.name: {"merged": True, "groups": [[e] for e in range(adapter.num_experts(ly))]}
            for ly in layers
        }
    }
    n = adapter.num_experts(layers[0])
    merge_model(model, adapter, groups, profiles_for([ly.name for ly in layers], n), "frequency")
    return adapter, {ly.name: BUDGET_OF[i] for i, ly in enumerate(layers)}


def _train_step(model, batch, pruner, step, total):
    model.train()
    model_forward(model, batch)
    pruner(step, total)


def test_schedule_reaches_the_budget_at_half_of_training(tiny_model, batch):
    adapter, budget = _singletons(tiny_model)
    pruner = TaskSpecificPruner(tiny_model, adapter, budget, times=4)
    total = 40
    assert pruner.interval(total) == 5 and pruner.final_step(total) == 20
    counts = []
    for step in range(total):
        _train_step(tiny_model, batch, pruner, step, total)
        counts.append({n: int(a.sum()) for n, a in pruner.alive.items()})
    assert counts[19] == budget  # the event at step 20 reaches it, whatever the usage
    assert counts[-1] == budget
    # Pruning only ever removes experts.
    for before, after in zip(counts, counts[1:], strict=False):
        assert all(after[n] <= before[n] for n in budget)


def test_dead_experts_are_never_chosen_even_with_negative_logits(tiny_model):
    """The authors multiply logits by a mask holding -1e6: a dead expert with a negative logit then
    wins. The additive mask cannot do that."""
    adapter, budget = _singletons(tiny_model)
    layer = adapter.sparse_layers(tiny_model)[0]
    classifier = adapter.router(layer).classifier
    with torch.no_grad():
        # Every token's logits are negative, expert 0's the least negative.
        classifier.weight.zero_()
    pruner = TaskSpecificPruner(tiny_model, adapter, {layer.name: 3})
    pruner.alive[layer.name] = torch.tensor([False, True, True, True] + [False] * (N_EXPERTS - 4))
    pruner._remask()
    with torch.no_grad():
        classifier.weight[:, 0] = -torch.arange(1, N_EXPERTS + 1).float()
        x = torch.zeros(2, 5, classifier.in_features)
        x[..., 0] = 1.0
        dispatch, _, masked_logits = adapter.router(layer)(x)
    chosen = dispatch.reshape(-1, N_EXPERTS).argmax(-1)
    assert set(chosen.tolist()) == {1}  # the best alive expert, never the dead expert 0
    raw = x @ classifier.weight.T  # the classifier itself now returns masked logits
    mult = raw * torch.where(pruner.alive[layer.name], 1.0, -1e6)
    assert set(mult.reshape(-1, N_EXPERTS).argmax(-1).tolist()) == {N_EXPERTS - 1}  # the defect
    assert torch.isinf(masked_logits[..., ~pruner.alive[layer.name]]).all()


def test_finalize_drops_experts_and_router_rows_without_changing_the_function(tiny_model, batch):
    adapter, budget = _singletons(tiny_model)
    pruner = TaskSpecificPruner(tiny_model, adapter, budget, times=2)
    total = 8
    for step in range(total):
        _train_step(tiny_model, batch, pruner, step, total)
    rows = {n: adapter.router(pruner.layers[n]).classifier.weight.clone() for n in budget}
    masked = logits(tiny_model.eval(), batch)
    report = pruner.finalize()
    for i, ly in enumerate(adapter.sparse_layers(tiny_model)):
        kept = report["layers"][ly.name]["kept"]
        assert adapter.num_experts(ly) == len(kept) == BUDGET_OF[i]
        assert torch.equal(adapter.router(ly).classifier.weight, rows[ly.name][kept])
        assert adapter.merged_routing(ly)["mode"] == "prune"
    assert torch.allclose(logits(tiny_model, batch), masked, atol=1e-5)


def test_train_resumes_the_pruner_state(tiny_model, rows):
    """The pruner is a checkpointed step hook: its state round-trips."""
    adapter, budget = _singletons(tiny_model)
    pruner = TaskSpecificPruner(tiny_model, adapter, budget)
    settings = train_settings(
        epochs=2, batch_size=8, lr=1e-3, router_z_loss_coef=0.0, router_aux_loss_coef=0.0
    )
    summary = train(
        tiny_model,
        rows,
        rows[:16],
        CLASS_TARGETS,
        PAD_ID,
        settings,
        torch.device("cpu"),
        step_hook=pruner,
        eligible_from=pruner.final_step,
        progress=False,
    )
    assert summary["best_step"] >= pruner.final_step(summary["total_steps"])
    assert {n: int(a.sum()) for n, a in pruner.alive.items()} == budget
    other = TaskSpecificPruner(copy.deepcopy(tiny_model), adapter_for(tiny_model), budget)
    other.load_state_dict(pruner.state_dict())
    assert all(torch.equal(other.alive[n], pruner.alive[n]) for n in budget)


def test_topk_family_mask_keeps_the_family_rule():
    cfg = {**TOPK_CONFIGS["mixtral"], "num_local_experts": 4}
    model = build_model("mixtral", cfg, cfg["vocab_size"], 0, 1, router_init_std=0.02, seed=0).eval()
    adapter, _ = _singletons(model)
    layer = adapter.sparse_layers(model)[0]
    pruner = TaskSpecificPruner(model, adapter, {layer.name: 2})
    pruner.alive[layer.name] = torch.tensor([True, False, True, False])
    pruner._remask()
    x = torch.randn(7, cfg["hidden_size"])
    with torch.no_grad():
        logit, scores, idx = adapter.router(layer)(x)
    assert set(idx.flatten().tolist()) <= {0, 2}
    assert torch.allclose(scores.sum(-1), torch.ones(7), atol=1e-5)  # Mixtral renormalises
    pruner.finalize()
    assert adapter.num_experts(layer) == 2


def test_budget_checks_and_registry(tiny_model):
    adapter, budget = _singletons(tiny_model)
    with pytest.raises(ValueError, match="outside 1..8"):
        TaskSpecificPruner(tiny_model, adapter, {next(iter(budget)): 9})
    with pytest.raises(ValueError, match="lacks"):
        TaskSpecificPruner(tiny_model, adapter, {"nope": 2})
    with pytest.raises(UnknownChoiceError, match="none, task-specific"):
        KD_PRUNERS.get("progressive")
    pruner = TaskSpecificPruner(tiny_model, adapter, budget)
    with pytest.raises(ValueError, match="not its budget"):
        pruner.finalize()
