"""Permutation alignment: weight matching is exact, optimal, and never changes what a model computes."""

import copy
import itertools

import pytest
import torch

from pipeline.align import (
    ALIGNERS,
    activation_matching_permutation,
    align_model,
    weight_matching_permutation,
)
from pipeline.assignment import SOLVERS, SolverPool
from pipeline.families import adapter_for
from pipeline.registry import UnknownChoiceError
from tests.conftest import N_EXPERTS, TINY, logits

AXES = {"wi": 0, "wo": 1}


def _expert(f: int, h: int, seed: int) -> dict[str, torch.Tensor]:
    """A random Switch expert: ``wi`` [F, H] and ``wo`` [H, F]."""
    g = torch.Generator().manual_seed(seed)
    return {"wi": torch.randn(f, h, generator=g), "wo": torch.randn(h, f, generator=g)}


def _apply(e, x):
    return torch.relu(x @ e["wi"].T) @ e["wo"].T


def _permute(e, perm):
    """Neuron i of the result is neuron ``perm[i]`` of ``e``."""
    return {"wi": e["wi"][perm], "wo": e["wo"][:, perm]}


def _objective(a, b, perm):
    p = _permute(b, perm)
    return float((a["wi"] * p["wi"]).sum() + (a["wo"] * p["wo"]).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_permuted_expert_computes_same_function(seed):
    a, b = _expert(16, 8, seed), _expert(16, 8, seed + 100)
    perm = weight_matching_permutation(a, b, AXES)
    assert perm.dtype == torch.long and sorted(perm.tolist()) == list(range(16))
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(_apply(_permute(b, perm), x), _apply(b, x), atol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_assignment_is_optimal_against_brute_force(seed):
    a, b = _expert(4, 3, seed), _expert(4, 3, seed + 50)
    perm = weight_matching_permutation(a, b, AXES)
    scores = [_objective(a, b, torch.tensor(p)) for p in itertools.permutations(range(4))]
    assert len(scores) == 24
    assert _objective(a, b, perm) == pytest.approx(max(scores), abs=1e-9)


def test_recovers_a_known_permutation():
    a = _expert(12, 6, 4)
    shuffle = torch.randperm(12, generator=torch.Generator().manual_seed(5))
    b = _permute(a, shuffle)
    aligned = _permute(b, weight_matching_permutation(a, b, AXES))
    assert torch.equal(aligned["wi"], a["wi"])
    assert torch.equal(aligned["wo"], a["wo"])


def test_matching_an_expert_to_itself_is_the_identity():
    a = _expert(10, 5, 9)
    assert torch.equal(weight_matching_permutation(a, a, AXES), torch.arange(10))


@pytest.mark.parametrize("reference", ["first", "most-used"])
def test_alignment_leaves_model_outputs_unchanged(tiny_model, batch, reference):
    adapter = adapter_for(tiny_model)
    before = logits(tiny_model, batch)
    freqs = {
        ly.name: torch.rand(N_EXPERTS, generator=torch.Generator().manual_seed(ly.position))
        for ly in adapter.sparse_layers(tiny_model)
    }
    report = align_model(tiny_model, adapter, "weight-matching", reference, freqs)
    assert set(report) == {ly.name for ly in adapter.sparse_layers(tiny_model)}
    assert sum(r["neurons_moved"] for r in report.values()) > 0
    assert torch.allclose(logits(tiny_model, batch), before, atol=1e-5)


def test_most_used_reference_is_the_busiest_expert_and_stays_put(tiny_model):
    adapter = adapter_for(tiny_model)
    layers = adapter.sparse_layers(tiny_model)
    freqs = {}
    for ly in layers:
        f = torch.full((N_EXPERTS,), 0.1)
        f[(3 + ly.position) % N_EXPERTS] = 0.9
        freqs[ly.name] = f
    refs = {ly.name: adapter.expert_weights(ly, (3 + ly.position) % N_EXPERTS) for ly in layers}
    refs = {n: {k: v.clone() for k, v in w.items()} for n, w in refs.items()}
    report = align_model(tiny_model, adapter, "weight-matching", "most-used", freqs)
    for ly in layers:
        ref = (3 + ly.position) % N_EXPERTS
        assert report[ly.name]["reference"] == ref
        now = adapter.expert_weights(ly, ref)
        assert all(torch.equal(now[k], refs[ly.name][k]) for k in now)


def test_most_used_without_frequencies_is_explained(tiny_model):
    with pytest.raises(ValueError, match="most-used needs the routing profile"):
        align_model(tiny_model, adapter_for(tiny_model), "weight-matching", "most-used")


def test_aligned_experts_are_closer_to_the_reference(tiny_model):
    """After matching, each expert's inner product with the reference cannot have decreased."""
    adapter = adapter_for(tiny_model)
    layer = adapter.sparse_layers(tiny_model)[1]

    def score(e):
        ref, w = adapter.expert_weights(layer, 0), adapter.expert_weights(layer, e)
        return float(sum((ref[k].double() * w[k].double()).sum() for k in ref))

    before = [score(e) for e in range(1, N_EXPERTS)]
    align_model(tiny_model, adapter, "weight-matching", "first")
    after = [score(e) for e in range(1, N_EXPERTS)]
    assert all(a >= b - 1e-9 for a, b in zip(after, before, strict=True))


def test_alignment_none_changes_nothing(tiny_model):
    adapter = adapter_for(tiny_model)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    report = align_model(tiny_model, adapter, "none", "first")
    assert all(r["neurons_moved"] == 0 for r in report.values())
    after = tiny_model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unknown_method_lists_choices(tiny_model):
    with pytest.raises(UnknownChoiceError) as err:
        align_model(tiny_model, adapter_for(tiny_model), "git-rebase", "first")
    msg = str(err.value)
    assert "'git-rebase'" in msg
    assert "valid choices: " + ", ".join(ALIGNERS.names()) in msg
    assert {"weight-matching", "none"} <= set(ALIGNERS.names())


def test_activation_matching_recovers_a_known_permutation():
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(6))
    a = _expert(12, 6, 7)
    shuffle = torch.randperm(12, generator=torch.Generator().manual_seed(8))
    b = _permute(a, shuffle)
    perm = activation_matching_permutation(torch.relu(x @ a["wi"].T), torch.relu(x @ b["wi"].T))
    assert torch.equal(_permute(b, perm)["wi"], a["wi"])


def test_activation_matching_leaves_model_outputs_unchanged(tiny_model, batch):
    adapter = adapter_for(tiny_model)
    before = logits(tiny_model, batch)
    g = torch.Generator().manual_seed(0)
    inputs = {
        ly.name: torch.randn(64, TINY["d_model"], generator=g) for ly in adapter.sparse_layers(tiny_model)
    }
    report = align_model(tiny_model, adapter, "activation-matching", "first", inputs=inputs)
    assert sum(r["neurons_moved"] for r in report.values()) > 0
    assert torch.allclose(logits(tiny_model, batch), before, atol=1e-5)


def test_activation_matching_needs_inputs(tiny_model):
    with pytest.raises(ValueError, match="needs profiled layer inputs"):
        align_model(tiny_model, adapter_for(tiny_model), "activation-matching", "first")


# ---------------------------------------------------------------- solvers, workers, gain (issue 22)


def _legacy_weight_matching(a, b):
    """The permutation as weight matching computed it before solvers were a choice."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    rows = lambda e: torch.cat([e["wi"], e["wo"].T], dim=1).float()  # noqa: E731
    r, c = linear_sum_assignment((rows(a) @ rows(b).T).numpy(), maximize=True)
    perm = np.empty_like(c)
    perm[r] = c
    return torch.as_tensor(perm)


@pytest.mark.parametrize("seed", range(3))
def test_default_solver_is_the_previous_exact_matching(seed):
    a, b = _expert(48, 16, seed), _expert(48, 16, seed + 7)
    assert torch.equal(weight_matching_permutation(a, b, AXES), _legacy_weight_matching(a, b))


@pytest.mark.parametrize("solver", SOLVERS.names())
def test_every_solver_recovers_a_known_permutation_of_an_expert(solver):
    a = _expert(40, 12, 11)
    shuffle = torch.randperm(40, generator=torch.Generator().manual_seed(12))
    b = _permute(a, shuffle)
    aligned = _permute(b, weight_matching_permutation(a, b, AXES, solver=solver))
    assert torch.equal(aligned["wi"], a["wi"]) and torch.equal(aligned["wo"], a["wo"])


@pytest.mark.parametrize("solver", SOLVERS.names())
@pytest.mark.parametrize("method", ["weight-matching", "activation-matching"])
def test_alignment_with_any_solver_leaves_model_outputs_unchanged(tiny_model, batch, solver, method):
    adapter = adapter_for(tiny_model)
    before = logits(tiny_model, batch)
    g = torch.Generator().manual_seed(0)
    inputs = {
        ly.name: torch.randn(64, TINY["d_model"], generator=g) for ly in adapter.sparse_layers(tiny_model)
    }
    report = align_model(tiny_model, adapter, method, "first", inputs=inputs, solver=solver, device="cpu")
    assert sum(r["neurons_moved"] for r in report.values()) > 0
    assert torch.allclose(logits(tiny_model, batch), before, atol=1e-5)


def test_worker_processes_align_as_the_serial_path(tiny_model):
    twin = copy.deepcopy(tiny_model)
    adapter = adapter_for(tiny_model)
    serial = align_model(tiny_model, adapter, "weight-matching", "first", workers=1)
    with SolverPool(2, min_width=0) as pool:
        parallel = align_model(twin, adapter_for(twin), "weight-matching", "first", pool=pool)
        assert pool._executor is not None  # the pairs did go to worker processes
    assert serial == parallel
    a, b = tiny_model.state_dict(), twin.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _distance2(model, adapter, layer):
    """Sum over non-reference experts of ||W_0 - W_e||^2 over the matrices in the matching cost."""
    ref = adapter.expert_weights(layer, 0)
    total = 0.0
    for e in range(1, adapter.num_experts(layer)):
        w = adapter.expert_weights(layer, e)
        total += sum(float((ref[k].double() - w[k].double()).pow(2).sum()) for k in ref)
    return total


def test_report_gives_the_objective_and_distances_before_and_after(tiny_model):
    adapter = adapter_for(tiny_model)
    layers = adapter.sparse_layers(tiny_model)
    before = {ly.name: _distance2(tiny_model, adapter, ly) for ly in layers}
    report = align_model(tiny_model, adapter, "weight-matching", "first")
    for ly in layers:
        r = report[ly.name]
        assert r["aligned"] and r["objective_after"] >= r["objective_before"]
        assert r["distance2_before"] == pytest.approx(before[ly.name], rel=1e-5)
        assert r["distance2_after"] == pytest.approx(_distance2(tiny_model, adapter, ly), rel=1e-5)
        assert r["gain"] == pytest.approx(1 - r["distance2_after"] / r["distance2_before"])
        assert 0 < r["gain"] < 1


def test_min_gain_leaves_layers_below_it_unaligned(tiny_model):
    adapter = adapter_for(tiny_model)
    gains = {
        n: r["gain"]
        for n, r in align_model(copy.deepcopy(tiny_model), adapter, "weight-matching", "first").items()
    }
    assert len(set(gains.values())) == len(gains)
    threshold = sorted(gains.values())[1]  # the lowest-gain layer falls below it
    untouched = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    report = align_model(tiny_model, adapter, "weight-matching", "first", min_gain=threshold)
    for ly in adapter.sparse_layers(tiny_model):
        r = report[ly.name]
        assert r["gain"] == pytest.approx(gains[ly.name])
        assert r["aligned"] == (gains[ly.name] >= threshold)
        weights_same = all(
            torch.equal(v, untouched[k]) for k, v in tiny_model.state_dict().items() if k.startswith(ly.name)
        )
        assert weights_same == (not r["aligned"])
        assert (r["neurons_moved"] == 0) == (not r["aligned"])


def test_min_gain_one_aligns_nothing(tiny_model):
    adapter = adapter_for(tiny_model)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    report = align_model(tiny_model, adapter, "weight-matching", "first", min_gain=1.0)
    assert not any(r["aligned"] for r in report.values())
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())


def test_negative_min_gain_and_unknown_solver_are_refused_before_any_work(tiny_model):
    adapter = adapter_for(tiny_model)
    with pytest.raises(ValueError, match="min_gain=-0.1 must be >= 0"):
        align_model(tiny_model, adapter, "weight-matching", "first", min_gain=-0.1)
    with pytest.raises(UnknownChoiceError, match="unknown assignment solver 'hungry'"):
        align_model(tiny_model, adapter, "weight-matching", "first", solver="hungry")
