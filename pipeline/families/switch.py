"""Switch Transformers (encoder-decoder, top-1 routing with expert capacity, ReLU experts ``wi``/``wo``
in a ModuleDict)."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.families.base import ADAPTERS, ModelStructureError, MoEAdapter, SparseLayer, set_submodule
from pipeline.moe import (
    LowRankSparseLinear,
    dispatch_by_group,
    linear_bias,
    linear_from_structure,
    linear_weight,
)


class SwitchExpert(nn.Module):
    """A Switch expert whose projections may be dense or low-rank+sparse (same names as stock)."""

    def __init__(self, wi: nn.Module, wo: nn.Module, act: nn.Module, dropout_rate: float) -> None:
        super().__init__()
        self.wi, self.wo, self.act = wi, wo, act
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.dropout(self.act(self.wi(x))))


def top1_dispatch(probs: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch's top-1 choice with expert capacity: ``[B, S, E]`` probs -> one-hot dispatch, max prob.

    Tokens fill each expert's capacity in sequence order, per sequence; the rest are dropped.
    """
    index = torch.nn.functional.one_hot(probs.argmax(-1), num_classes=probs.shape[-1])
    index = index * (torch.cumsum(index, dim=-2) <= capacity)
    return index, probs.max(-1).values.unsqueeze(-1)


class LogSumExpGroupRouter(nn.Module):
    """A top-1 router over M groups whose logit per group is the log-sum-exp of its members' rows.

    Keeps the original N router rows; per token, ``softmax`` over the group logits equals the summed
    probability of each group's members, so no group loses probability mass to pruned rows.
    """

    def __init__(
        self,
        classifier: nn.Linear,
        row_group: torch.Tensor,
        capacity: int,
        dtype: torch.dtype,
        jitter_noise: float = 0.0,
    ) -> None:
        super().__init__()
        self.classifier = classifier
        self.register_buffer("row_group", row_group.long(), persistent=False)
        self.num_experts = int(row_group.max()) + 1
        self.expert_capacity = capacity
        self.dtype = dtype
        self.jitter_noise = jitter_noise

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        in_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(self.dtype)
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            hidden_states = hidden_states * noise
        # As the stock Switch router does: the router computes in router_dtype (float32), whatever
        # dtype the rest of the model's weights are held in (runtime.weights_dtype).
        self.classifier.to(self.dtype)
        logits = self.classifier(hidden_states)
        group_logits = torch.stack(
            [logits[..., self.row_group == g].logsumexp(-1) for g in range(self.num_experts)], dim=-1
        )
        probs = torch.softmax(group_logits, dim=-1, dtype=self.dtype).to(in_dtype)
        dispatch, top = top1_dispatch(probs, self.expert_capacity)
        return dispatch, top, group_logits


class MergedSwitchSparseMLP(nn.Module):
    """A Switch SMoE layer holding only its M merged experts.

    The router picks one of its outputs per token (capacity applied per output) and
    ``expert_map[output]`` names the merged expert that runs it. In ``remap`` form the router is
    the original one (N outputs), so each token picks the same original expert as before and goes
    to that expert's group; pruned forms have one output per group. Tokens are sorted by expert and
    each expert runs once on all of its tokens.
    """

    def __init__(
        self,
        router: nn.Module,
        experts: nn.ModuleDict,
        expert_map: torch.Tensor,
        dominant: torch.Tensor | None = None,
        router_mode: str = "remap",
    ) -> None:
        super().__init__()
        self.router = router
        self.experts = experts
        self.router_mode = router_mode
        # Routing tables live in the structure file, so the weights keep the stock key names.
        self.register_buffer("expert_map", expert_map.long(), persistent=False)
        if dominant is None:
            dominant = torch.arange(len(experts))
        self.register_buffer("dominant", dominant.long(), persistent=False)

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


def _linear_structure(lin: nn.Module) -> dict | None:
    """A projection's structure entry: low-rank+sparse ones, and dense ones with a bias (REPAIR);
    None for a plain bias-free linear layer (the loader's default)."""
    if hasattr(lin, "structure"):
        return lin.structure()
    if isinstance(lin, nn.Linear) and lin.bias is not None:
        return {
            "type": "linear",
            "in_features": lin.in_features,
            "out_features": lin.out_features,
            "bias": True,
        }
    return None


