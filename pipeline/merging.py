"""Merging each group of experts into one expert."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.adapters import MoEAdapter
from pipeline.registry import Registry

# A strategy maps (member expert ids, layer usage frequencies) to merge coefficients.
MergeStrategy = Callable[[list[int], torch.Tensor], torch.Tensor]
MERGE_STRATEGIES: Registry[MergeStrategy] = Registry("merge strategy")


def _normalise(w: torch.Tensor) -> torch.Tensor:
    w = w.double().clamp_min(0)
    # A group nobody used carries no usage signal: fall back to a plain average.
    return w / w.sum() if w.sum() > 0 else torch.full_like(w, 1.0 / len(w))


@MERGE_STRATEGIES.register("frequency")
def _frequency(members: list[int], freq: torch.Tensor) -> torch.Tensor:
    return _normalise(freq[members])


@MERGE_STRATEGIES.register("uniform")
def _uniform(members: list[int], freq: torch.Tensor) -> torch.Tensor:
    return _normalise(torch.ones(len(members)))


def merge_expert_weights(
    experts: list[dict[str, torch.Tensor]], coeffs: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Weighted average of expert weight dicts (coefficients sum to one)."""
    if abs(float(coeffs.sum()) - 1.0) > 1e-6:
        raise ValueError(f"merge coefficients must sum to 1, got {float(coeffs.sum())}")
    out = {}
    for k in experts[0]:
        acc = sum(c * e[k].double() for c, e in zip(coeffs.tolist(), experts, strict=True))
        out[k] = acc.to(experts[0][k].dtype)
    return out


@torch.no_grad()
def merge_model(
    model: nn.Module, adapter: MoEAdapter, groups: dict, frequencies: dict[str, torch.Tensor], strategy: str
) -> dict:
    """Replace each merged layer by one expert per group; tokens of any member go to its group's expert."""
    strat = MERGE_STRATEGIES.get(strategy)
    report = {}
    for layer in adapter.sparse_layers(model):
        spec = groups["layers"].get(layer.name)
        if spec is None or not spec["merged"]:
            continue
        n = adapter.num_experts(layer)
        expert_map = [0] * n
        merged, coeff_report = [], []
        for g, members in enumerate(spec["groups"]):
            coeffs = strat(members, frequencies[layer.name])
            merged.append(merge_expert_weights([adapter.expert_weights(layer, e) for e in members], coeffs))
            coeff_report.append({str(e): round(float(c), 6) for e, c in zip(members, coeffs, strict=True)})
            for e in members:
                expert_map[e] = g
        adapter.replace_with_merged(model, layer, expert_map, merged)
        report[layer.name] = {"experts_before": n, "experts_after": len(merged), "coefficients": coeff_report}
    return report
