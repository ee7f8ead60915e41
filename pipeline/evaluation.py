"""Side-by-side evaluation of model variants: task metric, size and speed measured in one run."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from pipeline.data import batches
from pipeline.families import adapter_for
from pipeline.modeling import bytes_on_disk, count_unique_params
from pipeline.training import autocast, class_log_probs, score_classes


def expert_stats(model: nn.Module) -> dict[str, int]:
    """Experts physically present and the parameters they hold (routers excluded)."""
    adapter = adapter_for(model)
    n_experts, n_params = 0, 0
    for layer in adapter.sparse_layers(model):
        counts = adapter.expert_param_counts(layer)
        n_experts += len(counts)
        n_params += sum(c["present"] for c in counts)
    return {"experts_total": n_experts, "expert_params": n_params}


def model_memory_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers occupy in memory, each storage counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


class _LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of tensors created inside it that are still alive, and their peak.

    CPU tensors have no allocator statistics like CUDA's, so every op output's storage is counted
    when first seen and released when the last tensor viewing it is garbage collected.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, int] = {}
        self._sizes: dict[int, int] = {}

    def _release(self, ptr: int) -> None:
        self._refs[ptr] -= 1
        if self._refs[ptr] == 0:
            self.live -= self._sizes.pop(ptr)
            del self._refs[ptr]

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0:
            return
        if ptr not in self._refs:
            self._refs[ptr] = 0
            self._sizes[ptr] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self._refs[ptr] += 1
        weakref.finalize(t, self._release, ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        return out


@torch.no_grad()
def peak_forward_memory(model: nn.Module, forward: Callable[[], object], device: torch.device) -> dict:
    """Peak memory of one ``forward()`` of ``model``: its own bytes plus the activations alive at once."""
    weights = model_memory_bytes(model)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        forward()
        torch.cuda.synchronize()
        activations = torch.cuda.max_memory_allocated(device) - base
    else:
        tracker = _LiveTensorBytes()
        with tracker:
            forward()
        activations = tracker.peak
    return {"model_memory_bytes": weights, "peak_forward_bytes": weights + activations}


@contextmanager
def _countable(model: nn.Module):
    """Run experts and attention through transformers' eager code while FLOPs are counted: the
    counter does not see the grouped-matmul expert kernels that are the default for speed, and
    rejects fused attention with grouped key/value heads on CUDA."""
    restore = []
    for kind in ("experts", "attn"):
        impl = getattr(model.config, f"_{kind}_implementation", None)
        setter = getattr(model, f"set_{kind}_implementation", None)
        if impl not in (None, "eager") and setter is not None:
            setter("eager")
            restore.append((setter, impl))
    try:
        yield
    finally:
        for setter, impl in restore:
            setter(impl)


@torch.no_grad()
def speed_and_flops(
    model: nn.Module,
    rows: list[dict],
    class_targets: list[list[int]] | None,
    pad_id: int,
    batch_size: int,
    n_batches: int,
    device: torch.device,
    dtype: str = "float32",
) -> dict[str, float]:
    """Throughput (input tokens/s) and FLOPs per sample of the scoring forward on fixed batches.

    The scoring forward ranks ``class_targets`` (classification), or is the plain forward over the
    tokens when ``class_targets`` is None (language modelling).
    """

    def scoring_forward(batch: dict) -> object:
        if class_targets is None:
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return score_classes(model, batch, class_targets)

    model.to(device).eval()
    data = [{k: v.to(device) for k, v in b.items()} for b in batches(rows, batch_size, pad_id)][
        : n_batches + 1
    ]
    with autocast(device, dtype):
        scoring_forward(data[0])  # warm-up: allocations, kernel selection
        timed = data[1:] or data
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in timed:
            scoring_forward(b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        tokens = sum(int(b["attention_mask"].sum()) for b in timed)
        counter = FlopCounterMode(display=False)
        with counter, _countable(model):
            scoring_forward(data[0])
        memory = peak_forward_memory(model, lambda: scoring_forward(data[0]), device)
    samples = sum(int(b["input_ids"].shape[0]) for b in timed)
    return {
        "tokens_per_s": tokens / elapsed,
        "samples_per_s": samples / elapsed,
        "latency_ms_per_batch": 1000 * elapsed / len(timed),
        "batch_size": int(data[0]["input_ids"].shape[0]),
        "gflops_per_sample": counter.get_total_flops() / 1e9 / data[0]["input_ids"].shape[0],
        **memory,
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
) -> tuple[dict[str, float], torch.Tensor]:
    """Every figure of ``metrics/evaluate.json`` for one saved model, and its ``[rows, classes]``
    class log-probabilities (for paired comparisons between variants)."""
    logp = class_log_probs(model, rows, class_targets, pad_id, batch_size, device, dtype)
    correct = logp.argmax(-1) == torch.tensor([int(r["label"]) for r in rows])
    out = {
        metric: int(correct.sum()) / len(rows),
        "params_total": count_unique_params(model),
        **expert_stats(model),
        "bytes_on_disk": bytes_on_disk(folder),
    }
    out.update(speed_and_flops(model, rows, class_targets, pad_id, batch_size, speed_batches, device, dtype))
    return out, logp


def kl_to_reference(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per-row KL(reference || other) of two ``[rows, classes]`` log-probability tables (nats)."""
    return (reference.exp() * (reference - other)).sum(-1).clamp_min(0.0)


