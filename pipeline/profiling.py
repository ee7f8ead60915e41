"""Routing profile: per SMoE layer, each expert's usage frequency and the router logits of real tokens."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.data import DataError, batches, read_json
from pipeline.families import ModelStructureError, MoEAdapter, SparseLayer, adapter_for


@dataclass
class LayerProfile:
    name: str
    counts: torch.Tensor  # [N] tokens dispatched to each expert (after capacity drop)
    tokens: int  # non-padding tokens seen by the layer
    router_logits: torch.Tensor  # [T, N] router logits of those tokens
    # Sums over the tokens dispatched to each expert of its input x, |x| and x^2: [N, H].
    feature_sum: torch.Tensor | None = None
    feature_abs_sum: torch.Tensor | None = None
    feature_sq_sum: torch.Tensor | None = None
    # Layer inputs of the first profiled tokens [T', H], shared by all experts (activation matching).
    inputs: torch.Tensor | None = None
    # Per expert and matrix: summed gradient and summed squared gradient (diagonal Fisher) of the loss.
    gradients: dict[str, torch.Tensor] | None = None
    fisher: dict[str, torch.Tensor] | None = None
    # Tokens that reached at least one expert (the rest were dropped by capacity limits).
    routed: int | None = None
    # With ``expert_outputs`` (see :func:`profile_routing`): each expert's output summed over every
    # profiled token, routed to it or not [N, H] (HC-SMoE), and REAP's saliency numerator [N].
    output_sum: torch.Tensor | None = None
    reap_sum: torch.Tensor | None = None

    @property
    def frequency(self) -> torch.Tensor:
        """Share of the layer's tokens each expert processed."""
        return self.counts / max(1, self.tokens)

    def _per_expert(self, total: torch.Tensor | None) -> torch.Tensor | None:
        return None if total is None else total / self.counts.clamp_min(1)[:, None]

    @property
    def feature_mean(self) -> torch.Tensor | None:
        """Mean input hidden state of the tokens each expert processed (zeros if none)."""
        return self._per_expert(self.feature_sum)

    @property
    def feature_abs_mean(self) -> torch.Tensor | None:
        return self._per_expert(self.feature_abs_sum)

    @property
    def feature_norm(self) -> torch.Tensor | None:
        """Per input dimension, the L2 norm over the expert's tokens of its input features: [N, H]."""
        return None if self.feature_sq_sum is None else self.feature_sq_sum.sqrt()

    @property
    def output_mean(self) -> torch.Tensor | None:
        """Each expert's mean output over all of the layer's profiled tokens: [N, H] (HC-SMoE)."""
        return None if self.output_sum is None else self.output_sum / max(1, self.tokens)

    @property
    def reap_score(self) -> torch.Tensor | None:
        """REAP saliency [N]: mean over an expert's own tokens of gate x output norm (0 if it got none)."""
        return None if self.reap_sum is None else self.reap_sum / self.counts.clamp_min(1)


def _tokens_mask(batch: dict) -> dict[str, torch.Tensor]:
    return {
        "encoder": batch["attention_mask"].bool(),
        "decoder": batch["labels"] != -100,
        # Routers that decide once per sequence see one row per sequence, never padding.
        "sequence": torch.ones(
            batch["input_ids"].shape[0], dtype=torch.bool, device=batch["input_ids"].device
        ),
    }


def _forward(model: nn.Module, batch: dict):
    return model(**adapter_for(model).task_inputs(model, batch))


# Token rows per expert call: bounds the [rows, intermediate] activations of one expert pass.
EXPERT_CHUNK = 4096


