"""Decoder MoE LLMs with top-k routing and fused SwiGLU experts: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE.

``transformers`` 5.x keeps these experts as 3D parameters (``gate_up_proj`` ``[E, 2I, H]``,
``down_proj`` ``[E, H, I]``) and routes with a top-k router (weight ``[E, H]``) whose forward returns
``(logits, scores, indices)``. One base adapter handles them all; a family only declares where its
classes live and what its config calls things. A merged layer keeps the stock block (and, for
Qwen2-MoE, its shared expert untouched); only ``block.experts`` and ``block.gate`` change.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.adapters import ADAPTERS, ModelStructureError, MoEAdapter, SparseLayer, set_submodule
from pipeline.moe import (
    LowRankSparseLinear,
    dispatch_by_group,
    linear_bias,
    linear_from_structure,
    linear_weight,
)

MATRICES = ("gate", "up", "down")


class SwiGLUExpert(nn.Module):
    """``down(act(gate(x)) * up(x))`` with projections that may be dense or low-rank + sparse."""

    def __init__(self, gate: nn.Module, up: nn.Module, down: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.gate, self.up, self.down, self.act = gate, up, down, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


class _MergedExperts(nn.Module):
    """M merged experts behind a router with any number of outputs.

    Same call as the stock experts module (``hidden [T, H], top_k_index [T, k], top_k_weights
    [T, k]``); ``expert_map[output]`` names the expert that runs a router output, so two of a
    token's top-k choices that fall in one group add their weights on that group's expert.
    """

    def __init__(self, expert_map: torch.Tensor, dominant: torch.Tensor, router_mode: str, act: nn.Module):
        super().__init__()
        self.act_fn = act
        self.router_mode = router_mode
        # Routing tables live in the structure file, so the weights keep stock key names.
        self.register_buffer("expert_map", expert_map.long(), persistent=False)
        self.register_buffer("dominant", dominant.long(), persistent=False)

    def expert_fns(self) -> list:
        raise NotImplementedError

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        t, k = top_k_index.shape
        group = self.expert_map[top_k_index].reshape(-1)
        pairs = hidden_states.repeat_interleave(k, dim=0)  # one row per (token, choice)
        out = dispatch_by_group(pairs, group, top_k_weights.reshape(-1, 1), self.expert_fns())
        return out.reshape(t, k, -1).sum(1)


class MergedFusedExperts(_MergedExperts):
    """Dense merged experts stored like the stock module (``gate_up_proj``, ``down_proj``)."""

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        intermediate: int,
        act: nn.Module,
        expert_map: torch.Tensor,
        dominant: torch.Tensor,
        router_mode: str = "remap",
        bias: bool = False,
    ) -> None:
        super().__init__(expert_map, dominant, router_mode, act)
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden, intermediate
        self.gate_up_proj = nn.Parameter(torch.zeros(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.zeros(num_experts, hidden, intermediate))
        # Gate and up biases ``[E, 2I]``: only REPAIRed merged experts have them (stock ones do not).
        self.gate_up_bias = nn.Parameter(torch.zeros(num_experts, 2 * intermediate)) if bias else None

    def _expert(self, g: int, x: torch.Tensor) -> torch.Tensor:
        b = None if self.gate_up_bias is None else self.gate_up_bias[g]
        gate, up = F.linear(x, self.gate_up_proj[g], b).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate) * up, self.down_proj[g])

    def expert_fns(self) -> list:
        return [lambda x, g=g: self._expert(g, x) for g in range(self.num_experts)]


class MergedModularExperts(_MergedExperts):
    """Merged experts as separate modules, so each projection can be low-rank + sparse."""

    def __init__(
        self,
        experts: list[SwiGLUExpert],
        act: nn.Module,
        expert_map: torch.Tensor,
        dominant: torch.Tensor,
        router_mode: str = "remap",
    ) -> None:
        super().__init__(expert_map, dominant, router_mode, act)
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(experts)

    def expert_fns(self) -> list:
        return list(self.experts)


class LogSumExpTopKRouter(nn.Module):
    """Top-k over M groups whose logit is the log-sum-exp of the group's original router rows.

    Returns what the stock router returns: ``(group logits [T, M], scores [T, k], indices [T, k])``.
    """

    def __init__(self, weight: torch.Tensor, row_group: torch.Tensor, top_k: int, normalise: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.register_buffer("row_group", row_group.long(), persistent=False)
        self.num_experts = int(row_group.max()) + 1
        self.top_k = min(top_k, self.num_experts)
        self.normalise = normalise
        self.hidden_dim = weight.shape[1]
        # One [N, M] membership mask, built once: logsumexp over members = log(exp(logits) @ member).
        member = F.one_hot(self.row_group, self.num_experts).bool()
        self.register_buffer("member", member, persistent=False)

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = F.linear(hidden_states, self.weight).float()
        masked = logits[:, :, None].masked_fill(~self.member, float("-inf"))
        group_logits = masked.logsumexp(1)
        probs = group_logits.softmax(-1)
        top, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.normalise:
            top = top / top.sum(-1, keepdim=True)
        return group_logits.to(hidden_states.dtype), top.to(hidden_states.dtype), idx


def _z_loss(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().logsumexp(-1).square().mean()


def _balance_loss(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch-style load balancing for top-k: N * sum_e (share of selections) * (mean probability)."""
    probs = logits.float().softmax(-1)
    n = probs.shape[-1]
    chosen = F.one_hot(probs.topk(min(top_k, n), dim=-1).indices, n).float().sum(1)
    return n * (chosen.mean(0) / min(top_k, n) * probs.mean(0)).sum()


