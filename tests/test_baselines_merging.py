"""Baseline merges of MC-SMoE's Table 2: dominant-expert pruning, ZipIt, and REPAIR after merging."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.align import activation_matching_permutation
from pipeline.compression import compress_model, finalize_compact
from pipeline.families import ModelStructureError, adapter_for
from pipeline.families.switch import SwitchAdapter
from pipeline.merging import (
    MERGE_STRATEGIES,
    REPAIRS,
    ZipIt,
    feature_correlation,
    merge_expert_weights,
    merge_model,
    repair_group,
    zipit_clusters,
)
from pipeline.modeling import STRUCTURE_FILE, build_model, load_model, save_model
from pipeline.moe import LowRankSparseLinear
from pipeline.profiling import LayerProfile
from pipeline.registry import UnknownChoiceError
from pipeline.routing import set_router_mode
from tests.conftest import N_EXPERTS, TINY, TINY_MIXTRAL, logits

MIXTRAL = {**TINY_MIXTRAL, "num_local_experts": 4}
SWITCH_GROUPS = [[2, 0, 1], [5, 3, 4], [6], [7]]
MIXTRAL_GROUPS = [[1, 0], [2, 3]]


@pytest.fixture(scope="module")
def _mixtral():
    # Router std 1.0: decisive routing, so float-level changes cannot flip a top-k choice.
    return build_model("mixtral", MIXTRAL, 96, 0, 1, 1.0, 0).eval()


@pytest.fixture
def mixtral(_mixtral):
    return copy.deepcopy(_mixtral)


@pytest.fixture
def model(request, tiny_model, mixtral):
    """The tiny Switch or the tiny Mixtral, by the test's ``family`` parameter."""
    return tiny_model if request.param == "switch" else mixtral


def _ids() -> torch.Tensor:
    return torch.randint(2, 96, (3, 12), generator=torch.Generator().manual_seed(0))


def _outputs(model, batch) -> torch.Tensor:
    if adapter_for(model).model_type == "mixtral":
        with torch.no_grad():
            return model(input_ids=_ids()).logits
    return logits(model, batch)


def _profiles(model, seed: int = 0, positive: bool = False, tokens: int = 96) -> dict[str, LayerProfile]:
    """Random usage counts and random calibration inputs for every SMoE layer."""
    adapter = adapter_for(model)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for ly in adapter.sparse_layers(model):
        n = adapter.num_experts(ly)
        hidden = adapter.expert_weights(ly, 0)["wi" if "wi" in adapter.neuron_axes else "gate"].shape[1]
        counts = torch.randint(1, 50, (n,), generator=g).float()
        x = torch.randn(tokens, hidden, generator=g)
        p = LayerProfile(ly.name, counts, int(counts.sum()), torch.zeros(1, n))
        p.inputs = x.abs() if positive else x
        out[ly.name] = p
    return out


def _groups(model, groups: list[list[int]]) -> dict:
    adapter = adapter_for(model)
    return {"layers": {ly.name: {"merged": True, "groups": groups} for ly in adapter.sparse_layers(model)}}


def _groups_of(model) -> list[list[int]]:
    return SWITCH_GROUPS if adapter_for(model).model_type != "mixtral" else MIXTRAL_GROUPS


