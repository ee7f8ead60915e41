"""The paper's analyses of merged and compressed experts: stable rank (Figure 4), remaining parameters (Figure 5)."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.families import MoEAdapter


def stable_rank(matrix: torch.Tensor) -> float:
    """Sum of squared singular values over the largest squared one (1 for rank 1, n for orthogonal)."""
    sig = torch.linalg.svdvals(matrix.detach().double())
    if sig.numel() == 0 or float(sig[0]) == 0.0:
        return 0.0
    return float((sig**2).sum() / sig[0] ** 2)


def dominant_experts(groups: dict) -> dict[str, list[int]]:
    """Per merged layer, the dominant expert of each group (each group lists it first)."""
    return {
        name: [members[0] for members in spec["groups"]]
        for name, spec in groups["layers"].items()
        if spec["merged"]
    }


@torch.no_grad()
def expert_stable_ranks(
    model: nn.Module, adapter: MoEAdapter, experts: dict[str, list[int]]
) -> dict[str, list[dict[str, float]]]:
    """Stable rank of each matrix of the listed experts, per layer, in the given order."""
    layers = {ly.name: ly for ly in adapter.sparse_layers(model)}
    return {
        name: [
            {k: stable_rank(w) for k, w in adapter.expert_weights(layers[name], e).items() if w.dim() == 2}
            for e in idx
        ]
        for name, idx in experts.items()
    }


def stable_rank_change(
    before: dict[str, list[dict[str, float]]], after: dict[str, list[dict[str, float]]]
) -> dict[str, dict]:
    """Per layer: mean stable rank of the dominant experts before and after merging, and the mean
    relative change (after - before) / before over every expert matrix (negative = rank lost)."""
    out = {}
    for name, rows in before.items():
        changes, b_all, a_all = [], [], []
        for b, a in zip(rows, after[name], strict=True):
            for k in b:
                b_all.append(b[k])
                a_all.append(a[k])
                changes.append((a[k] - b[k]) / b[k] if b[k] else 0.0)
        out[name] = {
            "mean_before": sum(b_all) / len(b_all),
            "mean_after": sum(a_all) / len(a_all),
            "mean_change_ratio": sum(changes) / len(changes),
        }
    return out


def remaining_param_ratios(model: nn.Module, adapter: MoEAdapter) -> dict[str, list[float]]:
    """Per SMoE layer, each expert's stored parameters over its dense parameters (1.0 = uncompressed)."""
    return {
        layer.name: [
            c["kept"] / c["dense"] if c["dense"] else 1.0 for c in adapter.expert_param_counts(layer)
        ]
        for layer in adapter.sparse_layers(model)
    }
