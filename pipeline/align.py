"""Permutation alignment of experts before merging (MC-SMoE Algorithm 1, weight matching).

Each expert's hidden neurons are described by feature rows (weight matching: every weight attached
to the neuron; activation matching: its standardised activations on profiled inputs). The
similarity of expert ``e`` to the reference is ``S = R_ref R_e^T`` (float32 for weights, built on
``device``), and the permutation maximising ``sum_i S[i, perm[i]]`` is found by a registered
assignment solver (:mod:`pipeline.assignment`).

Gain, per layer: with ``D_e(P) = ||R_ref - P R_e||^2 = ||R_ref||^2 + ||R_e||^2 - 2 sum_i S[i, P(i)]``
summed over the layer's non-reference experts, ``gain = 1 - D(aligned) / D(identity)``: the share
of the experts' squared distance to the reference (in the matched features) that alignment removes.
For weight matching that is the squared Frobenius distance of the expert matrices in the cost, which
is what a merge of the expert with the reference averages over. A layer whose gain is below
``min_gain`` is left unaligned.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
from torch import nn

from pipeline.assignment import DEFAULT_SETTINGS, SOLVERS, SolverPool, SolverSettings, solve, solve_many
from pipeline.families import MoEAdapter, SparseLayer
from pipeline.registry import Registry

# An aligner returns, for one expert of a layer, its neuron feature rows ``[n_neurons, d]`` (None:
# the method aligns nothing), given the layer inputs kept by profiling (None if not available) and
# whether weight matching's cost includes the output projection (keyword ``include_wo``).
Aligner = Callable[..., torch.Tensor | None]
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


def weight_features(
    weights: dict[str, torch.Tensor], neuron_axes: dict[str, int], include_wo: bool = True
) -> torch.Tensor:
    """Weight matching's float32 neuron rows; without ``include_wo`` only the input projections
    (the matrices whose hidden neurons are axis 0), as the authors' ``include_wo`` switch."""
    if not include_wo:
        weights = {k: w for k, w in weights.items() if neuron_axes[k] == 0}
    return _neuron_rows(weights, neuron_axes)


def weight_matching_permutation(
    ref: dict[str, torch.Tensor],
    other: dict[str, torch.Tensor],
    neuron_axes: dict[str, int],
    include_wo: bool = True,
    solver: str = "exact",
    settings: SolverSettings = DEFAULT_SETTINGS,
) -> torch.Tensor:
    """The permutation P maximising sum_k <W_k^ref, P W_k^other> over all expert matrices k.

    For a Switch expert this is <W_in^a, P W_in^b> + <W_out^a, W_out^b P^T>; solved as a linear
    assignment by ``solver`` (exact by default). ``other`` permuted by the result has neuron i =
    old neuron ``perm[i]``. With ``include_wo=False`` the output projections (whose hidden neurons
    are their input axis, 1) are left out of the cost, as the authors' ``include_wo`` switch does.
    """
    # One float32 matmul: float64 doubles its cost, and the assignment only needs the ordering.
    cost = weight_features(ref, neuron_axes, include_wo) @ weight_features(other, neuron_axes, include_wo).T
    return solve(cost, solver, settings).perm


@ALIGNERS.register("weight-matching")
def _weight_matching(
    adapter: MoEAdapter,
    layer: SparseLayer,
    expert: int,
    inputs: torch.Tensor | None,
    include_wo: bool = True,
) -> torch.Tensor:
    return weight_features(adapter.expert_weights(layer, expert), adapter.neuron_axes, include_wo)


def _standardise(a: torch.Tensor) -> torch.Tensor:
    """``[T, F]`` activations -> ``[F, T]`` float64 rows of zero mean and unit norm."""
    a = a.double() - a.double().mean(0)
    return (a / a.norm(dim=0).clamp_min(1e-12)).T


def activation_matching_permutation(
    ref_act: torch.Tensor,
    other_act: torch.Tensor,
    solver: str = "exact",
    settings: SolverSettings = DEFAULT_SETTINGS,
) -> torch.Tensor:
    """The permutation maximising the summed correlation of paired hidden activations ``[T, F]``."""
    return solve(_standardise(ref_act) @ _standardise(other_act).T, solver, settings).perm


@ALIGNERS.register("activation-matching")
def _activation_matching(
    adapter: MoEAdapter,
    layer: SparseLayer,
    expert: int,
    inputs: torch.Tensor | None,
    include_wo: bool = True,
) -> torch.Tensor:
    if inputs is None or len(inputs) < 2:
        raise ValueError(f"align.method=activation-matching needs profiled layer inputs for {layer.name}")
    return _standardise(adapter.expert_activations(layer, expert, inputs))


