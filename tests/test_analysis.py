"""The paper's analyses: stable rank (Figure 4), remaining parameters (Figure 5), memory accounting."""

import copy

import pytest
import torch

from pipeline.analysis import (
    dominant_experts,
    expert_stable_ranks,
    remaining_param_ratios,
    stable_rank,
    stable_rank_change,
)
from pipeline.compression import SparsePruner, compress_model, finalize_compact
from pipeline.evaluation import model_memory_bytes, peak_forward_memory
from pipeline.families import adapter_for
from pipeline.merging import merge_model
from pipeline.plots import plot_remaining_params, plot_stable_rank_change
from pipeline.training import score_classes
from tests.conftest import CLASS_TARGETS, backward, profiles_for


def test_stable_rank_of_rank_one_matrix_is_one():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(7, 1, generator=g) @ torch.randn(1, 5, generator=g)
    assert stable_rank(m) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("n", [1, 4, 9])
def test_stable_rank_of_orthogonal_matrix_is_its_size(n):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64))
    assert stable_rank(q) == pytest.approx(n, rel=1e-9)
    assert stable_rank(3.0 * q) == pytest.approx(n, rel=1e-9)  # scale-free


def test_stable_rank_of_zero_matrix_is_zero():
    assert stable_rank(torch.zeros(3, 4)) == 0.0


def _groups(names):
    return {"layers": {n: {"merged": True, "groups": [[1, 0, 2, 3], [4, 5, 6, 7]]} for n in names}}


def test_merging_identical_experts_keeps_stable_rank(tiny_model):
    adapter = adapter_for(tiny_model)
    layers = adapter.sparse_layers(tiny_model)[1:]
    for ly in layers:
        w = adapter.expert_weights(ly, 0)
        for e in range(adapter.num_experts(ly)):
            adapter.set_expert_weights(ly, e, w)
    groups = _groups([ly.name for ly in layers])
    dominant = dominant_experts(groups)
    assert dominant == {ly.name: [1, 4] for ly in layers}
    before = expert_stable_ranks(tiny_model, adapter, dominant)
    merge_model(tiny_model, adapter, groups, profiles_for(list(dominant)), "frequency")
    after = expert_stable_ranks(tiny_model, adapter, {n: [0, 1] for n in dominant})
    change = stable_rank_change(before, after)
    assert set(change) == set(dominant)
    for c in change.values():
        assert c["mean_change_ratio"] == pytest.approx(0.0, abs=1e-6)
        assert c["mean_before"] == pytest.approx(c["mean_after"], rel=1e-6)


def test_averaging_distinct_experts_changes_stable_rank(tiny_model):
    adapter = adapter_for(tiny_model)
    names = [ly.name for ly in adapter.sparse_layers(tiny_model)][1:]
    groups = _groups(names)
    before = expert_stable_ranks(tiny_model, adapter, dominant_experts(groups))
    merge_model(tiny_model, adapter, groups, profiles_for(names), "uniform")
    after = expert_stable_ranks(tiny_model, adapter, {n: [0, 1] for n in names})
    change = stable_rank_change(before, after)
    assert all(abs(c["mean_change_ratio"]) > 1e-3 for c in change.values())


def test_remaining_ratios_one_for_dense_and_match_compact_storage(tiny_model, batch):
    adapter = adapter_for(tiny_model)
    dense = remaining_param_ratios(tiny_model, adapter)
    assert all(r == [1.0] * 8 for r in dense.values())
    compress_model(tiny_model, adapter, rank=4, scope="all")
    pruner = SparsePruner(tiny_model, target=0.25, warmup_frac=0.0, cooldown_frac=0.0)
    backward(tiny_model, batch)
    pruner(9, 10)
    masked = remaining_param_ratios(tiny_model, adapter)
    finalize_compact(tiny_model)
    compact = remaining_param_ratios(tiny_model, adapter)
    for name, values in masked.items():
        assert values == pytest.approx(compact[name])
    d_model, d_ff = 32, 64
    low_rank = 4 * (d_model + d_ff) * 2 / (2 * d_model * d_ff)
    values = [r for rs in compact.values() for r in rs]
    assert all(low_rank - 1e-9 <= r <= low_rank + 1 + 1e-9 for r in values)
    # Columns are ranked globally: the kept S entries total the target share of all S entries.
    mean_s = sum(values) / len(values) - low_rank
    assert mean_s == pytest.approx(0.25, abs=0.05)


def test_memory_accounting(tiny_model, batch):
    weights = model_memory_bytes(tiny_model)
    n_unique = sum(p.numel() for p in {id(p): p for p in tiny_model.parameters()}.values())
    assert weights >= 4 * n_unique
    cpu = torch.device("cpu")
    two = {k: v[:2] for k, v in batch.items()}
    small = peak_forward_memory(tiny_model, lambda: score_classes(tiny_model, two, CLASS_TARGETS), cpu)
    large = peak_forward_memory(tiny_model, lambda: score_classes(tiny_model, batch, CLASS_TARGETS), cpu)
    assert small["model_memory_bytes"] == large["model_memory_bytes"] == weights
    assert weights < small["peak_forward_bytes"] < large["peak_forward_bytes"]


def test_compact_model_takes_less_memory(tiny_model, batch):
    adapter = adapter_for(tiny_model)
    full = copy.deepcopy(tiny_model)
    compress_model(tiny_model, adapter, rank=4, scope="all")
    pruner = SparsePruner(tiny_model, target=0.1, warmup_frac=0.0, cooldown_frac=0.0)
    backward(tiny_model, batch)
    pruner(9, 10)
    finalize_compact(tiny_model)
    assert model_memory_bytes(tiny_model) < model_memory_bytes(full)


def test_analysis_plots_are_written(tmp_path):
    change = {
        "encoder.block.3.layer.1.mlp": {"mean_before": 5.0, "mean_after": 4.0, "mean_change_ratio": -0.2},
        "decoder.block.1.layer.2.mlp": {"mean_before": 5.0, "mean_after": 5.5, "mean_change_ratio": 0.1},
    }
    plot_stable_rank_change(change, tmp_path / "sr.png")
    ratios = {
        "mc_smoe": {
            "encoder.block.1.layer.1.mlp": [0.3, 0.5, 0.2, 0.4],
            "decoder.block.1.layer.2.mlp": [0.3],
        },
        "c_smoe": {"encoder.block.1.layer.1.mlp": [0.3, 0.5, 0.2, 0.4]},
    }
    plot_remaining_params(ratios, tmp_path / "rem.png")
    for name in ("sr.png", "rem.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000
