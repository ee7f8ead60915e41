import pytest
import torch

from pipeline.adapters import adapter_for
from pipeline.compression import (
    SCHEDULES,
    ColumnPruner,
    compress_model,
    finalize_compact,
    kept_ratio,
    low_rank_sparse_modules,
)
from pipeline.merging import merge_model
from pipeline.modeling import bytes_on_disk, load_model, save_model
from pipeline.moe import LowRankSparseLinear
from tests.conftest import logits, profiles_for


def _merged(model):
    adapter = adapter_for(model)
    names = [ly.name for ly in adapter.sparse_layers(model)][1:]
    groups = {"layers": {n: {"merged": True, "groups": [[0, 1, 2, 3], [4, 5, 6, 7]]} for n in names}}
    merge_model(model, adapter, groups, profiles_for(names), "frequency")
    return model, adapter


def test_svd_init_reproduces_weight():
    w = torch.randn(20, 12)
    m = LowRankSparseLinear.from_weight(w, 4)
    assert torch.allclose(m.dense_weight(), w, atol=1e-5)
    x = torch.randn(3, 12)
    assert torch.allclose(m(x), x @ w.T, atol=1e-5)


def test_rank_above_size_rejected():
    with pytest.raises(ValueError, match="rank"):
        LowRankSparseLinear.from_weight(torch.randn(4, 3), 5)


def test_full_rank_without_pruning_reproduces_merged_model(tiny_model, batch):
    model, adapter = _merged(tiny_model)
    before = logits(model, batch)
    compress_model(model, adapter, rank=32)
    assert low_rank_sparse_modules(model)
    assert torch.allclose(logits(model, batch), before, atol=1e-4)


@pytest.mark.parametrize("schedule", SCHEDULES.names())
def test_schedule_bounds_and_monotone(schedule):
    values = [kept_ratio(s, 100, 0.1, 10, 20, schedule) for s in range(101)]
    assert all(v == 1.0 for v in values[:10])
    assert all(v == pytest.approx(0.1) for v in values[80:])
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_pruner_keeps_target_and_compact_form_matches(tiny_model, batch, tmp_path):
    model, adapter = _merged(tiny_model)
    save_model(model, tmp_path / "merged")
    compress_model(model, adapter, rank=4)
    pruner = ColumnPruner(model, target=0.2, warmup_frac=0.0, cooldown_frac=0.0)
    model.train()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    out.loss.backward()
    pruner(9, 10)
    assert pruner.kept_fraction() <= 0.2 + 1e-9
    assert pruner.kept_fraction() > 0.2 - 64 / pruner.total_entries  # at most one column short
    for m in low_rank_sparse_modules(model).values():
        assert (m.s[:, ~m.s_mask] == 0).all()
    model.eval()
    before = logits(model, batch)
    kept = {n: int(m.s_mask.sum()) for n, m in low_rank_sparse_modules(model).items()}
    finalize_compact(model)
    compact = low_rank_sparse_modules(model)
    assert {n: m.s.shape[1] for n, m in compact.items()} == kept
    assert all(m.compact for m in compact.values())
    assert torch.allclose(logits(model, batch), before, atol=1e-5)
    save_model(model, tmp_path / "compressed")
    reloaded = load_model(tmp_path / "compressed")
    assert torch.allclose(logits(reloaded, batch), before, atol=1e-5)
    assert bytes_on_disk(tmp_path / "compressed") < bytes_on_disk(tmp_path / "merged")


def test_compress_needs_merged_layers(tiny_model):
    with pytest.raises(ValueError, match="no merged SMoE layer"):
        compress_model(tiny_model, adapter_for(tiny_model), 4)
