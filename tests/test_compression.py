"""Compression: low-rank + sparse decomposition, the pruning schedule, S pruning, compact storage."""

import pytest
import torch

from pipeline.compression import (
    PRUNE_AXES,
    PRUNE_SCORES,
    SCHEDULES,
    SparsePruner,
    compress_model,
    finalize_compact,
    kept_ratio,
    low_rank_sparse_modules,
)
from pipeline.families import adapter_for
from pipeline.merging import merge_model
from pipeline.modeling import bytes_on_disk, load_model, save_model
from pipeline.moe import LowRankSparseLinear, linear_from_structure
from tests.conftest import TINY, backward, logits, profiles_for, train_settings

FULL_RANK = min(TINY["d_model"], TINY["d_ff"])


def _merged(model):
    """Merge every SMoE layer but the first into two experts per layer."""
    adapter = adapter_for(model)
    names = [ly.name for ly in adapter.sparse_layers(model)][1:]
    groups = {"layers": {n: {"merged": True, "groups": [[0, 1, 2, 3], [4, 5, 6, 7]]} for n in names}}
    merge_model(model, adapter, groups, profiles_for(names), "frequency")
    return model, adapter


# ---------------------------------------------------------------- LowRankSparseLinear


@pytest.mark.parametrize("shape, rank", [((20, 12), 4), ((12, 20), 1), ((16, 16), 16), ((64, 32), 8)])
def test_svd_init_reproduces_weight(shape, rank):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(rank))
    m = LowRankSparseLinear.from_weight(w, rank)
    assert m.u.shape == (shape[0], rank) and m.v.shape == (rank, shape[1])
    assert torch.allclose(m.dense_weight(), w, atol=1e-5)
    x = torch.randn(3, shape[1])
    assert torch.allclose(m(x), x @ w.T, atol=1e-5)


def test_low_rank_part_is_the_best_rank_r_approximation():
    w = torch.randn(20, 12, generator=torch.Generator().manual_seed(0))
    m = LowRankSparseLinear.from_weight(w, 3)
    sig = torch.linalg.svdvals(w)
    residual = float(torch.linalg.matrix_norm(w - (m.u @ m.v).detach()))
    assert residual == pytest.approx(float(sig[3:].square().sum().sqrt()), rel=1e-4)


@pytest.mark.parametrize("rank", [0, 5])
def test_rank_out_of_range_rejected(rank):
    with pytest.raises(ValueError, match="rank"):
        LowRankSparseLinear.from_weight(torch.randn(4, 3), rank)


def test_compact_form_keeps_exactly_the_unmasked_columns():
    w = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    m = LowRankSparseLinear.from_weight(w, 2)
    mask = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 0, 1], dtype=torch.bool)
    with torch.no_grad():
        m.s_mask.copy_(mask)
    c = m.to_compact()
    assert c.compact and c.s.shape == (6, 5)
    assert c.s_index.tolist() == mask.nonzero().flatten().tolist()
    assert torch.equal(c.s, m.s[:, mask])
    assert torch.allclose(c.dense_weight(), m.dense_weight(), atol=1e-6)
    x = torch.randn(4, 10)
    assert torch.allclose(c(x), m(x), atol=1e-5)


def test_compact_form_with_no_column_left():
    m = LowRankSparseLinear.from_weight(torch.randn(6, 10), 2)
    with torch.no_grad():
        m.s_mask.zero_()
    c = m.to_compact()
    x = torch.randn(4, 10)
    assert c.s.shape == (6, 0)
    assert torch.allclose(c(x), x @ (m.u @ m.v).T, atol=1e-5)


def test_full_rank_without_pruning_reproduces_merged_model(tiny_model, batch):
    model, adapter = _merged(tiny_model)
    before = logits(model, batch)
    report = compress_model(model, adapter, rank=FULL_RANK)
    assert len(report) == 2
    modules = low_rank_sparse_modules(model)
    assert len(modules) == 2 * 2 * 2  # layers x experts x (wi, wo)
    assert all(m.s_mask.all() for m in modules.values())
    assert torch.allclose(logits(model, batch), before, atol=1e-5)


def test_low_rank_plus_dense_residual_reproduces_merged_model(tiny_model, batch):
    model, adapter = _merged(tiny_model)
    before = logits(model, batch)
    compress_model(model, adapter, rank=4)
    assert torch.allclose(logits(model, batch), before, atol=1e-5)


