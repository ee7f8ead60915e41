"""BERT-family sequence classifiers whose feed-forward networks were upcycled into MoE/MEO layers.

A BERT layer's FFN is ``intermediate.dense -> act -> output.dense -> dropout -> LayerNorm(+res)``.
Upcycling puts a :class:`~pipeline.meo.MoEFeedForward` (both linear maps and the activation) at
``intermediate`` and an identity at ``output.dense``, so dropout, residual and LayerNorm stay stock.
The classifier's logits are returned as ``[B, 1, classes]``: one target position, so the task and
distillation losses of :mod:`pipeline.training` apply unchanged to a class label stored as the
one-token target.

MC-SMoE merges whole experts, which exist only at ``granularity: ffn`` (one gate per FFN, both
matrices of an expert paired by hidden neuron); an expert's weights are ``w1 [F, D]``, ``b1 [F]``,
``w2 [D, F]`` and ``b2 [D]`` (``b2`` has no hidden-neuron axis, so alignment leaves it alone).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.families.base import (
    ADAPTERS,
    ModelStructureError,
    MoEAdapter,
    SparseLayer,
    module_param_counts,
    set_submodule,
)
from pipeline.meo import ExpertPair, MoEFeedForward, install_mask_hook
from pipeline.moe import LowRankSparseLinear

PROJECTIONS = ("w1", "w2")


def ffn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, BertLayer)`` of every transformer layer of the encoder, in order."""
    encoder = model.base_model.encoder
    prefix = f"{model.base_model_prefix}.encoder.layer"
    return [(f"{prefix}.{i}", layer) for i, layer in enumerate(encoder.layer)]


