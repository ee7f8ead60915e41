"""Grouping experts: a budget of groups per layer, chosen globally by usage, filled by a method.

``m-smoe`` (the paper): the most used experts lead and every other expert joins its most similar
leader. Baselines of the same budget: ``reap`` (leaders by REAP saliency), ``hc-smoe`` (hierarchical
clustering of expert outputs) and ``task-specific`` (no groups; KD prunes to the budget).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from pipeline.clustering import first_merges_labels
from pipeline.registry import Registry

if TYPE_CHECKING:
    from pipeline.config import GroupParams
    from pipeline.families import MoEAdapter, SparseLayer
    from pipeline.profiling import LayerProfile


@dataclass
class LayerData:
    """What similarity functions may use for one SMoE layer."""

    name: str
    router_logits: torch.Tensor  # [T, N]
    router_weight: torch.Tensor  # [N, H]
    expert_weights: list[dict[str, torch.Tensor]]
    seed: int = 0
    # From the routing profile; None when it was not collected.
    feature_mean: torch.Tensor | None = None  # [N, H]
    feature_abs_mean: torch.Tensor | None = None  # [N, H]
    feature_norm: torch.Tensor | None = None  # [N, H]
    gradients: dict[str, torch.Tensor] | None = None  # "expert::matrix" -> summed gradient
    # Usage share per expert [N]; group_experts fills it from its ``frequencies`` when None.
    frequency: torch.Tensor | None = None
    # From a profile with expert outputs (profile.expert_outputs: true).
    output_mean: torch.Tensor | None = None  # [N, H] mean output over all the layer's tokens
    reap_score: torch.Tensor | None = None  # [N] REAP saliency

    def need(self, field: str, similarity: str, how: str) -> torch.Tensor | dict:
        value = getattr(self, field)
        if value is None:
            raise ValueError(
                f"group.similarity={similarity} needs {how}, which the routing profile of {self.name} lacks"
            )
        return value


def layer_data(adapter: MoEAdapter, layer: SparseLayer, profile: LayerProfile, seed: int = 0) -> LayerData:
    """One layer's :class:`LayerData`: its router and expert weights as they are now, and every
    statistic its routing profile collected."""
    return LayerData(
        layer.name,
        profile.router_logits,
        adapter.router_weight(layer),
        [adapter.expert_weights(layer, e) for e in range(adapter.num_experts(layer))],
        seed=seed,
        feature_mean=profile.feature_mean,
        feature_abs_mean=profile.feature_abs_mean,
        feature_norm=profile.feature_norm,
        gradients=profile.gradients,
        frequency=profile.frequency,
        output_mean=profile.output_mean,
        reap_score=profile.reap_score,
    )


Similarity = Callable[[LayerData], torch.Tensor]
SIMILARITIES: Registry[Similarity] = Registry("similarity")
#: Similarities computed from the routing profile alone: grouping with them never reads a weight,
#: so it runs on a model whose weights stay on the meta device (pipeline.streaming.meta_model_of).
PROFILE_ONLY_SIMILARITIES = ("router-logits", "expert-feature", "expert-feature-abs", "random")


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity of the rows of ``vectors`` (``[N, D]`` -> ``[N, N]``)."""
    v = F.normalize(vectors.double(), dim=-1, eps=1e-12)
    sim = v @ v.T
    sim.fill_diagonal_(1.0)
    return sim.float()


@SIMILARITIES.register("router-logits")
def _router_logits(d: LayerData) -> torch.Tensor:
    # Expert e is described by its logit on every profiled token: a column of [T, N].
    return cosine_matrix(d.router_logits.T)


@SIMILARITIES.register("router-weight")
def _router_weight(d: LayerData) -> torch.Tensor:
    return cosine_matrix(d.router_weight)


@SIMILARITIES.register("expert-weight")
def _expert_weight(d: LayerData) -> torch.Tensor:
    return cosine_matrix(
        torch.stack([torch.cat([w.flatten() for w in e.values()]) for e in d.expert_weights])
    )