def test_compress_needs_merged_layers(tiny_model):
    with pytest.raises(ValueError, match="no SMoE layer in compression scope 'merged'"):
        compress_model(tiny_model, adapter_for(tiny_model), 4)


def test_unknown_scope_lists_valid_ones(tiny_model):
    with pytest.raises(ValueError, match="unknown compression scope 'some'.*all.*merged"):
        compress_model(tiny_model, adapter_for(tiny_model), 4, scope="some")


def test_scope_all_compresses_the_unmerged_first_layer_too(tiny_model, batch):
    model, adapter = _merged(tiny_model)
    before = logits(model, batch)
    report = compress_model(model, adapter, rank=FULL_RANK, scope="all")
    assert [r["merged"] for r in report.values()] == [False, True, True]
    # 8 experts in the kept layer + 2 x 2 merged ones, each with wi and wo.
    assert len(low_rank_sparse_modules(model)) == 2 * (8 + 2 * 2)
    assert torch.allclose(logits(model, batch), before, atol=1e-5)


def test_c_smoe_full_rank_without_pruning_reproduces_the_full_model(tiny_model, batch):
    """C-SMoE: every expert of the unmerged model compressed; routing stays exactly the same."""
    before = logits(tiny_model, batch)
    report = compress_model(tiny_model, adapter_for(tiny_model), rank=FULL_RANK, scope="all")
    assert len(report) == 3 and not any(r["merged"] for r in report.values())
    assert torch.allclose(logits(tiny_model, batch), before, atol=1e-5)


def test_c_smoe_pruned_compact_model_reloads_smaller(tiny_model, batch, tmp_path):
    adapter = adapter_for(tiny_model)
    save_model(tiny_model, tmp_path / "full")
    compress_model(tiny_model, adapter, rank=4, scope="all")
    pruner = SparsePruner(tiny_model, target=0.1, warmup_frac=0.0, cooldown_frac=0.0)
    backward(tiny_model, batch)
    pruner(9, 10)
    tiny_model.eval()
    finalize_compact(tiny_model)
    before = logits(tiny_model, batch)
    save_model(tiny_model, tmp_path / "c_smoe")
    reloaded = load_model(tmp_path / "c_smoe")
    assert len(low_rank_sparse_modules(reloaded)) == 2 * 3 * 8
    assert torch.allclose(logits(reloaded, batch), before, atol=1e-6)
    assert bytes_on_disk(tmp_path / "c_smoe") < bytes_on_disk(tmp_path / "full")


def test_pruner_needs_compressed_modules(tiny_model):
    with pytest.raises(ValueError, match="run compress first"):
        SparsePruner(tiny_model, 0.1, 0.0, 0.0)


# ---------------------------------------------------------------- schedule


@pytest.mark.parametrize("schedule", SCHEDULES.names())
@pytest.mark.parametrize(
    "total, warmup, cooldown, target", [(100, 10, 20, 0.1), (37, 0, 0, 0.3), (50, 5, 5, 0.05)]
)
def test_schedule_bounds_and_monotone(schedule, total, warmup, cooldown, target):
    values = [kept_ratio(s, total, target, warmup, cooldown, schedule) for s in range(total + 1)]
    assert all(v == 1.0 for v in values[:warmup])
    assert all(v == pytest.approx(target) for v in values[total - cooldown :])
    assert all(target - 1e-12 <= v <= 1.0 for v in values)
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_schedules_are_the_expected_shapes():
    mid = {name: kept_ratio(50, 100, 0.0, 0, 0, name) for name in SCHEDULES.names()}
    assert {"cubic", "quadratic", "linear"} <= set(mid)
    assert mid["cubic"] == pytest.approx(0.125)
    assert mid["quadratic"] == pytest.approx(0.25)
    assert mid["linear"] == pytest.approx(0.5)


# ---------------------------------------------------------------- pruning