class BertMoEAdapter(MoEAdapter):
    model_type = "bert"
    neuron_axes = {"w1": 0, "b1": 0, "w2": 1, "b2": None}
    sequence_classifier = True

    def model_class(self) -> type:
        from transformers import BertForSequenceClassification

        return BertForSequenceClassification

    def config_class(self) -> type:
        from transformers import BertConfig

        return BertConfig

    def config_defaults(self, vocab_size: int, pad_id: int, eos_id: int) -> dict:
        return {"vocab_size": vocab_size, "pad_token_id": pad_id}

    def task_inputs(self, model: nn.Module, batch: dict) -> dict:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def sparse_layers(self, model: nn.Module) -> list[SparseLayer]:
        out = []
        for name, layer in ffn_layers(model):
            m = layer.intermediate
            if isinstance(m, MoEFeedForward):
                out.append(SparseLayer(f"{name}.intermediate", "encoder", len(out), m, m.spec.sequence_gate))
        return out

    @staticmethod
    def _whole_experts(layer: SparseLayer) -> MoEFeedForward:
        m = layer.module
        if m.granularity != "ffn":
            raise ModelStructureError(
                f"{layer.name} has granularity 'linear': each linear map has its own gate and experts, "
                "so no expert pairs an input with an output matrix; MC-SMoE needs granularity 'ffn'"
            )
        return m

    def num_experts(self, layer: SparseLayer) -> int:
        return layer.module.num_experts

    def router(self, layer: SparseLayer) -> nn.Module:
        return layer.module.gates[0]

    def router_weight(self, layer: SparseLayer) -> torch.Tensor:
        return layer.module.gates[0].weight.detach()

    def routing_from_output(
        self, output, num_outputs: int, layer: SparseLayer | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        gates, logits, _aux = output
        return (gates > 0).long(), logits

    def expert_weights(self, layer: SparseLayer, idx: int) -> dict[str, torch.Tensor]:
        m = self._whole_experts(layer)
        out = {k: m.weight(k)[idx].detach() for k in PROJECTIONS}
        for k, b in (("b1", m.b1), ("b2", m.b2)):
            if b is not None:
                out[k] = b[idx].detach()
        return out

    def set_expert_weights(self, layer: SparseLayer, idx: int, weights: dict[str, torch.Tensor]) -> None:
        m = self._whole_experts(layer)
        with torch.no_grad():
            for k in PROJECTIONS:
                if m.experts is None:
                    getattr(m, k)[idx].copy_(weights[k])
                else:
                    lin = getattr(m.experts[idx], k)
                    if isinstance(lin, LowRankSparseLinear):
                        raise ModelStructureError(f"{layer.name}: compressed experts cannot be overwritten")
                    lin.weight.copy_(weights[k])
            for k in ("b1", "b2"):
                if getattr(m, k) is not None:
                    getattr(m, k)[idx].copy_(weights[k])

    def expert_parameters(self, layer: SparseLayer, idx: int) -> dict[str, nn.Parameter]:
        m = self._whole_experts(layer)
        return {k: getattr(m, k) for k in (*PROJECTIONS, "b1", "b2") if getattr(m, k, None) is not None}

    def expert_gradients(self, layer: SparseLayer, idx: int) -> dict[str, torch.Tensor]:
        grads = {k: p.grad[idx] for k, p in self.expert_parameters(layer, idx).items() if p.grad is not None}
        if not any(g.any() for g in grads.values()):  # the expert got no token
            return {}
        return grads

    def expert_activations(self, layer: SparseLayer, idx: int, x: torch.Tensor) -> torch.Tensor:
        w = self.expert_weights(layer, idx)
        h = x.to(w["w1"].dtype) @ w["w1"].T
        return layer.module.act(h + w["b1"] if "b1" in w else h)

    def expert_modules(self, layer: SparseLayer) -> list[nn.Module]:
        m = layer.module
        if m.experts is None:
            raise ModelStructureError(
                f"{layer.name} stores its experts stacked; there is no module per expert"
            )
        return list(m.experts)

    def expert_param_counts(self, layer: SparseLayer) -> list[dict[str, int]]:
        m = layer.module
        bias = sum(b[0].numel() for b in (m.b1, m.b2) if b is not None)
        if m.experts is None:
            n = m.w1[0].numel() + m.w2[0].numel() + bias
            return [{"present": n, "kept": n, "dense": n} for _ in range(m.num_experts)]
        counts = []
        for e in m.experts:
            c = module_param_counts(e)
            counts.append({k: v + bias for k, v in c.items()})
        return counts

    def permute_expert(self, layer: SparseLayer, idx: int, perm: torch.Tensor) -> None:
        if layer.module.spec.merge:
            raise ModelStructureError(
                f"{layer.name} is an MEO layer ({layer.module.kind}): it sums the selected experts' weights "
                "neuron by neuron, so permuting one expert's neurons changes the merged expert and the "
                "model; its upcycled experts share one neuron order already (use align.method: none)"
            )
        super().permute_expert(layer, idx, perm)

    def replace_with_merged(
        self,
        model: nn.Module,
        layer: SparseLayer,
        expert_map: list[int],
        merged: list[dict[str, torch.Tensor]],
        dominant: list[int] | None = None,
    ) -> None:
        old = self._whole_experts(layer)
        stack = {k: torch.stack([w[k] for w in merged]) for k in merged[0]}
        new = MoEFeedForward(
            old.kind,
            old.granularity,
            stack["w1"],
            stack["w2"],
            stack.get("b1"),
            stack.get("b2"),
            old.act,
            old.top_k,
            old.gates[0].noisy,
            old.token_block_ratio,
            old.merge_chunk,
            torch.tensor(expert_map),
        )
        # The gates (N rows: remap form) and token blocks are the layer's own, unchanged.
        new.gates = old.gates
        new.token_blocks = old.token_blocks
        new.dominant = list(dominant) if dominant is not None else list(range(len(merged)))
        new.router_mode = "remap"
        ref = old.gates[0].weight
        new = new.to(ref.device, ref.dtype)
        new.train(old.training)
        set_submodule(model, layer.name, new)
        layer.module = new

    def merged_routing(self, layer: SparseLayer) -> dict | None:
        m = layer.module
        if m.router_mode is None:
            return None
        return {"mode": m.router_mode, "expert_map": m.expert_map.tolist(), "dominant": list(m.dominant)}

    def set_router(self, layer: SparseLayer, plan, mode: str) -> None:
        m = layer.module
        rows = torch.tensor(plan.rows, device=m.gates[0].weight.device)
        for g in m.gates:
            g.weight = nn.Parameter(g.weight.detach().index_select(0, rows).clone())
            g.noise_weight = nn.Parameter(g.noise_weight.detach().index_select(0, rows).clone())
            g.set_row_group(torch.tensor(plan.row_group) if plan.logsumexp else None)
        exp_map = list(range(plan.outputs)) if plan.logsumexp else plan.row_group
        m.expert_map = torch.tensor(exp_map, device=m.expert_map.device)
        m.router_mode = mode

    def stock_config_overrides(self, model: nn.Module) -> dict | None:
        return None  # stock BERT has no MoE layer: the structure file is what restores them

    def compress_layer(self, layer: SparseLayer, rank: int) -> None:
        m = self._whole_experts(layer)
        if m.router_mode is None:
            raise ModelStructureError(
                f"{layer.name} is not a merged layer; only merged experts are compressed"
            )
        if m.experts is not None:
            return
        pairs = [
            ExpertPair(
                *(LowRankSparseLinear.from_weight(getattr(m, k)[e].detach(), rank) for k in PROJECTIONS)
            )
            for e in range(m.num_experts)
        ]
        m.set_expert_modules(pairs)
        m.experts.to(m.gates[0].weight.device)

    def forward(self, model: nn.Module, **inputs):
        """The model's forward, logits as ``[B, 1, classes]``."""
        out = model(**inputs)
        out.logits = out.logits[:, None, :]
        return out

    def forward_with_router_losses(self, model: nn.Module, **inputs):
        gates = [g for ly in self.sparse_layers(model) for g in ly.module.gates]
        caught: list[tuple[torch.Tensor, torch.Tensor]] = []
        hooks = [g.register_forward_hook(lambda _m, _i, out: caught.append((out[1], out[2]))) for g in gates]
        try:
            out = self.forward(model, **inputs)
        finally:
            for h in hooks:
                h.remove()
        if caught:
            # One value per gate, averaged: the same scale whatever the number of MoE layers.
            out.encoder_z_loss = torch.stack(
                [lg.float().logsumexp(-1).square().mean() for lg, _ in caught]
            ).mean()
            out.encoder_aux_loss = torch.stack([aux for _, aux in caught]).mean()
        return out

    def structure(self, model: nn.Module) -> dict:
        return {ly.name: {"moe": ly.module.structure()} for ly in self.sparse_layers(model)}

    def apply_structure(self, model: nn.Module, structure: dict) -> None:
        layers = dict(ffn_layers(model))
        for name, spec in structure.items():
            layer_name = name.removesuffix(".intermediate")
            if layer_name not in layers or "moe" not in spec:
                raise ModelStructureError(
                    f"model structure names a layer the model lacks or an unknown form: {name}"
                )
            layer = layers[layer_name]
            layer.intermediate = MoEFeedForward.from_structure(
                spec["moe"], layer.intermediate.intermediate_act_fn
            )
            layer.output.dense = nn.Identity()
        install_mask_hook(model.base_model)


ADAPTERS.register(BertMoEAdapter.model_type)(BertMoEAdapter())
