"""Model-family adapters: where router and expert weights live, and how merged layers are built.

Everything architecture-specific sits here, one adapter class per family; the algorithms in
``align``, ``grouping``, ``merging`` and ``compression`` only talk to the :class:`MoEAdapter` interface.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.moe import LowRankSparseLinear, dispatch_by_group, linear_from_structure, linear_weight
from pipeline.registry import Registry


class ModelStructureError(ValueError):
    """The model is not of a supported SMoE family, or has no SMoE layer."""


@dataclass
class SparseLayer:
    """One SMoE layer of a model."""

    name: str  # module path, e.g. "encoder.block.1.layer.1.mlp"
    stack: str  # "encoder" or "decoder"
    position: int  # index among all SMoE layers, in forward order
    module: nn.Module


class MoEAdapter:
    """Interface every family implements."""

    model_type: str
    #: Expert matrices and the axis of each that indexes the expert's hidden neurons.
    neuron_axes: dict[str, int]

    def model_class(self) -> type:
        raise NotImplementedError

    def config_class(self) -> type:
        raise NotImplementedError

    def sparse_layers(self, model: nn.Module) -> list[SparseLayer]:
        raise NotImplementedError

    def num_experts(self, layer: SparseLayer) -> int:
        raise NotImplementedError

    def router(self, layer: SparseLayer) -> nn.Module:
        raise NotImplementedError

    def expert_weights(self, layer: SparseLayer, idx: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def set_expert_weights(self, layer: SparseLayer, idx: int, weights: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def expert_parameters(self, layer: SparseLayer, idx: int) -> dict[str, nn.Parameter]:
        """The trainable tensors behind :meth:`expert_weights`, under the same names (for gradients)."""
        raise NotImplementedError

    def expert_activations(self, layer: SparseLayer, idx: int, x: torch.Tensor) -> torch.Tensor:
        """Hidden-neuron activations ``[T, F]`` of expert ``idx`` on layer inputs ``x`` ``[T, H]``."""
        raise NotImplementedError

    def replace_with_merged(
        self,
        model: nn.Module,
        layer: SparseLayer,
        expert_map: list[int],
        merged: list[dict[str, torch.Tensor]],
    ) -> None:
        raise NotImplementedError

    def compress_layer(self, layer: SparseLayer, rank: int) -> None:
        raise NotImplementedError

    def expert_modules(self, layer: SparseLayer) -> list[nn.Module]:
        raise NotImplementedError

    def structure(self, model: nn.Module) -> dict:
        raise NotImplementedError

    def apply_structure(self, model: nn.Module, structure: dict) -> None:
        raise NotImplementedError

    def permute_expert(self, layer: SparseLayer, idx: int, perm: torch.Tensor) -> None:
        """Reorder expert ``idx``'s hidden neurons (the function it computes is unchanged)."""
        w = self.expert_weights(layer, idx)
        self.set_expert_weights(
            layer, idx, {k: v.index_select(self.neuron_axes[k], perm) for k, v in w.items()}
        )


ADAPTERS: Registry[MoEAdapter] = Registry("model family")