@pytest.mark.parametrize("target", [0.1, 0.35])
def test_pruner_at_final_step_reaches_target_and_zeroes_masked_columns(tiny_model, batch, target):
    model, adapter = _merged(tiny_model)
    compress_model(model, adapter, rank=4)
    pruner = SparsePruner(model, target=target, warmup_frac=0.1, cooldown_frac=0.2)
    model.train()
    backward(model, batch)
    total = 10
    pruner(pruner.final_step(total) - 1, total)  # the hook call whose next step is the final one
    assert pruner.last_ratio == pytest.approx(target)
    modules = list(low_rank_sparse_modules(model).values())
    widest_column = max(m.out_features for m in modules) / pruner.total_entries
    assert pruner.kept_fraction() <= target + widest_column
    assert pruner.kept_fraction() >= target - widest_column
    for m in modules:
        assert (m.s[:, ~m.s_mask] == 0).all()
    assert any(not m.s_mask.all() for m in modules)


def test_pruner_does_nothing_during_warmup(tiny_model, batch):
    model, adapter = _merged(tiny_model)
    compress_model(model, adapter, rank=4)
    pruner = SparsePruner(model, target=0.1, warmup_frac=0.5, cooldown_frac=0.1)
    model.train()
    backward(model, batch)
    pruner(0, 10)
    assert pruner.last_ratio == 1.0
    assert pruner.kept_fraction() == 1.0


def test_pruned_columns_stay_pruned(tiny_model, batch):
    model, adapter = _merged(tiny_model)
    compress_model(model, adapter, rank=4)
    pruner = SparsePruner(model, target=0.2, warmup_frac=0.0, cooldown_frac=0.0)
    model.train()
    total, masks = 6, []
    for step in range(total):
        backward(model, batch)
        pruner(step, total)
        masks.append([m.s_mask.clone() for m in low_rank_sparse_modules(model).values()])
    for earlier, later in zip(masks, masks[1:], strict=False):
        assert all(not (b & ~a).any() for a, b in zip(earlier, later, strict=True))
    assert pruner.kept_fraction() <= 0.2 + 1e-9


def test_prune_compact_save_reload(tiny_model, batch, tmp_path):
    model, adapter = _merged(tiny_model)
    save_model(model, tmp_path / "merged")
    compress_model(model, adapter, rank=4)
    pruner = SparsePruner(model, target=0.2, warmup_frac=0.0, cooldown_frac=0.0)
    model.train()
    backward(model, batch)
    pruner(9, 10)
    model.eval()
    before = logits(model, batch)
    masked = {n: m.s_mask.clone() for n, m in low_rank_sparse_modules(model).items()}
    dense_s = {n: m.s.detach().clone() for n, m in low_rank_sparse_modules(model).items()}
    ratios = finalize_compact(model)
    compact = low_rank_sparse_modules(model)
    assert compact.keys() == masked.keys() == ratios.keys()
    assert sum(ratios.values()) / len(ratios) < 1  # rank 4 + 20% of S is smaller than dense
    for n, m in compact.items():
        assert m.compact
        assert m.s_index.tolist() == masked[n].nonzero().flatten().tolist()
        assert torch.equal(m.s, dense_s[n][:, masked[n]])
        assert ratios[n] == pytest.approx(
            (m.u.numel() + m.v.numel() + m.s.numel()) / (m.in_features * m.out_features)
        )
    assert torch.allclose(logits(model, batch), before, atol=1e-5)

    save_model(model, tmp_path / "compressed")
    reloaded = load_model(tmp_path / "compressed")
    assert all(m.compact for m in low_rank_sparse_modules(reloaded).values())
    assert torch.allclose(logits(reloaded, batch), before, atol=1e-6)
    assert bytes_on_disk(tmp_path / "compressed") < bytes_on_disk(tmp_path / "merged")


def test_masked_but_not_compacted_model_reloads(tiny_model, batch, tmp_path):
    model, adapter = _merged(tiny_model)
    compress_model(model, adapter, rank=4)
    pruner = SparsePruner(model, target=0.3, warmup_frac=0.0, cooldown_frac=0.0)
    backward(model, batch)
    pruner(9, 10)
    model.eval()
    save_model(model, tmp_path / "masked")
    reloaded = load_model(tmp_path / "masked")
    for n, m in low_rank_sparse_modules(reloaded).items():
        assert not m.compact
        assert torch.equal(m.s_mask, low_rank_sparse_modules(model)[n].s_mask)
    assert torch.allclose(logits(reloaded, batch), logits(model, batch), atol=1e-6)


