"""Compressing merged experts: W = U V + S with S pruned by columns or rows during KD (LoSparse)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.families import MoEAdapter, SparseLayer, set_submodule
from pipeline.moe import S_AXIS_DIMS, LowRankSparseLinear
from pipeline.registry import Registry

# schedule(progress in [0, 1]) -> share of the way from 1.0 to the target ratio still to go.
Schedule = Callable[[float], float]
SCHEDULES: Registry[Schedule] = Registry("pruning schedule")
SCHEDULES.register("cubic")(lambda p: (1 - p) ** 3)
SCHEDULES.register("quadratic")(lambda p: (1 - p) ** 2)
SCHEDULES.register("linear")(lambda p: 1 - p)


def kept_ratio(
    step: int, total: int, target: float, warmup: int, cooldown: int, schedule: str = "cubic"
) -> float:
    """Fraction of S kept at ``step``: 1.0 until ``warmup``, ``target`` from ``total - cooldown``."""
    fn = SCHEDULES.get(schedule)
    end = total - cooldown
    if step < warmup:
        return 1.0
    if step >= end:
        return target
    progress = (step - warmup) / max(1, end - warmup)
    return target + (1.0 - target) * fn(progress)


def _is_merged(adapter: MoEAdapter, layer: SparseLayer) -> bool:
    return adapter.merged_routing(layer) is not None


# scope(adapter, layer) -> whether the layer's experts are compressed.
SCOPES: Registry[Callable[[MoEAdapter, SparseLayer], bool]] = Registry("compression scope")
# The paper's MC-SMoE: only the layers that were merged (its 381M of 2.0B parameters for switch-base-32
# leave the first SMoE layer's experts whole).
SCOPES.register("merged")(_is_merged)
# Every SMoE layer, including one kept unmerged (group.skip_first_layer); C-SMoE uses this on the
# unmerged model.
SCOPES.register("all")(lambda adapter, layer: True)


@torch.no_grad()
def as_identity_merged(model: nn.Module, adapter: MoEAdapter, layer: SparseLayer) -> None:
    """Rebuild an unmerged SMoE layer as a merged one where every expert is its own group.

    Routing is unchanged (expert e -> group e), so the layer computes the same function, but its
    experts now sit in the project's expert modules, which can hold low-rank + sparse projections.
    """
    n = adapter.num_experts(layer)
    weights = [{k: v.clone() for k, v in adapter.expert_weights(layer, e).items()} for e in range(n)]
    adapter.replace_with_merged(model, layer, list(range(n)), weights)


@torch.no_grad()
def compress_model(model: nn.Module, adapter: MoEAdapter, rank: int, scope: str = "merged") -> dict:
    """Decompose every expert of the layers in ``scope`` into low rank + (still dense) sparse part."""
    in_scope = SCOPES.get(scope)
    report = {}
    for layer in adapter.sparse_layers(model):
        if not in_scope(adapter, layer):
            continue
        was_merged = _is_merged(adapter, layer)
        if not was_merged:
            as_identity_merged(model, adapter, layer)
        adapter.compress_layer(layer, rank)
        report[layer.name] = {"experts": adapter.num_experts(layer), "rank": rank, "merged": was_merged}
    if not report:
        raise ValueError(f"no SMoE layer in compression scope {scope!r}; with 'merged', run merge first")
    return report


def low_rank_sparse_modules(model: nn.Module) -> dict[str, LowRankSparseLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankSparseLinear)}


# A pruning axis names the units of S that are kept or pruned whole; its value is the dim of S
# (``[out, in]``) that a unit index selects.
PRUNE_AXES: Registry[int] = Registry("pruning axis")
# One unit = one input feature, a column of S (out_features entries): the paper's text.
PRUNE_AXES.register("column")(S_AXIS_DIMS["column"])
# One unit = one output feature, a row of S (in_features entries): the authors' code
# (LoSparsePruner with structured_direction='row').
PRUNE_AXES.register("row")(S_AXIS_DIMS["row"])

# score(entry importances [out, in], dim) -> one score per unit, reducing ``dim`` (a unit's entries).
PruneScore = Callable[[torch.Tensor, int], torch.Tensor]
PRUNE_SCORES: Registry[PruneScore] = Registry("pruning score")
# The paper's "cumulative score"; it favours long units (a row of a wide S outscores a short one
# with the same per-entry importance).
PRUNE_SCORES.register("sum")(lambda ipt, dim: ipt.sum(dim))
# The authors' code: comparable across units of different lengths.
PRUNE_SCORES.register("mean")(lambda ipt, dim: ipt.mean(dim))


class SparsePruner:
    """Global structured pruning of every S by smoothed ``|s * grad s|`` importance (LoSparse).

    A unit is a column (``axis="column"``: an input feature) or a row (``axis="row"``: an output
    feature) of S. Its importance reduces its entries' ``|s * grad s|`` by ``score``: ``sum`` (the
    paper) favours long units, so with S matrices of different shapes it spends the budget on the
    wider ones first; ``mean`` (the authors' code) does not. The importance is smoothed per unit by
    an EMA (``beta1``) and so is its uncertainty ``|importance - EMA|`` (``beta2``); the score is
    their product, or the EMA alone when ``beta2 == 1.0`` (the authors' default). Units of all S
    matrices are ranked at once and kept, best first, while the kept entries (a unit costs its
    length) fit in the scheduled fraction of all S entries.

    With ``regrow=False`` a pruned unit stays pruned; with ``regrow=True`` (the authors') every call
    re-ranks all units, and the modules are told to pass gradients to masked entries in training
    mode so a pruned unit whose importance rises comes back. Modules built along another axis are
    switched to ``axis`` (still unpruned) here, before training starts.
    """

    def __init__(
        self,
        model: nn.Module,
        target: float,
        warmup_frac: float,
        cooldown_frac: float,
        schedule: str = "cubic",
        beta1: float = 0.85,
        beta2: float = 0.95,
        axis: str = "column",
        score: str = "mean",
        regrow: bool = False,
    ) -> None:
        self.dim = PRUNE_AXES.get(axis)
        self.score_fn = PRUNE_SCORES.get(score)
        SCHEDULES.get(schedule)
        if not 0.0 <= beta2 <= 1.0:
            raise ValueError(f"beta2 must be in [0, 1], got {beta2}")
        self.modules = list(low_rank_sparse_modules(model).values())
        if not self.modules:
            raise ValueError("the model has no low-rank + sparse module to prune; run compress first")
        for m in self.modules:
            m.set_s_axis(axis)
            m.s_regrow = regrow
        self.target, self.schedule = target, schedule
        self.warmup_frac, self.cooldown_frac = warmup_frac, cooldown_frac
        self.beta1, self.beta2 = beta1, beta2
        self.axis, self.score, self.regrow = axis, score, regrow
        self.ipt = [torch.zeros(len(m.s_mask), device=m.s.device) for m in self.modules]
        self.unc = [torch.zeros(len(m.s_mask), device=m.s.device) for m in self.modules]
        self.total_entries = sum(m.s.numel() for m in self.modules)
        self.last_ratio = 1.0

    def bounds(self, total: int) -> tuple[int, int]:
        """Warm-up and cool-down lengths in steps for a run of ``total`` steps."""
        return int(self.warmup_frac * total), int(self.cooldown_frac * total)

    def final_step(self, total: int) -> int:
        """First step at which the target ratio holds."""
        return total - self.bounds(total)[1]

    def unit_scores(self) -> list[torch.Tensor]:
        """Each module's current unit scores (smoothed importance, times uncertainty if used)."""
        if self.beta2 == 1.0:
            # The uncertainty EMA never moves from 0 then; the product would rank nothing.
            return list(self.ipt)
        return [ipt * unc for ipt, unc in zip(self.ipt, self.unc, strict=True)]

    @torch.no_grad()
    def __call__(self, step: int, total: int) -> None:
        """Update the importances from the current gradients and apply the mask of ``step + 1``."""
        for i, m in enumerate(self.modules):
            if m.s.grad is None:
                continue
            unit = self.score_fn((m.s * m.s.grad).abs().float(), 1 - self.dim)
            if not self.regrow:
                unit = unit * m.s_mask
            self.ipt[i].mul_(self.beta1).add_((1 - self.beta1) * unit)
            self.unc[i].mul_(self.beta2).add_((1 - self.beta2) * (unit - self.ipt[i]).abs())
        warmup, cooldown = self.bounds(total)
        ratio = kept_ratio(step + 1, total, self.target, warmup, cooldown, self.schedule)
        self.last_ratio = ratio
        if ratio >= 1.0:
            return
        scores = torch.cat([s.cpu() for s in self.unit_scores()])
        sizes = torch.cat([torch.full((len(m.s_mask),), m.s_unit_size) for m in self.modules])
        alive = torch.cat([m.s_mask.cpu() for m in self.modules])
        if not self.regrow:
            # Pruned units stay pruned: they rank after every live unit.
            scores = torch.where(alive, scores, torch.full_like(scores, -1.0))
        order = torch.argsort(scores, descending=True, stable=True)
        budget = ratio * self.total_entries
        keep_n = int(
            torch.searchsorted(
                torch.cumsum(sizes[order], 0).double(), torch.tensor(budget, dtype=torch.float64), right=True
            )
        )
        keep = torch.zeros_like(alive)
        keep[order[:keep_n]] = True
        if not self.regrow:
            keep &= alive
        start = 0
        for m in self.modules:
            n = len(m.s_mask)
            mask = keep[start : start + n].to(m.s_mask.device)
            start += n
            m.s_mask.copy_(mask)
            # With regrow the optimiser moved masked entries too; zeroing them after every step is
            # the authors' masked_fill, so a unit that comes back restarts from 0.
            m.s.mul_(m.s_mask_2d().to(m.s.dtype))

    def state_dict(self) -> dict:
        """The smoothed importances (the masks live in the model), for resumable training."""
        return {"ipt": list(self.ipt), "unc": list(self.unc), "last_ratio": self.last_ratio}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved."""
        for own, saved in zip(self.ipt + self.unc, state["ipt"] + state["unc"], strict=True):
            own.copy_(saved)
        self.last_ratio = state["last_ratio"]

    def kept_fraction(self) -> float:
        """Share of all S entries currently kept."""
        return sum(m.s_kept_entries() for m in self.modules) / self.total_entries


def finalize_compact(model: nn.Module) -> dict:
    """Swap every masked S for its compact form (kept units + indices); returns remaining ratios."""
    ratios = {}
    for name, m in low_rank_sparse_modules(model).items():
        compact = m.to_compact()
        set_submodule(model, name, compact)
        dense = m.in_features * m.out_features
        ratios[name] = (compact.u.numel() + compact.v.numel() + compact.s.numel()) / dense
    return ratios
