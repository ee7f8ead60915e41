"""Grouping: the global dominant-expert budget, layer selection, similarities and group assignment."""

import pytest
import torch

from pipeline.config import GroupParams
from pipeline.families import adapter_for
from pipeline.grouping import (
    SIMILARITIES,
    LayerData,
    dominant_budget,
    group_experts,
    group_layer,
    group_model,
    layer_data,
    merged_layer_names,
    normalised_frequency,
    validate_groups,
)
from pipeline.profiling import profile_routing
from pipeline.registry import UnknownChoiceError
from tests.conftest import N_EXPERTS, PAD_ID

# Similarities built on cosine_matrix (every one but "random").
COSINE = [n for n in SIMILARITIES.names() if n != "random"]
LAYERS = [
    ("encoder.block.1.layer.1.mlp", "encoder"),
    ("encoder.block.3.layer.1.mlp", "encoder"),
    ("decoder.block.1.layer.2.mlp", "decoder"),
]


def _data(n=8, seed=0, name="l"):
    g = torch.Generator().manual_seed(seed)
    experts = [{"wi": torch.randn(6, 4, generator=g), "wo": torch.randn(4, 6, generator=g)} for _ in range(n)]
    grads = {
        f"{e}::{k}": torch.randn(v.shape, generator=g) for e in range(n - 1) for k, v in experts[e].items()
    }
    return LayerData(
        name,
        torch.randn(50, n, generator=g),
        torch.randn(n, 4, generator=g),
        experts,
        seed=seed,
        feature_mean=torch.randn(n, 4, generator=g),
        feature_abs_mean=torch.rand(n, 4, generator=g),
        feature_norm=torch.rand(n, 4, generator=g),
        gradients=grads,  # the last expert got no token, so no gradient
    )


def _random_freqs(names, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(n, generator=g) for name in names}


# ---------------------------------------------------------------- dominant budget


@pytest.mark.parametrize("ratio", ["adaptive", "uniform"])
@pytest.mark.parametrize("avg", [1, 2, 3, 8])
@pytest.mark.parametrize("seed", range(3))
def test_budget_sums_to_avg_times_layers_and_each_layer_keeps_one(ratio, avg, seed):
    names = [f"layer{i}" for i in range(5)]
    freqs = _random_freqs(names, seed=seed)
    freqs["layer2"] = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0])  # collapsed routing
    budget = dominant_budget(freqs, avg, ratio)
    assert list(budget) == names
    assert sum(budget.values()) == avg * len(names)
    assert all(1 <= v <= 8 for v in budget.values())


def test_adaptive_budget_favours_evenly_used_layers():
    freqs = {
        "a": torch.tensor([0.9, 0.05, 0.05, 0.0]),
        "b": torch.tensor([0.3, 0.3, 0.2, 0.2]),
        "c": torch.tensor([1.0, 0, 0, 0]),
    }
    budget = dominant_budget(freqs, 2, "adaptive")
    assert budget == {"a": 1, "b": 4, "c": 1}


def test_uniform_routing_makes_every_expert_of_the_layer_dominant():
    # Layer "a" routes uniformly; layer "b" uses two experts. A budget of 3 per layer (6 in all)
    # lets every expert of "a" be dominant, since each has normalised frequency 1.
    freqs = {"a": torch.full((4,), 0.25), "b": torch.tensor([0.7, 0.3, 0.0, 0.0])}
    assert dominant_budget(freqs, 3, "adaptive") == {"a": 4, "b": 2}
    groups = group_experts(
        {n: _data(4, seed=i, name=n) for i, n in enumerate(freqs)}, freqs, list(freqs), 3, "router-logits"
    )
    assert groups["layers"]["a"]["groups"] == [[0], [1], [2], [3]]


def test_layer_nobody_uses_still_keeps_one_expert():
    freqs = {"busy": torch.tensor([0.4, 0.3, 0.2, 0.1, 0, 0, 0, 0]), "idle": torch.zeros(8)}
    assert dominant_budget(freqs, 2, "adaptive") == {"busy": 3, "idle": 1}
    f = normalised_frequency(torch.zeros(8))
    assert f.max() == 1.0 and int((f == 1.0).sum()) == 1


def test_each_layer_keeps_one_even_when_an_earlier_layer_has_tied_top_experts():
    freqs = {
        "a": torch.full((8,), 0.125),
        "b": torch.full((8,), 0.125),
        "c": torch.tensor([0.6, 0.4] + [0.0] * 6),
    }
    budget = dominant_budget(freqs, 1, "adaptive")
    assert sum(budget.values()) == 3
    assert all(v >= 1 for v in budget.values()), budget


