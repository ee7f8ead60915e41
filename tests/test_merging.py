"""Merging: coefficients, weighted averages, merged layers' routing, and merged checkpoints."""

import copy

import pytest
import torch

from pipeline.families import adapter_for
from pipeline.families.switch import MergedSwitchSparseMLP
from pipeline.merging import MERGE_STRATEGIES, merge_expert_weights, merge_model
from pipeline.modeling import STRUCTURE_FILE, bytes_on_disk, count_unique_params, load_model, save_model
from pipeline.profiling import LayerProfile
from pipeline.registry import UnknownChoiceError
from tests.conftest import N_EXPERTS, TINY, logits, profiles_for


def _profile(freqs, fisher=False, shapes=(("wi", (6, 4)), ("wo", (4, 6)))) -> LayerProfile:
    counts = torch.tensor(freqs, dtype=torch.float32) * 100
    p = LayerProfile("l", counts, 100, torch.zeros(100, len(freqs)))
    if fisher:
        g = torch.Generator().manual_seed(0)
        p.fisher = {
            f"{e}::{k}": torch.rand(shape, generator=g) for e in range(len(freqs)) for k, shape in shapes
        }
    return p


def _groups(model, groups_per_layer):
    """A groups.json-like dict: the given layers merged, every other layer left as is."""
    adapter = adapter_for(model)
    out = {"layers": {}}
    for ly in adapter.sparse_layers(model):
        g = groups_per_layer.get(ly.name)
        out["layers"][ly.name] = {"merged": g is not None, "groups": g or [[e] for e in range(N_EXPERTS)]}
    return out


def _expert(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"wi": torch.randn(6, 4, generator=g), "wo": torch.randn(4, 6, generator=g)}


# ---------------------------------------------------------------- coefficients and averages


@pytest.mark.parametrize("strategy", MERGE_STRATEGIES.names())
@pytest.mark.parametrize("freqs", [[0.1, 0.5, 0.4], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.9, 0.05, 0.05]])
def test_merging_identical_experts_returns_that_expert(strategy, freqs):
    e = _expert()
    p = _profile(freqs, fisher=True)
    coeffs = MERGE_STRATEGIES.get(strategy)([0, 1, 2], p)
    merged = merge_expert_weights([copy.deepcopy(e) for _ in range(3)], coeffs)
    assert merged.keys() == e.keys()
    assert all(torch.allclose(merged[k], e[k], atol=1e-6) for k in e)
    assert all(merged[k].dtype == e[k].dtype for k in e)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("strategy", MERGE_STRATEGIES.names())
def test_merge_coefficients_are_normalised(strategy, seed):
    g = torch.Generator().manual_seed(seed)
    c = MERGE_STRATEGIES.get(strategy)(
        [3, 0, 5], _profile((torch.rand(8, generator=g) + 0.01).tolist(), fisher=True)
    )
    if isinstance(c, dict):  # per-element coefficients
        for v in c.values():
            assert v.shape[0] == 3
            assert torch.allclose(v.sum(0), torch.ones((), dtype=v.dtype))
            assert (v >= 0).all()
        return
    assert c.shape == (3,)
    assert float(c.sum()) == pytest.approx(1.0)
    assert (c >= 0).all()


@pytest.mark.parametrize("strategy", ["frequency", "uniform"])
def test_zero_usage_falls_back_to_uniform(strategy):
    c = MERGE_STRATEGIES.get(strategy)([0, 1, 3], _profile([0.0] * 4))
    assert torch.allclose(c, torch.full((3,), 1 / 3, dtype=c.dtype))


def test_frequency_weights_follow_usage():
    c = MERGE_STRATEGIES.get("frequency")([0, 1], _profile([0.3, 0.1]))
    assert torch.allclose(c.float(), torch.tensor([0.75, 0.25]))
    c = MERGE_STRATEGIES.get("frequency")([2, 0], _profile([0.2, 0.0, 0.6]))
    assert torch.allclose(c.float(), torch.tensor([0.75, 0.25]))


def test_uniform_ignores_usage():
    c = MERGE_STRATEGIES.get("uniform")([0, 1, 2, 3], _profile([0.7, 0.1, 0.1, 0.1]))
    assert torch.allclose(c.float(), torch.full((4,), 0.25))