class SwitchAdapter(MoEAdapter):
    model_type = "switch_transformers"
    # ``wi_bias``: only merged experts after REPAIR have one.
    neuron_axes = {"wi": 0, "wo": 1, "wi_bias": 0}
    preactivation_biases = {"wi": "wi_bias"}

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

    def config_defaults(self, vocab_size: int, pad_id: int, eos_id: int) -> dict:
        return {
            "vocab_size": vocab_size,
            "pad_token_id": pad_id,
            "eos_token_id": eos_id,
            "decoder_start_token_id": pad_id,
        }

    def task_inputs(self, model: nn.Module, batch: dict) -> dict:
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=batch["labels"]),
        }

    def sparse_layers(self, model: nn.Module) -> list[SparseLayer]:
        stock = self._stock_sparse()
        layers = []
        for name, mod in model.named_modules():
            if isinstance(mod, (stock, MergedSwitchSparseMLP)):
                layers.append(SparseLayer(name, name.split(".")[0], len(layers), mod))
        return layers

    def expert_count_keys(self) -> tuple[str, ...]:
        return ("num_experts",)

    def expert_width_keys(self, config: dict) -> tuple[str, ...]:
        return ("d_model", "d_ff")

    def num_experts(self, layer: SparseLayer) -> int:
        return len(layer.module.experts)

    def router(self, layer: SparseLayer) -> nn.Module:
        return layer.module.router

    def router_weight(self, layer: SparseLayer) -> torch.Tensor:
        return layer.module.router.classifier.weight.detach()

    def routing_from_output(
        self, output, num_outputs: int, layer: SparseLayer | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dispatch, _probs, logits = output
        return dispatch, logits

    def expert_modules(self, layer: SparseLayer) -> list[nn.Module]:
        return list(layer.module.experts.values())

    def expert_weights(self, layer: SparseLayer, idx: int) -> dict[str, torch.Tensor]:
        e = layer.module.experts[f"expert_{idx}"]
        out = {"wi": linear_weight(e.wi).detach(), "wo": linear_weight(e.wo).detach()}
        if linear_bias(e.wi) is not None:
            out["wi_bias"] = linear_bias(e.wi).detach()
        return out

    def expert_parameters(self, layer: SparseLayer, idx: int) -> dict[str, nn.Parameter]:
        e = layer.module.experts[f"expert_{idx}"]
        return {k: getattr(e, k).weight for k in ("wi", "wo") if isinstance(getattr(e, k), nn.Linear)}

    def expert_activations(self, layer: SparseLayer, idx: int, x: torch.Tensor) -> torch.Tensor:
        e = layer.module.experts[f"expert_{idx}"]
        return e.act(e.wi(x.to(next(e.parameters()).dtype)))

    def expert_output(self, layer: SparseLayer, idx: int, x: torch.Tensor) -> torch.Tensor:
        # Stock and merged layers both key their experts expert_{i} and compute wo(act(wi(x))).
        e = layer.module.experts[f"expert_{idx}"]
        return e(x.to(next(e.parameters()).dtype))

    def set_expert_weights(self, layer: SparseLayer, idx: int, weights: dict[str, torch.Tensor]) -> None:
        e = layer.module.experts[f"expert_{idx}"]
        if "wi_bias" in weights and linear_bias(e.wi) is None:
            raise ModelStructureError(f"{layer.name}: expert {idx} has no wi bias to set")
        with torch.no_grad():
            for k in ("wi", "wo"):
                getattr(e, k).weight.copy_(weights[k])
            if "wi_bias" in weights:
                e.wi.bias.copy_(weights["wi_bias"])

    def _act_and_dropout(self, model_or_layer) -> tuple[nn.Module, float]:
        e = next(iter(model_or_layer.experts.values()))
        return e.act, e.dropout.p

    def replace_with_merged(
        self,
        model: nn.Module,
        layer: SparseLayer,
        expert_map: list[int],
        merged: list[dict[str, torch.Tensor]],
        dominant: list[int] | None = None,
    ) -> None:
        act, p = self._act_and_dropout(layer.module)
        experts = nn.ModuleDict()
        for g, w in enumerate(merged):
            wi = nn.Linear(w["wi"].shape[1], w["wi"].shape[0], bias="wi_bias" in w)
            wo = nn.Linear(w["wo"].shape[1], w["wo"].shape[0], bias=False)
            with torch.no_grad():
                wi.weight.copy_(w["wi"])
                wo.weight.copy_(w["wo"])
                if "wi_bias" in w:
                    wi.bias.copy_(w["wi_bias"])
            experts[f"expert_{g}"] = SwitchExpert(wi, wo, act, p)
        ref = next(layer.module.parameters())
        new = MergedSwitchSparseMLP(
            layer.module.router,
            experts.to(ref.device, ref.dtype),
            torch.tensor(expert_map),
            torch.tensor(dominant) if dominant is not None else None,
        )
        # New modules start in training mode; keep the layer's (dropout, router jitter).
        new.train(layer.module.training)
        set_submodule(model, layer.name, new.to(ref.device))
        layer.module = new

    def merged_routing(self, layer: SparseLayer) -> dict | None:
        m = layer.module
        if not isinstance(m, MergedSwitchSparseMLP):
            return None
        return {"mode": m.router_mode, "expert_map": m.expert_map.tolist(), "dominant": m.dominant.tolist()}

    @staticmethod
    def _router_rows(router: nn.Module, rows: list[int] | None, n_out: int) -> nn.Linear:
        """A copy of the router's classifier holding ``rows`` (all when None), or an empty one."""
        old = router.classifier
        lin = nn.Linear(old.in_features, n_out if rows is None else len(rows), bias=old.bias is not None)
        lin = lin.to(old.weight.device, old.weight.dtype)
        if rows is not None:
            idx = torch.tensor(rows, device=old.weight.device)
            with torch.no_grad():
                lin.weight.copy_(old.weight.index_select(0, idx))
                if old.bias is not None:
                    lin.bias.copy_(old.bias.index_select(0, idx))
        return lin

    def _build_router(
        self, template: nn.Module, rows: list[int] | None, row_group: list[int], logsumexp: bool
    ):
        """A router like ``template`` (capacity, dtype) with the given rows and output rule."""
        import copy

        n_rows = len(row_group)
        classifier = self._router_rows(template, rows, n_rows)
        if logsumexp:
            return LogSumExpGroupRouter(
                classifier,
                torch.tensor(row_group),
                template.expert_capacity,
                template.dtype,
                getattr(template, "jitter_noise", 0.0),
            ).to(classifier.weight.device)
        router = copy.deepcopy(template)  # a stock Top1Router: same capacity, jitter and dtype
        router.classifier = classifier
        router.num_experts = n_rows
        return router

    def mask_router(self, layer: SparseLayer, dead: torch.Tensor):
        # Switch routers (stock and ours) compute their choice from `classifier`'s logits.
        classifier = layer.module.router.classifier
        dead = dead.to(classifier.weight.device)

        def hook(_mod, _inputs, logits):
            return logits.masked_fill(dead, float("-inf")) if dead.any() else logits

        return classifier.register_forward_hook(hook)

    def set_router(self, layer: SparseLayer, plan, mode: str) -> None:
        m = layer.module
        m.router = self._build_router(m.router, plan.rows, plan.row_group, plan.logsumexp)
        m.router.train(m.training)
        exp_map = list(range(plan.outputs)) if plan.logsumexp else plan.row_group
        m.expert_map = torch.tensor(exp_map, device=m.expert_map.device)
        m.router_mode = mode

    def stock_config_overrides(self, model: nn.Module) -> dict | None:
        sizes = set()
        for layer in self.sparse_layers(model):
            m = layer.module
            if isinstance(m, MergedSwitchSparseMLP):
                plain = (
                    m.router_mode == "prune"
                    and all(
                        isinstance(getattr(e, k), nn.Linear) for e in m.experts.values() for k in ("wi", "wo")
                    )
                    # Stock Switch experts have no bias: a REPAIRed layer is not a plain one.
                    and all(e.wi.bias is None for e in m.experts.values())
                    and list(m.experts) == [f"expert_{g}" for g in range(len(m.experts))]
                )
                if not plain:
                    return None
            sizes.add(self.num_experts(layer))
        return {"num_experts": sizes.pop()} if len(sizes) == 1 else None

    def compress_layer(self, layer: SparseLayer, rank: int) -> None:
        if not isinstance(layer.module, MergedSwitchSparseMLP):
            raise ModelStructureError(
                f"{layer.name} is not a merged layer; only merged experts are compressed"
            )
        for e in layer.module.experts.values():
            for k in ("wi", "wo"):
                lin = getattr(e, k)
                if not isinstance(lin, LowRankSparseLinear):
                    setattr(e, k, LowRankSparseLinear.from_weight(lin.weight, rank, lin.bias))

    def forward_with_router_losses(self, model: nn.Module, **inputs):
        from transformers.models.switch_transformers import modeling_switch_transformers as stock

        layers = self.sparse_layers(model)
        routers = [self.router(ly) for ly in layers]
        if all(type(r) is stock.SwitchTransformersTop1Router for r in routers) and (
            len({r.num_experts for r in routers}) == 1
        ):
            return model(**inputs, output_router_logits=True)
        logits: dict[str, list[torch.Tensor]] = {"encoder": [], "decoder": []}
        hooks = [
            r.register_forward_hook(lambda _m, _i, out, side=ly.stack: logits[side].append(out[2]))
            for ly, r in zip(layers, routers, strict=True)
        ]
        try:
            out = model(**inputs, output_router_logits=False)
        finally:
            for h in hooks:
                h.remove()
        # Per layer, then averaged: the stock losses of equal-width layers, layer by layer.
        for side, per_layer in logits.items():
            if not per_layer:
                continue
            z = torch.stack([stock.router_z_loss_func(x) for x in per_layer]).mean()
            aux = torch.stack(
                [stock.load_balancing_loss_func(x.softmax(-1), x.argmax(-1)) for x in per_layer]
            ).mean()
            setattr(out, f"{side}_z_loss", z)
            setattr(out, f"{side}_aux_loss", aux)
        return out

    def structure(self, model: nn.Module) -> dict:
        out = {}
        for layer in self.sparse_layers(model):
            m = layer.module
            if not isinstance(m, MergedSwitchSparseMLP):
                continue
            experts = {}
            for name, e in m.experts.items():
                experts[name] = {
                    k: _linear_structure(getattr(e, k))
                    for k in ("wi", "wo")
                    if _linear_structure(getattr(e, k)) is not None
                }
            router = {"mode": m.router_mode, "rows": m.router.classifier.out_features}
            if isinstance(m.router, LogSumExpGroupRouter):
                router["row_group"] = m.router.row_group.tolist()
            out[layer.name] = {
                "router": router,
                "expert_map": m.expert_map.tolist(),
                "dominant": m.dominant.tolist(),
                "experts": experts,
            }
        return out

    def apply_structure(self, model: nn.Module, structure: dict) -> None:
        layers = self.layers_named_by(model, structure)
        for name, spec in structure.items():
            layer = layers[name]
            act, p = self._act_and_dropout(layer.module)
            w0 = next(iter(layer.module.experts.values()))
            d_model, d_ff = w0.wi.in_features, w0.wi.out_features
            experts = nn.ModuleDict()
            for ename, parts in spec["experts"].items():
                wi = (
                    linear_from_structure(parts["wi"])
                    if "wi" in parts
                    else nn.Linear(d_model, d_ff, bias=False)
                )
                wo = (
                    linear_from_structure(parts["wo"])
                    if "wo" in parts
                    else nn.Linear(d_ff, d_model, bias=False)
                )
                experts[ename] = SwitchExpert(wi, wo, act, p)
            router_spec = spec.get("router", {"mode": "remap"})
            rows = router_spec.get("rows", len(spec["expert_map"]))
            row_group = router_spec.get("row_group", list(range(rows)))
            router = self._build_router(layer.module.router, None, row_group, "row_group" in router_spec)
            set_submodule(
                model,
                name,
                MergedSwitchSparseMLP(
                    router,
                    experts,
                    torch.tensor(spec["expert_map"]),
                    torch.tensor(spec["dominant"]) if "dominant" in spec else None,
                    router_spec["mode"],
                ),
            )


ADAPTERS.register(SwitchAdapter.model_type)(SwitchAdapter())