def test_uniform_ratio_gives_same_count_everywhere():
    freqs = _random_freqs(["a", "b", "c"])
    freqs["c"] = torch.tensor([1.0] + [0.0] * 7)
    assert dominant_budget(freqs, 3, "uniform") == {"a": 3, "b": 3, "c": 3}


def test_budget_larger_than_experts_is_an_error():
    with pytest.raises(ValueError, match="num_experts_avg=5 x 1 merged layers = 5 dominant experts"):
        dominant_budget({"a": torch.rand(4)}, 5)


def test_unknown_ratio_is_an_error():
    with pytest.raises(ValueError, match="valid choices: adaptive, uniform"):
        dominant_budget({"a": torch.rand(4)}, 2, "greedy")


# ---------------------------------------------------------------- which layers are merged


def test_skip_first_layer_keeps_the_first_smoe_layer_out():
    first, second, dec = (n for n, _ in LAYERS)
    assert merged_layer_names(LAYERS, True, "both") == [second, dec]
    assert merged_layer_names(LAYERS, False, "both") == [first, second, dec]
    assert merged_layer_names(LAYERS, True, "encoder") == [second]
    assert merged_layer_names(LAYERS, False, "encoder") == [first, second]
    assert merged_layer_names(LAYERS, False, "decoder") == [dec]
    assert merged_layer_names([], True, "both") == []


def test_group_experts_gives_unmerged_layers_singleton_groups():
    data = {n: _data(seed=i, name=n) for i, (n, _) in enumerate(LAYERS)}
    freqs = _random_freqs([n for n, _ in LAYERS])
    names = merged_layer_names(LAYERS, True, "both")
    groups = group_experts(data, freqs, names, 2, "router-logits")
    first = LAYERS[0][0]
    assert groups["layers"][first] == {"merged": False, "groups": [[e] for e in range(8)]}
    for n in names:
        assert groups["layers"][n]["merged"]
    assert sum(len(groups["layers"][n]["groups"]) for n in names) == 2 * len(names)
    assert groups["similarity"] == "router-logits" and groups["num_experts_avg"] == 2
    validate_groups(groups, {n: 8 for n, _ in LAYERS})


# ---------------------------------------------------------------- validity of groups


@pytest.mark.parametrize("similarity", SIMILARITIES.names())
@pytest.mark.parametrize("ratio", ["adaptive", "uniform"])
def test_groups_cover_every_expert_exactly_once(similarity, ratio):
    data = {n: _data(seed=i, name=n) for i, (n, _) in enumerate(LAYERS)}
    freqs = _random_freqs([n for n, _ in LAYERS], seed=3)
    groups = group_experts(data, freqs, [n for n, _ in LAYERS], 3, similarity, ratio)
    validate_groups(groups, {n: 8 for n, _ in LAYERS})
    for spec in groups["layers"].values():
        members = [e for g in spec["groups"] for e in g]
        assert sorted(members) == list(range(8))
        assert all(g for g in spec["groups"])


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"a": {"groups": [[0, 1], [1, 2]]}}, "exactly once"),  # 1 twice, 3 missing
        ({"a": {"groups": [[0, 1, 2]]}}, "exactly once"),  # 3 missing
        ({"a": {"groups": [[0, 1], [2, 3, 4]]}}, "exactly once"),  # 4 out of range
        ({}, "miss layer a"),
    ],
)
def test_validate_groups_rejects_bad_groupings(bad, message):
    with pytest.raises(ValueError, match=message):
        validate_groups({"layers": bad}, {"a": 4})


def test_validate_groups_accepts_a_good_grouping():
    validate_groups({"layers": {"a": {"groups": [[2, 0], [3], [1]]}}}, {"a": 4})


# ---------------------------------------------------------------- similarities


@pytest.mark.parametrize("name", SIMILARITIES.names())
def test_similarities_are_symmetric_square(name):
    sim = SIMILARITIES.get(name)(_data())
    assert sim.shape == (8, 8)
    assert torch.isfinite(sim).all()
    assert torch.allclose(sim, sim.T, atol=1e-6)


@pytest.mark.parametrize("name", COSINE)
def test_cosine_similarities_have_unit_diagonal_and_bounded_values(name):
    sim = SIMILARITIES.get(name)(_data())
    assert torch.allclose(sim.diagonal(), torch.ones(8), atol=1e-6)
    assert (sim.abs() <= 1 + 1e-5).all()


