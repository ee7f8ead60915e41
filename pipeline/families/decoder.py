"""One adapter for every decoder family whose SMoE block holds a router and an experts module.

transformers 5 builds these blocks alike: the block calls its router on the hidden states, then
its experts module on ``(hidden, top_k_index, top_k_weights)``. What differs is data: class and
attribute names, the router's semantics (:mod:`~pipeline.families.routers`), where per-expert
router tensors live, the experts' weight layout (:mod:`~pipeline.families.layouts`) and config
keys. A :class:`FamilySpec` holds that data; ``catalog`` lists one per family.

A merged layer keeps the stock block (and any shared expert, untouched) and changes two things:

- ``experts`` becomes a module of the stock class holding the M merged experts, whose forward
  first sends each router output to its group (``expert_map``), so the weights keep the stock
  names and layout; or, when its experts are low-rank + sparse or carry biases the stock layout
  lacks, a :class:`ModularExperts` with one module per expert;
- the router is kept (``remap``), sliced in place to the dominant experts' rows with every
  per-expert tensor (``prune``), or replaced by a :class:`LogSumExpRouter` (``prune-logsumexp``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.families.base import ModelStructureError, MoEAdapter, SparseLayer, module_param_counts
from pipeline.families.layouts import (
    NEURON_AXES,
    PREACTIVATION_BIASES,
    GLUActivation,
    activation_of,
    expert_forward,
    expert_hidden,
    layout_of,
)
from pipeline.families.routers import ROUTER_SEMANTICS, build_output, parse_output
from pipeline.moe import (
    LowRankSparseLinear,
    dispatch_by_group,
    linear_bias,
    linear_from_structure,
    linear_weight,
)

MATRICES = ("gate", "up", "down")


@dataclass(frozen=True)
class FamilySpec:
    """Where a decoder family keeps its SMoE parts, and how its router decides.

    Paths are attribute paths from the block (``router.weight``, ``block.expert_bias``,
    ``experts.num_experts``); ``params`` maps each semantics parameter to such a path, to
    to a callable ``(block, router) -> value`` or to a literal.
    """

    model_type: str
    causal_lm: str
    config: str
    block: str
    module: str = ""  # default: transformers.models.<model_type>.modeling_<model_type>
    router: str = "gate"
    output: str = "standard"
    semantics: str = "softmax-topk"
    params: Mapping[str, Any] = field(default_factory=dict)
    # Per-expert tensors of the router, each with its expert axis; the first is the [N, H] weight.
    rows: tuple[tuple[str, int], ...] = (("router.weight", 0),)
    # Integer attributes that hold the number of router outputs / experts, and top-k.
    counts: tuple[str, ...] = ("router.num_experts", "experts.num_experts")
    top_k: tuple[str, ...] = ("router.top_k",)
    config_experts: str = "num_experts"
    config_top_k: str = "num_experts_per_tok"
    # Config keys of an expert matrix's widths; () : hidden_size and moe_intermediate_size where the
    # config has one (its intermediate_size is the dense MLPs'), else intermediate_size.
    config_widths: tuple[str, ...] = ()
    layout: str | None = None  # None: the experts module's own flags
    activation: str | None = None  # None: act(gate) * up with the module's act_fn
    convention: str = "indexed"  # experts called on (hidden, indices, weights); "slots": Llama 4
    shared: tuple[str, ...] = ()
    # False where the router transforms its input (a norm, a scale) before its linear map by the
    # rows: a LogSumExpRouter over the rows would not see what the stock router sees.
    linear_router: bool = True
    # Values the catalog's description assumes (attribute path -> value); other values are refused.
    requires: Mapping[str, Any] = field(default_factory=dict)
    # The walk's tiny config (tests): overrides of the generic small values.
    tiny: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def module_path(self) -> str:
        return self.module or f"transformers.models.{self.model_type}.modeling_{self.model_type}"


def resolve(path: str, block: nn.Module, router: str = "gate"):
    """The object at ``path`` (``block.x``, ``router.x``, ``experts.x``; dotted) from a block whose
    router is its attribute ``router``."""
    head, _, rest = path.partition(".")
    obj = block if head == "block" else getattr(block, router if head == "router" else head)
    for part in rest.split(".") if rest else []:
        obj = getattr(obj, part)
    return obj


def _owner(path: str, block: nn.Module, router: str) -> tuple[nn.Module, str]:
    owner, _, leaf = path.rpartition(".")
    return resolve(owner, block, router), leaf


class _Merged:
    """Marks experts modules that hold merged experts (``expert_map``, ``dominant``, ``router_mode``)."""


_REMAPPED: dict[tuple[type, str], type] = {}


def _remapped_class(cls: type, convention: str) -> type:
    """``cls`` whose forward first sends each router output to the merged expert of its group."""
    key = (cls, convention)
    if key in _REMAPPED:
        return _REMAPPED[key]
    if convention == "indexed":

        def forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
            return cls.forward(
                self, hidden_states, self.expert_map[top_k_index], top_k_weights, *args, **kwargs
            )

    else:

        def forward(self, hidden_states):
            # One slot of pre-scaled inputs per router output (Llama 4): each runs its group's expert.
            slots = self.expert_map.shape[0]
            x = hidden_states.view(slots, -1, hidden_states.shape[-1])
            out = torch.stack(
                [
                    expert_forward(self.smoe_layout.read(self, g), x[s], self.smoe_act)
                    for s, g in enumerate(self.expert_map.tolist())
                ]
            )
            return out.view(-1, out.shape[-1]).to(hidden_states.dtype)

    new = type(f"Merged{cls.__name__}", (cls, _Merged), {"forward": forward, "__module__": __name__})
    _REMAPPED[key] = new
    return new


class GLUExpert(nn.Module):
    """``down(f(gate(x), up(x)))`` with projections that may be dense or low-rank + sparse."""

    def __init__(self, gate: nn.Module | None, up: nn.Module, down: nn.Module, act: GLUActivation) -> None:
        super().__init__()
        self.gate, self.up, self.down, self.act = gate, up, down, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(None if self.gate is None else self.gate(x), self.up(x)))


class ModularExperts(_Merged, nn.Module):
    """Merged experts as one module each, called like the stock experts module of the family."""

    def __init__(
        self,
        experts: list[GLUExpert],
        act: GLUActivation,
        expert_map: torch.Tensor,
        dominant: torch.Tensor,
        router_mode: str = "remap",
        convention: str = "indexed",
    ) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.act = act
        self.num_experts = len(experts)
        self.router_mode = router_mode
        self.convention = convention
        # Routing tables live in the structure file, so the weights keep their plain names.
        self.register_buffer("expert_map", expert_map.long(), persistent=False)
        self.register_buffer("dominant", dominant.long(), persistent=False)

    def forward(self, hidden_states: torch.Tensor, top_k_index=None, top_k_weights=None, *args, **kwargs):
        shape = hidden_states.shape
        if self.convention == "slots":
            slots = self.expert_map.shape[0]
            x = hidden_states.view(slots, -1, shape[-1])
            out = torch.stack([self.experts[g](x[s]) for s, g in enumerate(self.expert_map.tolist())])
            return out.view(-1, shape[-1]).to(hidden_states.dtype)
        h = hidden_states.reshape(-1, shape[-1])
        t, k = top_k_index.shape
        group = self.expert_map[top_k_index].reshape(-1)
        pairs = h.repeat_interleave(k, dim=0)  # one row per (token, choice)
        out = dispatch_by_group(pairs, group, top_k_weights.reshape(-1, 1), list(self.experts))
        return out.reshape(t, k, -1).sum(1).reshape(shape)


class LogSumExpRouter(nn.Module):
    """A router over M groups whose logit is the log-sum-exp of the group's original rows' logits,
    choosing by the family's semantics; returns what the family's router returns."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        row_group: torch.Tensor,
        semantics: str,
        params: dict,
        output: str,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.register_buffer("row_group", row_group.long(), persistent=False)
        self.num_experts = int(row_group.max()) + 1
        self.semantics, self.output = semantics, output
        self.params = {**params, "top_k": min(int(params["top_k"]), self.num_experts)}
        self.top_k = self.params["top_k"]
        self.register_buffer("member", F.one_hot(self.row_group, self.num_experts).bool(), persistent=False)

    def forward(self, hidden_states: torch.Tensor, *_args):
        x = hidden_states.reshape(-1, self.weight.shape[1])
        logits = F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())
        group_logits = logits[:, :, None].masked_fill(~self.member, float("-inf")).logsumexp(1)
        if self.output == "logits":
            return group_logits.to(hidden_states.dtype)
        weights, idx = ROUTER_SEMANTICS.get(self.semantics).select(group_logits, self.params, None)
        return build_output(self.output, group_logits, weights.to(hidden_states.dtype), idx)