@SIMILARITIES.register("expert-weight-feature")
def _expert_weight_feature(d: LayerData) -> torch.Tensor:
    # Input columns of each expert's first matrix weighted by how strongly its tokens use them.
    norm = d.need("feature_norm", "expert-weight-feature", "per-expert input feature norms")
    rows = []
    for e, w in enumerate(d.expert_weights):
        parts = [w[k] * norm[e][None, :] if w[k].shape[-1] == norm.shape[-1] else w[k] for k in w]
        rows.append(torch.cat([p.flatten() for p in parts]))
    return cosine_matrix(torch.stack(rows))


@SIMILARITIES.register("expert-feature")
def _expert_feature(d: LayerData) -> torch.Tensor:
    return cosine_matrix(d.need("feature_mean", "expert-feature", "per-expert mean input features"))


@SIMILARITIES.register("expert-feature-abs")
def _expert_feature_abs(d: LayerData) -> torch.Tensor:
    return cosine_matrix(d.need("feature_abs_mean", "expert-feature-abs", "per-expert mean |input features|"))


@SIMILARITIES.register("expert-gradient")
def _expert_gradient(d: LayerData) -> torch.Tensor:
    grads = d.need("gradients", "expert-gradient", "expert gradients (set profile.gradients: true)")
    rows = []
    for e, w in enumerate(d.expert_weights):
        # An expert that got no token has no gradient: a zero vector, similar to nothing.
        rows.append(
            torch.cat([grads.get(f"{e}::{k}", torch.zeros_like(v)).flatten().float() for k, v in w.items()])
        )
    return cosine_matrix(torch.stack(rows))


@SIMILARITIES.register("random")
def _random(d: LayerData) -> torch.Tensor:
    n = d.router_weight.shape[0]
    g = torch.Generator().manual_seed(d.seed)
    m = torch.rand(n, n, generator=g)
    m = (m + m.T) / 2
    m.fill_diagonal_(1.0)
    return m


# norm(usage counts of one layer) -> per-expert score for the global budget, the layer's most used
# expert set to exactly 1.0 (the paper's footnote 3) so every layer keeps one.
FrequencyNorm = Callable[[torch.Tensor], torch.Tensor]
FREQUENCY_NORMS: Registry[FrequencyNorm] = Registry("frequency normalisation")


def _top_to_one(f: torch.Tensor, scaled: torch.Tensor) -> torch.Tensor:
    scaled[int(torch.argmax(f))] = 1.0
    return scaled


@FREQUENCY_NORMS.register("sum-top1")
def _sum_top1(freq: torch.Tensor) -> torch.Tensor:
    # The authors' code: each expert's share of the layer's routed tokens, then the top set to 1.0.
    # A layer that spreads its tokens evenly gives each expert a small share, so the budget goes
    # to layers whose routing is concentrated beyond their top expert.
    f = freq.double().clone()
    total = f.sum()
    return _top_to_one(f, f / total if total > 0 else torch.zeros_like(f))


@FREQUENCY_NORMS.register("max")
def _max(freq: torch.Tensor) -> torch.Tensor:
    # Relative to the layer's top expert: an evenly used layer scores near 1.0 everywhere.
    f = freq.double().clone()
    top = f.max()
    return _top_to_one(f, f / top if top > 0 else torch.zeros_like(f))


def normalised_frequency(freq: torch.Tensor, norm: str = "max") -> torch.Tensor:
    """Frequencies scaled by ``norm`` (see FREQUENCY_NORMS); the most used expert has exactly 1.0."""
    return FREQUENCY_NORMS.get(norm)(freq)


