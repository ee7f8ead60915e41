"""Knock-out of SMoE layers: what their experts are worth to the model at all."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.families import MoEAdapter


@torch.no_grad()
def zero_experts(model: nn.Module, adapter: MoEAdapter, layer_names: set[str]) -> int:
    """Set every expert weight of the named SMoE layers to zero, in place; returns the layer count.

    The model's accuracy without those layers' experts (their residual passes the input on)
    bounds how much any merging of them can cost, and so how far merging methods can differ.
    """
    done = 0
    for layer in adapter.sparse_layers(model):
        if layer.name in layer_names:
            for e in range(adapter.num_experts(layer)):
                w = adapter.expert_weights(layer, e)
                adapter.set_expert_weights(layer, e, {k: torch.zeros_like(v) for k, v in w.items()})
            done += 1
    return done
