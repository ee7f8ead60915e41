"""What happens to a merged layer's router: kept and remapped, or pruned to one output per group.

A merged layer starts in ``remap`` form: its router keeps its N rows and ``expert_map`` sends the
chosen original expert to its group. The other modes give the router M outputs (one per group),
which is what the paper's router pruning does and what lets a checkpoint load as a plain model with
``num_experts = M``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from pipeline.families import ModelStructureError, MoEAdapter
from pipeline.registry import Registry


@dataclass(frozen=True)
class RouterPlan:
    """How to rebuild a merged layer's router from its original N rows.

    ``rows``: original router rows kept, in output order. ``row_group``: the group (merged expert)
    each kept row stands for. ``logsumexp``: the router outputs one logit per group, the
    log-sum-exp of its rows' logits, instead of one per row.
    """

    rows: list[int]
    row_group: list[int]
    logsumexp: bool = False

    @property
    def outputs(self) -> int:
        return len(set(self.row_group)) if self.logsumexp else len(self.rows)


# mode(expert_map [N] -> group, dominant [M] original expert per group) -> plan
RouterMode = Callable[[list[int], list[int]], RouterPlan]
ROUTER_MODES: Registry[RouterMode] = Registry("router mode")


@ROUTER_MODES.register("remap")
def _remap(expert_map: list[int], dominant: list[int]) -> RouterPlan:
    # Exactly the routing of the merged model with every original slot redirected to its group.
    return RouterPlan(list(range(len(expert_map))), list(expert_map))


@ROUTER_MODES.register("prune")
def _prune(expert_map: list[int], dominant: list[int]) -> RouterPlan:
    # The paper's router pruning: each group is chosen by its dominant expert's logit alone.
    return RouterPlan(list(dominant), list(range(len(dominant))))


@ROUTER_MODES.register("prune-logsumexp")
def _prune_logsumexp(expert_map: list[int], dominant: list[int]) -> RouterPlan:
    # softmax over log-sum-exp group logits = the summed probability of each group's members.
    return RouterPlan(list(range(len(expert_map))), list(expert_map), logsumexp=True)


def set_router_mode(model: nn.Module, adapter: MoEAdapter, mode: str) -> dict:
    """Give every merged layer the router of ``mode``, in place; returns router outputs per layer.

    Layers must be in ``remap`` form (as ``merge`` leaves them): the other modes are built from the
    original N router rows, which they drop.
    """
    make = ROUTER_MODES.get(mode)
    report = {}
    for layer in adapter.sparse_layers(model):
        state = adapter.merged_routing(layer)
        if state is None:
            continue
        if state["mode"] != "remap":
            raise ValueError(
                f"{layer.name} already has router mode {state['mode']!r}; router modes are set once, "
                "on a merged model in 'remap' form"
            )
        plan = make(state["expert_map"], state["dominant"])
        why = adapter.router_mode_refusal(mode, plan, layer)
        if why:
            raise ModelStructureError(f"{layer.name}: {why}")
        adapter.set_router(layer, plan, mode)
        report[layer.name] = {"router_outputs": plan.outputs, "experts": adapter.num_experts(layer)}
    if not report:
        raise ValueError("the model has no merged layer; run merge before choosing a router mode")
    return report


def router_mode_refusals(model: nn.Module, adapter: MoEAdapter) -> dict[str, str]:
    """The router modes a merged model (in ``remap`` form) cannot take, each with the reason."""
    out = {}
    for mode in ROUTER_MODES.names():
        make = ROUTER_MODES.get(mode)
        for layer in adapter.sparse_layers(model):
            state = adapter.merged_routing(layer)
            if state is None:
                continue
            why = adapter.router_mode_refusal(mode, make(state["expert_map"], state["dominant"]), layer)
            if why:
                out[mode] = f"{layer.name}: {why}"
                break
    return out


def router_mode_variants(model: nn.Module, adapter: MoEAdapter) -> dict[str, nn.Module]:
    """Copies of a merged model in ``remap`` form, one under each router mode it can take (see
    :func:`router_mode_refusals` for the others)."""
    refused = router_mode_refusals(model, adapter)
    out = {}
    for mode in ROUTER_MODES.names():
        if mode in refused:
            continue
        variant = copy.deepcopy(model)
        set_router_mode(variant, adapter, mode)
        out[mode] = variant
    return out
