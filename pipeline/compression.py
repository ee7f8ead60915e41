"""Compressing merged experts: W = U V + S with S pruned column-wise during KD (LoSparse)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.adapters import MoEAdapter, SparseLayer, set_submodule
from pipeline.moe import LowRankSparseLinear
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


class ColumnPruner:
    """Global column pruning of every S by smoothed |s * grad s| importance (LoSparse).

    Importance of a column = sum over its entries of |s * grad s|; it is smoothed with exponential
    moving averages of the importance (beta1) and of its uncertainty (beta2), and the score is their
    product. Columns are ranked over all S matrices at once and kept, best first, until the kept
    entries reach the scheduled fraction of all S entries.
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
    ) -> None:
        self.modules = list(low_rank_sparse_modules(model).values())
        if not self.modules:
            raise ValueError("the model has no low-rank + sparse module to prune; run compress first")
        self.target, self.schedule = target, schedule
        self.warmup_frac, self.cooldown_frac = warmup_frac, cooldown_frac
        self.beta1, self.beta2 = beta1, beta2
        self.ipt = [torch.zeros(m.in_features, device=m.s.device) for m in self.modules]
        self.unc = [torch.zeros(m.in_features, device=m.s.device) for m in self.modules]
        self.total_entries = sum(m.s.numel() for m in self.modules)
        self.last_ratio = 1.0

    def bounds(self, total: int) -> tuple[int, int]:
        return int(self.warmup_frac * total), int(self.cooldown_frac * total)

    def final_step(self, total: int) -> int:
        """First step at which the target ratio holds."""
        return total - self.bounds(total)[1]

    @torch.no_grad()
    def __call__(self, step: int, total: int) -> None:
        for i, m in enumerate(self.modules):
            if m.s.grad is None:
                continue
            col = (m.s * m.s.grad).abs().sum(0).float() * m.s_mask
            self.ipt[i].mul_(self.beta1).add_((1 - self.beta1) * col)
            self.unc[i].mul_(self.beta2).add_((1 - self.beta2) * (col - self.ipt[i]).abs())
        warmup, cooldown = self.bounds(total)
        ratio = kept_ratio(step + 1, total, self.target, warmup, cooldown, self.schedule)
        self.last_ratio = ratio
        if ratio >= 1.0:
            return
        scores = torch.cat([(ipt * unc).cpu() for ipt, unc in zip(self.ipt, self.unc, strict=True)])
        sizes = torch.cat([torch.full((m.in_features,), m.out_features) for m in self.modules])
        alive = torch.cat([m.s_mask.cpu() for m in self.modules])
        # Pruned columns stay pruned: they rank after every live column.
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
        keep &= alive
        start = 0
        for m in self.modules:
            mask = keep[start : start + m.in_features].to(m.s_mask.device)
            start += m.in_features
            m.s_mask.copy_(mask)
            m.s.mul_(mask.to(m.s.dtype))

    def state_dict(self) -> dict:
        """The smoothed importances (the masks live in the model), for resumable training."""
        return {"ipt": list(self.ipt), "unc": list(self.unc), "last_ratio": self.last_ratio}

    def load_state_dict(self, state: dict) -> None:
        for own, saved in zip(self.ipt + self.unc, state["ipt"] + state["unc"], strict=True):
            own.copy_(saved)
        self.last_ratio = state["last_ratio"]

    def kept_fraction(self) -> float:
        return sum(int(m.s_mask.sum()) * m.out_features for m in self.modules) / self.total_entries


def finalize_compact(model: nn.Module) -> dict:
    """Swap every masked S for its compact form (kept columns + indices); returns remaining ratios."""
    ratios = {}
    for name, m in low_rank_sparse_modules(model).items():
        compact = m.to_compact()
        set_submodule(model, name, compact)
        dense = m.in_features * m.out_features
        ratios[name] = (compact.u.numel() + compact.v.numel() + compact.s.numel()) / dense
    return ratios
