import copy

import pytest
import torch

from pipeline.adapters import MergedSwitchSparseMLP, adapter_for
from pipeline.merging import MERGE_STRATEGIES, merge_expert_weights, merge_model
from pipeline.modeling import bytes_on_disk, count_unique_params, load_model, save_model
from pipeline.profiling import LayerProfile
from pipeline.registry import UnknownChoiceError
from tests.conftest import logits, profiles_for


def _profile(freqs, fisher=False, shapes=(("wi", (6, 4)), ("wo", (4, 6)))) -> LayerProfile:
    counts = torch.tensor(freqs, dtype=torch.float32) * 100
    p = LayerProfile("l", counts, 100, torch.zeros(100, len(freqs)))
    if fisher:
        g = torch.Generator().manual_seed(0)
        p.fisher = {
            f"{e}::{k}": torch.rand(shape, generator=g) for e in range(len(freqs)) for k, shape in shapes
        }
    return p


def test_fisher_with_equal_information_equals_uniform():
    experts = [{"wi": torch.randn(6, 4), "wo": torch.randn(4, 6)} for _ in range(3)]
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


def _groups(model, groups_per_layer):
    adapter = adapter_for(model)
    layers = adapter.sparse_layers(model)
    out = {"layers": {}}
    for ly in layers:
        g = groups_per_layer.get(ly.name)
        out["layers"][ly.name] = {"merged": g is not None, "groups": g or [[e] for e in range(8)]}
    return out


@pytest.mark.parametrize("freqs", [[0.1, 0.5, 0.4], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
def test_merging_identical_experts_returns_that_expert(freqs):
    e = {"wi": torch.randn(6, 4), "wo": torch.randn(4, 6)}
    coeffs = MERGE_STRATEGIES.get("frequency")([0, 1, 2], _profile(freqs))
    merged = merge_expert_weights([copy.deepcopy(e) for _ in range(3)], coeffs)
    assert all(torch.allclose(merged[k], e[k], atol=1e-6) for k in e)


@pytest.mark.parametrize("name", MERGE_STRATEGIES.names())
def test_merge_coefficients_are_normalised(name):
    c = MERGE_STRATEGIES.get(name)([3, 0, 5], _profile((torch.rand(8) + 0.01).tolist(), fisher=True))
    if isinstance(c, dict):
        assert all(torch.allclose(v.sum(0), torch.ones((), dtype=v.dtype)) for v in c.values())
        return
    assert float(c.sum()) == pytest.approx(1.0)
    assert (c >= 0).all()


def test_zero_usage_falls_back_to_uniform():
    c = MERGE_STRATEGIES.get("frequency")([0, 1], _profile([0.0] * 4))
    assert torch.allclose(c, torch.tensor([0.5, 0.5], dtype=c.dtype))


def test_frequency_weights_follow_usage():
    c = MERGE_STRATEGIES.get("frequency")([0, 1], _profile([0.3, 0.1]))
    assert torch.allclose(c.float(), torch.tensor([0.75, 0.25]))


def test_unnormalised_coefficients_rejected():
    with pytest.raises(ValueError, match="must sum to 1"):
        merge_expert_weights([{"w": torch.ones(2)}] * 2, torch.tensor([0.5, 0.6]))


def test_merging_copies_of_one_expert_keeps_outputs(tiny_model, batch):
    adapter = adapter_for(tiny_model)
    layer = adapter.sparse_layers(tiny_model)[1]
    for e in range(1, 8):  # every expert of the layer becomes a copy of expert 0 or 4
        adapter.set_expert_weights(layer, e, adapter.expert_weights(layer, 0 if e < 4 else 4))
    before = logits(tiny_model, batch)
    groups = _groups(tiny_model, {layer.name: [[0, 1, 2, 3], [4, 5, 6, 7]]})
    merge_model(tiny_model, adapter, groups, profiles_for([layer.name]), "frequency")
    assert isinstance(tiny_model.get_submodule(layer.name), MergedSwitchSparseMLP)
    assert torch.allclose(logits(tiny_model, batch), before, atol=1e-5)


def test_tokens_of_any_member_go_to_group_expert(tiny_model):
    adapter = adapter_for(tiny_model)
    layer = adapter.sparse_layers(tiny_model)[2]
    groups = _groups(tiny_model, {layer.name: [[2, 0, 1], [5, 3, 4, 6, 7]]})
    merge_model(tiny_model, adapter, groups, profiles_for([layer.name]), "uniform")
    merged = tiny_model.get_submodule(layer.name)
    assert merged.expert_map.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert len(merged.experts) == 2


def test_merged_checkpoint_smaller_and_reloads(tiny_model, batch, tmp_path):
    adapter = adapter_for(tiny_model)
    save_model(tiny_model, tmp_path / "full")
    names = [ly.name for ly in adapter.sparse_layers(tiny_model)][1:]
    groups = _groups(tiny_model, {n: [[0, 1, 2, 3], [4, 5, 6, 7]] for n in names})
    merge_model(tiny_model, adapter, groups, profiles_for(names), "frequency")
    save_model(tiny_model, tmp_path / "merged", params={"merge": {"strategy": "frequency"}})
    assert bytes_on_disk(tmp_path / "merged") < bytes_on_disk(tmp_path / "full")
    reloaded = load_model(tmp_path / "merged")
    assert torch.allclose(logits(reloaded, batch), logits(tiny_model, batch), atol=1e-5)
    assert count_unique_params(reloaded) == count_unique_params(tiny_model)
    assert (tmp_path / "merged" / "params.yaml").is_file()


def test_unknown_strategy_lists_choices(tiny_model):
    with pytest.raises(UnknownChoiceError, match="valid choices: fisher, frequency, uniform"):
        merge_model(tiny_model, adapter_for(tiny_model), {"layers": {}}, {}, "ties")
