"""Permutation alignment of experts before merging (MC-SMoE Algorithm 1, weight matching)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from pipeline.adapters import MoEAdapter, SparseLayer
from pipeline.registry import Registry

# An aligner returns, for one layer, a permutation of each expert's hidden neurons (None: leave as
# is), given the reference expert and the layer inputs kept by profiling (None if not available).
Aligner = Callable[[MoEAdapter, SparseLayer, int, "torch.Tensor | None"], list[torch.Tensor | None]]
ALIGNERS: Registry[Aligner] = Registry("alignment method")


def _neuron_rows(w: torch.Tensor, axis: int) -> torch.Tensor:
    """``[n_neurons, rest]``: each row holds every weight attached to one hidden neuron."""
    return w.movedim(axis, 0).reshape(w.shape[axis], -1).double()


def weight_matching_permutation(
    ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor], neuron_axes: dict[str, int]
) -> torch.Tensor:
    """The permutation P maximising sum_k <W_k^ref, P W_k^other> over all expert matrices k.

    For a Switch expert this is <W_in^a, P W_in^b> + <W_out^a, W_out^b P^T>; solved exactly as a
    linear assignment. ``other`` permuted by the result has neuron i = old neuron ``perm[i]``.
    """
    cost = None
    for k, axis in neuron_axes.items():
        c = _neuron_rows(ref[k], axis) @ _neuron_rows(other[k], axis).T
        cost = c if cost is None else cost + c
    rows, cols = linear_sum_assignment(cost.cpu().numpy(), maximize=True)
    perm = np.empty_like(cols)
    perm[rows] = cols
    return torch.as_tensor(perm, dtype=torch.long)


@ALIGNERS.register("weight-matching")
def _weight_matching(
    adapter: MoEAdapter, layer: SparseLayer, reference: int, inputs: torch.Tensor | None
) -> list[torch.Tensor | None]:
    ref = adapter.expert_weights(layer, reference)
    out: list[torch.Tensor | None] = []
    for e in range(adapter.num_experts(layer)):
        out.append(
            None
            if e == reference
            else weight_matching_permutation(ref, adapter.expert_weights(layer, e), adapter.neuron_axes)
        )
    return out


def activation_matching_permutation(ref_act: torch.Tensor, other_act: torch.Tensor) -> torch.Tensor:
    """The permutation maximising the summed correlation of paired hidden activations ``[T, F]``."""

    def standardise(a: torch.Tensor) -> torch.Tensor:
        a = a.double() - a.double().mean(0)
        return a / a.norm(dim=0).clamp_min(1e-12)

    corr = standardise(ref_act).T @ standardise(other_act)
    rows, cols = linear_sum_assignment(corr.cpu().numpy(), maximize=True)
    perm = np.empty_like(cols)
    perm[rows] = cols
    return torch.as_tensor(perm, dtype=torch.long)


@ALIGNERS.register("activation-matching")
def _activation_matching(
    adapter: MoEAdapter, layer: SparseLayer, reference: int, inputs: torch.Tensor | None
) -> list[torch.Tensor | None]:
    if inputs is None or len(inputs) < 2:
        raise ValueError(f"align.method=activation-matching needs profiled layer inputs for {layer.name}")
    ref = adapter.expert_activations(layer, reference, inputs)
    return [
        None
        if e == reference
        else activation_matching_permutation(ref, adapter.expert_activations(layer, e, inputs))
        for e in range(adapter.num_experts(layer))
    ]


@ALIGNERS.register("none")
def _no_alignment(
    adapter: MoEAdapter, layer: SparseLayer, reference: int, inputs: torch.Tensor | None
) -> list[torch.Tensor | None]:
    return [None] * adapter.num_experts(layer)


@torch.no_grad()
def align_model(
    model: nn.Module,
    adapter: MoEAdapter,
    method: str,
    reference: str,
    frequencies: dict[str, torch.Tensor] | None = None,
    inputs: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Align every expert of every SMoE layer to the layer's reference expert, in place.

    ``reference``: ``first`` (expert 0, as the paper) or ``most-used`` (needs ``frequencies``);
    ``inputs``: per layer, profiled layer inputs (needed by activation matching).
    Returns per-layer reference experts and how many neurons moved.
    """
    aligner = ALIGNERS.get(method)
    report = {}
    for layer in adapter.sparse_layers(model):
        if reference == "most-used":
            if frequencies is None or layer.name not in frequencies:
                raise ValueError(f"align.reference=most-used needs the routing profile of {layer.name}")
            ref = int(torch.argmax(frequencies[layer.name]))
        else:
            ref = 0
        perms = aligner(adapter, layer, ref, (inputs or {}).get(layer.name))
        moved = 0
        for e, perm in enumerate(perms):
            if perm is not None:
                adapter.permute_expert(layer, e, perm)
                moved += int((perm != torch.arange(len(perm))).sum())
        report[layer.name] = {"reference": ref, "neurons_moved": moved}
    return report
