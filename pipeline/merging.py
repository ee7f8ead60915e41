"""Merging each group of experts into one expert, then (optionally) repairing its neuron statistics.

Two kinds of merge strategy share one registry, chosen by ``merge.strategy``:

* coefficient strategies (``frequency``, ``uniform``, ``fisher``, ``dominant``) map the members and
  the layer's routing profile to averaging coefficients, and :func:`merge_expert_weights` takes the
  weighted average of the (aligned) members;
* weight strategies (:class:`WeightMergeStrategy`: ``zipit``) build the merged weights themselves
  from the adapter, the layer, the members and the profile.

After either, ``merge.repair`` (:data:`REPAIRS`: ``none`` | ``repair``) may reset each merged
neuron's pre-activation statistics (REPAIR).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pipeline.clustering import first_merges_labels
from pipeline.families import ModelStructureError, MoEAdapter, SparseLayer
from pipeline.profiling import LayerProfile
from pipeline.registry import Registry

# A coefficient strategy maps (member expert ids, the layer's routing profile) to merge
# coefficients: one per member, or per expert matrix a tensor with one coefficient per member and element.
Coefficients = torch.Tensor | dict[str, torch.Tensor]
MergeStrategy = Callable[[list[int], LayerProfile], Coefficients]


@dataclass
class MergedGroup:
    """One group's merged expert.

    ``neuron_map[i, j]``: the merged neuron that hidden neuron j of member i went into (the identity
    for averaging strategies, whose neurons correspond after alignment). ``shares``: each member's
    share of the merge, for the report. ``info``: strategy-specific facts for the report.
    """

    weights: dict[str, torch.Tensor]
    neuron_map: torch.Tensor
    shares: dict[str, float]
    info: dict = field(default_factory=dict)


class WeightMergeStrategy:
    """A merge strategy that produces the merged expert's weights itself.

    Called like a coefficient strategy, ``(members, profile)``, it returns each member's share of
    the merged expert's output, which is what reports list for it.
    """

    def __call__(self, members: list[int], profile: LayerProfile) -> Coefficients:
        raise NotImplementedError

    def merge(
        self, adapter: MoEAdapter, layer: SparseLayer, members: list[int], profile: LayerProfile
    ) -> MergedGroup:
        """The merged expert of ``members`` (expert ids of ``layer``, leader first)."""
        raise NotImplementedError


MERGE_STRATEGIES: Registry[MergeStrategy | WeightMergeStrategy] = Registry("merge strategy")


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


@MERGE_STRATEGIES.register("dominant")
def _dominant(members: list[int], profile: LayerProfile) -> torch.Tensor:
    """The group's leader alone (with ``merge.router: prune``, one-shot expert pruning)."""
    c = torch.zeros(len(members), dtype=torch.float64)
    c[0] = 1.0
    return c


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


def _num_neurons(weights: dict[str, torch.Tensor], neuron_axes: dict[str, int | None]) -> int:
    return next(w.shape[neuron_axes[k]] for k, w in weights.items() if neuron_axes[k] is not None)


def _calibration_inputs(profile: LayerProfile, what: str) -> torch.Tensor:
    x = profile.inputs
    if x is None or len(x) < 2:
        raise ValueError(
            f"{what} needs the profiled layer inputs of {profile.name} (at least 2 tokens); "
            "run the profile stage with profile.max_inputs >= 2"
        )
    return x


# ------------------------------------------------------------------------------------- ZipIt


def feature_correlation(features: torch.Tensor) -> torch.Tensor:
    """Pearson correlation ``[N, N]`` (float32) of the columns of ``features`` ``[T, N]``.

    A constant (zero-variance) feature, e.g. a dead ReLU neuron, has no defined correlation; it is
    given 1 with every other constant feature (one is an affine function of the other, so merging
    them loses nothing) and 0 with the rest, so nothing is NaN.
    """
    a = features.double()
    centred = a - a.mean(0)
    norm = centred.norm(dim=0)
    # Centring a constant column leaves only rounding noise, far below its magnitude.
    const = norm <= 1e-9 * a.abs().amax(0) * math.sqrt(len(a))
    z = torch.where(const, torch.zeros_like(centred), centred / norm.clamp_min(1e-300)).float()
    corr = z.T @ z
    idx = const.nonzero().flatten()
    if len(idx):
        corr[idx[:, None], idx[None, :]] = 1.0
    corr.fill_diagonal_(1.0)
    return corr