def dominant_budget(
    frequencies: dict[str, torch.Tensor],
    num_experts_avg: int,
    ratio: str = "adaptive",
    norm: str = "max",
    allow_unused: bool = True,
) -> dict[str, int]:
    """Number of dominant experts per merged layer, at most ``num_experts_avg * len(frequencies)``.

    ``adaptive``: the top normalised frequencies (``norm``) over all layers win, so busier layers
    keep more (ties go to the earlier layer, then the lower expert index); every layer keeps at
    least one. ``uniform``: the same in every layer. With ``allow_unused=False`` (the authors'
    code) an expert that received no token is never made dominant unless its layer has nothing
    else: the budget it would take stays unspent, so the sum can fall short of the target.
    """
    names = list(frequencies)
    sizes = {n: len(frequencies[n]) for n in names}
    total = num_experts_avg * len(names)
    if total > sum(sizes.values()):
        raise ValueError(
            f"group.num_experts_avg={num_experts_avg} x {len(names)} merged layers = {total} dominant experts, "
            f"but those layers hold only {sum(sizes.values())}"
        )
    used = {n: max(1, int((frequencies[n] > 0).sum())) for n in names}
    if ratio == "uniform":
        if any(num_experts_avg > s for s in sizes.values()):
            raise ValueError(
                f"group.num_experts_avg={num_experts_avg} exceeds a layer's expert count {min(sizes.values())}"
            )
        if allow_unused:
            return {n: num_experts_avg for n in names}
        return {n: min(num_experts_avg, used[n]) for n in names}
    if ratio != "adaptive":
        raise ValueError(f"unknown group.ratio {ratio!r}; valid choices: adaptive, uniform")
    # Every merged layer keeps its most used expert first: with ties at 1.0 in earlier layers a
    # purely global ranking could leave a later layer with no expert at all.
    budget = dict.fromkeys(names, 1)
    entries = []
    for li, n in enumerate(names):
        counts = frequencies[n].tolist()
        scores = normalised_frequency(frequencies[n], norm).tolist()
        top = max(range(len(scores)), key=lambda e: (scores[e], -e))
        entries.extend(
            (-v, li, e) for e, v in enumerate(scores) if e != top and (allow_unused or counts[e] > 0)
        )
    entries.sort()
    for _, li, _ in entries[: total - len(names)]:
        budget[names[li]] += 1
    return budget


def group_layer(freq: torch.Tensor, similarity: torch.Tensor, k: int) -> list[list[int]]:
    """Groups of one layer: the ``k`` most used experts lead; every other expert joins the dominant
    expert it is most similar to. Each group lists its dominant expert first."""
    n = len(freq)
    order = sorted(range(n), key=lambda e: (-float(freq[e]), e))
    dominant = order[:k]
    groups = {d: [d] for d in dominant}
    for e in order[k:]:
        best = max(dominant, key=lambda d: (float(similarity[e, d]), -dominant.index(d)))
        groups[best].append(e)
    return [groups[d] for d in dominant]


def merged_layer_names(layers: list[tuple[str, str]], skip_first_layer: bool, which: str) -> list[str]:
    """Names of the SMoE layers to merge, from ``(name, stack)`` pairs in forward order."""
    names = [n for n, stack in layers if which == "both" or stack == which]
    if skip_first_layer and layers and layers[0][0] in names:
        names.remove(layers[0][0])
    return names


# ------------------------------------------------------------------ grouping methods

#: A layer's groups (leader first) and the similarity matrix used to assign them (None: none used).
LayerGroups = tuple[list[list[int]], torch.Tensor | None]


@dataclass(frozen=True)
class GroupingMethod:
    """Fills one layer's budget: ``fn(data, k, similarity) -> (groups, similarity matrix)``."""

    fn: Callable[[LayerData, int, Similarity], LayerGroups]
    # Whether the method must return exactly the layer's budget of groups (all but task-specific).
    equal_budget: bool = True


GROUPING_METHODS: Registry[GroupingMethod] = Registry("grouping method")


def _method(name: str, equal_budget: bool = True):
    def deco(fn: Callable[[LayerData, int, Similarity], LayerGroups]):
        GROUPING_METHODS.register(name)(GroupingMethod(fn, equal_budget))
        return fn

    return deco


