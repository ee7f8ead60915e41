"""Baseline grouping methods of equal budget (REAP, HC-SMoE, task-specific) and the profile
statistics they need: per-expert output sums (HC-SMoE) and REAP saliency."""

from __future__ import annotations

import copy
import itertools
import json
import weakref

import pytest
import torch
from scipy.cluster.hierarchy import cut_tree, linkage

import pipeline.profiling as profiling
from pipeline.data import batches
from pipeline.families import ADAPTERS, ModelStructureError, adapter_for
from pipeline.grouping import (
    GROUPING_METHODS,
    SIMILARITIES,
    GroupingMethod,
    LayerData,
    average_linkage_clusters,
    dominant_budget,
    group_experts,
    group_layer,
    validate_groups,
)
from pipeline.modeling import build_model
from pipeline.profiling import expert_output_sums, load_profile, profile_routing, save_profile
from pipeline.registry import UnknownChoiceError
from tests.conftest import PAD_ID, TINY_MIXTRAL

CPU = torch.device("cpu")
MIXTRAL = {**TINY_MIXTRAL, "num_local_experts": 6}


def _mixtral(seed: int = 0):
    # Router std 1.0: decisive top-2 choices, so float noise cannot flip a selection.
    return build_model("mixtral", MIXTRAL, 96, 0, 1, 1.0, seed).eval()