def test_kd_training_with_pruning_keeps_only_models_at_target(tiny_model, rows):
    """The kd_finetune recipe: KD from the full model, pruning as a step hook, best model eligible
    only once the target sparsity holds."""
    import copy

    from pipeline.training import KDSettings, train

    teacher = copy.deepcopy(tiny_model)
    model, adapter = _merged(tiny_model)
    compress_model(model, adapter, rank=4)
    pruner = SparsePruner(model, target=0.25, warmup_frac=0.1, cooldown_frac=0.25)
    settings = train_settings(epochs=4, eval_batch_size=48, lr=1e-3, weight_decay=0.01)
    summary = train(
        model,
        rows,
        rows,
        [[5, 1], [6, 1]],
        0,
        settings,
        torch.device("cpu"),
        kd=KDSettings(teacher, alpha=0.5, temperature=2.0),
        step_hook=pruner,
        eligible_from=pruner.final_step,
        progress=False,
    )
    assert summary["total_steps"] == 12
    assert pruner.final_step(12) == 9
    assert summary["best_step"] >= 9
    modules = list(low_rank_sparse_modules(model).values())
    slack = max(m.out_features for m in modules) / pruner.total_entries
    assert pruner.kept_fraction() <= 0.25 + slack
    for m in modules:
        assert (m.sparse_weight()[:, ~m.s_mask] == 0).all()


# ---------------------------------------------------------------- pruning choices (hand-worked)


class _Holder(torch.nn.Module):
    """Low-rank + sparse modules whose S and gradients the tests set by hand."""

    def __init__(self, *shapes: tuple[int, int]) -> None:
        super().__init__()
        self.parts = torch.nn.ModuleList(LowRankSparseLinear(i, o, 1) for o, i in shapes)
        with torch.no_grad():
            for m in self.parts:
                m.u.zero_()
                m.v.zero_()
                m.s.fill_(1.0)


def _feed(holder: _Holder, *importances: torch.Tensor) -> None:
    """Make each module's entry importance |s * grad s| equal ``importances`` (s set to 1)."""
    for m, ipt in zip(holder.parts, importances, strict=True):
        with torch.no_grad():
            m.s.fill_(1.0)
        m.s.grad = ipt.clone().float()


def _at_target(pruner: SparsePruner) -> None:
    pruner(9, 10)  # no warm-up / cool-down: the call before the last step applies the target


def test_prune_choices_are_registered():
    assert PRUNE_AXES.names() == ["column", "row"]
    assert PRUNE_SCORES.names() == ["mean", "sum"]


@pytest.mark.parametrize("axis, expected", [("column", [0, 2, 4]), ("row", [1, 3])])
def test_row_and_column_pruning_keep_the_expected_units(axis, expected):
    holder = _Holder((4, 6))
    # Entry (i, j) = r_i + c_j: columns rank by c, rows by r.
    r, c = torch.tensor([0.0, 10.0, 0.0, 20.0]), torch.tensor([5.0, 1.0, 4.0, 2.0, 6.0, 3.0])
    _feed(holder, r[:, None] + c[None, :])
    pruner = SparsePruner(holder, 0.5, 0.0, 0.0, beta1=0.0, beta2=1.0, axis=axis)
    _at_target(pruner)
    m = holder.parts[0]
    assert m.s_axis == axis and m.s_mask.nonzero().flatten().tolist() == expected
    # 12 of 24 entries: 3 columns of 4, or 2 rows of 6.
    assert pruner.kept_fraction() == pytest.approx(0.5)
    assert m.s_kept_entries() == 12
    assert torch.equal(m.s, m.sparse_weight().detach())
    assert int((m.s != 0).sum()) == 12


def test_sum_score_spends_the_budget_on_long_units_mean_splits_it():
    # Columns of a [8, 2] S have 8 entries, those of a [2, 8] S have 2.
    a = torch.ones(8, 2)
    b = torch.cat([torch.full((2, 4), 1.5), torch.full((2, 4), 0.5)], dim=1)
    kept = {}
    for score in ("sum", "mean"):
        holder = _Holder((8, 2), (2, 8))
        _feed(holder, a, b)
        pruner = SparsePruner(holder, 0.5, 0.0, 0.0, beta1=0.0, beta2=1.0, score=score)
        _at_target(pruner)
        kept[score] = [m.s_mask.nonzero().flatten().tolist() for m in holder.parts]
        assert pruner.kept_fraction() == pytest.approx(0.5)
    # sum: A's columns score 8 against B's 3 or 1, and A's 16 entries fill the budget.
    assert kept["sum"] == [[0, 1], []]
    # mean: B's 1.5 columns (8 entries), then one of A's 1.0 columns (8 entries).
    assert kept["mean"] == [[0], [0, 1, 2, 3]]