def test_merge_is_the_weighted_average():
    a, b = _expert(1), _expert(2)
    merged = merge_expert_weights([a, b], torch.tensor([0.25, 0.75]))
    for k in a:
        assert torch.allclose(merged[k], 0.25 * a[k] + 0.75 * b[k], atol=1e-6)


def test_unnormalised_coefficients_rejected():
    with pytest.raises(ValueError, match="must sum to 1"):
        merge_expert_weights([{"w": torch.ones(2)}] * 2, torch.tensor([0.5, 0.6]))


def test_fisher_with_equal_information_equals_uniform():
    experts = [_expert(s) for s in range(3)]
    p = _profile([0.2, 0.3, 0.5, 0.0])
    p.fisher = {f"{e}::{k}": torch.full(v.shape, 2.0) for e in range(4) for k, v in experts[0].items()}
    fisher = merge_expert_weights(experts, MERGE_STRATEGIES.get("fisher")([0, 1, 3], p))
    uniform = merge_expert_weights(experts, MERGE_STRATEGIES.get("uniform")([0, 1, 3], p))
    assert all(torch.allclose(fisher[k], uniform[k], atol=1e-6) for k in fisher)


def test_fisher_favours_the_informed_member():
    experts = [{"w": torch.zeros(3)}, {"w": torch.ones(3)}]
    p = _profile([0.5, 0.5])
    p.fisher = {"0::w": torch.tensor([1.0, 0.0, 0.0]), "1::w": torch.tensor([0.0, 1.0, 0.0])}
    merged = merge_expert_weights(experts, MERGE_STRATEGIES.get("fisher")([0, 1], p))
    assert torch.allclose(merged["w"], torch.tensor([0.0, 1.0, 0.5]))


def test_fisher_without_gradients_is_explained():
    with pytest.raises(ValueError, match="profile.gradients: true"):
        MERGE_STRATEGIES.get("fisher")([0, 1], _profile([0.5, 0.5]))


# ---------------------------------------------------------------- merged layers in a model


@pytest.mark.parametrize("strategy", ["frequency", "uniform"])
def test_merging_copies_of_one_expert_keeps_outputs(tiny_model, batch, strategy):
    adapter = adapter_for(tiny_model)
    layers = adapter.sparse_layers(tiny_model)
    for layer in layers[1:]:
        for e in range(1, N_EXPERTS):  # every expert becomes a copy of expert 0 or 4
            adapter.set_expert_weights(layer, e, adapter.expert_weights(layer, 0 if e < 4 else 4))
    before = logits(tiny_model, batch)
    names = [ly.name for ly in layers[1:]]
    groups = _groups(tiny_model, {n: [[0, 1, 2, 3], [4, 5, 6, 7]] for n in names})
    report = merge_model(tiny_model, adapter, groups, profiles_for(names), strategy)
    assert set(report) == set(names)
    assert all(r["experts_before"] == 8 and r["experts_after"] == 2 for r in report.values())
    for n in names:
        assert isinstance(tiny_model.get_submodule(n), MergedSwitchSparseMLP)
    assert not isinstance(tiny_model.get_submodule(layers[0].name), MergedSwitchSparseMLP)
    assert torch.allclose(logits(tiny_model, batch), before, atol=1e-5)


def test_singleton_groups_reproduce_the_stock_layer(tiny_model, batch):
    adapter = adapter_for(tiny_model)
    before = logits(tiny_model, batch)
    names = [ly.name for ly in adapter.sparse_layers(tiny_model)]
    groups = {"layers": {n: {"merged": True, "groups": [[e] for e in range(N_EXPERTS)]} for n in names}}
    merge_model(tiny_model, adapter, groups, profiles_for(names), "frequency")
    assert all(isinstance(tiny_model.get_submodule(n), MergedSwitchSparseMLP) for n in names)
    assert torch.allclose(logits(tiny_model, batch), before, atol=1e-5)


