"""Permutation alignment of experts before merging (MC-SMoE Algorithm 1, weight matching)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from pipeline.families import MoEAdapter, SparseLayer
from pipeline.registry import Registry

# An aligner returns, for one layer, a permutation of each expert's hidden neurons (None: leave as
# is), given the reference expert, the layer inputs kept by profiling (None if not available) and
# whether weight matching's cost includes the output projection (keyword ``include_wo``).
Aligner = Callable[..., list[torch.Tensor | None]]
ALIGNERS: Registry[Aligner] = Registry("alignment method")


def _neuron_rows(weights: dict[str, torch.Tensor], neuron_axes: dict[str, int]) -> torch.Tensor:
    """``[n_neurons, rest]``: row i holds every weight attached to hidden neuron i, over all matrices."""
    return torch.cat(
        [
            w.movedim(neuron_axes[k], 0).reshape(w.shape[neuron_axes[k]], -1).float()
            for k, w in weights.items()
            if neuron_axes[k] is not None  # an output bias moves with no neuron
        ],
        dim=1,
    )


def weight_matching_permutation(
    ref: dict[str, torch.Tensor],
    other: dict[str, torch.Tensor],
    neuron_axes: dict[str, int],
    include_wo: bool = True,
) -> torch.Tensor:
    """The permutation P maximising sum_k <W_k^ref, P W_k^other> over all expert matrices k.

    For a Switch expert this is <W_in^a, P W_in^b> + <W_out^a, W_out^b P^T>; solved exactly as a
    linear assignment. ``other`` permuted by the result has neuron i = old neuron ``perm[i]``.
    With ``include_wo=False`` the output projections (whose hidden neurons are their input axis,
    1) are left out of the cost, as the authors' ``include_wo`` switch does.
    """
    if not include_wo:
        inputs = [k for k in ref if neuron_axes[k] == 0]
        ref, other = {k: ref[k] for k in inputs}, {k: other[k] for k in inputs}
    # One float32 matmul: float64 doubles its cost, and the assignment only needs the ordering.
    cost = _neuron_rows(ref, neuron_axes) @ _neuron_rows(other, neuron_axes).T
    rows, cols = linear_sum_assignment(cost.cpu().numpy(), maximize=True)
    perm = np.empty_like(cols)
    perm[rows] = cols
    return torch.as_tensor(perm, dtype=torch.long)


@ALIGNERS.register("weight-matching")
def _weight_matching(
    adapter: MoEAdapter,
    layer: SparseLayer,
    reference: int,
    inputs: torch.Tensor | None,
    include_wo: bool = True,
) -> list[torch.Tensor | None]:
    ref = adapter.expert_weights(layer, reference)
    others = [e for e in range(adapter.num_experts(layer)) if e != reference]

    def solve(e: int) -> torch.Tensor:
        return weight_matching_permutation(
            ref, adapter.expert_weights(layer, e), adapter.neuron_axes, include_wo
        )

    # scipy's assignment solver is single-threaded and releases the GIL: solve pairs side by side.
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        perms = dict(zip(others, pool.map(solve, others), strict=True))
    return [perms.get(e) for e in range(adapter.num_experts(layer))]


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
    adapter: MoEAdapter,
    layer: SparseLayer,
    reference: int,
    inputs: torch.Tensor | None,
    include_wo: bool = True,
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
    adapter: MoEAdapter,
    layer: SparseLayer,
    reference: int,
    inputs: torch.Tensor | None,
    include_wo: bool = True,
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
    layers: Collection[str] | None = None,
    include_wo: bool = True,
) -> dict:
    """Align every expert of every SMoE layer (or of the named ``layers``) to the layer's reference
    expert, in place.

    ``reference``: ``first`` (expert 0, as the paper) or ``most-used`` (needs ``frequencies``);
    ``inputs``: per layer, profiled layer inputs (needed by activation matching); ``include_wo``:
    whether weight matching's cost includes the output projection.
    Returns per-layer reference experts and how many neurons moved.
    """
    aligner = ALIGNERS.get(method)
    report = {}
    for layer in adapter.sparse_layers(model):
        if layers is not None and layer.name not in layers:
            continue
        if reference == "most-used":
            if frequencies is None or layer.name not in frequencies:
                raise ValueError(f"align.reference=most-used needs the routing profile of {layer.name}")
            ref = int(torch.argmax(frequencies[layer.name]))
        else:
            ref = 0
        perms = aligner(adapter, layer, ref, (inputs or {}).get(layer.name), include_wo=include_wo)
        moved = 0
        for e, perm in enumerate(perms):
            if perm is not None:
                adapter.permute_expert(layer, e, perm)
                moved += int((perm != torch.arange(len(perm))).sum())
        report[layer.name] = {"reference": ref, "neurons_moved": moved}
    return report
