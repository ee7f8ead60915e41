"""Router semantics: how a router's logits become each token's experts and their weights.

Kept apart from where a router's weights live (``catalog``): a semantics is a rule over logits
``[T, N]`` and a few parameters (top-k, normalisation, a per-expert score-correction bias, routing
groups), registered by name. The decoder adapter uses it wherever the stock router cannot be
reused as it is: to mask experts out of the choice (task-specific pruning), to route over
log-sum-exp group logits (``prune-logsumexp``), and to read a choice from routers that return only
logits. ``tests/test_families.py`` checks each family's semantics against its stock router.

Router modes per semantics:

- ``remap`` keeps the stock router: defined for every semantics.
- ``prune`` slices the router's rows (and every per-expert tensor with them): defined for every
  semantics; with group-limited routing only when each routing group keeps the same number of
  rows, in order (the stock rule splits the rows into equal contiguous groups).
- ``prune-logsumexp`` routes over ``logsumexp`` of each group's member logits, which keeps the
  group's whole probability only when probabilities are a softmax of the logits; refused for
  sigmoid scores and for group-limited routing (a merged group can straddle routing groups).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pipeline.registry import Registry

Selection = tuple[torch.Tensor, torch.Tensor]  # weights [T, k], expert indices [T, k]


@dataclass(frozen=True)
class RouterSemantics:
    """A registered routing rule.

    ``select(logits, params, dead)`` returns the top-k weights and indices; ``dead`` ``[N]`` marks
    experts that must never be chosen (their logits are set to -inf before the rule, so a softmax
    gives them no mass). ``defaults`` are the parameters' values where a family gives none.
    """

    name: str
    description: str
    softmax: bool
    select: Callable[[torch.Tensor, dict, torch.Tensor | None], Selection]
    defaults: dict = field(default_factory=dict)

    def groups(self, params: dict) -> int:
        """Routing groups of group-limited routing (1: none)."""
        return int(params.get("n_group") or 1)

    def mode_refusal(self, mode: str, params: dict) -> str | None:
        """Why ``mode`` has no meaning under this semantics (None: defined)."""
        if mode == "prune-logsumexp":
            if not self.softmax:
                return (
                    f"merge.router=prune-logsumexp needs softmax probabilities, but the {self.name} "
                    "router scores each expert on its own: a log-sum-exp of logits is no group score "
                    "here; valid: remap, prune"
                )
            if self.groups(params) > 1:
                return (
                    "merge.router=prune-logsumexp: the router limits each token to "
                    f"{params.get('topk_group')} of {self.groups(params)} routing groups, which a "
                    "merged group can straddle; valid: remap, prune"
                )
        return None


ROUTER_SEMANTICS: Registry[RouterSemantics] = Registry("router semantics")


def _register(sem: RouterSemantics) -> RouterSemantics:
    return ROUTER_SEMANTICS.register(sem.name)(sem)


def _mask(logits: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor:
    if dead is None or not bool(dead.any()):
        return logits
    return logits.masked_fill(dead.to(logits.device), float("-inf"))


def _limit_groups(choice: torch.Tensor, p: dict, dead: torch.Tensor | None) -> torch.Tensor:
    """``choice`` with every expert outside each token's ``topk_group`` best routing groups set to
    ``group_fill`` (-inf, or 0.0 where a router fills with zeros); a group's score is its best
    expert's (``group_score="max"``) or its two best experts' sum (``"top2"``)."""
    n_group, topk_group = int(p["n_group"]), int(p["topk_group"])
    t, n = choice.shape
    per_group = choice.view(t, n_group, n // n_group)
    if p["group_score"] == "max":
        scores = per_group.max(-1).values
    else:
        scores = per_group.topk(min(2, n // n_group), dim=-1).values.sum(-1)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(1, scores.topk(topk_group, dim=-1).indices, True)
    out = choice.masked_fill(~keep.repeat_interleave(n // n_group, dim=1), float(p["group_fill"]))
    # A finite fill must not bring a dead expert back.
    return _mask(out, dead)


def _normalise(w: torch.Tensor, p: dict) -> torch.Tensor:
    how = p.get("normalise")
    if how in (None, False, "none"):
        return w
    if how == "pnorm":
        order = p.get("pnorm")
        return w if order is None else w / torch.norm(w, p=order, dim=-1, keepdim=True)
    total = w.sum(-1, keepdim=True)
    if p.get("norm_min") is not None:
        return w / total.clamp(min=p["norm_min"])
    return w / (total + p.get("norm_eps", 0.0))


def _choose(scores: torch.Tensor, p: dict, dead: torch.Tensor | None) -> torch.Tensor:
    """Top-k indices by ``scores`` plus the score-correction bias, within the token's routing
    groups where routing is group-limited."""
    choice = scores if p.get("correction") is None else scores + p["correction"].float()
    choice = _mask(choice, dead)
    if int(p.get("n_group") or 1) > 1:
        choice = _limit_groups(choice, p, dead)
    return choice.topk(min(int(p["top_k"]), choice.shape[-1]), dim=-1).indices


def _weights(scores: torch.Tensor, idx: torch.Tensor, p: dict) -> torch.Tensor:
    """The chosen experts' scores, normalised, times a per-expert scale if any, times scaling."""
    w = _normalise(scores.gather(-1, idx), p)
    if p.get("expert_scale") is not None:
        w = w * p["expert_scale"].float()[idx]
    return w * p.get("scaling", 1.0)


def _softmax_topk(logits: torch.Tensor, p: dict, dead: torch.Tensor | None) -> Selection:
    probs = _mask(logits, dead).float().softmax(-1)
    idx = _choose(probs, p, dead)
    return _weights(probs, idx, p), idx