def test_beta2_one_scores_by_the_smoothed_importance_alone():
    holder = _Holder((2, 3))
    g1 = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    g2 = torch.tensor([[0.0, 4.0, 2.0], [2.0, 0.0, 2.0]])
    pruner = SparsePruner(holder, 0.5, 0.5, 0.0, beta1=0.85, beta2=1.0)
    for g in (g1, g2):
        _feed(holder, g)
        pruner(0, 10)  # warm-up: scores move, masks do not
    expected = 0.85 * 0.15 * g1.mean(0) + 0.15 * g2.mean(0)
    assert torch.allclose(pruner.unit_scores()[0], expected)
    assert pruner.unc[0].abs().sum() == 0
    assert holder.parts[0].s_mask.all()


def test_beta2_below_one_scores_by_importance_times_uncertainty():
    holder = _Holder((2, 2))
    g = torch.tensor([[2.0, 4.0], [2.0, 0.0]])
    pruner = SparsePruner(holder, 0.5, 0.5, 0.0, beta1=0.5, beta2=0.5, score="sum")
    _feed(holder, g)
    pruner(0, 10)
    ipt = 0.5 * torch.tensor([4.0, 4.0])
    unc = 0.5 * (torch.tensor([4.0, 4.0]) - ipt).abs()
    assert torch.allclose(pruner.unit_scores()[0], ipt * unc)


def test_config_accepts_the_choices_and_beta2_one():
    from pipeline.config import CompressParams

    c = CompressParams(beta2=1.0, prune_axis="row", prune_score="sum", regrow=True)
    assert (c.beta2, c.prune_axis, c.prune_score, c.regrow) == (1.0, "row", "sum", True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"axis": "diagonal"}, "unknown pruning axis 'diagonal'; valid choices: column, row"),
        ({"score": "max"}, "unknown pruning score 'max'; valid choices: mean, sum"),
    ],
)
def test_unknown_axis_or_score_lists_valid_ones(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparsePruner(_Holder((2, 2)), 0.5, 0.0, 0.0, **kwargs)
    from pipeline.config import CompressParams

    key = {"axis": "prune_axis", "score": "prune_score"}[next(iter(kwargs))]
    with pytest.raises(ValueError, match=message):
        CompressParams(**{key: next(iter(kwargs.values()))})


@pytest.mark.parametrize("regrow", [True, False])
def test_regrow_brings_back_a_unit_whose_importance_rises(regrow):
    holder = _Holder((2, 4))
    pruner = SparsePruner(holder, 0.5, 0.0, 0.0, beta1=0.0, beta2=1.0, regrow=regrow)
    m = holder.parts[0]
    assert m.s_regrow is regrow
    _feed(holder, torch.tensor([[3.0, 3.0, 1.0, 1.0]] * 2))
    _at_target(pruner)
    assert m.s_mask.tolist() == [True, True, False, False]
    assert (m.s[:, 2:] == 0).all()
    # The optimiser moved the masked entries (they get gradients with regrow) and columns 2, 3
    # now matter more.
    _feed(holder, torch.tensor([[1.0, 1.0, 3.0, 3.0]] * 2))
    _at_target(pruner)
    assert m.s_mask.tolist() == ([False, False, True, True] if regrow else [True, True, False, False])
    assert pruner.kept_fraction() == pytest.approx(0.5)
    assert (m.s * ~m.s_mask_2d() == 0).all()


@pytest.mark.parametrize("axis", ["column", "row"])
@pytest.mark.parametrize("regrow", [True, False])
def test_masked_entries_get_gradients_only_with_regrow(axis, regrow):
    torch.manual_seed(0)
    m = LowRankSparseLinear.from_weight(torch.randn(5, 6), 2)
    m.set_s_axis(axis)
    m.s_regrow = regrow
    with torch.no_grad():
        m.s_mask[::2] = False  # masked entries keep nonzero values: the forward must ignore them
    expected_w = (m.u @ m.v + m.s * m.s_mask_2d()).detach()
    x = torch.randn(3, 6)
    for training in (True, False):
        m.train(training)
        m.zero_grad(set_to_none=True)
        y = m(x)
        assert torch.allclose(y, x @ expected_w.T, atol=1e-6)
        y.square().sum().backward()
        masked_grad = m.s.grad * ~m.s_mask_2d()
        assert bool(masked_grad.abs().sum() > 0) is (regrow and training)


def test_pruner_switches_modules_to_its_axis():
    holder = _Holder((3, 5), (5, 3))
    pruner = SparsePruner(holder, 0.5, 0.0, 0.0, axis="row")
    assert [len(m.s_mask) for m in holder.parts] == [3, 5]
    assert all(m.s_axis == "row" and m.s_mask.all() for m in holder.parts)
    assert [len(i) for i in pruner.ipt] == [3, 5]
    with torch.no_grad():
        holder.parts[0].s_mask[0] = False
    with pytest.raises(ValueError, match="already pruned along rows"):
        SparsePruner(holder, 0.5, 0.0, 0.0, axis="column")


def test_row_pruned_module_compacts_and_rebuilds_from_its_structure():
    torch.manual_seed(1)
    m = LowRankSparseLinear.from_weight(torch.randn(6, 10), 2)
    m.set_s_axis("row")
    mask = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)
    with torch.no_grad():
        m.s_mask.copy_(mask)
    c = m.to_compact()
    assert c.compact and c.s_axis == "row" and c.s.shape == (3, 10)
    assert c.s_index.tolist() == [0, 2, 3]
    assert torch.equal(c.s, m.s[mask])
    assert torch.equal(c.sparse_weight(), m.sparse_weight())
    assert c.s_kept_entries() == m.s_kept_entries() == 30
    x = torch.randn(2, 4, 10)
    assert torch.allclose(c(x), m(x), atol=1e-6)
    assert "s_rows_kept=3" in repr(c)
    for module in (c, m):
        spec = module.structure()
        assert spec["axis"] == "row"
        rebuilt = linear_from_structure(spec)
        rebuilt.load_state_dict(module.state_dict())
        assert rebuilt.compact is module.compact
        assert torch.equal(rebuilt.sparse_weight(), module.sparse_weight())
        assert torch.allclose(rebuilt(x), module(x), atol=1e-6)