def _need_expert_outputs(d: LayerData, field: str, method: str) -> torch.Tensor:
    value = getattr(d, field)
    if value is None:
        raise ValueError(
            f"group.method={method} needs profile.expert_outputs: true (the routing profile of {d.name} has no {field})"
        )
    return value


def _frequency(d: LayerData) -> torch.Tensor:
    if d.frequency is None:
        raise ValueError(f"no usage frequency for layer {d.name}")
    return d.frequency


@_method("m-smoe")
def _m_smoe(d: LayerData, k: int, sim_fn: Similarity) -> LayerGroups:
    # The paper: the k most used experts lead.
    sim = sim_fn(d)
    return group_layer(_frequency(d), sim, k), sim


@_method("reap")
def _reap(d: LayerData, k: int, sim_fn: Similarity) -> LayerGroups:
    # The k most salient experts lead (group_layer ranks by the score, ties to the lower index);
    # with merge.strategy dominant and merge.router prune this is REAP's pruning.
    score = _need_expert_outputs(d, "reap_score", "reap")
    sim = sim_fn(d)
    return group_layer(score, sim, k), sim


def average_linkage_clusters(vectors: torch.Tensor, k: int) -> list[list[int]]:
    """``k`` clusters of the rows of ``vectors`` by average-linkage (UPGMA) Euclidean clustering.

    Replays the first ``N - k`` merges of scipy's linkage, so there are exactly ``k`` clusters
    (``cut_tree`` promises the same, but by height, which ties could blur). Clusters list their
    members in ascending order, clusters ordered by their lowest member.
    """
    from scipy.cluster.hierarchy import linkage

    n = vectors.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"cannot cut {n} experts into {k} clusters")
    if k == n:
        return [[e] for e in range(n)]
    z = linkage(vectors.double().cpu().numpy(), method="average", metric="euclidean")
    labels = first_merges_labels(z, n, k)
    # Labels are numbered by each cluster's lowest member.
    return [[e for e in range(n) if labels[e] == c] for c in range(k)]


@_method("hc-smoe")
def _hc_smoe(d: LayerData, k: int, sim_fn: Similarity) -> LayerGroups:
    # HC-SMoE (Chen et al. 2024) clusters experts by their mean output over all calibration tokens.
    # The authors' scripts (wazenmai/HC-SMoE scripts/{mixtral,qwen,tinyllama}/run.sh:13) pass
    # --cluster="hirarchical", which hcsmoe/merging/clustering.py:24,28 does not recognise, so
    # their runs fall through to k-means (:72-139, k-means++ from a random start); here the average
    # linkage the paper and those scripts (--linkage="average", run.sh:14) name. Their feature
    # (hcsmoe/merging/grouping_mixtral.py:383,398) averages over padding too; ours does not.
    out = _need_expert_outputs(d, "output_mean", "hc-smoe")
    freq = _frequency(d)
    groups = []
    for cluster in average_linkage_clusters(out, k):
        # Its most used member leads (the authors' code takes the one nearest the centroid,
        # clustering.py:131-139 and :354-359); merging by frequency then weights it most.
        leader = max(cluster, key=lambda e: (float(freq[e]), -e))
        groups.append([leader] + [e for e in cluster if e != leader])
    groups.sort(key=lambda g: (-float(freq[g[0]]), g[0]))
    return groups, None


@_method("task-specific", equal_budget=False)
def _task_specific(d: LayerData, k: int, sim_fn: Similarity) -> LayerGroups:
    # Nothing merges now: KD prunes the layer to its budget while it trains (kd.prune).
    return [[e] for e in range(len(_frequency(d)))], None


