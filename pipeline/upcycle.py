"""Upcycling a dense pretrained encoder into an MoE/MEO sequence classifier, and scoring classifiers.

Every expert starts as a copy of the dense FFN (weights and biases), so a freshly upcycled model
computes exactly what the dense one does, whatever the layer kind: the top-k gate weights sum to one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from pipeline.families import ADAPTERS
from pipeline.families.bert import ffn_layers
from pipeline.meo import MoEFeedForward, check_layer, install_mask_hook
from pipeline.modeling import STRUCTURE_FILE, CheckpointError, check_finite_weights, load_model
from pipeline.sources import dense_source

DENSE = "dense"
BIAS_MODES = ("copy", "drop")


def load_dense_classifier(name: str, num_labels: int, seed: int) -> nn.Module:
    """A BERT-family checkpoint with a fresh (seeded) classification head of ``num_labels``."""
    from transformers import AutoConfig

    source = dense_source(name)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read the config of {name} ({source}): {err}") from None
    if config.model_type != "bert":
        raise CheckpointError(
            f"{name} is a {config.model_type!r} model; upcycling supports BERT-architecture encoders "
            "(model_type 'bert', e.g. bert-base-uncased, all-MiniLM-L6-v2)"
        )
    torch.manual_seed(seed)
    try:
        model = (
            ADAPTERS.get("bert")
            .model_class()
            .from_pretrained(source, num_labels=num_labels, use_safetensors=True)
        )
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load weights from {name} ({source}): {err}") from None
    check_finite_weights(model, f"{name} ({source})")
    return model


def upcycle(
    model: nn.Module,
    layer: str,
    num_experts: int,
    top_k: int,
    granularity: str = "linear",
    bias: str = "copy",
    noisy: bool = True,
    token_block_ratio: int = 64,
    merge_chunk: int = 0,
) -> nn.Module:
    """Replace every FFN of ``model`` (in place) by ``num_experts`` copies routed as ``layer``.

    ``bias="drop"`` reproduces the authors' code, whose experts have no bias (the pretrained FFN
    biases are lost); ``layer="dense"`` leaves the model as it is (the baseline).
    """
    if bias not in BIAS_MODES:
        raise ValueError(f"unknown bias mode {bias!r}; valid choices: {', '.join(BIAS_MODES)}")
    if layer == DENSE:
        return model
    check_layer(layer, num_experts, top_k, granularity)
    for _name, block in ffn_layers(model):
        inter, out = block.intermediate.dense, block.output.dense
        w1 = inter.weight.detach()[None].repeat(num_experts, 1, 1)
        w2 = out.weight.detach()[None].repeat(num_experts, 1, 1)
        keep = bias == "copy" and inter.bias is not None and out.bias is not None
        b1 = inter.bias.detach()[None].repeat(num_experts, 1) if keep else None
        b2 = out.bias.detach()[None].repeat(num_experts, 1) if keep else None
        block.intermediate = MoEFeedForward(
            layer,
            granularity,
            w1,
            w2,
            b1,
            b2,
            block.intermediate.intermediate_act_fn,
            top_k,
            noisy,
            token_block_ratio,
            merge_chunk,
        ).to(inter.weight.device, inter.weight.dtype)
        block.output.dense = nn.Identity()
    install_mask_hook(model.base_model)
    return model


def load_classifier(folder: str | Path) -> nn.Module:
    """A classifier saved by the finetune stage: an upcycled MoE/MEO model or the dense baseline."""
    folder = Path(folder)
    if (folder / STRUCTURE_FILE).is_file():
        return load_model(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a model folder: no config.json")
    try:
        config = json.loads((folder / "config.json").read_text())
    except ValueError as err:
        raise CheckpointError(f"{folder}/config.json is not valid JSON ({err})") from None
    if config.get("model_type") != "bert":
        raise CheckpointError(f"{folder} holds a {config.get('model_type')!r} model, not a BERT classifier")
    try:
        model = ADAPTERS.get("bert").model_class().from_pretrained(str(folder), use_safetensors=True)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load weights from {folder}: {err}") from None
    check_finite_weights(model, folder)
    return model.eval()


def expert_parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters of the experts (stored) and of the experts one sequence or token runs (active)."""
    stored = active = 0
    for _name, block in ffn_layers(model):
        m = block.intermediate
        if isinstance(m, MoEFeedForward):
            per_expert = sum(p[0].numel() for p in (m.w1, m.w2, m.b1, m.b2) if p is not None)
            stored += per_expert * m.num_experts
            active += per_expert * (1 if m.spec.merge else m.top_k)
        else:
            n = sum(
                p.numel() for p in (*block.intermediate.dense.parameters(), *block.output.dense.parameters())
            )
            stored += n
            active += n
    return {"expert_params": stored, "active_expert_params": active}