def test_compact_row_form_with_no_row_left():
    m = LowRankSparseLinear.from_weight(torch.randn(6, 10), 2)
    m.set_s_axis("row")
    with torch.no_grad():
        m.s_mask.zero_()
    c = m.to_compact()
    x = torch.randn(4, 10)
    assert c.s.shape == (0, 10)
    assert torch.allclose(c(x), x @ (m.u @ m.v).T, atol=1e-5)


def test_structure_saved_before_axes_loads_as_columns():
    old = {"type": "low_rank_sparse", "in_features": 10, "out_features": 6, "rank": 2, "kept_columns": 4}
    m = linear_from_structure(old)
    assert m.s_axis == "column" and m.compact and m.s.shape == (6, 4)
    dense = linear_from_structure({**old, "kept_columns": None})
    assert not dense.compact and dense.s_mask.shape == (10,)


def test_row_pruned_model_reaches_target_and_reloads_compact(tiny_model, batch, tmp_path):
    model, adapter = _merged(tiny_model)
    compress_model(model, adapter, rank=4)
    pruner = SparsePruner(model, 0.2, 0.0, 0.0, beta2=1.0, axis="row", score="sum", regrow=True)
    model.train()
    backward(model, batch)
    pruner(9, 10)
    modules = list(low_rank_sparse_modules(model).values())
    slack = max(m.s_unit_size for m in modules) / pruner.total_entries
    assert 0.2 - slack <= pruner.kept_fraction() <= 0.2
    assert all(len(m.s_mask) == m.out_features for m in modules)
    model.eval()
    save_model(model, tmp_path / "masked")
    assert torch.allclose(logits(load_model(tmp_path / "masked"), batch), logits(model, batch), atol=1e-6)
    finalize_compact(model)
    before = logits(model, batch)
    save_model(model, tmp_path / "compressed")
    reloaded = load_model(tmp_path / "compressed")
    assert all(m.compact and m.s_axis == "row" for m in low_rank_sparse_modules(reloaded).values())
    assert torch.allclose(logits(reloaded, batch), before, atol=1e-6)