def _z_loss(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().logsumexp(-1).square().mean()


def _balance_loss(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch-style load balancing for top-k: N * sum_e (share of selections) * (mean probability)."""
    probs = logits.float().softmax(-1)
    n = probs.shape[-1]
    chosen = F.one_hot(probs.topk(min(top_k, n), dim=-1).indices, n).float().sum(1)
    return n * (chosen.mean(0) / min(top_k, n) * probs.mean(0)).sum()


def _replace_tensor(owner: nn.Module, leaf: str, value: torch.Tensor) -> None:
    """Put ``value`` where ``owner.leaf`` is, as the same kind (parameter or buffer)."""
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        setattr(owner, leaf, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        owner._buffers[leaf] = value


class DecoderAdapter(MoEAdapter):
    """The adapter of one decoder family, driven by its :class:`FamilySpec`."""

    neuron_axes = NEURON_AXES
    preactivation_biases = PREACTIVATION_BIASES
    shift_labels = True

    def __init__(self, spec: FamilySpec) -> None:
        self.spec = spec
        self.model_type = spec.model_type

    @cached_property
    def _module(self):
        return importlib.import_module(self.spec.module_path)

    @cached_property
    def semantics(self):
        return ROUTER_SEMANTICS.get(self.spec.semantics)

    def model_class(self) -> type:
        return getattr(self._module, self.spec.causal_lm)

    def config_class(self) -> type:
        return getattr(self._module, self.spec.config)

    def config_defaults(self, vocab_size: int, pad_id: int, eos_id: int) -> dict:
        return {
            "vocab_size": vocab_size,
            "pad_token_id": pad_id,
            "eos_token_id": eos_id,
            "bos_token_id": eos_id,
        }

    def task_inputs(self, model: nn.Module, batch: dict) -> dict:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def expert_count_keys(self) -> tuple[str, ...]:
        return (self.spec.config_experts, *super().expert_count_keys())

    def expert_width_keys(self, config: dict) -> tuple[str, ...]:
        if self.spec.config_widths:
            return self.spec.config_widths
        return (
            "hidden_size",
            "moe_intermediate_size" if "moe_intermediate_size" in config else "intermediate_size",
        )

    # ---------------------------------------------------------------- finding things

    def sparse_layers(self, model: nn.Module) -> list[SparseLayer]:
        block = getattr(self._module, self.spec.block)
        layers = []
        for name, mod in model.named_modules():
            if isinstance(mod, block):
                layers.append(SparseLayer(name, "decoder", len(layers), mod))
        return layers

    def _experts(self, layer: SparseLayer) -> nn.Module:
        return layer.module.experts

    def _layout(self, experts: nn.Module):
        return getattr(experts, "smoe_layout", None) or layout_of(experts, self.spec.layout)

    def _activation(self, experts: nn.Module) -> GLUActivation:
        if isinstance(experts, ModularExperts):
            return experts.act
        return getattr(experts, "smoe_act", None) or activation_of(
            experts, self._layout(experts), self.spec.activation
        )

    def check_block(self, layer: SparseLayer) -> None:
        """Raise ModelStructureError when a block is not what the catalog says (layout, activation)."""
        for path, value in self.spec.requires.items():
            found = resolve(path, layer.module, self.spec.router)
            if found != value:
                raise ModelStructureError(
                    f"{layer.name}: {path} is {found!r}; the {self.model_type} catalog entry describes "
                    f"{value!r} only"
                )
        ex = self._experts(layer)
        if not isinstance(ex, ModularExperts):
            self._activation(ex)
        self.params(layer)

    def num_experts(self, layer: SparseLayer) -> int:
        ex = self._experts(layer)
        if isinstance(ex, ModularExperts):
            return len(ex.experts)
        return self._layout(ex).num_experts(ex)

    def router(self, layer: SparseLayer) -> nn.Module:
        return getattr(layer.module, self.spec.router)

    def _router_weight_path(self, layer: SparseLayer) -> str:
        return "router.weight" if isinstance(self.router(layer), LogSumExpRouter) else self.spec.rows[0][0]

    def router_weight(self, layer: SparseLayer) -> torch.Tensor:
        return resolve(self._router_weight_path(layer), layer.module, self.spec.router).detach()

    def params(self, layer: SparseLayer) -> dict:
        """The semantics parameters of ``layer``'s router, read from the model."""
        block = layer.module
        out = dict(self.semantics.defaults)
        for key, source in self.spec.params.items():
            if callable(source):
                out[key] = source(block, getattr(block, self.spec.router))
            elif isinstance(source, str) and source.partition(".")[0] in ("router", "block", "experts"):
                out[key] = resolve(source, block, self.spec.router)
            else:
                out[key] = source
        if "top_k" not in out:
            out["top_k"] = resolve(self.spec.top_k[0], block, self.spec.router)
        return out

    def shared_experts(self, layer: SparseLayer) -> dict[str, int]:
        out = {}
        for attr in self.spec.shared:
            mod = getattr(layer.module, attr, None)
            if isinstance(mod, nn.Module):
                out[attr] = sum(p.numel() for p in mod.parameters())
        return out

    def routing_from_output(self, output, num_outputs: int, layer: SparseLayer | None = None):
        logits, _weights, idx = parse_output(self._output_kind(layer), output)
        if idx is None:
            if layer is None:
                raise ModelStructureError(f"{self.model_type}: its router returns no choice; pass the layer")
            _w, idx = self.semantics.select(logits, self._live_params(layer), None)
        chosen = F.one_hot(idx.reshape(-1, idx.shape[-1]), num_outputs).sum(1)
        return chosen, logits

    def _output_kind(self, layer: SparseLayer | None) -> str:
        return self.spec.output

    def _live_params(self, layer: SparseLayer) -> dict:
        router = self.router(layer)
        return router.params if isinstance(router, LogSumExpRouter) else self.params(layer)

    # ---------------------------------------------------------------- expert weights

    def expert_modules(self, layer: SparseLayer) -> list[nn.Module]:
        ex = self._experts(layer)
        if isinstance(ex, ModularExperts):
            return list(ex.experts)
        raise ModelStructureError(f"{layer.name} stores its experts fused; there is no module per expert")

    def expert_param_counts(self, layer: SparseLayer) -> list[dict[str, int]]:
        ex = self._experts(layer)
        if isinstance(ex, ModularExperts):
            return [module_param_counts(e) for e in ex.experts]
        n = sum(t.numel() for t in self._layout(ex).read(ex, 0).values())
        return [{"present": n, "kept": n, "dense": n} for _ in range(self.num_experts(layer))]

    def expert_weights(self, layer: SparseLayer, idx: int) -> dict[str, torch.Tensor]:
        ex = self._experts(layer)
        if isinstance(ex, ModularExperts):
            e = ex.experts[idx]
            out = {}
            for k in MATRICES:
                lin = getattr(e, k)
                if lin is None:
                    continue
                out[k] = linear_weight(lin).detach()
                if linear_bias(lin) is not None:
                    out[f"{k}_bias"] = linear_bias(lin).detach()
            return out
        return self._layout(ex).read(ex, idx)

    def set_expert_weights(self, layer: SparseLayer, idx: int, weights: dict[str, torch.Tensor]) -> None:
        ex = self._experts(layer)
        if not isinstance(ex, ModularExperts):
            self._layout(ex).write(ex, idx, weights)
            return
        e = ex.experts[idx]
        with torch.no_grad():
            for k in MATRICES:
                lin = getattr(e, k)
                if lin is None:
                    continue
                lin.weight.copy_(weights[k])
                if f"{k}_bias" in weights:
                    if lin.bias is None:
                        raise ModelStructureError(f"{layer.name}: expert {idx} has no {k} bias to set")
                    lin.bias.copy_(weights[f"{k}_bias"])

    def expert_gradients(self, layer: SparseLayer, idx: int) -> dict[str, torch.Tensor]:
        ex = self._experts(layer)
        if isinstance(ex, ModularExperts):
            e = ex.experts[idx]
            return {
                k: getattr(e, k).weight.grad
                for k in MATRICES
                if isinstance(getattr(e, k), nn.Linear) and getattr(e, k).weight.grad is not None
            }
        grads = self._layout(ex).read(ex, idx, grad=True)
        if not any(g.any() for g in grads.values()):  # the expert got no token
            return {}
        return grads

    def expert_activations(self, layer: SparseLayer, idx: int, x: torch.Tensor) -> torch.Tensor:
        ex = self._experts(layer)
        return expert_hidden(self.expert_weights(layer, idx), x, self._activation(ex))

    def expert_output(self, layer: SparseLayer, idx: int, x: torch.Tensor) -> torch.Tensor:
        ex = self._experts(layer)
        if isinstance(ex, ModularExperts):
            # Merged experts may be low-rank + sparse modules: run the layer's own module.
            return ex.experts[idx](x.to(next(ex.parameters()).dtype))
        return expert_forward(self.expert_weights(layer, idx), x, self._activation(ex))

    # ---------------------------------------------------------------- merged layers

    def _resized(self, experts: nn.Module, count: int) -> nn.Module:
        layout = self._layout(experts)
        counts = tuple(p.partition(".")[2] for p in self.spec.counts if p.startswith("experts."))
        new = layout.resized(experts, count, counts)
        if isinstance(experts, _Merged):
            new.__class__ = type(experts).__mro__[1]
        new.__class__ = _remapped_class(type(new), self.spec.convention)
        object.__setattr__(new, "smoe_layout", layout)
        object.__setattr__(new, "smoe_act", self._activation(experts))
        return new

    def _set_routing(self, ex: nn.Module, expert_map, dominant, mode: str) -> None:
        ref = next(ex.parameters())
        ex.register_buffer("expert_map", torch.as_tensor(expert_map).long().to(ref.device), persistent=False)
        ex.register_buffer("dominant", torch.as_tensor(dominant).long().to(ref.device), persistent=False)
        ex.router_mode = mode

    def _modular(
        self, layer: SparseLayer, weights: list[dict[str, torch.Tensor]], rank: int | None
    ) -> ModularExperts:
        old = self._experts(layer)
        act = self._activation(old)
        ref = next(old.parameters())
        experts = []
        for w in weights:
            mods = {}
            for k in MATRICES:
                if k not in w:
                    mods[k] = None
                    continue
                bias = w.get(f"{k}_bias")
                if rank is None:
                    lin = nn.Linear(w[k].shape[1], w[k].shape[0], bias=bias is not None)
                    with torch.no_grad():
                        lin.weight.copy_(w[k])
                        if bias is not None:
                            lin.bias.copy_(bias)
                else:
                    lin = LowRankSparseLinear.from_weight(w[k], rank, bias)
                mods[k] = lin
            experts.append(GLUExpert(mods["gate"], mods["up"], mods["down"], act))
        state = self.merged_routing(layer)
        new = ModularExperts(
            experts,
            act,
            torch.tensor(state["expert_map"]) if state else torch.arange(len(weights)),
            torch.tensor(state["dominant"]) if state else torch.arange(len(weights)),
            state["mode"] if state else "remap",
            self.spec.convention,
        )
        return new.to(ref.device, ref.dtype)

    def replace_with_merged(
        self,
        model: nn.Module,
        layer: SparseLayer,
        expert_map: list[int],
        merged: list[dict[str, torch.Tensor]],
        dominant: list[int] | None = None,
    ) -> None:
        old = self._experts(layer)
        dominant = dominant if dominant is not None else list(range(len(merged)))
        layout = self._layout(old)
        if set(merged[0]) <= set(layout.keys()):
            new = self._resized(old, len(merged))
            self._set_routing(new, expert_map, dominant, "remap")
            for g, w in enumerate(merged):
                layout.write(new, g, w)
        else:
            # Biases the stock layout has no place for (REPAIR): one module per expert.
            new = self._modular(layer, merged, None)
            self._set_routing(new, expert_map, dominant, "remap")
        new.train(old.training)
        layer.module.experts = new

    def merged_routing(self, layer: SparseLayer) -> dict | None:
        ex = self._experts(layer)
        if not isinstance(ex, _Merged):
            return None
        return {
            "mode": ex.router_mode,
            "expert_map": ex.expert_map.tolist(),
            "dominant": ex.dominant.tolist(),
        }

    # ---------------------------------------------------------------- routers

    def router_mode_refusal(self, mode: str, plan=None, layer: SparseLayer | None = None) -> str | None:
        params = self.params(layer) if layer is not None else {}
        why = self.semantics.mode_refusal(mode, params)
        if why is None and mode == "prune-logsumexp":
            for key, what in (
                ("correction", "a per-expert score correction"),
                ("expert_scale", "a per-expert weight scale"),
            ):
                # Without a layer (params validation), a family that can have one refuses.
                value = params.get(key) if layer is not None else self.spec.params.get(key)
                if value is not None:
                    why = (
                        f"merge.router=prune-logsumexp: the {self.model_type} router applies {what}, "
                        "which has no per-group value; valid: remap, prune"
                    )
                    break
        if why is None and mode == "prune-logsumexp" and not self.spec.linear_router:
            why = (
                f"merge.router=prune-logsumexp: the {self.model_type} router transforms its input before "
                "its linear map, which a log-sum-exp router over its rows does not; valid: remap, prune"
            )
        if why is None and mode == "prune" and plan is not None and layer is not None:
            rows = int(self.router_weight(layer).shape[0])
            why = self._uneven_groups(plan.rows, params, rows)
        return why

    def _uneven_groups(self, rows: list[int], params: dict, n: int) -> str | None:
        n_group = self.semantics.groups(params)
        if n_group <= 1:
            return None
        size = n // n_group
        kept = [sum(1 for r in rows if r // size == g) for g in range(n_group)]
        # A router that scores a routing group by its two best experts needs two in each.
        least = 2 if params.get("group_score") == "top2" else 1
        if rows != sorted(rows) or len(set(kept)) != 1 or kept[0] < least:
            return (
                f"merge.router=prune keeps {kept} experts of the router's {n_group} routing groups; "
                f"group-limited routing needs the same number in each, at least {least}; valid here: remap"
            )
        return None

    def _slice_rows(self, layer: SparseLayer, rows: list[int] | None, count: int) -> None:
        """Keep router ``rows`` (all but the first ``count`` when None: shapes for loading) of
        every per-expert tensor, and set the count and top-k attributes."""
        block = layer.module
        for path, axis in self.spec.rows:
            try:
                owner, leaf = _owner(path, block, self.spec.router)
                t = getattr(owner, leaf)
            except AttributeError:
                continue
            if t is None:
                continue
            idx = torch.tensor(rows if rows is not None else range(count), device=t.device)
            _replace_tensor(owner, leaf, t.detach().index_select(axis % t.dim(), idx).clone())
        for path in self.spec.counts:
            if path.startswith("experts."):
                continue  # the experts module is already of its merged size
            try:
                owner, leaf = _owner(path, block, self.spec.router)
            except AttributeError:
                continue
            if hasattr(owner, leaf):
                setattr(owner, leaf, count)
        for path in self.spec.top_k:
            owner, leaf = _owner(path, block, self.spec.router)
            setattr(owner, leaf, min(int(getattr(owner, leaf)), count))

    def _linear_tensors(self, layer: SparseLayer) -> tuple[torch.Tensor, torch.Tensor | None]:
        block = layer.module
        weight = resolve(self.spec.rows[0][0], block, self.spec.router)
        bias = None
        for path, _axis in self.spec.rows[1:]:
            if path.endswith(".bias"):
                bias = resolve(path, block, self.spec.router)
        return weight, bias

    def set_router(self, layer: SparseLayer, plan, mode: str) -> None:
        why = self.router_mode_refusal(mode, plan, layer)
        if why:
            raise ModelStructureError(f"{layer.name}: {why}")
        block, ex = layer.module, self._experts(layer)
        if plan.logsumexp:
            weight, bias = self._linear_tensors(layer)
            rows = torch.tensor(plan.rows, device=weight.device)
            new = LogSumExpRouter(
                weight.detach().index_select(0, rows),
                None if bias is None else bias.detach().index_select(0, rows),
                torch.tensor(plan.row_group),
                self.spec.semantics,
                self.params(layer),
                self.spec.output,
            ).to(weight.device)
            new.train(self.router(layer).training)
            setattr(block, self.spec.router, new)
            for path in self.spec.top_k:
                if not path.startswith("router."):
                    owner, leaf = _owner(path, block, self.spec.router)
                    setattr(owner, leaf, min(int(getattr(owner, leaf)), new.num_experts))
            exp_map = list(range(plan.outputs))
        else:
            # In place, so hooks transformers put on the stock router (router-logit capture) stay.
            self._slice_rows(layer, plan.rows, len(plan.rows))
            exp_map = plan.row_group
        ex.expert_map = torch.tensor(exp_map, device=ex.expert_map.device)
        ex.router_mode = mode

    def mask_router(self, layer: SparseLayer, dead: torch.Tensor):
        router, kind = self.router(layer), self._output_kind(layer)
        params = self._live_params(layer)
        semantics = self.semantics

        # The choice is made inside the router (or the block, for routers that return logits only):
        # redo it from masked logits with the family's own rule.
        def hook(_mod, _inputs, output):
            if not dead.any():
                return output
            logits, _w, _i = parse_output(kind, output)
            masked = logits.float().masked_fill(dead.to(logits.device), float("-inf"))
            if kind == "logits":
                return masked.to(output.dtype).reshape(output.shape)
            weights, idx = semantics.select(masked, params, dead.to(logits.device))
            return build_output(kind, masked, weights, idx, like=output)

        return router.register_forward_hook(hook)

    def stock_config_overrides(self, model: nn.Module) -> dict | None:
        sizes, top_ks = set(), set()
        for layer in self.sparse_layers(model):
            ex = self._experts(layer)
            if isinstance(ex, _Merged):
                plain = (
                    not isinstance(ex, ModularExperts)
                    and ex.router_mode == "prune"
                    and ex.expert_map.tolist() == list(range(self.num_experts(layer)))
                )
                if not plain:
                    return None
            sizes.add(self.num_experts(layer))
            top_ks.add(int(resolve(self.spec.top_k[0], layer.module, self.spec.router)))
        if len(sizes) != 1 or len(top_ks) != 1:
            return None
        return {self.spec.config_experts: sizes.pop(), self.spec.config_top_k: top_ks.pop()}

    def compress_layer(self, layer: SparseLayer, rank: int) -> None:
        ex = self._experts(layer)
        if not isinstance(ex, _Merged):
            raise ModelStructureError(
                f"{layer.name} is not a merged layer; only merged experts are compressed"
            )
        if isinstance(ex, ModularExperts):
            for e in ex.experts:
                for k in MATRICES:
                    lin = getattr(e, k)
                    if lin is not None and not isinstance(lin, LowRankSparseLinear):
                        setattr(e, k, LowRankSparseLinear.from_weight(lin.weight, rank, lin.bias))
            return
        weights = [self.expert_weights(layer, g) for g in range(self.num_experts(layer))]
        new = self._modular(layer, weights, rank)
        new.train(ex.training)
        layer.module.experts = new

    def forward_with_router_losses(self, model: nn.Module, **inputs):
        layers = self.sparse_layers(model)
        logits: list[tuple[torch.Tensor, int]] = []
        hooks = []
        for ly in layers:
            kind, k = self._output_kind(ly), int(self._live_params(ly)["top_k"])
            hooks.append(
                self.router(ly).register_forward_hook(
                    lambda _m, _i, out, kind=kind, k=k: logits.append((parse_output(kind, out)[0], k))
                )
            )
        try:
            out = model(**inputs, output_router_logits=False)
        finally:
            for h in hooks:
                h.remove()
        # Per layer, then averaged, so merged layers with fewer router outputs fit in.
        out.decoder_z_loss = torch.stack([_z_loss(x) for x, _ in logits]).mean()
        out.decoder_aux_loss = torch.stack([_balance_loss(x, k) for x, k in logits]).mean()
        return out

    # ---------------------------------------------------------------- saving and loading

    def structure(self, model: nn.Module) -> dict:
        out = {}
        for layer in self.sparse_layers(model):
            ex, router = self._experts(layer), self.router(layer)
            if not isinstance(ex, _Merged):
                continue
            spec = {
                "mode": ex.router_mode,
                "rows": int(self.router_weight(layer).shape[0]),
                "top_k": int(self._live_params(layer)["top_k"]),
            }
            if isinstance(router, LogSumExpRouter):
                spec["row_group"] = router.row_group.tolist()
            if isinstance(ex, ModularExperts):
                experts = {
                    "type": "modules",
                    "activation": ex.act.spec(),
                    "modules": [
                        {k: _linear_spec(getattr(e, k)) for k in MATRICES if getattr(e, k) is not None}
                        for e in ex.experts
                    ],
                }
            else:
                experts = {
                    "type": "fused",
                    "count": self.num_experts(layer),
                    "intermediate": self._layout(ex).intermediate(ex),
                }
            out[layer.name] = {
                "router": spec,
                "expert_map": ex.expert_map.tolist(),
                "dominant": ex.dominant.tolist(),
                "experts": experts,
            }
        return out

    def apply_structure(self, model: nn.Module, structure: dict) -> None:
        layers = self.layers_named_by(model, structure)
        for name, spec in structure.items():
            layer = layers[name]
            r, e = spec["router"], spec["experts"]
            emap, dom = spec["expert_map"], spec["dominant"]
            old = self._experts(layer)
            if e["type"] == "fused":
                if e.get("bias"):
                    raise ModelStructureError(
                        f"{name}: saved with an earlier layout of biased merged experts; re-run merge"
                    )
                new = self._resized(old, e["count"])
            elif e["type"] == "modules":
                act = self._activation(old)
                if e.get("activation", {}).get("kind", act.kind) != act.kind:
                    raise ModelStructureError(
                        f"{name}: saved activation {e['activation']} is not the family's"
                    )
                mods = []
                for parts in e["modules"]:
                    built = {k: linear_from_structure(p) for k, p in parts.items()}
                    mods.append(GLUExpert(built.get("gate"), built["up"], built["down"], act))
                new = ModularExperts(
                    mods, act, torch.tensor(emap), torch.tensor(dom), r["mode"], self.spec.convention
                )
            else:
                raise ModelStructureError(
                    f"{name}: unknown experts type {e['type']!r}; valid: fused, modules"
                )
            self._set_routing(new, emap, dom, r["mode"])
            layer.module.experts = new
            if "row_group" in r:
                weight, bias = self._linear_tensors(layer)
                new_router = LogSumExpRouter(
                    torch.zeros(r["rows"], weight.shape[1], dtype=weight.dtype),
                    None if bias is None else torch.zeros(r["rows"], dtype=bias.dtype),
                    torch.tensor(r["row_group"]),
                    self.spec.semantics,
                    {**self.params(layer), "top_k": r["top_k"]},
                    self.spec.output,
                )
                setattr(layer.module, self.spec.router, new_router)
                for path in self.spec.top_k:
                    if not path.startswith("router."):
                        owner, leaf = _owner(path, layer.module, self.spec.router)
                        setattr(owner, leaf, r["top_k"])
            elif r["rows"] != int(self.router_weight(layer).shape[0]):
                self._slice_rows(layer, None, r["rows"])
                for path in self.spec.top_k:
                    owner, leaf = _owner(path, layer.module, self.spec.router)
                    setattr(owner, leaf, r["top_k"])


def _linear_spec(lin: nn.Module) -> dict:
    if hasattr(lin, "structure"):
        return lin.structure()
    return {
        "type": "linear",
        "in_features": lin.in_features,
        "out_features": lin.out_features,
        **({"bias": True} if lin.bias is not None else {}),
    }
