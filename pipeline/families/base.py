"""The interface every model family implements, and the registry of families.

Everything architecture-specific sits in :mod:`pipeline.families`, one adapter per family (or per
kind of family); the algorithms in ``align``, ``grouping``, ``merging`` and ``compression`` only
talk to the :class:`MoEAdapter` interface defined here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.moe import LowRankSparseLinear
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
    # The router decides once per sequence (its input and output rows are sequences, not tokens).
    per_sequence: bool = False


class MoEAdapter:
    """Interface every family implements."""

    model_type: str
    #: Expert tensors and the axis of each that indexes the expert's hidden neurons (None: none).
    neuron_axes: dict[str, int | None]
    #: Per input-side matrix whose rows compute the hidden neurons' pre-activations, the name of
    #: its bias in expert weight dicts (REPAIR sets it). Empty: merged experts cannot carry one.
    preactivation_biases: dict[str, str] = {}
    #: Causal LMs predict token t+1 at position t; encoder-decoders align logits with labels.
    shift_labels: bool = False
    #: The model's logits are class scores (``[B, 1, classes]``), not a vocabulary to rank targets in.
    sequence_classifier: bool = False

    def model_class(self) -> type:
        raise NotImplementedError

    def config_class(self) -> type:
        raise NotImplementedError

    def config_defaults(self, vocab_size: int, pad_id: int, eos_id: int) -> dict:
        """Config values a model built from scratch takes from its tokenizer."""
        raise NotImplementedError

    def task_inputs(self, model: nn.Module, batch: dict) -> dict:
        """Model inputs of a collated batch (teacher forcing on ``labels`` where the family needs it)."""
        raise NotImplementedError

    def sparse_layers(self, model: nn.Module) -> list[SparseLayer]:
        raise NotImplementedError

    def forward(self, model: nn.Module, **inputs):
        """The model's plain forward on :meth:`task_inputs` (no router losses)."""
        return model(**inputs, output_router_logits=False)

    def num_experts(self, layer: SparseLayer) -> int:
        raise NotImplementedError

    def router(self, layer: SparseLayer) -> nn.Module:
        raise NotImplementedError

    def router_weight(self, layer: SparseLayer) -> torch.Tensor:
        """The router's ``[outputs, H]`` weight."""
        raise NotImplementedError

    def routing_from_output(
        self, output, num_outputs: int, layer: SparseLayer | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """From a router's forward output: ``[..., outputs]`` selection counts per token and logits
        (``layer``: the layer whose router gave it, for routers that return logits only)."""
        raise NotImplementedError

    def expert_weights(self, layer: SparseLayer, idx: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def set_expert_weights(self, layer: SparseLayer, idx: int, weights: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def expert_parameters(self, layer: SparseLayer, idx: int) -> dict[str, nn.Parameter]:
        """The trainable tensors behind :meth:`expert_weights`, under the same names (for gradients)."""
        raise NotImplementedError

    def expert_gradients(self, layer: SparseLayer, idx: int) -> dict[str, torch.Tensor]:
        """Gradients of expert ``idx``'s matrices after a backward pass (empty if it got no token)."""
        return {k: p.grad for k, p in self.expert_parameters(layer, idx).items() if p.grad is not None}

    def expert_activations(self, layer: SparseLayer, idx: int, x: torch.Tensor) -> torch.Tensor:
        """Hidden-neuron activations ``[T, F]`` of expert ``idx`` on layer inputs ``x`` ``[T, H]``."""
        raise NotImplementedError

    def expert_output(self, layer: SparseLayer, idx: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``idx``'s output ``[T, H]`` on layer inputs ``x`` ``[T, H]`` (before any gate weight)."""
        raise ModelStructureError(
            f"model family {getattr(self, 'model_type', type(self).__name__)!r} cannot run a single "
            "expert on given inputs, so it has no per-expert output statistics (profile.expert_outputs)"
        )

    def replace_with_merged(
        self,
        model: nn.Module,
        layer: SparseLayer,
        expert_map: list[int],
        merged: list[dict[str, torch.Tensor]],
        dominant: list[int] | None = None,
    ) -> None:
        """Swap ``layer`` for one holding the ``merged`` experts, in ``remap`` router form.

        ``expert_map[e]``: the merged expert of original expert e; ``dominant[g]``: the original
        expert that leads group g (whose router row ``prune`` keeps).
        """
        raise NotImplementedError

    def merged_routing(self, layer: SparseLayer) -> dict | None:
        """``{"mode", "expert_map", "dominant"}`` of a merged layer; None for an unmerged one."""
        raise NotImplementedError

    def set_router(self, layer: SparseLayer, plan, mode: str) -> None:
        """Rebuild a merged layer's router from its original rows by a :class:`RouterPlan`."""
        raise NotImplementedError

    def router_mode_refusal(self, mode: str, plan=None, layer: SparseLayer | None = None) -> str | None:
        """Why router ``mode`` has no meaning for this family's routers (None: it is defined).

        With ``layer`` (and ``plan``, a :class:`~pipeline.routing.RouterPlan`), the answer for
        that layer's router and plan (e.g. group-limited routing after an uneven prune).
        """
        return None

    def expert_count_keys(self) -> tuple[str, ...]:
        """Config keys that may hold the number of routed experts, in order of preference."""
        return ("num_experts", "num_local_experts", "n_routed_experts")

    def expert_width_keys(self, config: dict) -> tuple[str, ...]:
        """Config keys (dotted for nested configs) of an expert matrix's two widths, given the
        checkpoint's or the params' config values."""
        return ("hidden_size", "intermediate_size")

    def shared_experts(self, layer: SparseLayer) -> dict[str, int]:
        """Parameters of each shared (always-on) expert of ``layer``; merging leaves them as they are."""
        return {}

    def mask_router(self, layer: SparseLayer, dead: torch.Tensor):
        """Make the router never choose the experts flagged in ``dead`` [N] (their logits -inf,
        added before the choice); returns a handle whose ``remove()`` undoes it."""
        raise ModelStructureError(f"{self.model_type}: masking router outputs is not supported")

    def stock_config_overrides(self, model: nn.Module) -> dict | None:
        """Config values under which stock ``transformers`` loads the model as saved (fewer experts,
        capped top-k), when every SMoE layer is a plain layer of one size; None otherwise."""
        raise NotImplementedError

    def compress_layer(self, layer: SparseLayer, rank: int) -> None:
        raise NotImplementedError

    def forward_with_router_losses(self, model: nn.Module, **inputs):
        """The model's forward with its router losses filled in, also when merged layers' routers
        have different numbers of outputs (which the stock loss code cannot concatenate)."""
        raise NotImplementedError

    def expert_modules(self, layer: SparseLayer) -> list[nn.Module]:
        raise NotImplementedError

    def expert_param_counts(self, layer: SparseLayer) -> list[dict[str, int]]:
        """Per expert: parameters present, parameters kept (pruned units of S excluded), and the
        parameters of its dense form."""
        return [module_param_counts(e) for e in self.expert_modules(layer)]

    def structure(self, model: nn.Module) -> dict:
        raise NotImplementedError

    def apply_structure(self, model: nn.Module, structure: dict) -> None:
        raise NotImplementedError

    def layers_named_by(self, model: nn.Module, structure: dict) -> dict[str, SparseLayer]:
        """The model's SMoE layers by name; refuses a structure naming a layer the model lacks
        (a structure file from another model would otherwise be applied in part)."""
        layers = {layer.name: layer for layer in self.sparse_layers(model)}
        unknown = sorted(set(structure) - set(layers))
        if unknown:
            raise ModelStructureError(f"model structure names layers the model lacks: {unknown}")
        return layers

    def permute_expert(self, layer: SparseLayer, idx: int, perm: torch.Tensor) -> None:
        """Reorder expert ``idx``'s hidden neurons (the function it computes is unchanged)."""
        w = self.expert_weights(layer, idx)
        axes = self.neuron_axes
        # A tensor without a hidden-neuron axis (an output bias) is the same under any permutation.
        self.set_expert_weights(
            layer,
            idx,
            {k: v if axes[k] is None else v.index_select(axes[k], perm.to(v.device)) for k, v in w.items()},
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


def module_param_counts(module: nn.Module) -> dict[str, int]:
    """Parameters of a (possibly low-rank + sparse) expert: present, kept after pruning, and dense."""
    present = sum(p.numel() for p in module.parameters())
    kept = dense = 0
    for m in module.modules():
        if isinstance(m, LowRankSparseLinear):
            s_kept = m.s_kept_entries()
            bias = m.bias.numel() if m.bias is not None else 0
            kept += m.u.numel() + m.v.numel() + s_kept + bias
            dense += m.in_features * m.out_features + bias
        elif isinstance(m, nn.Linear):
            bias = m.bias.numel() if m.bias is not None else 0
            kept += m.weight.numel() + bias
            dense += m.weight.numel() + bias
    return {"present": present, "kept": kept, "dense": dense}


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
