"""Side-by-side evaluation of model variants: task metric, size and speed measured in one run."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.adapters import adapter_for
from pipeline.data import batches
from pipeline.modeling import bytes_on_disk, count_unique_params
from pipeline.training import autocast, evaluate_accuracy, score_classes


def expert_stats(model: nn.Module) -> dict[str, int]:
    """Experts physically present and the parameters they hold (routers excluded)."""
    adapter = adapter_for(model)
    n_experts, n_params = 0, 0
    for layer in adapter.sparse_layers(model):
        experts = adapter.expert_modules(layer)
        n_experts += len(experts)
        n_params += sum(count_unique_params(e) for e in experts)
    return {"experts_total": n_experts, "expert_params": n_params}


@torch.no_grad()
def speed_and_flops(
    model: nn.Module,
    rows: list[dict],
    class_targets: list[list[int]],
    pad_id: int,
    batch_size: int,
    n_batches: int,
    device: torch.device,
    dtype: str = "float32",
) -> dict[str, float]:
    """Throughput (source tokens/s) and FLOPs per sample of the scoring forward on fixed dev batches."""
    model.to(device).eval()
    data = [{k: v.to(device) for k, v in b.items()} for b in batches(rows, batch_size, pad_id)][
        : n_batches + 1
    ]
    with autocast(device, dtype):
        score_classes(model, data[0], class_targets)  # warm-up: allocations, kernel selection
        timed = data[1:] or data
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in timed:
            score_classes(model, b, class_targets)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        tokens = sum(int(b["attention_mask"].sum()) for b in timed)
        counter = FlopCounterMode(display=False)
        with counter:
            score_classes(model, data[0], class_targets)
    return {
        "tokens_per_s": tokens / elapsed,
        "latency_ms_per_batch": 1000 * elapsed / len(timed),
        "gflops_per_sample": counter.get_total_flops() / 1e9 / data[0]["input_ids"].shape[0],
    }


def evaluate_variant(
    model: nn.Module,
    folder: Path,
    rows: list[dict],
    class_targets: list[list[int]],
    pad_id: int,
    metric: str,
    batch_size: int,
    speed_batches: int,
    device: torch.device,
    dtype: str = "float32",
) -> dict[str, float]:
    """Every figure of ``metrics/evaluate.json`` for one saved model."""
    acc = evaluate_accuracy(model, rows, class_targets, pad_id, batch_size, device, dtype)
    out = {
        metric: acc,
        "params_total": count_unique_params(model),
        **expert_stats(model),
        "bytes_on_disk": bytes_on_disk(folder),
    }
    out.update(speed_and_flops(model, rows, class_targets, pad_id, batch_size, speed_batches, device, dtype))
    return out