def _topk_softmax(logits: torch.Tensor, p: dict, dead: torch.Tensor | None) -> Selection:
    top, idx = _mask(logits, dead).float().topk(min(int(p["top_k"]), logits.shape[-1]), dim=-1)
    return top.softmax(-1), idx


def _score(logits: torch.Tensor, p: dict) -> torch.Tensor:
    """Per-expert scores: the sigmoid, or the router's own per-expert activation (a callable, or
    the name of one in transformers' ACT2FN)."""
    fn = p.get("score_fn", "sigmoid")
    if fn == "sigmoid":
        return logits.float().sigmoid()
    if isinstance(fn, str):
        from transformers.activations import ACT2FN

        fn = ACT2FN[fn]
    return fn(logits.float())


def _sigmoid_topk(logits: torch.Tensor, p: dict, dead: torch.Tensor | None) -> Selection:
    scores = _score(_mask(logits, dead), p)
    idx = _choose(scores, p, dead)
    return _weights(scores, idx, p), idx


def _sigmoid_top_logits(logits: torch.Tensor, p: dict, dead: torch.Tensor | None) -> Selection:
    masked = _mask(logits, dead).float()
    idx = _choose(masked, p, dead)
    return _weights(masked.sigmoid(), idx, p), idx


def _sparsemixer(logits: torch.Tensor, p: dict, dead: torch.Tensor | None) -> Selection:
    # PhiMoE's own rule (transformers' implementation, evaluation branch): its gradient estimator
    # only matters in training, where the stock router runs.
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    return sparsemixer(_mask(logits, dead), jitter_eps=p["jitter_eps"], training=False, top_k=p["top_k"])


for _sem in (
    RouterSemantics(
        "softmax-topk",
        "softmax over all experts, top-k by probability (plus an optional score-correction bias), "
        "weights renormalised over the k (sum, clamped sum or p-norm) or not, optional group-limited "
        "choice (a group scored by its best expert, or its two best), an optional per-expert scale "
        "of the weights, and scaling",
        softmax=True,
        select=_softmax_topk,
        defaults={"normalise": "none", "scaling": 1.0, "group_score": "max", "group_fill": float("-inf")},
    ),
    RouterSemantics(
        "topk-softmax",
        "top-k by logit, softmax over the k chosen logits (with or without a router bias)",
        softmax=True,
        select=_topk_softmax,
    ),
    RouterSemantics(
        "sigmoid-topk",
        "sigmoid score per expert (or another per-expert activation the router names), top-k after "
        "a score-correction bias, optional group-limited choice (a group scored by its two best "
        "experts), weights renormalised or not, then scaled",
        softmax=False,
        select=_sigmoid_topk,
        defaults={
            "normalise": "none",
            "norm_eps": 1e-20,
            "scaling": 1.0,
            "group_score": "top2",
            "group_fill": float("-inf"),
        },
    ),
    RouterSemantics(
        "sigmoid-top-logits",
        "top-k by logit (plus an optional score-correction bias), each chosen expert weighted by the "
        "sigmoid of its logit (Llama 4), renormalised over the k or not",
        softmax=False,
        select=_sigmoid_top_logits,
        defaults={"normalise": "none", "scaling": 1.0},
    ),
    RouterSemantics(
        "sparsemixer",
        "PhiMoE's sparsemixer: the best expert, then the best of the rest, each weighted by a softmax "
        "over the experts within a relative threshold of it",
        softmax=True,
        select=_sparsemixer,
    ),
):
    _register(_sem)


# ------------------------------------------------------------------------------------------
# What a router returns, and how a block reads it.


def parse_output(kind: str, output) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(logits [T, N], weights [T, k] or None, indices [T, k] or None)`` of a router's output.

    ``standard``: ``(logits, weights, indices)``; ``probs``: ``(probabilities, weights, indices)``,
    read as logits ``log p`` (a softmax of which gives ``p`` back); ``logits``: the logits alone
    (the block routes); ``dense-scores``: ``(scores [T, N], logits)`` with zero scores for experts
    not chosen.
    """
    if kind == "standard":
        logits, weights, idx = output[:3]
        return logits.reshape(-1, logits.shape[-1]), weights, idx
    if kind == "probs":
        probs, weights, idx = output[:3]
        return probs.reshape(-1, probs.shape[-1]).float().log(), weights, idx
    if kind == "logits":
        return output.reshape(-1, output.shape[-1]), None, None
    if kind == "dense-scores":
        _scores, logits = output
        return logits.reshape(-1, logits.shape[-1]), None, None
    raise ValueError(f"unknown router output kind {kind!r}; valid: {', '.join(OUTPUT_KINDS)}")


OUTPUT_KINDS = ("dense-scores", "logits", "probs", "standard")


def build_output(kind: str, logits: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, like=None):
    """A router output of ``kind`` from logits and a selection (dtypes follow ``like``, the stock
    output it replaces, where given)."""
    if kind == "standard":
        if like is not None:
            logits, weights = logits.to(like[0].dtype), weights.to(like[1].dtype)
        return logits, weights, idx
    if kind == "probs":
        probs = logits.float().softmax(-1)
        if like is not None:
            probs, weights = probs.to(like[0].dtype), weights.to(like[1].dtype)
        return probs, weights, idx
    if kind == "logits":
        return logits if like is None else logits.to(like.dtype)
    if kind == "dense-scores":
        scores = torch.zeros_like(logits, dtype=weights.dtype).scatter(1, idx, weights)
        if like is not None:
            scores, logits = scores.to(like[0].dtype), logits.to(like[1].dtype)
        return scores, logits
    raise ValueError(f"unknown router output kind {kind!r}; valid: {', '.join(OUTPUT_KINDS)}")