def adapter_for(model_or_config) -> MoEAdapter:
    """The adapter of a model (or config), by its ``model_type``."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ModelStructureError(
            f"model type {model_type!r} is not a supported SMoE family; supported: {', '.join(ADAPTERS.names())}"
        )
    return ADAPTERS.get(model_type)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# --------------------------------------------------------------------------------------------
# Switch Transformers (encoder-decoder, top-1 routing, ReLU experts `wi`/`wo` in a ModuleDict)
# --------------------------------------------------------------------------------------------


class SwitchExpert(nn.Module):
    """A Switch expert whose projections may be dense or low-rank+sparse (same names as stock)."""

    def __init__(self, wi: nn.Module, wo: nn.Module, act: nn.Module, dropout_rate: float) -> None:
        super().__init__()
        self.wi, self.wo, self.act = wi, wo, act
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.dropout(self.act(self.wi(x))))


class MergedSwitchSparseMLP(nn.Module):
    """A Switch SMoE layer whose N router outputs are redirected to M merged experts.

    The router and its capacity rule are untouched, so each token picks the same original expert
    as before; ``expert_map[e]`` sends it to the merged expert of e's group.
    """

    def __init__(self, router: nn.Module, experts: nn.ModuleDict, expert_map: torch.Tensor) -> None:
        super().__init__()
        self.router = router
        self.experts = experts
        self.register_buffer("expert_map", expert_map.long())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, s, h = hidden_states.shape
        dispatch, probs, _ = self.router(hidden_states)
        dispatch = dispatch.reshape(-1, dispatch.shape[-1])
        routed = dispatch.any(-1)
        group = torch.where(
            routed, self.expert_map[dispatch.argmax(-1)], torch.full_like(routed, -1, dtype=torch.long)
        )
        out = dispatch_by_group(
            hidden_states.reshape(-1, h), group, probs.reshape(-1, 1), list(self.experts.values())
        )
        return out.reshape(b, s, h)


class SwitchAdapter(MoEAdapter):
    model_type = "switch_transformers"
    neuron_axes = {"wi": 0, "wo": 1}

    def model_class(self) -> type:
        from transformers import SwitchTransformersForConditionalGeneration

        return SwitchTransformersForConditionalGeneration

    def config_class(self) -> type:
        from transformers import SwitchTransformersConfig

        return SwitchTransformersConfig

    @staticmethod
    def _stock_sparse() -> type:
        from transformers.models.switch_transformers.modeling_switch_transformers import (
            SwitchTransformersSparseMLP,
        )

        return SwitchTransformersSparseMLP

    def sparse_layers(self, model: nn.Module) -> list[SparseLayer]:
        stock = self._stock_sparse()
        layers = []
        for name, mod in model.named_modules():
            if isinstance(mod, (stock, MergedSwitchSparseMLP)):
                layers.append(SparseLayer(name, name.split(".")[0], len(layers), mod))
        return layers

    def num_experts(self, layer: SparseLayer) -> int:
        return len(layer.module.experts)

    def router(self, layer: SparseLayer) -> nn.Module:
        return layer.module.router

    def expert_modules(self, layer: SparseLayer) -> list[nn.Module]:
        return list(layer.module.experts.values())

    def expert_weights(self, layer: SparseLayer, idx: int) -> dict[str, torch.Tensor]:
        e = layer.module.experts[f"expert_{idx}"]
        return {"wi": linear_weight(e.wi).detach(), "wo": linear_weight(e.wo).detach()}

    def expert_parameters(self, layer: SparseLayer, idx: int) -> dict[str, nn.Parameter]:
        e = layer.module.experts[f"expert_{idx}"]
        return {k: getattr(e, k).weight for k in ("wi", "wo") if isinstance(getattr(e, k), nn.Linear)}

    def expert_activations(self, layer: SparseLayer, idx: int, x: torch.Tensor) -> torch.Tensor:
        e = layer.module.experts[f"expert_{idx}"]
        return e.act(e.wi(x.to(next(e.parameters()).dtype)))

    def set_expert_weights(self, layer: SparseLayer, idx: int, weights: dict[str, torch.Tensor]) -> None:
        e = layer.module.experts[f"expert_{idx}"]
        with torch.no_grad():
            for k in ("wi", "wo"):
                getattr(e, k).weight.copy_(weights[k])

    def _act_and_dropout(self, model_or_layer) -> tuple[nn.Module, float]:
        e = next(iter(model_or_layer.experts.values()))
        return e.act, e.dropout.p

    def replace_with_merged(
        self,
        model: nn.Module,
        layer: SparseLayer,
        expert_map: list[int],
        merged: list[dict[str, torch.Tensor]],
    ) -> None:
        act, p = self._act_and_dropout(layer.module)
        experts = nn.ModuleDict()
        for g, w in enumerate(merged):
            wi = nn.Linear(w["wi"].shape[1], w["wi"].shape[0], bias=False)
            wo = nn.Linear(w["wo"].shape[1], w["wo"].shape[0], bias=False)
            with torch.no_grad():
                wi.weight.copy_(w["wi"])
                wo.weight.copy_(w["wo"])
            experts[f"expert_{g}"] = SwitchExpert(wi, wo, act, p)
        ref = next(layer.module.parameters())
        new = MergedSwitchSparseMLP(
            layer.module.router, experts.to(ref.device, ref.dtype), torch.tensor(expert_map)
        )
        set_submodule(model, layer.name, new.to(ref.device))
        layer.module = new

    def compress_layer(self, layer: SparseLayer, rank: int) -> None:
        if not isinstance(layer.module, MergedSwitchSparseMLP):
            raise ModelStructureError(
                f"{layer.name} is not a merged layer; only merged experts are compressed"
            )
        for e in layer.module.experts.values():
            for k in ("wi", "wo"):
                lin = getattr(e, k)
                if not isinstance(lin, LowRankSparseLinear):
                    setattr(e, k, LowRankSparseLinear.from_weight(lin.weight, rank))

    def structure(self, model: nn.Module) -> dict:
        out = {}
        for layer in self.sparse_layers(model):
            if not isinstance(layer.module, MergedSwitchSparseMLP):
                continue
            experts = {}
            for name, e in layer.module.experts.items():
                experts[name] = {
                    k: getattr(e, k).structure() for k in ("wi", "wo") if hasattr(getattr(e, k), "structure")
                }
            out[layer.name] = {"expert_map": layer.module.expert_map.tolist(), "experts": experts}
        return out

    def apply_structure(self, model: nn.Module, structure: dict) -> None:
        layers = {layer.name: layer for layer in self.sparse_layers(model)}
        unknown = sorted(set(structure) - set(layers))
        if unknown:
            raise ModelStructureError(f"model structure names layers the model lacks: {unknown}")
        for name, spec in structure.items():
            layer = layers[name]
            act, p = self._act_and_dropout(layer.module)
            w0 = next(iter(layer.module.experts.values()))
            experts = nn.ModuleDict()
            for ename, parts in spec["experts"].items():
                wi = (
                    linear_from_structure(parts["wi"])
                    if "wi" in parts
                    else nn.Linear(w0.wi.in_features, w0.wi.out_features, bias=False)
                )
                wo = (
                    linear_from_structure(parts["wo"])
                    if "wo" in parts
                    else nn.Linear(w0.wo.in_features, w0.wo.out_features, bias=False)
                )
                experts[ename] = SwitchExpert(wi, wo, act, p)
            set_submodule(
                model,
                name,
                MergedSwitchSparseMLP(layer.module.router, experts, torch.tensor(spec["expert_map"])),
            )


ADAPTERS.register(SwitchAdapter.model_type)(SwitchAdapter())