def evaluate_lm_variant(
    model: nn.Module,
    folder: Path,
    task,
    batch_size: int,
    speed_batches: int,
    device: torch.device,
    dtype: str = "float32",
    zero_shot: Callable[[nn.Module], tuple[dict[str, dict], dict[str, list[bool]]]] | None = None,
    dense: bool = False,
) -> tuple[dict[str, float], dict]:
    """Every figure of ``metrics/evaluate.json`` for one saved causal LM: test perplexity, zero-shot
    accuracy per task and their unweighted mean, size, speed and memory; and the per-example results
    behind them (each test block's NLL sum, each zero-shot example's hit) for paired comparisons.
    ``dense``: a model without experts (the source of an upcycled SMoE).

    ``zero_shot`` scores the prepared zero-shot tasks of a model: per task its figures (accuracy,
    ...), and each example's hit (e.g. :func:`pipeline.lm_harness.score_zero_shot` bound to a scorer).
    """
    from pipeline.zeroshot import perplexity_from_rows, row_nlls

    if task.zero_shot and zero_shot is None:
        raise ValueError("the prepared task has zero-shot sets: give the zero_shot scorer that scores them")
    pad_id = task.tokenizer.pad_token_id
    test = task.splits["test"]
    nlls, counts = row_nlls(model.to(device), test, pad_id, batch_size, device, dtype)
    out = {f"test_{k}": v for k, v in perplexity_from_rows(nlls, counts).items()}
    details: dict = {"nll": nlls, "tokens": counts, "zero_shot": {}}
    if task.zero_shot:
        per_task, details["zero_shot"] = zero_shot(model)
        for name, res in per_task.items():
            out.update({f"{name}_{k}": v for k, v in res.items()})
        out["mean_accuracy"] = sum(r["accuracy"] for r in per_task.values()) / len(per_task)
    out.update(
        {
            "params_total": count_unique_params(model),
            **({"experts_total": 0, "expert_params": 0} if dense else expert_stats(model)),
            "bytes_on_disk": bytes_on_disk(folder),
        }
    )
    out.update(speed_and_flops(model, test, None, pad_id, batch_size, speed_batches, device, dtype))
    return out, details


def lm_predictions(details: dict[str, dict]) -> dict:
    """The per-example record of a language-modelling evaluation: every test block's NLL sum per
    model (with the blocks' token counts) and every zero-shot example's hit per task and model."""
    first = next(iter(details.values()))
    tasks = first["zero_shot"]
    return {
        "split": "test",
        "objective": "lm",
        "n": len(first["tokens"]),
        "tokens": first["tokens"],
        # nats summed over a block's tokens: 4 decimals keep the mean exact to ~1e-6 per token.
        "nll": {v: [round(x, 4) for x in d["nll"]] for v, d in details.items()},
        "zero_shot": {
            t: {v: "".join("1" if h else "0" for h in d["zero_shot"][t]) for v, d in details.items()}
            for t in tasks
        },
    }