class TopKMoEAdapter(MoEAdapter):
    """Shared logic of decoder families with a top-k router and fused SwiGLU experts."""

    # ``gate_bias``/``up_bias``: only merged experts after REPAIR have them.
    neuron_axes = {"gate": 0, "up": 0, "down": 1, "gate_bias": 0, "up_bias": 0}
    preactivation_biases = {"gate": "gate_bias", "up": "up_bias"}
    shift_labels = True
    #: Where the family lives in transformers, and its class names.
    module: str
    causal_lm_class: str
    config_class_name: str
    block_class: str
    #: Config key of the number of routed experts.
    num_experts_key: str = "num_experts"
    #: Mixtral renormalises its top-k weights always (no config flag); others follow norm_topk_prob.
    normalises_top_k_always: bool = False

    def _classes(self):
        return importlib.import_module(self.module)

    def model_class(self) -> type:
        return getattr(self._classes(), self.causal_lm_class)

    def config_class(self) -> type:
        return getattr(self._classes(), self.config_class_name)

    def config_defaults(self, vocab_size: int, pad_id: int, eos_id: int) -> dict:
        return {
            "vocab_size": vocab_size,
            "pad_token_id": pad_id,
            "eos_token_id": eos_id,
            "bos_token_id": eos_id,
        }

    def normalises_top_k(self, router_or_config) -> bool:
        """Whether the top-k probabilities are rescaled to sum to one (per family, or per config)."""
        return self.normalises_top_k_always or bool(getattr(router_or_config, "norm_topk_prob", False))

    def task_inputs(self, model: nn.Module, batch: dict) -> dict:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def sparse_layers(self, model: nn.Module) -> list[SparseLayer]:
        block = getattr(self._classes(), self.block_class)
        layers = []
        for name, mod in model.named_modules():
            if isinstance(mod, block):
                layers.append(SparseLayer(name, "decoder", len(layers), mod))
        return layers

    def num_experts(self, layer: SparseLayer) -> int:
        return int(layer.module.experts.num_experts)

    def router(self, layer: SparseLayer) -> nn.Module:
        return layer.module.gate

    def router_weight(self, layer: SparseLayer) -> torch.Tensor:
        return layer.module.gate.weight.detach()

    def routing_from_output(self, output, num_outputs: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits, _scores, indices = output
        # Every one of a token's top-k selections counts towards its expert's frequency.
        chosen = F.one_hot(indices.reshape(-1, indices.shape[-1]), num_outputs).sum(1)
        return chosen, logits

    def expert_modules(self, layer: SparseLayer) -> list[nn.Module]:
        ex = layer.module.experts
        if isinstance(ex, MergedModularExperts):
            return list(ex.experts)
        raise ModelStructureError(f"{layer.name} stores its experts fused; there is no module per expert")

    def expert_param_counts(self, layer: SparseLayer) -> list[dict[str, int]]:
        ex = layer.module.experts
        if isinstance(ex, MergedModularExperts):
            return super().expert_param_counts(layer)
        n = ex.gate_up_proj[0].numel() + ex.down_proj[0].numel()
        if getattr(ex, "gate_up_bias", None) is not None:
            n += ex.gate_up_bias[0].numel()
        return [{"present": n, "kept": n, "dense": n} for _ in range(self.num_experts(layer))]

    def expert_weights(self, layer: SparseLayer, idx: int) -> dict[str, torch.Tensor]:
        ex = layer.module.experts
        if isinstance(ex, MergedModularExperts):
            e = ex.experts[idx]
            out = {k: linear_weight(getattr(e, k)).detach() for k in MATRICES}
            for k in ("gate", "up"):
                if linear_bias(getattr(e, k)) is not None:
                    out[f"{k}_bias"] = linear_bias(getattr(e, k)).detach()
            return out
        gate, up = ex.gate_up_proj[idx].detach().chunk(2, dim=0)
        out = {"gate": gate, "up": up, "down": ex.down_proj[idx].detach()}
        if getattr(ex, "gate_up_bias", None) is not None:
            out["gate_bias"], out["up_bias"] = ex.gate_up_bias[idx].detach().chunk(2, dim=0)
        return out

    def set_expert_weights(self, layer: SparseLayer, idx: int, weights: dict[str, torch.Tensor]) -> None:
        ex = layer.module.experts
        with torch.no_grad():
            if isinstance(ex, MergedModularExperts):
                for k in MATRICES:
                    getattr(ex.experts[idx], k).weight.copy_(weights[k])
                for k in ("gate", "up"):
                    if f"{k}_bias" in weights:
                        getattr(ex.experts[idx], k).bias.copy_(weights[f"{k}_bias"])
            else:
                ex.gate_up_proj[idx].copy_(torch.cat([weights["gate"], weights["up"]], dim=0))
                ex.down_proj[idx].copy_(weights["down"])
                if "gate_bias" in weights:
                    ex.gate_up_bias[idx].copy_(torch.cat([weights["gate_bias"], weights["up_bias"]], dim=0))

    def expert_gradients(self, layer: SparseLayer, idx: int) -> dict[str, torch.Tensor]:
        ex = layer.module.experts
        if isinstance(ex, MergedModularExperts):
            e = ex.experts[idx]
            return {
                k: getattr(e, k).weight.grad
                for k in MATRICES
                if isinstance(getattr(e, k), nn.Linear) and getattr(e, k).weight.grad is not None
            }
        if ex.gate_up_proj.grad is None:
            return {}
        gate, up = ex.gate_up_proj.grad[idx].chunk(2, dim=0)
        if not (gate.any() or up.any()):  # the expert got no token
            return {}
        return {"gate": gate, "up": up, "down": ex.down_proj.grad[idx]}

    def expert_activations(self, layer: SparseLayer, idx: int, x: torch.Tensor) -> torch.Tensor:
        w = self.expert_weights(layer, idx)
        x = x.to(w["gate"].dtype)
        gate, up = F.linear(x, w["gate"], w.get("gate_bias")), F.linear(x, w["up"], w.get("up_bias"))
        return layer.module.experts.act_fn(gate) * up

    def expert_output(self, layer: SparseLayer, idx: int, x: torch.Tensor) -> torch.Tensor:
        ex = layer.module.experts
        if isinstance(ex, _MergedExperts):
            # Merged experts may be low-rank + sparse modules: run the layer's own callable.
            ref = next(ex.parameters())
            return ex.expert_fns()[idx](x.to(ref.dtype))
        x = x.to(ex.gate_up_proj.dtype)
        gate, up = F.linear(x, ex.gate_up_proj[idx]).chunk(2, dim=-1)
        return F.linear(ex.act_fn(gate) * up, ex.down_proj[idx])

    def replace_with_merged(
        self,
        model: nn.Module,
        layer: SparseLayer,
        expert_map: list[int],
        merged: list[dict[str, torch.Tensor]],
        dominant: list[int] | None = None,
    ) -> None:
        old = layer.module.experts
        inter, hidden = merged[0]["gate"].shape
        bias = "gate_bias" in merged[0]
        new = MergedFusedExperts(
            len(merged),
            hidden,
            inter,
            old.act_fn,
            torch.tensor(expert_map),
            torch.tensor(dominant if dominant is not None else list(range(len(merged)))),
            bias=bias,
        )
        ref = old.gate_up_proj if hasattr(old, "gate_up_proj") else next(old.parameters())
        new = new.to(ref.device, ref.dtype)
        with torch.no_grad():
            for g, w in enumerate(merged):
                new.gate_up_proj[g].copy_(torch.cat([w["gate"], w["up"]], dim=0))
                new.down_proj[g].copy_(w["down"])
                if bias:
                    new.gate_up_bias[g].copy_(torch.cat([w["gate_bias"], w["up_bias"]], dim=0))
        new.train(old.training)
        layer.module.experts = new

    def merged_routing(self, layer: SparseLayer) -> dict | None:
        ex = layer.module.experts
        if not isinstance(ex, _MergedExperts):
            return None
        return {
            "mode": ex.router_mode,
            "expert_map": ex.expert_map.tolist(),
            "dominant": ex.dominant.tolist(),
        }

    def mask_router(self, layer: SparseLayer, dead: torch.Tensor):
        gate = layer.module.gate
        normalise = self.normalises_top_k(gate)

        # The stock router picks its top-k inside forward: redo the choice from masked logits,
        # with the family's softmax-then-top-k rule (and renormalisation where it has one).
        def hook(_mod, _inputs, output):
            logits, scores, _ = output
            if not dead.any():
                return output
            masked = logits.float().masked_fill(dead.to(logits.device), float("-inf"))
            top, idx = torch.topk(masked.softmax(-1), min(gate.top_k, int((~dead).sum())), dim=-1)
            if normalise:
                top = top / top.sum(-1, keepdim=True)
            return masked.to(logits.dtype), top.to(scores.dtype), idx

        return gate.register_forward_hook(hook)

    def set_router(self, layer: SparseLayer, plan, mode: str) -> None:
        block, ex = layer.module, layer.module.experts
        gate = block.gate
        rows = torch.tensor(plan.rows, device=gate.weight.device)
        if plan.logsumexp:
            new = LogSumExpTopKRouter(
                gate.weight.detach().index_select(0, rows),
                torch.tensor(plan.row_group),
                gate.top_k,
                self.normalises_top_k(gate),
            ).to(gate.weight.device)
            new.train(gate.training)
            block.gate = new
            exp_map = list(range(plan.outputs))
        else:
            # In place, so hooks transformers put on the stock router (router-logit capture) stay.
            gate.weight = nn.Parameter(gate.weight.detach().index_select(0, rows).clone())
            gate.num_experts = len(plan.rows)
            gate.top_k = min(gate.top_k, len(plan.rows))
            exp_map = plan.row_group
        ex.expert_map = torch.tensor(exp_map, device=ex.expert_map.device)
        ex.router_mode = mode

    def stock_config_overrides(self, model: nn.Module) -> dict | None:
        sizes, top_ks = set(), set()
        for layer in self.sparse_layers(model):
            ex = layer.module.experts
            if isinstance(ex, _MergedExperts):
                plain = (
                    isinstance(ex, MergedFusedExperts)
                    # Stock experts have no bias: a REPAIRed layer is not a plain one.
                    and ex.gate_up_bias is None
                    and ex.router_mode == "prune"
                    and ex.expert_map.tolist() == list(range(ex.num_experts))
                )
                if not plain:
                    return None
            sizes.add(self.num_experts(layer))
            top_ks.add(int(layer.module.gate.top_k))
        if len(sizes) != 1 or len(top_ks) != 1:
            return None
        return {self.num_experts_key: sizes.pop(), "num_experts_per_tok": top_ks.pop()}

    def compress_layer(self, layer: SparseLayer, rank: int) -> None:
        ex = layer.module.experts
        if not isinstance(ex, _MergedExperts):
            raise ModelStructureError(
                f"{layer.name} is not a merged layer; only merged experts are compressed"
            )
        if isinstance(ex, MergedFusedExperts):
            experts = []
            for g in range(ex.num_experts):
                w = self.expert_weights(layer, g)
                parts = {k: LowRankSparseLinear.from_weight(w[k], rank, w.get(f"{k}_bias")) for k in MATRICES}
                experts.append(SwiGLUExpert(parts["gate"], parts["up"], parts["down"], ex.act_fn))
            new = MergedModularExperts(
                experts, ex.act_fn, ex.expert_map.clone(), ex.dominant.clone(), ex.router_mode
            )
            new.train(ex.training)
            layer.module.experts = new.to(ex.gate_up_proj.device)
            return
        for e in ex.experts:
            for k in MATRICES:
                lin = getattr(e, k)
                if not isinstance(lin, LowRankSparseLinear):
                    setattr(e, k, LowRankSparseLinear.from_weight(lin.weight, rank, lin.bias))

    def forward_with_router_losses(self, model: nn.Module, **inputs):
        layers = self.sparse_layers(model)
        logits: list[tuple[torch.Tensor, int]] = []
        hooks = [
            self.router(ly).register_forward_hook(lambda m, _i, out: logits.append((out[0], int(m.top_k))))
            for ly in layers
        ]
        try:
            out = model(**inputs, output_router_logits=False)
        finally:
            for h in hooks:
                h.remove()
        # Per layer, then averaged, so merged layers with fewer router outputs fit in.
        out.decoder_z_loss = torch.stack([_z_loss(x) for x, _ in logits]).mean()
        out.decoder_aux_loss = torch.stack([_balance_loss(x, k) for x, k in logits]).mean()
        return out

    def structure(self, model: nn.Module) -> dict:
        out = {}
        for layer in self.sparse_layers(model):
            ex, gate = layer.module.experts, layer.module.gate
            if not isinstance(ex, _MergedExperts):
                continue
            router = {"mode": ex.router_mode, "rows": int(gate.weight.shape[0]), "top_k": int(gate.top_k)}
            if isinstance(gate, LogSumExpTopKRouter):
                router["row_group"] = gate.row_group.tolist()
                router["normalise"] = gate.normalise
            if isinstance(ex, MergedFusedExperts):
                experts = {"type": "fused", "count": ex.num_experts, "intermediate": ex.intermediate_dim}
                if ex.gate_up_bias is not None:  # recorded only when present (REPAIR)
                    experts["bias"] = True
            else:
                experts = {
                    "type": "modules",
                    "modules": [
                        {
                            k: getattr(e, k).structure()
                            if hasattr(getattr(e, k), "structure")
                            else {
                                "type": "linear",
                                "in": getattr(e, k).in_features,
                                "out": getattr(e, k).out_features,
                                **({"bias": True} if getattr(e, k).bias is not None else {}),
                            }
                            for k in MATRICES
                        }
                        for e in ex.experts
                    ],
                }
            out[layer.name] = {
                "router": router,
                "expert_map": ex.expert_map.tolist(),
                "dominant": ex.dominant.tolist(),
                "experts": experts,
            }
        return out

    def apply_structure(self, model: nn.Module, structure: dict) -> None:
        layers = {layer.name: layer for layer in self.sparse_layers(model)}
        unknown = sorted(set(structure) - set(layers))
        if unknown:
            raise ModelStructureError(f"model structure names layers the model lacks: {unknown}")
        for name, spec in structure.items():
            block = layers[name].module
            act = block.experts.act_fn
            hidden = block.gate.weight.shape[1]
            r = spec["router"]
            if "row_group" in r:
                block.gate = LogSumExpTopKRouter(
                    torch.zeros(r["rows"], hidden), torch.tensor(r["row_group"]), r["top_k"], r["normalise"]
                )
            else:
                block.gate.weight = nn.Parameter(torch.zeros(r["rows"], hidden))
                block.gate.num_experts = r["rows"]
                block.gate.top_k = r["top_k"]
            emap, dom = torch.tensor(spec["expert_map"]), torch.tensor(spec["dominant"])
            e = spec["experts"]
            if e["type"] == "fused":
                block.experts = MergedFusedExperts(
                    e["count"],
                    hidden,
                    e["intermediate"],
                    act,
                    emap,
                    dom,
                    r["mode"],
                    bias=e.get("bias", False),
                )
            elif e["type"] == "modules":
                experts = []
                for parts in e["modules"]:
                    mods = {
                        k: nn.Linear(p["in"], p["out"], bias=p.get("bias", False))
                        if p["type"] == "linear"
                        else linear_from_structure(p)
                        for k, p in parts.items()
                    }
                    experts.append(SwiGLUExpert(mods["gate"], mods["up"], mods["down"], act))
                block.experts = MergedModularExperts(experts, act, emap, dom, r["mode"])
            else:
                raise ModelStructureError(
                    f"{name}: unknown experts type {e['type']!r}; valid: fused, modules"
                )
            set_submodule(model, name, block)


class MixtralAdapter(TopKMoEAdapter):
    model_type = "mixtral"
    module = "transformers.models.mixtral.modeling_mixtral"
    causal_lm_class = "MixtralForCausalLM"
    config_class_name = "MixtralConfig"
    block_class = "MixtralSparseMoeBlock"
    num_experts_key = "num_local_experts"
    normalises_top_k_always = True


class Qwen2MoeAdapter(TopKMoEAdapter):
    """Qwen2-MoE: the shared expert and its gate stay as they are; only routed experts merge."""

    model_type = "qwen2_moe"
    module = "transformers.models.qwen2_moe.modeling_qwen2_moe"
    causal_lm_class = "Qwen2MoeForCausalLM"
    config_class_name = "Qwen2MoeConfig"
    block_class = "Qwen2MoeSparseMoeBlock"


class Qwen3MoeAdapter(TopKMoEAdapter):
    model_type = "qwen3_moe"
    module = "transformers.models.qwen3_moe.modeling_qwen3_moe"
    causal_lm_class = "Qwen3MoeForCausalLM"
    config_class_name = "Qwen3MoeConfig"
    block_class = "Qwen3MoeSparseMoeBlock"


class OlmoeAdapter(TopKMoEAdapter):
    model_type = "olmoe"
    module = "transformers.models.olmoe.modeling_olmoe"
    causal_lm_class = "OlmoeForCausalLM"
    config_class_name = "OlmoeConfig"
    block_class = "OlmoeSparseMoeBlock"


def register() -> None:
    """Add the decoder families to the adapter registry (idempotent)."""
    for cls in (MixtralAdapter, Qwen2MoeAdapter, Qwen3MoeAdapter, OlmoeAdapter):
        if cls.model_type not in ADAPTERS:
            ADAPTERS.register(cls.model_type)(cls())