def test_random_similarity_is_seeded():
    f = SIMILARITIES.get("random")
    assert torch.equal(f(_data(seed=1)), f(_data(seed=1)))
    assert not torch.equal(f(_data(seed=1)), f(_data(seed=2)))


def test_unknown_similarity_lists_choices():
    with pytest.raises(UnknownChoiceError, match="valid choices: " + ", ".join(SIMILARITIES.names())):
        group_experts({}, {}, [], 1, "vibes")


@pytest.mark.parametrize(
    "name", ["expert-feature", "expert-feature-abs", "expert-weight-feature", "expert-gradient"]
)
def test_profile_based_similarity_without_profile_data_is_explained(name):
    d = _data()
    d.feature_mean = d.feature_abs_mean = d.feature_norm = d.gradients = None
    with pytest.raises(ValueError, match=f"group.similarity={name} needs"):
        SIMILARITIES.get(name)(d)


# ---------------------------------------------------------------- assignment inside a layer


def test_members_join_most_similar_dominant():
    freq = torch.tensor([0.5, 0.3, 0.1, 0.1])
    sim = torch.eye(4)
    sim[2, 1] = sim[1, 2] = 0.9
    sim[3, 0] = sim[0, 3] = 0.8
    assert group_layer(freq, sim, 2) == [[0, 3], [1, 2]]


@pytest.mark.parametrize("seed", range(5))
def test_every_non_dominant_expert_sits_with_its_most_similar_dominant(seed):
    g = torch.Generator().manual_seed(seed)
    freq = torch.rand(8, generator=g)
    m = torch.rand(8, 8, generator=g)
    sim = (m + m.T) / 2
    sim.fill_diagonal_(1.0)
    k = 3
    groups = group_layer(freq, sim, k)
    dominant = torch.argsort(freq, descending=True)[:k].tolist()
    assert [grp[0] for grp in groups] == dominant  # leaders first, busiest first
    for grp in groups:
        for e in grp[1:]:
            assert e not in dominant
            assert grp[0] == max(dominant, key=lambda d: float(sim[e, d]))


def test_groups_from_a_real_routing_profile(tiny_model, rows):
    adapter = adapter_for(tiny_model)
    layers = adapter.sparse_layers(tiny_model)
    prof = profile_routing(tiny_model, rows, PAD_ID, 16, torch.device("cpu"))
    data = {ly.name: layer_data(adapter, ly, prof[ly.name], seed=ly.position) for ly in layers}
    for ly in layers:  # what the group stage gives the similarities: the layer as it is, its whole profile
        d = data[ly.name]
        assert torch.equal(d.router_weight, adapter.router(ly).classifier.weight)
        assert len(d.expert_weights) == N_EXPERTS and d.seed == ly.position
        assert torch.equal(d.feature_norm, prof[ly.name].feature_norm)
        assert torch.equal(d.frequency, prof[ly.name].frequency)
    names = merged_layer_names([(ly.name, ly.stack) for ly in layers], True, "both")
    freqs = {n: p.frequency for n, p in prof.items()}
    for similarity in ["router-logits", "router-weight", "expert-weight", "expert-feature"]:
        groups = group_experts(data, freqs, names, 2, similarity)
        validate_groups(groups, {ly.name: N_EXPERTS for ly in layers})
        assert not groups["layers"][layers[0].name]["merged"]
        sim = torch.tensor(groups["layers"][names[0]]["similarity"])
        assert sim.shape == (N_EXPERTS, N_EXPERTS)


def test_group_model_follows_the_group_section(tiny_model, rows):
    adapter = adapter_for(tiny_model)
    layers = adapter.sparse_layers(tiny_model)
    prof = profile_routing(tiny_model, rows, PAD_ID, 16, torch.device("cpu"))
    section = GroupParams(num_experts_avg=2, similarity="router-logits", ratio="uniform")
    groups = group_model(adapter, layers, prof, section, seed=3)
    names = merged_layer_names([(ly.name, ly.stack) for ly in layers], True, "both")
    data = {
        ly.name: layer_data(adapter, ly, prof[ly.name], seed=3 + ly.position)
        for ly in layers
        if ly.name in names
    }
    freqs = {n: p.frequency for n, p in prof.items()}
    assert groups == group_experts(data, freqs, names, 2, "router-logits", "uniform", "sum-top1", False)
    assert [len(groups["layers"][n]["groups"]) for n in names] == [2] * len(names)
    # Only the first SMoE layer, which is kept: nothing is left to merge.
    with pytest.raises(ValueError, match="no SMoE layer left to merge with group.layers=both"):
        group_model(adapter, layers[:1], prof, section, seed=0)
