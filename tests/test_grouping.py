import pytest
import torch

from pipeline.adapters import adapter_for
from pipeline.grouping import (
    SIMILARITIES,
    LayerData,
    dominant_budget,
    group_experts,
    group_layer,
    merged_layer_names,
    validate_groups,
)


def _data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    experts = [{"wi": torch.randn(6, 4, generator=g), "wo": torch.randn(4, 6, generator=g)} for _ in range(n)]
    grads = {
        f"{e}::{k}": torch.randn(v.shape, generator=g) for e in range(n - 1) for k, v in experts[e].items()
    }
    return LayerData(
        "l",
        torch.randn(50, n, generator=g),
        torch.randn(n, 4, generator=g),
        experts,
        seed=seed,
        feature_mean=torch.randn(n, 4, generator=g),
        feature_abs_mean=torch.rand(n, 4, generator=g),
        feature_norm=torch.rand(n, 4, generator=g),
        gradients=grads,  # the last expert got no token, so no gradient
    )


def test_budget_sums_to_total_and_each_layer_keeps_one():
    freqs = {
        "a": torch.tensor([0.9, 0.05, 0.05, 0.0]),
        "b": torch.tensor([0.3, 0.3, 0.2, 0.2]),
        "c": torch.tensor([1.0, 0, 0, 0]),
    }
    budget = dominant_budget(freqs, 2, "adaptive")
    assert sum(budget.values()) == 6
    assert all(v >= 1 for v in budget.values())
    assert budget["b"] == 4  # the evenly used layer keeps the most


def test_uniform_routing_makes_every_expert_dominant():
    freqs = {"a": torch.full((4,), 0.25), "b": torch.tensor([0.7, 0.3, 0, 0])}
    budget = dominant_budget(freqs, 3, "adaptive")
    assert budget == {"a": 4, "b": 2}


def test_uniform_ratio_gives_same_count_everywhere():
    freqs = {"a": torch.rand(8), "b": torch.rand(8)}
    assert dominant_budget(freqs, 3, "uniform") == {"a": 3, "b": 3}


def test_budget_larger_than_experts_is_an_error():
    with pytest.raises(ValueError, match="num_experts_avg=5 x 1 merged layers = 5 dominant experts"):
        dominant_budget({"a": torch.rand(4)}, 5)


def test_skip_first_layer_keeps_its_experts():
    layers = [("encoder.block.1", "encoder"), ("encoder.block.3", "encoder"), ("decoder.block.1", "decoder")]
    assert merged_layer_names(layers, True, "both") == ["encoder.block.3", "decoder.block.1"]
    assert merged_layer_names(layers, False, "decoder") == ["decoder.block.1"]
    assert merged_layer_names(layers, True, "encoder") == ["encoder.block.3"]
    data = {n: _data(seed=i) for i, (n, _) in enumerate(layers)}
    freqs = {n: torch.rand(8) for n, _ in layers}
    groups = group_experts(data, freqs, merged_layer_names(layers, True, "both"), 2, "router-logits")
    assert groups["layers"]["encoder.block.1"]["groups"] == [[e] for e in range(8)]
    assert not groups["layers"]["encoder.block.1"]["merged"]
    validate_groups(groups, {n: 8 for n, _ in layers})
    kept = sum(len(groups["layers"][n]["groups"]) for n in ("encoder.block.3", "decoder.block.1"))
    assert kept == 4


def test_validate_groups_rejects_missing_or_duplicate_experts():
    bad = {"layers": {"a": {"groups": [[0, 1], [1, 2]]}}}
    with pytest.raises(ValueError, match="exactly once"):
        validate_groups(bad, {"a": 4})


@pytest.mark.parametrize("name", SIMILARITIES.names())
def test_similarities_are_symmetric_with_unit_diagonal(name):
    sim = SIMILARITIES.get(name)(_data())
    assert sim.shape == (8, 8)
    assert torch.allclose(sim, sim.T, atol=1e-6)
    assert torch.allclose(sim.diagonal(), torch.ones(8), atol=1e-6)


def test_random_similarity_is_seeded():
    f = SIMILARITIES.get("random")
    assert torch.equal(f(_data(seed=1)), f(_data(seed=1)))
    assert not torch.equal(f(_data(seed=1)), f(_data(seed=2)))


def test_members_join_most_similar_dominant():
    freq = torch.tensor([0.5, 0.3, 0.1, 0.1])
    sim = torch.eye(4)
    sim[2, 1] = sim[1, 2] = 0.9
    sim[3, 0] = sim[0, 3] = 0.8
    assert group_layer(freq, sim, 2) == [[0, 3], [1, 2]]


def test_groups_of_tiny_model_cover_all_experts(tiny_model):
    adapter = adapter_for(tiny_model)
    layers = adapter.sparse_layers(tiny_model)
    data = {ly.name: _data(seed=ly.position) for ly in layers}
    freqs = {ly.name: torch.rand(8) for ly in layers}
    names = merged_layer_names([(ly.name, ly.stack) for ly in layers], True, "both")
    groups = group_experts(data, freqs, names, 2, "router-logits", "uniform")
    validate_groups(groups, {ly.name: 8 for ly in layers})


@pytest.mark.parametrize(
    "name", ["expert-feature", "expert-feature-abs", "expert-weight-feature", "expert-gradient"]
)
def test_profile_based_similarity_without_profile_data_is_explained(name):
    d = _data()
    d.feature_mean = d.feature_abs_mean = d.feature_norm = d.gradients = None
    with pytest.raises(ValueError, match=f"group.similarity={name} needs"):
        SIMILARITIES.get(name)(d)
