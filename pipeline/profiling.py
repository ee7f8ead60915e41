"""Routing profile: per SMoE layer, each expert's usage frequency and the router logits of real tokens."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.adapters import adapter_for
from pipeline.data import batches


@dataclass
class LayerProfile:
    name: str
    counts: torch.Tensor  # [N] tokens dispatched to each expert (after capacity drop)
    tokens: int  # non-padding tokens seen by the layer
    router_logits: torch.Tensor  # [T, N] router logits of those tokens

    @property
    def frequency(self) -> torch.Tensor:
        """Share of the layer's tokens each expert processed."""
        return self.counts / max(1, self.tokens)


@torch.no_grad()
def profile_routing(
    model: nn.Module, rows: list[dict], pad_id: int, batch_size: int, device: torch.device
) -> dict[str, LayerProfile]:
    """Route ``rows`` through ``model`` and record each SMoE layer's dispatch and router logits.

    Padding tokens (source padding, target positions past the label) are excluded.
    """
    adapter = adapter_for(model)
    layers = adapter.sparse_layers(model)
    model.to(device).eval()
    masks: dict[str, torch.Tensor] = {}
    acc = {layer.name: {"counts": 0, "tokens": 0, "logits": []} for layer in layers}
    handles = []
    for layer in layers:

        def hook(_mod, _inp, output, name=layer.name, stack=layer.stack):
            dispatch, _probs, logits = output
            keep = masks[stack].reshape(-1).bool()
            d = dispatch.reshape(-1, dispatch.shape[-1])[keep]
            acc[name]["counts"] += d.float().sum(0).cpu()
            acc[name]["tokens"] += int(keep.sum())
            acc[name]["logits"].append(logits.reshape(-1, logits.shape[-1])[keep].float().cpu())

        handles.append(adapter.router(layer).register_forward_hook(hook))
    try:
        for batch in batches(rows, batch_size, pad_id):
            batch = {k: v.to(device) for k, v in batch.items()}
            masks["encoder"] = batch["attention_mask"]
            masks["decoder"] = batch["labels"] != -100
            model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=batch["labels"]),
            )
    finally:
        for h in handles:
            h.remove()
    if not rows:
        raise ValueError("no samples to profile")
    return {
        name: LayerProfile(name, a["counts"], a["tokens"], torch.cat(a["logits"])) for name, a in acc.items()
    }


def save_profile(profiles: dict[str, LayerProfile], folder: Path) -> None:
    """Tensors to safetensors (no pickle), a readable summary to JSON."""
    tensors = {}
    for name, p in profiles.items():
        tensors[f"{name}::counts"] = p.counts.contiguous()
        tensors[f"{name}::router_logits"] = p.router_logits.contiguous()
    save_file(tensors, str(folder / "profile.safetensors"))
    summary = {
        name: {"tokens": p.tokens, "frequency": [round(x, 6) for x in p.frequency.tolist()]}
        for name, p in profiles.items()
    }
    (folder / "profile.json").write_text(json.dumps(summary, indent=1))


def load_profile(folder: Path) -> dict[str, LayerProfile]:
    summary_path = folder / "profile.json"
    if not summary_path.is_file():
        raise FileNotFoundError(
            f"{folder} holds no routing profile (profile.json); run the profile stage first"
        )
    summary = json.loads(summary_path.read_text())
    tensors = load_file(str(folder / "profile.safetensors"))
    return {
        name: LayerProfile(name, tensors[f"{name}::counts"], s["tokens"], tensors[f"{name}::router_logits"])
        for name, s in summary.items()
    }