def group_experts(
    layer_data: dict[str, LayerData],
    frequencies: dict[str, torch.Tensor],
    merge_layers: list[str],
    num_experts_avg: int,
    similarity: str,
    ratio: str = "adaptive",
    norm: str = "max",
    allow_unused: bool = True,
    method: str = "m-smoe",
) -> dict:
    """Groups for every SMoE layer; layers not merged keep each expert in its own group.

    ``norm`` and ``allow_unused`` shape the per-layer budget (see :func:`dominant_budget`);
    ``method`` (see GROUPING_METHODS) fills each merged layer's budget ``k`` with exactly ``k``
    groups, recorded as the layer's ``budget``. A layer's ``frequencies`` stand in for its
    :attr:`LayerData.frequency` when that is None.
    """
    sim_fn = SIMILARITIES.get(similarity)
    grouping = GROUPING_METHODS.get(method)
    budget = dominant_budget(
        {n: frequencies[n] for n in merge_layers}, num_experts_avg, ratio, norm, allow_unused
    )
    layers = {}
    for name, freq in frequencies.items():
        if name in budget:
            data = layer_data[name]
            if data.frequency is None:
                data = dataclasses.replace(data, frequency=freq)
            k = budget[name]
            groups, sim = grouping.fn(data, k, sim_fn)
            if grouping.equal_budget and len(groups) != k:
                raise ValueError(
                    f"group.method={method} gave layer {name} {len(groups)} groups, but its budget is {k}"
                )
            layers[name] = {"merged": True, "groups": groups}
            if sim is not None:
                layers[name]["similarity"] = [[round(x, 5) for x in r] for r in sim.tolist()]
            layers[name]["budget"] = k
        else:
            layers[name] = {"merged": False, "groups": [[e] for e in range(len(freq))]}
    return {
        "similarity": similarity,
        "ratio": ratio,
        "frequency_norm": norm,
        "num_experts_avg": num_experts_avg,
        "dominant_experts": sum(budget.values()),
        "budget_unspent": num_experts_avg * len(budget) - sum(budget.values()),
        "layers": layers,
        "method": method,
    }


def group_model(
    adapter: MoEAdapter,
    layers: list[SparseLayer],
    profiles: dict[str, LayerProfile],
    section: GroupParams,
    seed: int,
) -> dict:
    """Groups for a model's SMoE ``layers`` as the ``group`` params section asks, checked.

    Layer ``i`` of the merged ones draws its random choices from ``seed + i`` (its position), so
    a layer's groups do not depend on which other layers are merged. Raises ValueError when no
    layer is left to merge or the budget cannot be met.
    """
    names = merged_layer_names(
        [(ly.name, ly.stack) for ly in layers], section.skip_first_layer, section.layers
    )
    if not names:
        raise ValueError(
            f"no SMoE layer left to merge with group.layers={section.layers} and "
            f"group.skip_first_layer={section.skip_first_layer}"
        )
    data = {
        ly.name: layer_data(adapter, ly, profiles[ly.name], seed + ly.position)
        for ly in layers
        if ly.name in names
    }
    groups = group_experts(
        data,
        {n: prof.frequency for n, prof in profiles.items()},
        names,
        section.num_experts_avg,
        section.similarity,
        section.ratio,
        section.frequency_norm,
        section.dominant_unused,
        section.method,
    )
    validate_groups(groups, {ly.name: adapter.num_experts(ly) for ly in layers})
    return groups


def validate_groups(groups: dict, num_experts: dict[str, int]) -> None:
    """Every expert of every layer in exactly one group."""
    if not isinstance(groups, dict) or not isinstance(groups.get("layers"), dict):
        raise ValueError("groups file has no 'layers' mapping; run the group stage again")
    for name, n in num_experts.items():
        if name not in groups["layers"]:
            raise ValueError(f"groups miss layer {name}")
        try:
            members = sorted(int(e) for g in groups["layers"][name]["groups"] for e in g)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"groups of {name} are not a list of lists of expert indices") from None
        if members != list(range(n)):
            raise ValueError(f"groups of {name} do not cover experts 0..{n - 1} exactly once: {members}")