def _lm_rows(n: int = 10, seed: int = 0) -> list[dict]:
    """Causal-LM rows of varying length, so batches carry padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(2, 96, (4 + i % 5,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": ids, "label": 0})
    return out


def _direct_statistics(model, rows, batch_size: int, stacks: tuple[str, ...]):
    """Per SMoE layer of ``stacks``: every expert run on every non-padding token, independently of
    the profiler. Returns layer -> (mean output [N, H], REAP score [N], counts [N])."""
    adapter = adapter_for(model)
    layers = [ly for ly in adapter.sparse_layers(model) if ly.stack in stacks]
    seen = {ly.name: [] for ly in layers}

    def hook(_m, inputs, output, name):
        seen[name].append((inputs[0].detach().clone(), output))

    handles = [
        adapter.router(ly).register_forward_hook(lambda m, i, o, n=ly.name: hook(m, i, o, n)) for ly in layers
    ]
    masks = []
    try:
        with torch.no_grad():
            for batch in batches(rows, batch_size, PAD_ID):
                masks.append(batch["attention_mask"].bool().reshape(-1))
                model(**adapter.task_inputs(model, batch))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for ly in layers:
        n = adapter.num_experts(ly)
        xs, gates, chosen = [], [], []
        for (x, output), keep in zip(seen[ly.name], masks, strict=True):
            xs.append(x.reshape(-1, x.shape[-1])[keep])
            if adapter.model_type == "switch_transformers":
                dispatch = output[0].reshape(-1, n)[keep]
                chosen.append(dispatch.bool())
                gates.append(dispatch.float())  # top-1: the renormalised gate of the choice is 1
            else:
                _logits, scores, idx = output  # Mixtral's own renormalised top-k weights
                idx, scores = idx[keep], scores[keep]
                g = torch.zeros(len(idx), n).scatter_(1, idx, scores.float())
                gates.append(g)
                chosen.append(g > 0)
        x, gate, sel = torch.cat(xs), torch.cat(gates), torch.cat(chosen)
        means, scores = [], []
        for e in range(n):
            if adapter.model_type == "switch_transformers":
                y = ly.module.experts[f"expert_{e}"](x)
            else:  # the stock fused forward with expert e as the only choice, weight 1
                y = ly.module.experts(x, torch.full((len(x), 1), e), torch.ones(len(x), 1))
            means.append(y.mean(0))
            norms = y.norm(dim=-1)
            scores.append((gate[:, e] * norms)[sel[:, e]].mean() if sel[:, e].any() else torch.tensor(0.0))
        out[ly.name] = (torch.stack(means), torch.stack(scores), sel.sum(0).float())
    return out


# ---------------------------------------------------------------- profile statistics


def test_switch_output_mean_and_reap_score_match_a_direct_computation(tiny_model, rows):
    prof = profile_routing(tiny_model, rows, PAD_ID, 16, CPU, expert_outputs=True)
    direct = _direct_statistics(tiny_model, rows, 16, ("encoder",))
    assert direct
    for name, (mean, score, counts) in direct.items():
        p = prof[name]
        torch.testing.assert_close(p.counts, counts)
        torch.testing.assert_close(p.output_mean, mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(p.reap_score, score, atol=1e-5, rtol=1e-4)


def test_mixtral_reap_weights_are_the_renormalised_top_k_gates():
    model, rows = _mixtral(), _lm_rows()
    prof = profile_routing(model, rows, 0, 4, CPU, expert_outputs=True)
    direct = _direct_statistics(model, rows, 4, ("decoder",))
    for name, (mean, score, counts) in direct.items():
        p = prof[name]
        torch.testing.assert_close(p.counts, counts)
        assert p.output_sum.shape == (6, 32) and p.reap_sum.shape == (6,)
        torch.testing.assert_close(p.output_mean, mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(p.reap_score, score, atol=1e-5, rtol=1e-4)


def test_reap_numerator_by_hand_on_planted_top2_routing():
    model = _mixtral()
    adapter = adapter_for(model)
    layer = adapter.sparse_layers(model)[0]
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    logits = torch.tensor(
        [
            [2.0, 1.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 3.0, 3.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.0, 0.5, 0.0],
            [1.0, 0.0, 0.0, 0.0, 0.0, 2.0],
            [0.0, 0.0, 4.0, 0.0, 0.0, 1.0],
        ]
    )
    dispatch = torch.zeros(5, 6)
    for t, pair in enumerate([(0, 1), (1, 2), (3, 4), (0, 5), (2, 5)]):
        dispatch[t, list(pair)] = 1
    out_sum, reap_sum = expert_output_sums(adapter, layer, x, dispatch, logits)
    with torch.no_grad():
        y = [adapter.expert_output(layer, e, x) for e in range(6)]
    expected = torch.zeros(6)
    for t, pair in enumerate([(0, 1), (1, 2), (3, 4), (0, 5), (2, 5)]):
        a, b = (float(logits[t, e]) for e in pair)
        # softmax restricted to the two chosen experts = their renormalised probabilities
        ga, gb = 1 / (1 + torch.exp(torch.tensor(b - a))), 1 / (1 + torch.exp(torch.tensor(a - b)))
        expected[pair[0]] += ga * y[pair[0]][t].norm()
        expected[pair[1]] += gb * y[pair[1]][t].norm()
    torch.testing.assert_close(reap_sum, expected)
    torch.testing.assert_close(out_sum, torch.stack([v.sum(0) for v in y]))


def test_reap_drops_the_experts_with_small_outputs(tiny_model, rows):
    # Every expert the same function up to an output scale: the scales decide REAP's ranking.
    adapter = adapter_for(tiny_model)
    layer = adapter.sparse_layers(tiny_model)[1]
    scales = [1.0, 1e3, 1e-2, 1e2, 1e-1, 1e4, 1e-3, 10.0]
    w0 = adapter.expert_weights(layer, 0)
    for e, s in enumerate(scales):
        adapter.set_expert_weights(layer, e, {"wi": w0["wi"], "wo": w0["wo"] * s})
    p = profile_routing(tiny_model, rows, PAD_ID, 16, CPU, expert_outputs=True)[layer.name]
    used = [e for e in range(8) if p.counts[e] > 0]
    assert len(used) >= 6
    score = p.reap_score
    assert all(score[e] == 0 for e in range(8) if e not in used)
    by_scale = sorted(used, key=lambda e: -scales[e])
    assert sorted(used, key=lambda e: -float(score[e])) == by_scale
    d = LayerData(layer.name, p.router_logits, adapter.router_weight(layer), [], reap_score=score)
    groups, _ = GROUPING_METHODS.get("reap").fn(d, 3, SIMILARITIES.get("router-logits"))
    assert [g[0] for g in groups] == by_scale[:3]
    assert sorted(e for g in groups for e in g) == list(range(8))


def test_expert_outputs_are_saved_and_loaded(tiny_model, rows, tmp_path):
    prof = profile_routing(tiny_model, rows[:8], PAD_ID, 8, CPU, expert_outputs=True)
    save_profile(prof, tmp_path)
    back = load_profile(tmp_path, tiny_model)
    for name, p in prof.items():
        torch.testing.assert_close(back[name].output_sum, p.output_sum)
        torch.testing.assert_close(back[name].reap_score, p.reap_score)
    plain = profile_routing(tiny_model, rows[:8], PAD_ID, 8, CPU)
    assert all(
        p.output_sum is None and p.output_mean is None and p.reap_score is None for p in plain.values()
    )
    save_profile(plain, tmp_path)
    assert all(p.reap_sum is None for p in load_profile(tmp_path).values())


def test_expert_outputs_run_one_expert_on_one_chunk_at_a_time(tiny_model, rows, monkeypatch):
    """Bounded memory: at most one expert's output for at most a chunk of rows exists at a time.

    (tracemalloc cannot see tensor storage, which torch allocates outside Python's allocator, so
    the test watches the tensors instead.)"""
    reference = profile_routing(tiny_model, rows, PAD_ID, 48, CPU, expert_outputs=True)
    adapter = adapter_for(tiny_model)
    original = type(adapter).expert_output
    alive: weakref.WeakSet = weakref.WeakSet()
    most_alive, most_rows = [0], [0]

    def spy(self, layer, idx, x):
        most_alive[0] = max(most_alive[0], len(alive))
        most_rows[0] = max(most_rows[0], x.shape[0])
        y = original(self, layer, idx, x)
        alive.add(y)
        return y

    monkeypatch.setattr(type(adapter), "expert_output", spy)
    monkeypatch.setattr(profiling, "EXPERT_CHUNK", 16)
    chunked = profile_routing(tiny_model, rows, PAD_ID, 48, CPU, expert_outputs=True)
    assert most_rows[0] == 16  # a 48-row batch holds far more than 16 non-padding tokens
    assert most_alive[0] <= 1  # the previous call's output may linger until reassigned, no more
    for name, p in chunked.items():
        torch.testing.assert_close(p.output_sum, reference[name].output_sum, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(p.reap_sum, reference[name].reap_sum, atol=1e-4, rtol=1e-5)


def test_expert_output_is_the_same_function_after_merging_and_compressing(tiny_model):
    from pipeline.merging import merge_model

    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(0))
    for model in (tiny_model, _mixtral()):
        adapter = adapter_for(model)
        layer = adapter.sparse_layers(model)[-1]
        n = adapter.num_experts(layer)
        with torch.no_grad():
            before = [adapter.expert_output(layer, e, x) for e in range(n)]
            groups = {"layers": {layer.name: {"merged": True, "groups": [[e] for e in range(n)]}}}
            profile = profiling.LayerProfile(layer.name, torch.ones(n), n, torch.zeros(n, n))
            merge_model(model, adapter, groups, {layer.name: profile}, "uniform")
            layer = next(ly for ly in adapter.sparse_layers(model) if ly.name == layer.name)
            assert adapter.merged_routing(layer) is not None
            merged = [adapter.expert_output(layer, e, x) for e in range(n)]
            adapter.compress_layer(layer, 4)
            compressed = [adapter.expert_output(layer, e, x) for e in range(n)]
        for e in range(n):
            torch.testing.assert_close(merged[e], before[e], atol=1e-5, rtol=1e-4)
            assert compressed[e].shape == before[e].shape  # low-rank + sparse: a different function


def test_a_family_without_expert_outputs_says_so():
    with pytest.raises(ModelStructureError, match="'bert' cannot run a single expert"):
        ADAPTERS.get("bert").expert_output(None, 0, torch.zeros(1, 4))


# ---------------------------------------------------------------- HC-SMoE: average linkage

# On a line: B, C, D chain, A and E hang off either end. Average linkage joins B-C (1), then D
# (mean distance 5.5), then A (mean 31/3 < E's 32/3): {A, B, C, D} | {E}. Single and complete
# linkage join E third (min 7 < 8, max 13 < 14): {A} | {B, C, D, E}; the least-squares split
# (k-means' optimum) is {A, B, C} | {D, E}.
LINE = torch.tensor([5.0, 13.0, 14.0, 19.0, 26.0])


def _partition(labels) -> list[list[int]]:
    out: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        out.setdefault(int(lab), []).append(i)
    return sorted(out.values())


def test_average_linkage_differs_from_single_complete_and_k_means():
    # Rotated into 3-D: Euclidean clustering sees only distances.
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))
    points = torch.stack([LINE, torch.zeros(5), torch.zeros(5)], 1) @ q.T
    assert average_linkage_clusters(points, 2) == [[0, 1, 2, 3], [4]]
    for method in ("single", "complete"):
        labels = cut_tree(linkage(points.double().numpy(), method=method), n_clusters=2).ravel()
        assert _partition(labels) == [[0], [1, 2, 3, 4]]

    def sse(part):
        return sum(float(((LINE[c] - LINE[c].mean()) ** 2).sum()) for c in part)

    splits = [
        [list(a), [i for i in range(5) if i not in a]]
        for r in (1, 2)
        for a in itertools.combinations(range(5), r)
    ]
    assert sorted(min(splits, key=sse)) == [[0, 1, 2], [3, 4]]


def test_average_linkage_recovers_planted_clusters_and_matches_cut_tree():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 20
    planted = [[0, 4, 7], [1, 2, 5, 8], [3, 6]]
    points = torch.zeros(9, 16)
    for c, members in enumerate(planted):
        for e in members:
            points[e] = centres[c] + torch.randn(16, generator=g) * 0.1
    assert average_linkage_clusters(points, 3) == planted
    labels = cut_tree(linkage(points.double().numpy(), method="average"), n_clusters=3).ravel()
    assert _partition(labels) == planted
    for k in range(1, 10):
        clusters = average_linkage_clusters(points, k)
        assert len(clusters) == k and sorted(e for c in clusters for e in c) == list(range(9))


def test_hc_smoe_leaders_are_the_most_used_members_and_lead_in_usage_order():
    g = torch.Generator().manual_seed(0)
    planted = [[0, 4, 7], [1, 2, 5], [3, 6]]
    out = torch.zeros(8, 4)
    for members in planted:
        out[members] = torch.randn(4, generator=g) * 10
    freq = torch.tensor([0.10, 0.05, 0.30, 0.20, 0.10, 0.05, 0.02, 0.18])
    d = LayerData("l", torch.zeros(4, 8), torch.zeros(8, 4), [], frequency=freq, output_mean=out)
    groups, sim = GROUPING_METHODS.get("hc-smoe").fn(d, 3, SIMILARITIES.get("random"))
    # Leaders: 7 (0.18) in {0, 4, 7}, 2 (0.30) in {1, 2, 5}, 3 (0.20) in {3, 6}; tie 0/4 irrelevant.
    assert groups == [[2, 1, 5], [3, 6], [7, 0, 4]]
    assert sim is None
    tied = LayerData("l", torch.zeros(4, 8), torch.zeros(8, 4), [], frequency=torch.ones(8), output_mean=out)
    groups, _ = GROUPING_METHODS.get("hc-smoe").fn(tied, 3, SIMILARITIES.get("random"))
    assert groups == [[0, 4, 7], [1, 2, 5], [3, 6]]  # ties: the lower index leads, and goes first


# ---------------------------------------------------------------- group_experts with methods

NAMES = ["a", "b", "c"]


def _data(name: str, seed: int, n: int = 8, stats: bool = True) -> LayerData:
    g = torch.Generator().manual_seed(seed)
    experts = [{"wi": torch.randn(6, 4, generator=g), "wo": torch.randn(4, 6, generator=g)} for _ in range(n)]
    return LayerData(
        name,
        torch.randn(40, n, generator=g),
        torch.randn(n, 4, generator=g),
        experts,
        seed=seed,
        feature_mean=torch.randn(n, 4, generator=g),
        output_mean=torch.randn(n, 4, generator=g) if stats else None,
        reap_score=torch.rand(n, generator=g) if stats else None,
    )


def _freqs(seed: int = 0, n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(n, generator=g) for name in NAMES}


def _before(layer_data, frequencies, merge_layers, num_experts_avg, similarity, ratio, norm, allow_unused):
    """group_experts as it was before grouping methods (the paper's M-SMoE), for comparison."""
    sim_fn = SIMILARITIES.get(similarity)
    budget = dominant_budget(
        {n: frequencies[n] for n in merge_layers}, num_experts_avg, ratio, norm, allow_unused
    )
    layers = {}
    for name, freq in frequencies.items():
        if name in budget:
            sim = sim_fn(layer_data[name])
            layers[name] = {
                "merged": True,
                "groups": group_layer(freq, sim, budget[name]),
                "similarity": [[round(x, 5) for x in r] for r in sim.tolist()],
            }
        else:
            layers[name] = {"merged": False, "groups": [[e] for e in range(len(freq))]}
    return {
        "similarity": similarity,
        "ratio": ratio,
        "frequency_norm": norm,
        "num_experts_avg": num_experts_avg,
        "dominant_experts": sum(budget.values()),
        "budget_unspent": num_experts_avg * len(budget) - sum(budget.values()),
        "layers": layers,
    }


@pytest.mark.parametrize("similarity", ["router-logits", "expert-weight", "expert-feature", "random"])
@pytest.mark.parametrize("ratio, norm, unused", [("adaptive", "sum-top1", False), ("uniform", "max", True)])
def test_m_smoe_groups_are_unchanged(similarity, ratio, norm, unused):
    data = {n: _data(n, i) for i, n in enumerate(NAMES)}
    freqs = _freqs(1)
    freqs["b"][5:] = 0  # unused experts, so dominant_unused matters
    old = _before(data, freqs, NAMES[1:], 3, similarity, ratio, norm, unused)
    new = group_experts(data, freqs, NAMES[1:], 3, similarity, ratio, norm, unused)
    assert new.pop("method") == "m-smoe"
    for spec in new["layers"].values():
        if spec["merged"]:
            assert spec.pop("budget") == len(spec["groups"])
    assert json.dumps(new, indent=1) == json.dumps(old, indent=1)


@pytest.mark.parametrize("method", ["reap", "hc-smoe", "task-specific"])
def test_every_method_records_its_budget_and_covers_every_expert(method):
    data = {n: _data(n, i) for i, n in enumerate(NAMES)}
    freqs = _freqs(2)
    groups = group_experts(data, freqs, NAMES[1:], 3, "router-logits", "adaptive", method=method)
    validate_groups(groups, dict.fromkeys(NAMES, 8))
    assert groups["method"] == method
    assert groups["layers"]["a"] == {"merged": False, "groups": [[e] for e in range(8)]}
    budgets = dominant_budget({n: freqs[n] for n in NAMES[1:]}, 3, "adaptive")
    for name in NAMES[1:]:
        spec = groups["layers"][name]
        assert spec["merged"] and spec["budget"] == budgets[name]
        expected = 8 if method == "task-specific" else budgets[name]
        assert len(spec["groups"]) == expected


def test_reap_leaders_are_the_top_scores_and_members_join_the_most_similar():
    d = _data("a", 0)
    d.reap_score = torch.tensor([0.5, 0.9, 0.1, 0.9, 0.0, 0.3, 0.7, 0.2])
    groups = group_experts(
        {"a": d}, {"a": torch.rand(8)}, ["a"], 3, "router-weight", "uniform", method="reap"
    )
    spec = groups["layers"]["a"]
    leaders = [g[0] for g in spec["groups"]]
    assert leaders == [1, 3, 6]  # 0.9 tie: the lower index first
    sim = torch.tensor(spec["similarity"])
    for g in spec["groups"]:
        for e in g[1:]:
            assert g[0] == max(leaders, key=lambda lead: (float(sim[e, lead]), -leaders.index(lead)))


def test_a_method_that_misses_the_budget_is_an_error(monkeypatch):
    def one_group(d, k, sim_fn):
        return [list(range(len(d.frequency)))], None

    monkeypatch.setitem(GROUPING_METHODS._items, "lumper", GroupingMethod(one_group))
    data = {n: _data(n, i) for i, n in enumerate(NAMES)}
    with pytest.raises(ValueError, match="group.method=lumper gave layer a 1 groups, but its budget is 2"):
        group_experts(data, _freqs(), NAMES, 2, "router-logits", "uniform", method="lumper")


@pytest.mark.parametrize("method, field", [("reap", "reap_score"), ("hc-smoe", "output_mean")])
def test_missing_expert_output_statistics_are_explained(method, field):
    data = {n: _data(n, i, stats=False) for i, n in enumerate(NAMES)}
    with pytest.raises(ValueError, match=f"group.method={method} needs profile.expert_outputs: true") as err:
        group_experts(data, _freqs(), NAMES, 2, "router-logits", method=method)
    assert "\n" not in str(err.value) and field in str(err.value)


def test_unknown_method_lists_valid_choices():
    assert {"hc-smoe", "m-smoe", "reap", "task-specific"} <= set(GROUPING_METHODS.names())
    with pytest.raises(UnknownChoiceError, match="valid choices: " + ", ".join(GROUPING_METHODS.names())):
        group_experts({}, {}, [], 1, "router-logits", method="vibes")


def test_groups_from_a_real_profile_for_every_method(tiny_model, rows):
    adapter = adapter_for(tiny_model)
    layers = adapter.sparse_layers(tiny_model)
    prof = profile_routing(copy.deepcopy(tiny_model), rows, PAD_ID, 16, CPU, expert_outputs=True)
    data = {
        ly.name: LayerData(
            ly.name,
            prof[ly.name].router_logits,
            adapter.router_weight(ly),
            [adapter.expert_weights(ly, e) for e in range(8)],
            frequency=prof[ly.name].frequency,
            output_mean=prof[ly.name].output_mean,
            reap_score=prof[ly.name].reap_score,
        )
        for ly in layers
    }
    freqs = {n: p.frequency for n, p in prof.items()}
    names = [ly.name for ly in layers[1:]]
    for method in GROUPING_METHODS.names():
        groups = group_experts(data, freqs, names, 2, "router-logits", "uniform", method=method)
        validate_groups(groups, {ly.name: 8 for ly in layers})
        for n in names:
            assert len(groups["layers"][n]["groups"]) == (8 if method == "task-specific" else 2)