@ALIGNERS.register("none")
def _no_alignment(
    adapter: MoEAdapter,
    layer: SparseLayer,
    expert: int,
    inputs: torch.Tensor | None,
    include_wo: bool = True,
) -> None:
    return None


def _sq_norm(rows: torch.Tensor) -> float:
    return float(rows.double().pow(2).sum())


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
    *,
    solver: str = "exact",
    settings: SolverSettings = DEFAULT_SETTINGS,
    workers: int | str | None = 1,
    min_gain: float = 0.0,
    device: torch.device | str | None = None,
    pool: SolverPool | None = None,
) -> dict:
    """Align every expert of every SMoE layer (or of the named ``layers``) to the layer's reference
    expert, in place.

    ``reference``: ``first`` (expert 0, as the paper) or ``most-used`` (needs ``frequencies``);
    ``inputs``: per layer, profiled layer inputs (needed by activation matching); ``include_wo``:
    whether weight matching's cost includes the output projection; ``solver``/``settings``:
    the assignment solver and its settings (:mod:`pipeline.assignment`); ``workers``: processes for exact solves (0 or 1:
    this process; ``pool`` reuses a :class:`~pipeline.assignment.SolverPool` instead); ``device``:
    where similarity matrices are built (default: the CPU); ``min_gain``: a layer whose gain (module
    docstring) is below it is left unaligned (0: align every layer).
    Returns per layer: the reference expert, neurons moved, the matching objective summed over the
    layer's experts before (identity) and after alignment, the squared distances of the experts to
    the reference before and after, the gain, and whether the layer was aligned.
    """
    features = ALIGNERS.get(method)
    SOLVERS.get(solver)
    if not min_gain >= 0:
        raise ValueError(f"min_gain={min_gain} must be >= 0")
    device = torch.device(device or "cpu")
    own_pool = pool is None
    pool = SolverPool(workers) if own_pool else pool
    report = {}
    try:
        for layer in adapter.sparse_layers(model):
            if layers is not None and layer.name not in layers:
                continue
            if reference == "most-used":
                if frequencies is None or layer.name not in frequencies:
                    raise ValueError(f"align.reference=most-used needs the routing profile of {layer.name}")
                ref = int(torch.argmax(frequencies[layer.name]))
            else:
                ref = 0
            layer_inputs = (inputs or {}).get(layer.name)
            report[layer.name] = _align_layer(
                adapter,
                layer,
                ref,
                features,
                layer_inputs,
                include_wo,
                solver,
                settings,
                pool,
                min_gain,
                device,
            )
    finally:
        if own_pool:
            pool.close()
    return report


def _align_layer(
    adapter: MoEAdapter,
    layer: SparseLayer,
    ref: int,
    features: Aligner,
    inputs: torch.Tensor | None,
    include_wo: bool,
    solver: str,
    settings: SolverSettings,
    pool: SolverPool,
    min_gain: float,
    device: torch.device,
) -> dict:
    ref_rows = features(adapter, layer, ref, inputs, include_wo=include_wo)
    if ref_rows is None:
        return {"reference": ref, "neurons_moved": 0}
    ref_rows = ref_rows.to(device)
    ref_sq = _sq_norm(ref_rows)
    others = [e for e in range(adapter.num_experts(layer)) if e != ref]
    norms: list[float] = []

    def similarities():
        # One expert's matrix at a time (plus those pending in the pool): memory stays bounded.
        for e in others:
            rows = features(adapter, layer, e, inputs, include_wo=include_wo).to(device)
            norms.append(ref_sq + _sq_norm(rows))
            yield ref_rows @ rows.T

    found = list(solve_many(similarities(), solver, settings, pool))
    before = sum(a.identity_objective for a in found)
    after = sum(a.objective for a in found)
    d_before = sum(norms) - 2 * before
    d_after = sum(norms) - 2 * after
    gain = 1 - d_after / d_before if d_before > 0 else 0.0
    aligned = not (min_gain > 0 and gain < min_gain)
    moved = 0
    if aligned:
        for e, a in zip(others, found, strict=True):
            adapter.permute_expert(layer, e, a.perm)
            moved += int((a.perm != torch.arange(len(a.perm))).sum())
    return {
        "reference": ref,
        "neurons_moved": moved,
        "objective_before": before,
        "objective_after": after,
        "distance2_before": d_before,
        "distance2_after": d_after,
        "gain": gain,
        "aligned": aligned,
    }
