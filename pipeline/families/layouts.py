"""Expert weight layouts as data: where each expert's matrices sit in a family's experts module.

Every layout reads and writes one expert in the *canonical* form the algorithms use:
``gate [I, H]``, ``up [I, H]``, ``down [H, I]`` and, where the family has them, ``gate_bias [I]``,
``up_bias [I]``, ``down_bias [H]`` (an ungated expert has no ``gate``). Neuron ``i`` of an expert is
row ``i`` of ``gate``/``up`` and column ``i`` of ``down``, whatever the storage.

transformers 5 marks most experts modules with their layout (``use_experts_implementation`` sets
``is_transposed``, ``is_concatenated``, ``has_bias``, ``has_gate``); :func:`layout_of` reads those
flags, and the families that predate them name their layout in the catalog.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.families.base import ModelStructureError

#: The hidden-neuron axis of each canonical tensor (None: it has none, e.g. an output bias).
NEURON_AXES: dict[str, int | None] = {
    "gate": 0,
    "up": 0,
    "down": 1,
    "gate_bias": 0,
    "up_bias": 0,
    "down_bias": None,
}
#: Per input-side matrix, its pre-activation bias (REPAIR sets it).
PREACTIVATION_BIASES = {"gate": "gate_bias", "up": "up_bias"}


@dataclass(frozen=True)
class FusedLayout:
    """Experts stored as 3D tensors ``[E, ...]``: ``gate_up_proj`` (or ``up_proj`` when ungated)
    and ``down_proj``, with optional ``gate_up_proj_bias [E, 2I]`` and ``down_proj_bias [E, H]``.

    ``transposed``: ``[E, H, 2I]`` and ``[E, I, H]`` (inputs multiply from the left) instead of
    ``[E, 2I, H]`` and ``[E, H, I]``. ``interleaved``: gate and up alternate along the 2I axis
    (gate 0, up 0, gate 1, ...) instead of gate then up.
    """

    gated: bool = True
    transposed: bool = False
    interleaved: bool = False
    bias: bool = False

    @property
    def name(self) -> str:
        parts = ["fused"]
        parts += [] if self.gated else ["ungated"]
        parts += ["transposed"] if self.transposed else []
        parts += ["interleaved"] if self.interleaved else []
        parts += ["bias"] if self.bias else []
        return "-".join(parts)

    @property
    def in_name(self) -> str:
        return "gate_up_proj" if self.gated else "up_proj"

    def tensor_names(self) -> list[str]:
        names = [self.in_name, "down_proj"]
        return names + ([f"{self.in_name}_bias", "down_proj_bias"] if self.bias else [])

    def num_experts(self, experts: nn.Module) -> int:
        return int(getattr(experts, self.in_name).shape[0])

    def intermediate(self, experts: nn.Module) -> int:
        w = getattr(experts, self.in_name)
        width = w.shape[2] if self.transposed else w.shape[1]
        return int(width // 2 if self.gated else width)

    def _split(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate, up) along the last axis of ``t`` (``[..., 2I]``)."""
        if self.interleaved:
            return t[..., 0::2], t[..., 1::2]
        return t.chunk(2, dim=-1)

    def _join(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.interleaved:
            return torch.stack([gate, up], dim=-1).flatten(-2)
        return torch.cat([gate, up], dim=-1)

    def read(self, experts: nn.Module, e: int, grad: bool = False) -> dict[str, torch.Tensor]:
        """Expert ``e`` in canonical form (views where the storage allows); ``grad``: of the
        tensors' gradients instead (empty if there are none)."""

        def get(name):
            t = getattr(experts, name)
            t = t.grad if grad else t
            return None if t is None else t.detach()[e]

        w_in, w_out = get(self.in_name), get("down_proj")
        if w_in is None or w_out is None:
            return {}
        # To [.., 2I] along the last axis, so one split serves both orientations.
        w_in = w_in if self.transposed else w_in.T
        out = {}
        if self.gated:
            gate, up = self._split(w_in)
            out["gate"], out["up"] = gate.T, up.T
        else:
            out["up"] = w_in.T
        out["down"] = w_out.T if self.transposed else w_out
        if self.bias:
            b_in, b_out = get(f"{self.in_name}_bias"), get("down_proj_bias")
            if self.gated:
                out["gate_bias"], out["up_bias"] = self._split(b_in)
            else:
                out["up_bias"] = b_in
            out["down_bias"] = b_out
        return out

    def stored(self, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Canonical weights of one expert as this layout's per-expert slices, by tensor name."""
        w_in = self._join(w["gate"].T, w["up"].T) if self.gated else w["up"].T
        out = {
            self.in_name: w_in if self.transposed else w_in.T,
            "down_proj": w["down"].T if self.transposed else w["down"],
        }
        if self.bias:
            if self.gated:
                out[f"{self.in_name}_bias"] = self._join(w["gate_bias"], w["up_bias"])
            else:
                out[f"{self.in_name}_bias"] = w["up_bias"]
            out["down_proj_bias"] = w["down_bias"]
        return out

    def write(self, experts: nn.Module, e: int, w: dict[str, torch.Tensor]) -> None:
        extra = sorted(set(w) - set(self.keys()))
        if extra:
            raise ModelStructureError(f"the {self.name} experts layout has no place for {extra}")
        with torch.no_grad():
            for name, value in self.stored(w).items():
                getattr(experts, name)[e].copy_(value)

    def keys(self) -> list[str]:
        """The canonical tensors an expert of this layout has."""
        keys = ["gate", "up", "down"] if self.gated else ["up", "down"]
        if self.bias:
            keys += ["gate_bias", "up_bias", "down_bias"] if self.gated else ["up_bias", "down_bias"]
        return keys

    def resized(self, experts: nn.Module, count: int, count_attrs: tuple[str, ...]) -> nn.Module:
        """A module of the stock class holding ``count`` zero experts (same dtype and device)."""
        tensors = {n: getattr(experts, n) for n in self.tensor_names()}
        new = _clone_without(experts, tensors.values())
        for name, t in tensors.items():
            setattr(new, name, nn.Parameter(t.new_zeros(count, *t.shape[1:]), requires_grad=t.requires_grad))
        for attr in count_attrs:
            if hasattr(new, attr):
                setattr(new, attr, count)
        return new


@dataclass(frozen=True)
class FlatLayout:
    """DBRX: ``mlp.w1`` (gate) and ``mlp.v1`` (up) as ``[E*I, H]``, and ``mlp.w2`` as ``[E*I, H]``
    holding each expert's down projection transposed."""

    name: str = "flat"

    def tensor_names(self) -> list[str]:
        return ["mlp.w1", "mlp.v1", "mlp.w2"]

    @staticmethod
    def _t(experts: nn.Module, name: str) -> torch.Tensor:
        return experts.get_parameter(name)

    def num_experts(self, experts: nn.Module) -> int:
        return int(experts.num_experts)

    def intermediate(self, experts: nn.Module) -> int:
        return int(self._t(experts, "mlp.w1").shape[0] // self.num_experts(experts))

    def _views(self, experts: nn.Module, grad: bool = False) -> dict[str, torch.Tensor] | None:
        n, i = self.num_experts(experts), self.intermediate(experts)
        out = {}
        for key, name in (("gate", "mlp.w1"), ("up", "mlp.v1"), ("down", "mlp.w2")):
            t = self._t(experts, name)
            t = t.grad if grad else t
            if t is None:
                return None
            out[key] = t.detach().view(n, i, -1)
        return out

    def read(self, experts: nn.Module, e: int, grad: bool = False) -> dict[str, torch.Tensor]:
        v = self._views(experts, grad)
        if v is None:
            return {}
        return {"gate": v["gate"][e], "up": v["up"][e], "down": v["down"][e].T}

    def write(self, experts: nn.Module, e: int, w: dict[str, torch.Tensor]) -> None:
        extra = sorted(set(w) - set(self.keys()))
        if extra:
            raise ModelStructureError(f"the {self.name} experts layout has no place for {extra}")
        v = self._views(experts)
        with torch.no_grad():
            v["gate"][e].copy_(w["gate"])
            v["up"][e].copy_(w["up"])
            v["down"][e].copy_(w["down"].T)

    def keys(self) -> list[str]:
        return ["gate", "up", "down"]

    def resized(self, experts: nn.Module, count: int, count_attrs: tuple[str, ...]) -> nn.Module:
        i = self.intermediate(experts)
        tensors = {n: self._t(experts, n) for n in self.tensor_names()}
        new = _clone_without(experts, tensors.values())
        for name, t in tensors.items():
            owner, _, leaf = name.rpartition(".")
            setattr(new.get_submodule(owner), leaf, nn.Parameter(t.new_zeros(count * i, t.shape[1])))
        for attr in count_attrs:
            owner, _, leaf = attr.rpartition(".")
            mod = new.get_submodule(owner) if owner else new
            if hasattr(mod, leaf):
                setattr(mod, leaf, count)
        return new


def _clone_without(module: nn.Module, tensors) -> nn.Module:
    """A deep copy of ``module`` in which ``tensors`` are not copied (placeholders the caller
    replaces): resizing a layer must not hold a second copy of its experts."""
    memo = {id(t): torch.empty(0) for t in tensors}
    # The model's config stays shared: set_experts_implementation() and friends act through it.
    for sub in module.modules():
        config = sub.__dict__.get("config")
        if config is not None:
            memo[id(config)] = config
    return copy.deepcopy(module, memo)


# ------------------------------------------------------------------------------------------
# The activation between an expert's input and output projections.


class GLUActivation(nn.Module):
    """``h = f(gate, up)`` of a gated expert, or ``f(up)`` of an ungated one.

    ``act``: ``act(gate) * up`` (SwiGLU / GeGLU); ``clamped-swiglu``: GPT-OSS's
    ``(clamp(up, ±limit) + 1) * g * sigmoid(alpha * g)`` with ``g = clamp(gate, max=limit)``;
    ``clamped-glu``: ``act(clamp(gate, max=limit)) * clamp(up, ±limit)``; ``joint``: the experts'
    own two-argument, parameter-free ``act_fn(gate, up)``; ``ungated``: ``act(up)``.
    """

    KINDS = ("act", "clamped-swiglu", "clamped-glu", "joint", "ungated")

    def __init__(self, kind: str, act: nn.Module | None = None, alpha: float = 1.0, limit: float = 0.0):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"unknown expert activation {kind!r}; valid: {', '.join(self.KINDS)}")
        self.kind, self.act, self.alpha, self.limit = kind, act, alpha, limit

    def forward(self, gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
        if self.kind == "ungated":
            return self.act(up)
        if self.kind == "joint":
            return self.act(gate, up)
        if self.kind == "clamped-swiglu":
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            return (up + 1) * gate * torch.sigmoid(gate * self.alpha)
        if self.kind == "clamped-glu":
            return self.act(gate.clamp(max=self.limit)) * up.clamp(min=-self.limit, max=self.limit)
        return self.act(gate) * up

    def spec(self) -> dict:
        """What the structure file records to rebuild it (the act module comes from the stock model)."""
        out = {"kind": self.kind}
        if self.kind == "clamped-swiglu":
            out |= {"alpha": float(self.alpha), "limit": float(self.limit)}
        if self.kind == "clamped-glu":
            out |= {"limit": float(self.limit)}
        return out


def expert_forward(w: dict[str, torch.Tensor], x: torch.Tensor, act: GLUActivation) -> torch.Tensor:
    """One expert's output on ``x [T, H]`` from its canonical weights."""
    x = x.to(w["up"].dtype)
    up = F.linear(x, w["up"], w.get("up_bias"))
    gate = F.linear(x, w["gate"], w.get("gate_bias")) if "gate" in w else None
    return F.linear(act(gate, up), w["down"], w.get("down_bias"))


def expert_hidden(w: dict[str, torch.Tensor], x: torch.Tensor, act: GLUActivation) -> torch.Tensor:
    """One expert's hidden-neuron activations ``[T, I]`` on ``x [T, H]``."""
    x = x.to(w["up"].dtype)
    up = F.linear(x, w["up"], w.get("up_bias"))
    gate = F.linear(x, w["gate"], w.get("gate_bias")) if "gate" in w else None
    return act(gate, up)


def layout_of(experts: nn.Module, declared: str | None = None) -> FusedLayout | FlatLayout:
    """The layout of a stock experts module: ``declared`` by the catalog, else read from the flags
    transformers sets on it. Raises ModelStructureError for layouts no canonical form covers."""
    if declared == "flat":
        return FlatLayout()
    if declared == "fused-transposed":
        return FusedLayout(transposed=True)
    if declared is not None and declared != "flags":
        raise ModelStructureError(
            f"unknown experts layout {declared!r}; valid: flags, flat, fused-transposed"
        )
    if not hasattr(experts, "is_transposed"):
        raise ModelStructureError(
            f"{type(experts).__name__} declares no weight layout (no use_experts_implementation flags)"
        )
    if getattr(experts, "has_post_expert_norm", False):
        raise ModelStructureError(
            f"{type(experts).__name__} normalises each expert's output: a merged expert has no such norm"
        )
    return FusedLayout(
        gated=bool(experts.has_gate),
        transposed=bool(experts.is_transposed),
        interleaved=not bool(experts.is_concatenated),
        bias=bool(experts.has_bias),
    )


def _first_attr(experts: nn.Module, names: tuple[str, ...]) -> float:
    for name in names:
        if getattr(experts, name, None) is not None:
            return float(getattr(experts, name))
    raise ModelStructureError(f"{type(experts).__name__} has none of {', '.join(names)}")


#: Declared activations: the name the catalog gives -> how to build it from the experts module.
#: ``act`` ignores an ``_apply_gate`` that only changes the precision of ``act(gate) * up``;
#: ``clamped-silu`` is ``clamped-glu`` with a SiLU the experts hard-code (they have no act_fn).
DECLARED_ACTIVATIONS = ("act", "clamped-swiglu", "clamped-glu", "clamped-silu", "joint")


def activation_of(experts: nn.Module, layout, declared: str | None = None) -> GLUActivation:
    """The activation of a stock experts module (``declared`` by the catalog, or its ``act_fn``)."""
    if declared == "clamped-swiglu":
        return GLUActivation(
            "clamped-swiglu",
            alpha=_first_attr(experts, ("alpha", "swiglu_alpha")),
            limit=_first_attr(experts, ("limit", "swiglu_limit")),
        )
    if declared in ("clamped-glu", "clamped-silu"):
        act = nn.SiLU() if declared == "clamped-silu" else experts.act_fn
        return GLUActivation("clamped-glu", act, limit=_first_attr(experts, ("limit", "swiglu_limit")))
    if declared in ("act", "joint"):
        return GLUActivation(declared, experts.act_fn)
    if declared is not None:
        raise ModelStructureError(
            f"unknown expert activation {declared!r}; valid: {', '.join(DECLARED_ACTIVATIONS)}"
        )
    custom = getattr(type(experts), "_apply_gate", None)
    if custom is not None:
        from transformers.integrations.moe import _default_apply_gate

        if custom is not _default_apply_gate:
            raise ModelStructureError(
                f"{type(experts).__name__} applies its own gate function, which the catalog does not describe"
            )
    act = getattr(experts, "act_fn", None)
    if act is None and isinstance(layout, FlatLayout):
        act = experts.mlp.activation_fn
    if act is None:
        raise ModelStructureError(f"{type(experts).__name__} has no act_fn")
    return GLUActivation("act" if getattr(layout, "gated", True) else "ungated", act)