def test_tokens_of_any_member_go_to_group_expert(tiny_model):
    adapter = adapter_for(tiny_model)
    layer = adapter.sparse_layers(tiny_model)[2]
    members = [[2, 0, 1], [5, 3, 4, 6, 7]]
    originals = [adapter.expert_weights(layer, e) for e in range(N_EXPERTS)]
    groups = _groups(tiny_model, {layer.name: members})
    merge_model(tiny_model, adapter, groups, profiles_for([layer.name]), "uniform")
    merged = tiny_model.get_submodule(layer.name)
    assert isinstance(merged, MergedSwitchSparseMLP)
    assert merged.expert_map.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert len(merged.experts) == 2
    # Each merged expert is the plain average of its members (uniform strategy).
    for g, grp in enumerate(members):
        e = merged.experts[f"expert_{g}"]
        for k in ("wi", "wo"):
            mean = torch.stack([originals[m][k] for m in grp]).mean(0)
            assert torch.allclose(getattr(e, k).weight, mean, atol=1e-6)

    # Feed hidden states straight into the layer: a token the router sends to expert e must come
    # out as merged expert expert_map[e] applied to it, scaled by the router probability.
    h = torch.randn(4, 10, TINY["d_model"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = merged(h).reshape(-1, TINY["d_model"])
        dispatch, probs, _ = merged.router(h)
    dispatch, probs, flat = dispatch.reshape(-1, N_EXPERTS), probs.reshape(-1), h.reshape(-1, TINY["d_model"])
    chosen = dispatch.argmax(-1)
    assert len(set(chosen.tolist())) > 2  # the router really spreads tokens over several experts
    for t in range(flat.shape[0]):
        if not dispatch[t].any():
            assert torch.equal(out[t], torch.zeros_like(out[t]))
            continue
        g = members[0] if int(chosen[t]) in members[0] else members[1]
        expert = merged.experts[f"expert_{members.index(g)}"]
        with torch.no_grad():
            expected = expert(flat[t : t + 1])[0] * probs[t]
        assert torch.allclose(out[t], expected, atol=1e-6)


def test_merged_layer_keeps_the_router(tiny_model):
    adapter = adapter_for(tiny_model)
    layer = adapter.sparse_layers(tiny_model)[1]
    router = adapter.router(layer)
    merge_model(
        tiny_model,
        adapter,
        _groups(tiny_model, {layer.name: [list(range(8))]}),
        profiles_for([layer.name]),
        "frequency",
    )
    assert tiny_model.get_submodule(layer.name).router is router


def test_merged_checkpoint_smaller_and_reloads(tiny_model, batch, tmp_path):
    adapter = adapter_for(tiny_model)
    save_model(tiny_model, tmp_path / "full")
    assert not (tmp_path / "full" / STRUCTURE_FILE).exists()
    names = [ly.name for ly in adapter.sparse_layers(tiny_model)][1:]
    groups = _groups(tiny_model, {n: [[0, 1, 2, 3], [4, 5, 6, 7]] for n in names})
    merge_model(tiny_model, adapter, groups, profiles_for(names), "frequency")
    save_model(tiny_model, tmp_path / "merged", params={"merge": {"strategy": "frequency"}})
    assert (tmp_path / "merged" / STRUCTURE_FILE).is_file()
    full_bytes, merged_bytes = bytes_on_disk(tmp_path / "full"), bytes_on_disk(tmp_path / "merged")
    # Two merged layers lose 6 of 8 experts, 2 x (32 x 64) float32 weights each.
    assert full_bytes - merged_bytes >= 2 * 6 * 2 * 32 * 64 * 4
    reloaded = load_model(tmp_path / "merged")
    for n in names:
        m = reloaded.get_submodule(n)
        assert isinstance(m, MergedSwitchSparseMLP) and len(m.experts) == 2
        assert m.expert_map.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert torch.allclose(logits(reloaded, batch), logits(tiny_model, batch), atol=1e-6)
    assert count_unique_params(reloaded) == count_unique_params(tiny_model)
    assert count_unique_params(reloaded) < count_unique_params(load_model(tmp_path / "full"))
    assert (tmp_path / "merged" / "params.yaml").is_file()


def test_unknown_strategy_lists_choices(tiny_model):
    with pytest.raises(UnknownChoiceError) as err:
        merge_model(tiny_model, adapter_for(tiny_model), {"layers": {}}, {}, "ties")
    assert "'ties'" in str(err.value)
    assert "valid choices: " + ", ".join(MERGE_STRATEGIES.names()) in str(err.value)
    assert {"frequency", "uniform"} <= set(MERGE_STRATEGIES.names())