def _preacts(adapter, weights: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pre-activations ``[T, F]`` (float64) of each pre-activation matrix of one expert."""
    out = {}
    for matrix, bias in adapter.preactivation_biases.items():
        z = x.double() @ weights[matrix].double().T
        out[matrix] = z + weights[bias].double() if bias in weights else z
    return out


# ------------------------------------------------------------------------------ dominant


def test_dominant_keeps_exactly_the_leaders_weights_and_prunes(tiny_model):
    adapter = adapter_for(tiny_model)
    layers = adapter.sparse_layers(tiny_model)
    before = {ly.name: [adapter.expert_weights(ly, e) for e in range(N_EXPERTS)] for ly in layers}
    routers = {ly.name: adapter.router_weight(ly).clone() for ly in layers}
    report = merge_model(
        tiny_model, adapter, _groups(tiny_model, SWITCH_GROUPS), _profiles(tiny_model), "dominant"
    )
    for ly in adapter.sparse_layers(tiny_model):
        shares = report[ly.name]["coefficients"]
        assert [c[str(grp[0])] for c, grp in zip(shares, SWITCH_GROUPS, strict=True)] == [1.0] * 4
        for g, members in enumerate(SWITCH_GROUPS):
            merged = adapter.expert_weights(ly, g)
            assert merged.keys() == {"wi", "wo"}
            assert all(torch.equal(merged[k], before[ly.name][members[0]][k]) for k in merged)
    # With the pruned router, only the leaders' router rows are left: one-shot expert pruning.
    set_router_mode(tiny_model, adapter, "prune")
    for ly in adapter.sparse_layers(tiny_model):
        leaders = torch.tensor([m[0] for m in SWITCH_GROUPS])
        assert torch.equal(adapter.router_weight(ly), routers[ly.name][leaders])
        assert adapter.num_experts(ly) == 4


def test_new_strategies_are_registered():
    assert {"dominant", "zipit"} <= set(MERGE_STRATEGIES.names())
    assert REPAIRS.names() == ["none", "repair"]


# ------------------------------------------------------------------------------ ZipIt


@pytest.mark.parametrize("model", ["switch", "mixtral"], indirect=True)
def test_zipit_of_identical_experts_returns_that_expert(model):
    adapter = adapter_for(model)
    groups = _groups_of(model)
    originals = {}
    for ly in adapter.sparse_layers(model):
        for members in groups:
            for e in members[1:]:
                adapter.set_expert_weights(ly, e, adapter.expert_weights(ly, members[0]))
        originals[ly.name] = [
            {k: v.clone() for k, v in adapter.expert_weights(ly, m[0]).items()} for m in groups
        ]
    report = merge_model(model, adapter, _groups(model, groups), _profiles(model), "zipit")
    for ly in adapter.sparse_layers(model):
        for g in range(len(groups)):
            merged = adapter.expert_weights(ly, g)
            assert merged.keys() == originals[ly.name][g].keys()
            assert all(torch.equal(merged[k], originals[ly.name][g][k]) for k in merged)
        f = next(iter(originals[ly.name][0].values())).shape[0]  # wi / gate: [F, H]
        for info, members in zip(report[ly.name]["strategy_info"], groups, strict=True):
            if len(members) > 1:  # every merged neuron zips one neuron of each copy
                assert info == {
                    "clusters_across_members": f,
                    "clusters_within_one_member": 0,
                    "singletons": 0,
                }


def test_zipit_of_permuted_twins_equals_the_aligned_average(tiny_model):
    adapter = adapter_for(tiny_model)
    layer = adapter.sparse_layers(tiny_model)[1]
    w0 = adapter.expert_weights(layer, 0)
    pi = torch.randperm(TINY["d_ff"], generator=torch.Generator().manual_seed(3))
    # Expert 1's neuron i computes expert 0's neuron pi[i]; its output columns are its own.
    adapter.set_expert_weights(layer, 1, {"wi": w0["wi"][pi], "wo": adapter.expert_weights(layer, 1)["wo"]})
    profiles = _profiles(tiny_model)
    groups = [[0, 1], *[[e] for e in range(2, N_EXPERTS)]]
    spec = {"layers": {layer.name: {"merged": True, "groups": groups}}}

    aligned = copy.deepcopy(tiny_model)
    a_layer = adapter.sparse_layers(aligned)[1]
    x = profiles[layer.name].inputs
    with torch.no_grad():
        perm = activation_matching_permutation(
            adapter.expert_activations(a_layer, 0, x), adapter.expert_activations(a_layer, 1, x)
        )
    assert torch.equal(pi[perm], torch.arange(TINY["d_ff"]))  # the planted permutation is found
    adapter.permute_expert(a_layer, 1, perm)
    expected = merge_expert_weights(
        [adapter.expert_weights(a_layer, e) for e in (0, 1)], torch.tensor([0.5, 0.5])
    )

    report = merge_model(tiny_model, adapter, spec, profiles, "zipit")
    merged = adapter.expert_weights(adapter.sparse_layers(tiny_model)[1], 0)
    assert torch.equal(merged["wi"], w0["wi"])
    assert all(torch.allclose(merged[k], expected[k], atol=1e-6) for k in expected)
    assert report[layer.name]["strategy_info"][0]["clusters_across_members"] == TINY["d_ff"]


def test_zipit_and_repair_never_nan_with_dead_neurons(tiny_model, batch):
    adapter = adapter_for(tiny_model)
    g = torch.Generator().manual_seed(1)
    for ly in adapter.sparse_layers(tiny_model):
        for e in range(N_EXPERTS):
            w = adapter.expert_weights(ly, e)
            wi = w["wi"].clone()
            wi[: 8 + e] = 0.0  # constant-zero neurons
            wi[20 : 24 + e] = -torch.rand(4 + e, wi.shape[1], generator=g)  # dead on positive inputs
            adapter.set_expert_weights(ly, e, {"wi": wi, "wo": w["wo"]})
    profiles = _profiles(tiny_model, positive=True)
    merge_model(tiny_model, adapter, _groups(tiny_model, SWITCH_GROUPS), profiles, "zipit", "repair")
    assert all(torch.isfinite(p).all() for p in tiny_model.parameters())
    assert torch.isfinite(logits(tiny_model, batch)).all()


def test_feature_correlation_of_constant_features():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    feats = torch.cat([x, torch.zeros(50, 1), torch.full((50, 1), 3.0), x[:, :1] * 2 + 1], dim=1)
    c = feature_correlation(feats)
    assert torch.isfinite(c).all()
    assert torch.allclose(c.diagonal(), torch.ones(7))
    assert c[4, 5] == 1.0 and (c[4, :4] == 0).all() and (c[5, :4] == 0).all()
    assert c[0, 6] == pytest.approx(1.0, abs=1e-6)


def test_zipit_clusters_gives_exactly_k_clusters_in_first_feature_order():
    g = torch.Generator().manual_seed(0)
    for feats in (torch.randn(40, 24, generator=g), torch.zeros(40, 24)):
        for k in (1, 5, 23, 24):
            labels = zipit_clusters(feats, k)
            assert sorted(set(labels.tolist())) == list(range(k))
            first = [labels.tolist().index(c) for c in range(k)]
            assert first == sorted(first)


def test_zipit_needs_profiled_inputs(tiny_model):
    adapter = adapter_for(tiny_model)
    profiles = _profiles(tiny_model)
    for p in profiles.values():
        p.inputs = None
    with pytest.raises(ValueError, match="merge.strategy=zipit needs the profiled layer inputs"):
        merge_model(tiny_model, adapter, _groups(tiny_model, SWITCH_GROUPS), profiles, "zipit")
    with pytest.raises(ValueError, match="merge.repair=repair needs the profiled layer inputs"):
        merge_model(tiny_model, adapter, _groups(tiny_model, SWITCH_GROUPS), profiles, "uniform", "repair")


# ------------------------------------------------------------------------------ REPAIR


@pytest.mark.parametrize(
    ("model", "strategy"),
    [("switch", "frequency"), ("switch", "uniform"), ("switch", "dominant"), ("mixtral", "frequency")],
    indirect=["model"],
)
def test_repair_restores_the_members_statistics(model, strategy):
    adapter = adapter_for(model)
    groups = _groups_of(model)
    profiles = _profiles(model)
    members = {
        ly.name: [[adapter.expert_weights(ly, e) for e in grp] for grp in groups]
        for ly in adapter.sparse_layers(model)
    }
    targets = {}
    for name, per_group in members.items():
        x = profiles[name].inputs
        targets[name] = []
        for weights in per_group:
            z = [_preacts(adapter, w, x) for w in weights]
            targets[name].append(
                {
                    k: (
                        torch.stack([zi[k].mean(0) for zi in z]).mean(0),
                        torch.stack([zi[k].std(0, correction=0) for zi in z]).mean(0),
                    )
                    for k in adapter.preactivation_biases
                }
            )
    report = merge_model(model, adapter, _groups(model, groups), profiles, strategy, "repair")
    for ly in adapter.sparse_layers(model):
        x = profiles[ly.name].inputs
        shift = report[ly.name]["preactivation_shift"]
        assert shift["repair"] == "repair" and shift["mean_abs_dsigma_after"] < 1e-6
        assert shift["mean_abs_dsigma_before"] > 1e-3 and shift["std_ratio_after"] == pytest.approx(1.0)
        for g in range(len(groups)):
            w = adapter.expert_weights(ly, g)
            assert set(adapter.preactivation_biases.values()) <= set(w)
            z = _preacts(adapter, w, x)
            for k, (mu, sd) in targets[ly.name][g].items():
                assert torch.allclose(z[k].mean(0), mu, atol=1e-5), (ly.name, g, k)
                assert torch.allclose(z[k].std(0, correction=0), sd, atol=1e-5, rtol=1e-5), (ly.name, g, k)
    if adapter.model_type == "switch_transformers":
        # The merged module itself computes the repaired pre-activations.
        ly = adapter.sparse_layers(model)[0]
        e = ly.module.experts["expert_0"]
        with torch.no_grad():
            z = e.wi(profiles[ly.name].inputs)
        assert torch.allclose(z.double().std(0, correction=0), targets[ly.name][0]["wi"][1], atol=1e-5)


def test_repair_after_zipit_matches_each_clusters_statistics(tiny_model):
    adapter = adapter_for(tiny_model)
    layer = adapter.sparse_layers(tiny_model)[0]
    profile = _profiles(tiny_model)[layer.name]
    members = [0, 3, 5]
    weights = [adapter.expert_weights(layer, e) for e in members]
    group = ZipIt().merge(adapter, layer, members, profile)
    stats = repair_group(adapter, layer, weights, group, profile.inputs)
    assert stats["wi"]["mean_abs_dsigma_after"] < 1e-6  # float32 weights
    z_members = torch.cat([_preacts(adapter, w, profile.inputs)["wi"] for w in weights], dim=1)
    z = _preacts(adapter, group.weights, profile.inputs)["wi"]
    labels = group.neuron_map.flatten()
    for c in range(z.shape[1]):
        cluster = z_members[:, labels == c]
        assert z[:, c].mean() == pytest.approx(float(cluster.mean(0).mean()), abs=1e-5)
        assert z[:, c].std(correction=0) == pytest.approx(
            float(cluster.std(0, correction=0).mean()), abs=1e-5
        )


def test_repair_none_leaves_the_merge_as_it_was(tiny_model):
    adapter = adapter_for(tiny_model)
    a, b = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    profiles = _profiles(tiny_model)
    blind = {k: copy.copy(p) for k, p in profiles.items()}
    for p in blind.values():
        p.inputs = None
    report = merge_model(a, adapter, _groups(a, SWITCH_GROUPS), profiles, "frequency")
    merge_model(b, adapter, _groups(b, SWITCH_GROUPS), blind, "frequency", "none")
    assert all("preactivation_shift" not in entry for entry in report.values())
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert all(adapter.expert_weights(ly, 0).keys() == {"wi", "wo"} for ly in adapter.sparse_layers(a))


@pytest.mark.parametrize("model", ["switch", "mixtral"], indirect=True)
def test_repaired_model_saves_and_reloads_exactly(model, batch, tmp_path):
    adapter = adapter_for(model)
    merge_model(model, adapter, _groups(model, _groups_of(model)), _profiles(model), "frequency", "repair")
    before = _outputs(model, batch)
    save_model(model, tmp_path / "m")
    assert '"bias": true' in (tmp_path / "m" / STRUCTURE_FILE).read_text()
    reloaded = load_model(tmp_path / "m")
    state, saved = reloaded.state_dict(), model.state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k]) for k in state)
    assert torch.equal(_outputs(reloaded, batch), before)
    # A REPAIRed layer is not a stock one: the checkpoint must not claim to load as plain experts.
    set_router_mode(model, adapter, "prune")
    assert adapter.stock_config_overrides(model) is None


@pytest.mark.parametrize("model", ["switch", "mixtral"], indirect=True)
def test_full_rank_compression_of_a_repaired_model_is_lossless(model, batch, tmp_path):
    adapter = adapter_for(model)
    merge_model(model, adapter, _groups(model, _groups_of(model)), _profiles(model), "uniform", "repair")
    before = _outputs(model, batch)
    compress_model(model, adapter, rank=32)
    lrs = {n: m for n, m in model.named_modules() if isinstance(m, LowRankSparseLinear)}
    # Exactly the pre-activation projections (wi; gate and up) keep their REPAIR bias.
    assert lrs and all(
        (m.bias is not None) == (n.rsplit(".", 1)[1] in adapter.preactivation_biases) for n, m in lrs.items()
    )
    assert torch.allclose(_outputs(model, batch), before, atol=1e-5)
    finalize_compact(model)
    assert torch.allclose(_outputs(model, batch), before, atol=1e-5)
    save_model(model, tmp_path / "c")
    assert torch.equal(_outputs(load_model(tmp_path / "c"), batch), _outputs(model, batch))


def test_repair_refused_for_a_family_without_biases(tiny_model):
    class NoBias(SwitchAdapter):
        preactivation_biases = {}

    with pytest.raises(ModelStructureError, match="merge.repair=repair is not available for model family"):
        merge_model(
            tiny_model,
            NoBias(),
            _groups(tiny_model, SWITCH_GROUPS),
            _profiles(tiny_model),
            "uniform",
            "repair",
        )


def test_unknown_repair_lists_choices(tiny_model):
    with pytest.raises(UnknownChoiceError, match="valid choices: none, repair"):
        merge_model(tiny_model, adapter_for(tiny_model), {"layers": {}}, {}, "uniform", "bn-reset")


# ------------------------------------------------------------------------------ the stage


def test_merge_stage_runs_zipit_with_repair_and_reports_the_shift(tiny_model, rows, prepared, tmp_path):
    import json
    import signal
    from pathlib import Path

    import yaml

    from pipeline.data import load_tokenizer
    from pipeline.profiling import profile_routing, save_profile
    from stages import merge
    from tests.conftest import PAD_ID

    save_model(tiny_model, tmp_path / "aligned", tokenizer=load_tokenizer(prepared / "tokenizer"))
    (tmp_path / "profile").mkdir()
    save_profile(profile_routing(tiny_model, rows, PAD_ID, 16, torch.device("cpu")), tmp_path / "profile")
    (tmp_path / "groups.json").write_text(json.dumps(_groups(tiny_model, SWITCH_GROUPS)))
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["merge"].update(strategy="zipit", repair="repair")
    params["mlflow"]["tracking_uri"] = None
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        merge.main(
            [
                "--params",
                str(tmp_path / "params.yaml"),
                "--metrics",
                str(tmp_path / "merge.json"),
                "--model",
                str(tmp_path / "aligned"),
                "--profile",
                str(tmp_path / "profile"),
                "--groups",
                str(tmp_path / "groups.json"),
                "--out",
                str(tmp_path / "merged"),
            ]  # fmt: skip
        )
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    metrics = json.loads((tmp_path / "merge.json").read_text())
    layers = [ly.name for ly in adapter_for(tiny_model).sparse_layers(tiny_model)]
    assert set(metrics["preactivation_shift"]) == set(layers)
    for shift in metrics["preactivation_shift"].values():
        assert shift["repair"] == "repair" and shift["mean_abs_dsigma_after"] < 1e-6
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert all("strategy_info" in report[n] for n in layers)
    merged = load_model(tmp_path / "merged")
    assert all(adapter_for(merged).num_experts(ly) == 4 for ly in adapter_for(merged).sparse_layers(merged))