def zipit_clusters(features: torch.Tensor, k: int) -> torch.Tensor:
    """Partition the ``N`` columns of ``features`` ``[T, N]`` into exactly ``k`` clusters by
    greedily merging the most correlated pair, a merged feature's correlation to another being the
    mean of its members' (average-linkage agglomerative clustering on ``1 - correlation``).

    Returns ``[N]`` labels in ``0..k-1``, numbered by each cluster's first column. Memory and time
    are quadratic in ``N`` (an ``N x N`` matrix plus scipy's condensed distances).
    """
    from scipy.cluster.hierarchy import linkage

    n = features.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"cannot zip {n} features into {k}")
    if k == n:
        return torch.arange(n)
    # In place: at n x F features in the tens of thousands, every N x N copy costs gigabytes.
    dist = feature_correlation(features).neg_().add_(1.0).clamp_(0.0, 2.0).cpu().numpy()
    # scipy wants the condensed upper triangle in float64: fill it row by row, never a second N x N.
    condensed = np.empty(n * (n - 1) // 2, dtype=np.float64)
    start = 0
    for i in range(n - 1):
        condensed[start : start + n - 1 - i] = dist[i, i + 1 :]
        start += n - 1 - i
    del dist
    merges = linkage(condensed, method="average")
    return torch.as_tensor(first_merges_labels(merges, n, k), dtype=torch.long)


def zip_expert_weights(
    experts: list[dict[str, torch.Tensor]], labels: torch.Tensor, neuron_axes: dict[str, int | None]
) -> dict[str, torch.Tensor]:
    """One expert from ``experts`` whose hidden neurons, concatenated in member order, are grouped
    by ``labels`` ``[n * F]`` into ``k`` merged neurons.

    A tensor whose neuron axis is 0 feeds the neurons (input rows, their biases): a merged neuron's
    row is the mean of its cluster's rows. One whose neuron axis is 1 reads them (output columns):
    a merged neuron's column is ``1/n`` times the sum of its cluster's columns, so the merged
    expert approximates the plain average of the members' outputs. A tensor without a neuron axis
    (an output bias) is averaged. Sums run in float64, so identical members give that expert exactly.
    """
    n, k = len(experts), int(labels.max()) + 1
    out = {}
    for key, ref in experts[0].items():
        axis = neuron_axes[key]
        if axis is None:
            out[key] = (sum(e[key].double() for e in experts) / n).to(ref.dtype)
            continue
        if axis not in (0, 1):
            raise ValueError(f"{key}: neuron axis {axis} is neither an input (0) nor an output (1) side")
        cat = torch.cat([e[key].double() for e in experts], dim=axis)
        shape = list(cat.shape)
        shape[axis] = k
        idx = labels.to(cat.device)
        summed = torch.zeros(shape, dtype=torch.float64, device=cat.device).index_add_(axis, idx, cat)
        if axis == 0:
            counts = torch.bincount(idx, minlength=k).double()
            merged = summed / counts.reshape(-1, *[1] * (cat.dim() - 1))
        else:
            merged = summed / n
        out[key] = merged.to(ref.dtype)
    return out


class ZipIt(WeightMergeStrategy):
    """ZipIt (Stoica et al. 2023, arXiv 2305.03053) as MC-SMoE's baselines apply it to a group.

    The layer's calibration inputs (profile ``inputs``: the first ``profile.max_inputs`` layer
    inputs, shared by all experts) run through every member; their ``n * F`` hidden features are
    zipped into ``F`` by greedily merging the most correlated pair, within one expert or across
    experts, with no usage weighting (:func:`zipit_clusters`, :func:`zip_expert_weights`). It
    needs no prior alignment: features are matched here.

    Differences from the authors' ``merge_switch_mlp_by_activation_matching_within_and_across_models``
    (mcsmoe/merging/permutation.py), which merges one pair per step:

    * after merging a pair they overwrite the merged feature's correlations with
      ``0.1 * min(...)`` of the pair's (``alpha_for_repeated_merging``), shrinking positive ones
      tenfold, so a merged feature is rarely merged again; here its correlation to another is the
      mean of its members' (average linkage), the greedy process on mean correlation;
    * they set the output column of a merged feature to the mean of its cluster's columns, so a
      feature standing for one neuron of one member weighs as much as one standing for all ``n``
      members: clusters of unequal size are mis-weighted against the plain average of the members'
      outputs. Here the column is ``1/n`` times the cluster's sum;
    * they feed the group's routed tokens (each member's, concatenated); here the shared
      profiled inputs; constant features get correlation 0 with everything there (``+ eps``), here
      1 with each other (:func:`feature_correlation`).
    """

    def __call__(self, members: list[int], profile: LayerProfile) -> torch.Tensor:
        # Every member's neurons enter the output at weight 1/n.
        return _normalise(torch.ones(len(members)))

    def merge(
        self, adapter: MoEAdapter, layer: SparseLayer, members: list[int], profile: LayerProfile
    ) -> MergedGroup:
        weights = [adapter.expert_weights(layer, e) for e in members]
        f = _num_neurons(weights[0], adapter.neuron_axes)
        n = len(members)
        shares = _summary(members, self(members, profile))
        if n == 1:
            return MergedGroup(
                {k: v.clone() for k, v in weights[0].items()}, torch.arange(f)[None], shares, {}
            )
        x = _calibration_inputs(profile, "merge.strategy=zipit")
        x = x.to(next(layer.module.parameters()).device)
        acts = torch.cat([adapter.expert_activations(layer, e, x).detach() for e in members], dim=1)
        labels = zipit_clusters(acts, f)
        member_of = torch.arange(n).repeat_interleave(f)
        size = torch.bincount(labels, minlength=f)
        spans = torch.zeros(f, n, dtype=torch.bool)
        spans[labels, member_of] = True
        across = spans.sum(1) > 1
        info = {
            "clusters_across_members": int(across.sum()),
            "clusters_within_one_member": int(((size > 1) & ~across).sum()),
            "singletons": int((size == 1).sum()),
        }
        return MergedGroup(
            zip_expert_weights(weights, labels, adapter.neuron_axes), labels.reshape(n, f), shares, info
        )


MERGE_STRATEGIES.register("zipit")(ZipIt())


# ------------------------------------------------------------------------------------ REPAIR


def _preactivation_keys(adapter: MoEAdapter, layer: SparseLayer) -> dict[str, str]:
    keys = adapter.preactivation_biases
    if not keys:
        raise ModelStructureError(
            f"merge.repair=repair is not available for model family {adapter.model_type!r} "
            f"({layer.name}): its adapter names no pre-activation bias (preactivation_biases) "
            "for REPAIR to set on merged experts"
        )
    return keys


def _preactivations(
    weights: dict[str, torch.Tensor], matrix: str, bias: str, x: torch.Tensor
) -> torch.Tensor:
    """``x W^T + b`` ``[T, F]`` in float64 (``b``: 0 when the expert has no such bias)."""
    w = weights[matrix].double()
    z = x.to(w.device, torch.float64) @ w.T
    return z + weights[bias].double() if bias in weights else z


def _preact_stats(
    weights: dict[str, torch.Tensor], matrix: str, bias: str, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per hidden neuron, the mean and (population) std of its pre-activation over the rows of ``x``."""
    z = _preactivations(weights, matrix, bias, x)
    return z.mean(0), z.std(0, correction=0)


def _targets(
    member_weights: list[dict[str, torch.Tensor]],
    neuron_map: torch.Tensor,
    matrix: str,
    bias: str,
    x: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per merged neuron: the mean over the member neurons merged into it of their mean and std."""
    stats = [_preact_stats(w, matrix, bias, x) for w in member_weights]
    mu = torch.stack([s[0] for s in stats]).flatten()
    sd = torch.stack([s[1] for s in stats]).flatten()
    idx = neuron_map.flatten().to(mu.device)
    count = torch.bincount(idx, minlength=k).double().clamp_min(1)
    zeros = torch.zeros(k, dtype=torch.float64, device=mu.device)
    return zeros.index_add(0, idx, mu) / count, zeros.index_add(0, idx, sd) / count


def _shift(
    merged: dict[str, torch.Tensor], matrix: str, bias: str, x: torch.Tensor, mu_t, sd_t
) -> dict[str, float]:
    mu, sd = _preact_stats(merged, matrix, bias, x)
    live = sd_t > 0  # a ratio to a target spread of 0 means nothing
    return {
        "mean_abs_dmu": float((mu - mu_t).abs().mean()),
        "mean_abs_dsigma": float((sd - sd_t).abs().mean()),
        # Below 1: the merged neurons' spread collapsed (REPAIR's "variance collapse").
        "std_ratio": float((sd[live] / sd_t[live]).mean()) if live.any() else 1.0,
    }


def repair_group(
    adapter: MoEAdapter,
    layer: SparseLayer,
    member_weights: list[dict[str, torch.Tensor]],
    group: MergedGroup,
    x: torch.Tensor,
    apply: bool = True,
) -> dict[str, dict[str, float]]:
    """REPAIR (Jordan et al. 2022, arXiv 2211.08403) of one merged expert, in place.

    For every pre-activation matrix of the family (Switch ``wi``; SwiGLU ``gate`` and ``up``) and
    every merged neuron, the target mean and std are the mean over the member neurons merged into
    it (``group.neuron_map``; after alignment, the members' neurons of the same index) of their
    pre-activation mean and std on the calibration inputs ``x``. The neuron's input row is scaled
    by ``sigma_target / sigma_merged`` and its bias set so the mean becomes ``mu_target``. A
    neuron with (numerically) zero spread is left unscaled and only re-centred. Returns, per
    matrix, the mean ``|delta mu|``, ``|delta sigma|`` and std ratio before (and after) the repair;
    ``apply=False`` only measures.

    This is the paper's exact variant (the merged expert's own statistics are measured), with the
    targets of a plain average of the endpoints generalised to ``n`` members. The paper repairs
    layer after layer on the interpolated network's forward passes over training data; here every
    layer uses the inputs profiled on the unmerged model (the first ``profile.max_inputs``, shared
    by all experts, not each member's own tokens), so it does not see the input shift of earlier
    merged layers. The authors' MC-SMoE code has no such step: its "repair" baseline is activation
    matching plus a plain average (``merge_by_groups(..., permute_strategy="activation-matching")``).
    """
    keys = _preactivation_keys(adapter, layer)
    merged = group.weights
    k = _num_neurons(merged, adapter.neuron_axes)
    out = {}
    for matrix, bias in keys.items():
        mu_t, sd_t = _targets(member_weights, group.neuron_map, matrix, bias, x, k)
        stats = {f"{name}_before": v for name, v in _shift(merged, matrix, bias, x, mu_t, sd_t).items()}
        if apply:
            w = merged[matrix]
            z = _preactivations(merged, matrix, bias, x)
            mu, sd = z.mean(0), z.std(0, correction=0)
            # A constant pre-activation keeps only rounding noise as spread, far below its size
            # (an all-zero one: 0 <= 0); scaling that noise up would blow the row up.
            flat = sd <= 1e-9 * z.abs().amax(0)
            scale = torch.where(flat, torch.ones_like(sd), sd_t / sd.clamp_min(1e-300))
            old_b = merged[bias].double() if bias in merged else torch.zeros_like(mu)
            # New pre-activation: scale * (z - mu) + mu_target, with z = W x + old_b.
            merged[matrix] = (scale[:, None] * w.double()).to(w.dtype)
            merged[bias] = (mu_t + scale * (old_b - mu)).to(w.dtype)
            stats.update(
                {f"{name}_after": v for name, v in _shift(merged, matrix, bias, x, mu_t, sd_t).items()}
            )
        out[matrix] = stats
    return out


# A repair step sees the adapter, the layer, the members' weights, the merged group (changed in
# place) and the profile; it returns the statistics for the report (None: nothing measured).
Repair = Callable[
    [MoEAdapter, SparseLayer, list[dict[str, torch.Tensor]], MergedGroup, LayerProfile], dict | None
]
REPAIRS: Registry[Repair] = Registry("repair method")


@REPAIRS.register("none")
def _no_repair(
    adapter: MoEAdapter,
    layer: SparseLayer,
    member_weights: list[dict[str, torch.Tensor]],
    group: MergedGroup,
    profile: LayerProfile,
) -> dict | None:
    # Nothing measured either: the statistics cost a float64 pass of every member, minutes on a
    # CPU for LLM-sized experts. A repair run's "before" figures are what this merge would show.
    return None


@REPAIRS.register("repair")
def _repair(
    adapter: MoEAdapter,
    layer: SparseLayer,
    member_weights: list[dict[str, torch.Tensor]],
    group: MergedGroup,
    profile: LayerProfile,
) -> dict | None:
    x = _calibration_inputs(profile, "merge.repair=repair")
    return repair_group(adapter, layer, member_weights, group, x)


def _layer_shift(stats: list[dict]) -> dict[str, float]:
    """Mean over the layer's groups and pre-activation matrices of each statistic."""
    values: dict[str, list[float]] = {}
    for per_matrix in stats:
        for s in per_matrix.values():
            for name, v in s.items():
                values.setdefault(name, []).append(v)
    return {name: round(sum(v) / len(v), 6) for name, v in values.items()}


@torch.no_grad()
def merge_model(
    model: nn.Module,
    adapter: MoEAdapter,
    groups: dict,
    profiles: dict[str, LayerProfile],
    strategy: str,
    repair: str = "none",
) -> dict:
    """Replace each merged layer by one expert per group; tokens of any member go to its group's expert.

    ``strategy`` names a :data:`MERGE_STRATEGIES` entry, ``repair`` a :data:`REPAIRS` one.
    """
    strat = MERGE_STRATEGIES.get(strategy)
    repair_fn = REPAIRS.get(repair)
    report = {}
    for layer in adapter.sparse_layers(model):
        spec = groups["layers"].get(layer.name)
        if spec is None or not spec["merged"]:
            continue
        profile = profiles[layer.name]
        n = adapter.num_experts(layer)
        expert_map = [0] * n
        merged, coeff_report, infos, shifts = [], [], [], []
        for g, members in enumerate(spec["groups"]):
            member_weights = [adapter.expert_weights(layer, e) for e in members]
            if isinstance(strat, WeightMergeStrategy):
                group = strat.merge(adapter, layer, members, profile)
            else:
                coeffs = strat(members, profile)
                f = _num_neurons(member_weights[0], adapter.neuron_axes)
                group = MergedGroup(
                    merge_expert_weights(member_weights, coeffs),
                    torch.arange(f).repeat(len(members), 1),
                    _summary(members, coeffs),
                )
            shift = repair_fn(adapter, layer, member_weights, group, profile)
            if shift is not None:
                shifts.append(shift)
            merged.append(group.weights)
            coeff_report.append(group.shares)
            infos.append(group.info)
            for e in members:
                expert_map[e] = g
        # Groups list their dominant expert first.
        dominant = [members[0] for members in spec["groups"]]
        adapter.replace_with_merged(model, layer, expert_map, merged, dominant)
        entry = {"experts_before": n, "experts_after": len(merged), "coefficients": coeff_report}
        if any(infos):
            entry["strategy_info"] = infos
        if shifts:
            entry["preactivation_shift"] = {"repair": repair, **_layer_shift(shifts)}
        report[layer.name] = entry
    return report
