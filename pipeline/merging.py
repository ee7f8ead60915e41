"""Merging each group of experts into one expert."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.adapters import MoEAdapter
from pipeline.profiling import LayerProfile
from pipeline.registry import Registry

# A strategy maps (member expert ids, the layer's routing profile) to merge coefficients: one per
# member, or per expert matrix a tensor with one coefficient per member and element.
Coefficients = torch.Tensor | dict[str, torch.Tensor]
MergeStrategy = Callable[[list[int], LayerProfile], Coefficients]
MERGE_STRATEGIES: Registry[MergeStrategy] = Registry("merge strategy")


def _normalise(w: torch.Tensor) -> torch.Tensor:
    w = w.double().clamp_min(0)
    # A group nobody used carries no usage signal: fall back to a plain average.
    return w / w.sum() if w.sum() > 0 else torch.full_like(w, 1.0 / len(w))


@MERGE_STRATEGIES.register("frequency")
def _frequency(members: list[int], profile: LayerProfile) -> torch.Tensor:
    return _normalise(profile.frequency[members])


@MERGE_STRATEGIES.register("uniform")
def _uniform(members: list[int], profile: LayerProfile) -> torch.Tensor:
    return _normalise(torch.ones(len(members)))


@MERGE_STRATEGIES.register("fisher")
def _fisher(members: list[int], profile: LayerProfile) -> dict[str, torch.Tensor]:
    """Element-wise weights proportional to each member's diagonal Fisher information."""
    if not profile.fisher:
        raise ValueError(
            f"merge.strategy=fisher needs Fisher diagonals in the profile of {profile.name}; "
            "set profile.gradients: true"
        )
    shapes = {key.split("::", 1)[1]: v.shape for key, v in profile.fisher.items()}
    out = {}
    for k, shape in shapes.items():
        f = torch.stack([profile.fisher.get(f"{e}::{k}", torch.zeros(shape)).double() for e in members])
        total = f.sum(0, keepdim=True)
        # Where no member carries information, fall back to the plain average.
        out[k] = torch.where(total > 0, f / total.clamp_min(1e-300), torch.full_like(f, 1.0 / len(members)))
    return out


def merge_expert_weights(
    experts: list[dict[str, torch.Tensor]], coeffs: Coefficients
) -> dict[str, torch.Tensor]:
    """Weighted average of expert weight dicts; coefficients sum to one (per element when per-matrix)."""
    out = {}
    for k, ref in experts[0].items():
        c = coeffs[k] if isinstance(coeffs, dict) else coeffs.double().reshape(-1, *[1] * ref.dim())
        if not torch.allclose(c.sum(0), torch.ones((), dtype=c.dtype), atol=1e-6):
            raise ValueError(
                f"merge coefficients of {k} must sum to 1, got {c.sum(0).flatten()[:3].tolist()}"
            )
        # Accumulate member by member in (at least) float32: stacking every member in float64 costs
        # seconds per layer at switch-base size, and float32 sums are exact enough for weights.
        acc_dtype = torch.promote_types(ref.dtype, torch.float32)
        acc = torch.zeros(ref.shape, dtype=acc_dtype, device=ref.device)
        for i, e in enumerate(experts):
            if isinstance(coeffs, dict):
                acc.add_(e[k].to(acc_dtype) * c[i].to(acc.device, acc_dtype))
            else:
                acc.add_(e[k].to(acc_dtype), alpha=float(c[i]))
        out[k] = acc.to(ref.dtype)
    return out


def _summary(members: list[int], coeffs: Coefficients) -> dict[str, float]:
    """Each member's share of the merge (mean over elements for per-element coefficients)."""
    if isinstance(coeffs, dict):
        shares = torch.stack([c.reshape(len(members), -1).mean(1) for c in coeffs.values()]).mean(0)
    else:
        shares = coeffs
    return {str(e): round(float(c), 6) for e, c in zip(members, shares, strict=True)}


@torch.no_grad()
def merge_model(
    model: nn.Module, adapter: MoEAdapter, groups: dict, profiles: dict[str, LayerProfile], strategy: str
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
            coeffs = strat(members, profiles[layer.name])
            merged.append(merge_expert_weights([adapter.expert_weights(layer, e) for e in members], coeffs))
            coeff_report.append(_summary(members, coeffs))
            for e in members:
                expert_map[e] = g
        # Groups list their dominant expert first.
        dominant = [members[0] for members in spec["groups"]]
        adapter.replace_with_merged(model, layer, expert_map, merged, dominant)
        report[layer.name] = {"experts_before": n, "experts_after": len(merged), "coefficients": coeff_report}
    return report
