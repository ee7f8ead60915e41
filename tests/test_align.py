import itertools

import pytest
import torch

from pipeline.adapters import adapter_for
from pipeline.align import activation_matching_permutation, align_model, weight_matching_permutation
from pipeline.registry import UnknownChoiceError
from tests.conftest import logits

AXES = {"wi": 0, "wo": 1}


def _expert(f: int, h: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"wi": torch.randn(f, h, generator=g), "wo": torch.randn(h, f, generator=g)}


def _apply(e, x):
    return torch.relu(x @ e["wi"].T) @ e["wo"].T


def _permute(e, perm):
    return {"wi": e["wi"][perm], "wo": e["wo"][:, perm]}


def _objective(a, b, perm):
    p = _permute(b, perm)
    return float((a["wi"] * p["wi"]).sum() + (a["wo"] * p["wo"]).sum())


def test_permuted_expert_computes_same_function():
    a, b = _expert(16, 8, 0), _expert(16, 8, 1)
    perm = weight_matching_permutation(a, b, AXES)
    x = torch.randn(5, 8)
    assert torch.allclose(_apply(_permute(b, perm), x), _apply(b, x), atol=1e-5)
    assert sorted(perm.tolist()) == list(range(16))


def test_assignment_is_optimal_against_brute_force():
    a, b = _expert(4, 3, 2), _expert(4, 3, 3)
    perm = weight_matching_permutation(a, b, AXES)
    best = max(_objective(a, b, torch.tensor(p)) for p in itertools.permutations(range(4)))
    assert _objective(a, b, perm) == pytest.approx(best, abs=1e-9)


def test_recovers_a_known_permutation():
    a = _expert(12, 6, 4)
    shuffle = torch.randperm(12, generator=torch.Generator().manual_seed(5))
    b = _permute(a, shuffle)
    assert torch.equal(_permute(b, weight_matching_permutation(a, b, AXES))["wi"], a["wi"])


@pytest.mark.parametrize("reference", ["first", "most-used"])
def test_alignment_leaves_model_outputs_unchanged(tiny_model, batch, reference):
    adapter = adapter_for(tiny_model)
    before = logits(tiny_model, batch)
    freqs = {ly.name: torch.rand(8) for ly in adapter.sparse_layers(tiny_model)}
    report = align_model(tiny_model, adapter, "weight-matching", reference, freqs)
    assert sum(r["neurons_moved"] for r in report.values()) > 0
    assert torch.allclose(logits(tiny_model, batch), before, atol=1e-5)


def test_alignment_none_changes_nothing(tiny_model):
    adapter = adapter_for(tiny_model)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    align_model(tiny_model, adapter, "none", "first")
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())


def test_unknown_method_lists_choices(tiny_model):
    with pytest.raises(UnknownChoiceError, match="valid choices: activation-matching, none, weight-matching"):
        align_model(tiny_model, adapter_for(tiny_model), "git-rebase", "first")


def test_activation_matching_recovers_a_known_permutation():
    x = torch.randn(200, 6)
    a = _expert(12, 6, 7)
    shuffle = torch.randperm(12, generator=torch.Generator().manual_seed(8))
    b = _permute(a, shuffle)
    perm = activation_matching_permutation(torch.relu(x @ a["wi"].T), torch.relu(x @ b["wi"].T))
    assert torch.equal(_permute(b, perm)["wi"], a["wi"])


def test_activation_matching_leaves_model_outputs_unchanged(tiny_model, batch):
    adapter = adapter_for(tiny_model)
    before = logits(tiny_model, batch)
    inputs = {ly.name: torch.randn(64, 32) for ly in adapter.sparse_layers(tiny_model)}
    report = align_model(tiny_model, adapter, "activation-matching", "first", inputs=inputs)
    assert sum(r["neurons_moved"] for r in report.values()) > 0
    assert torch.allclose(logits(tiny_model, batch), before, atol=1e-5)


def test_activation_matching_needs_inputs(tiny_model):
    with pytest.raises(ValueError, match="needs profiled layer inputs"):
        align_model(tiny_model, adapter_for(tiny_model), "activation-matching", "first")