def expert_output_sums(
    adapter: MoEAdapter,
    layer: SparseLayer,
    x: torch.Tensor,
    dispatch: torch.Tensor,
    logits: torch.Tensor,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per expert, over token rows ``x`` [T, H]: its summed output [N, H] and REAP's numerator [N].

    ``dispatch`` [T, N] marks each token's selected experts, ``logits`` [T, N] are the router's.
    Experts run one at a time on ``chunk`` rows at a time, so nothing of size experts x tokens x
    hidden exists; only the two running sums are kept (``chunk`` defaults to ``EXPERT_CHUNK``).

    REAP (Lasby et al. 2025; CerebrasResearch/reap): ``src/reap/observer.py:351,378-382`` runs every
    expert on every token into one [E, T, H] tensor; ``src/reap/pruning_metrics.py:172-183`` takes
    the softmax of the router logits over *all* experts and divides by the selected top-k's sum only
    when the model's config sets ``norm_topk_prob`` (``src/reap/main.py:121-124``; so not for
    Mixtral, whose config has no such flag); ``:187-198`` then averages, over the tokens that
    selected expert e, ``g_e(x) * ||E_e(x)||_2``, and ``:209`` combines batches weighted by the
    expert's token count, i.e. ``sum g ||E|| / count``. ``src/reap/prune.py:101-103`` prunes the
    lowest scores. Here ``g`` is always renormalised over the token's selected experts (the weights
    Mixtral and norm_topk_prob models apply; 1 for top-1 Switch, where REAP's would be the top
    probability), a token counts for the experts it was dispatched to (after Switch's capacity
    drop, where REAP takes the plain top-k), and the sum is divided by the count in
    :attr:`LayerProfile.reap_score`.
    """
    t, n = dispatch.shape
    chunk = chunk or EXPERT_CHUNK
    if n != adapter.num_experts(layer):
        raise ModelStructureError(
            f"{layer.name}: its router has {n} outputs for {adapter.num_experts(layer)} experts; "
            "per-expert output statistics need a layer whose router picks experts directly"
        )
    chosen = (dispatch > 0).float()
    p = logits.float().softmax(-1) * chosen
    # A token every expert dropped (capacity) has no selection and so no weight anywhere.
    gate = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    out_sum = torch.zeros(n, x.shape[-1], device=x.device)
    reap_sum = torch.zeros(n, device=x.device)
    for e in range(n):
        for start in range(0, t, chunk):
            y = adapter.expert_output(layer, e, x[start : start + chunk]).float()
            out_sum[e] += y.sum(0)
            reap_sum[e] += (gate[start : start + chunk, e] * y.norm(dim=-1)).sum()
    return out_sum, reap_sum


@torch.no_grad()
def profile_routing(
    model: nn.Module,
    rows: list[dict],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    max_inputs: int = 1024,
    expert_outputs: bool = False,
) -> dict[str, LayerProfile]:
    """Route ``rows`` through ``model`` and record, per SMoE layer, what merging methods need.

    Dispatch counts (with top-k routing, every selection counts), router logits, per-expert input feature statistics and the first
    ``max_inputs`` layer inputs, in one pass. Padding tokens (source padding, target positions
    past the label) are excluded everywhere. With ``expert_outputs``, every expert also runs on
    every token of its layer, for ``output_sum`` (HC-SMoE) and ``reap_sum`` (REAP); see
    :func:`expert_output_sums`.
    """
    if not rows:
        raise ValueError("no samples to profile")
    adapter = adapter_for(model)
    layers = adapter.sparse_layers(model)
    model.to(device).eval()
    masks: dict[str, torch.Tensor] = {}
    acc = {
        layer.name: {
            "counts": 0,
            "tokens": 0,
            "routed": 0,
            "logits": [],
            "x": 0,
            "ax": 0,
            "x2": 0,
            "inputs": [],
            "out": None,
            "reap": None,
        }
        for layer in layers
    }
    handles = []
    for layer in layers:
        n_out = adapter.num_experts(layer)

        stack = "sequence" if layer.per_sequence else layer.stack

        def hook(_mod, inputs, output, name=layer.name, stack=stack, n=n_out, ly=layer):
            dispatch, logits = adapter.routing_from_output(output, n, ly)
            keep = masks[stack].reshape(-1)
            d = dispatch.reshape(-1, dispatch.shape[-1])[keep].float()
            x = inputs[0].reshape(-1, inputs[0].shape[-1])[keep].float()
            a = acc[name]
            a["counts"] += d.sum(0).cpu()
            a["tokens"] += int(keep.sum())
            a["routed"] += int((d.sum(-1) > 0).sum())
            kept_logits = logits.reshape(-1, logits.shape[-1])[keep]
            a["logits"].append(kept_logits.float().cpu())
            a["x"] += (d.T @ x).cpu()
            a["ax"] += (d.T @ x.abs()).cpu()
            a["x2"] += (d.T @ x.square()).cpu()
            have = sum(len(t) for t in a["inputs"])
            if have < max_inputs:
                a["inputs"].append(x[: max_inputs - have].cpu())
            if expert_outputs:
                # The layer's own input rows (not the float copy): experts run in their dtype.
                raw = inputs[0].reshape(-1, inputs[0].shape[-1])[keep]
                out_sum, reap_sum = expert_output_sums(adapter, ly, raw, d, kept_logits)
                # Accumulated in float64 on the CPU: many batches of float32 sums.
                for key, val in (("out", out_sum), ("reap", reap_sum)):
                    val = val.cpu().double()  # to the CPU first: some devices have no float64
                    a[key] = val if a[key] is None else a[key] + val

        handles.append(adapter.router(layer).register_forward_hook(hook))
    try:
        for batch in batches(rows, batch_size, pad_id):
            batch = {k: v.to(device) for k, v in batch.items()}
            masks.update(_tokens_mask(batch))
            _forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {
        name: LayerProfile(
            name,
            a["counts"],
            a["tokens"],
            torch.cat(a["logits"]),
            a["x"],
            a["ax"],
            a["x2"],
            torch.cat(a["inputs"]),
            routed=a["routed"],
            output_sum=None if a["out"] is None else a["out"].float(),
            reap_sum=None if a["reap"] is None else a["reap"].float(),
        )
        for name, a in acc.items()
    }


def profile_gradients(
    model: nn.Module,
    rows: list[dict],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    profiles: dict[str, LayerProfile],
) -> None:
    """Add each expert's summed gradient and diagonal Fisher (summed squared batch gradients) of the
    target loss on ``rows`` to ``profiles`` (in place)."""
    from pipeline.training import task_loss

    adapter = adapter_for(model)
    layers = adapter.sparse_layers(model)
    model.to(device).eval()
    grads = {ly.name: {} for ly in layers}
    fisher = {ly.name: {} for ly in layers}
    for batch in batches(rows, batch_size, pad_id):
        batch = {k: v.to(device) for k, v in batch.items()}
        model.zero_grad(set_to_none=True)
        task_loss(_forward(model, batch).logits, batch["labels"], adapter.shift_labels).backward()
        for ly in layers:
            for e in range(adapter.num_experts(ly)):
                for pname, grad in adapter.expert_gradients(ly, e).items():
                    key = f"{e}::{pname}"
                    g = grad.detach().float().cpu()
                    grads[ly.name][key] = grads[ly.name].get(key, 0) + g
                    fisher[ly.name][key] = fisher[ly.name].get(key, 0) + g.square()
    model.zero_grad(set_to_none=True)
    for ly in layers:
        profiles[ly.name].gradients = grads[ly.name]
        profiles[ly.name].fisher = fisher[ly.name]


_OPTIONAL = ("feature_sum", "feature_abs_sum", "feature_sq_sum", "inputs", "output_sum", "reap_sum")


def save_profile(profiles: dict[str, LayerProfile], folder: Path) -> None:
    """Tensors to safetensors (no pickle), a readable summary to JSON."""
    tensors = {}
    for name, p in profiles.items():
        tensors[f"{name}::counts"] = p.counts.contiguous()
        tensors[f"{name}::router_logits"] = p.router_logits.contiguous()
        for field in _OPTIONAL:
            if getattr(p, field) is not None:
                tensors[f"{name}::{field}"] = getattr(p, field).contiguous()
        for kind in ("gradients", "fisher"):
            for key, t in (getattr(p, kind) or {}).items():
                tensors[f"{name}::{kind}::{key}"] = t.contiguous()
    save_file(tensors, str(folder / "profile.safetensors"))
    summary = {
        name: {
            "tokens": p.tokens,
            "routed": p.routed,
            "frequency": [round(x, 6) for x in p.frequency.tolist()],
            "has_gradients": p.gradients is not None,
            "has_expert_outputs": p.output_sum is not None,
        }
        for name, p in profiles.items()
    }
    (folder / "profile.json").write_text(json.dumps(summary, indent=1))


def load_profile(folder: Path, model: nn.Module | None = None) -> dict[str, LayerProfile]:
    """Read a saved profile; with ``model``, check that it profiles every SMoE layer of that model."""
    summary_path = folder / "profile.json"
    if not summary_path.is_file():
        raise FileNotFoundError(
            f"{folder} holds no routing profile (profile.json); run the profile stage first"
        )
    summary = read_json(summary_path, "routing profile summary")
    try:
        tensors = load_file(str(folder / "profile.safetensors"))
    except Exception as err:  # safetensors raises its own error type for corrupt files
        raise DataError(
            f"{folder}: cannot read profile.safetensors ({err}); run the profile stage again"
        ) from None
    missing = [n for n in summary if f"{n}::counts" not in tensors or f"{n}::router_logits" not in tensors]
    if missing:
        raise DataError(f"{folder}: profile.safetensors lacks layers {missing}; run the profile stage again")
    out = {}
    for name, s in summary.items():
        p = LayerProfile(name, tensors[f"{name}::counts"], s["tokens"], tensors[f"{name}::router_logits"])
        p.routed = s.get("routed")
        for field in _OPTIONAL:
            setattr(p, field, tensors.get(f"{name}::{field}"))
        for kind in ("gradients", "fisher"):
            prefix = f"{name}::{kind}::"
            found = {k.removeprefix(prefix): t for k, t in tensors.items() if k.startswith(prefix)}
            setattr(p, kind, found or None)
        out[name] = p
    if model is not None:
        layers = [ly.name for ly in adapter_for(model).sparse_layers(model)]
        lacking = [n for n in layers if n not in out]
        if lacking:
            raise DataError(
                f"{folder}: the routing profile does not match the model: it lacks SMoE layers "
                f"{lacking[:4]}{' ...' if len(lacking) > 4 else ''}; profile this model again"
            )
    return out
