"""The memory each step of the workflow needs for an MoE checkpoint, from its config alone.

The model is built on the meta device (no weight is read or allocated) and its family adapter
finds the routed experts, shared experts and routers, so the parameter counts are those of the
model transformers would build, not of a formula. From them, for bf16 weights and a number of
GPUs of one size:

- **serve**: the weights per GPU under tensor parallelism (vLLM's ``-tp N``), stock and after a
  uniform pruned merge to ``keep`` experts per layer. KV cache and activations come on top: a model
  "fits" when its weights take at most ``serve_fraction`` of a GPU (vLLM's default
  ``gpu_memory_utilization`` 0.9 is the share of a GPU it takes for weights plus cache);
- **profile**: ``runtime.device_map: auto`` over the GPUs, what stays on each GPU (up to
  ``serve_fraction`` of it) and what goes to RAM or disk;
- **streamed merge** (``runtime.streaming``, CPU only): the RAM of
  :func:`pipeline.streaming.stream_merge`, measured at about 3.5 layers of experts above a fixed
  0.26 GiB (``benchmarks/streamed_merge.py``); disk for the input and the output;
- **train**: full fine-tuning on float32 master weights with AdamW (weights, gradients and two
  moments: 16 bytes per parameter), per GPU under DDP (replicated) and under FSDP (sharded over
  the GPUs), activations not counted; KD (``kd_finetune``, DDP only) adds the bf16 teacher.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from pipeline.families import adapter_for
from pipeline.modeling import count_unique_params, default_dtype

GB = 10**9
#: Bytes per parameter while training: float32 weights, float32 gradients, AdamW's two moments.
TRAIN_BYTES = 16
#: The streamed merge's measured peak above its imports, in layers of experts, and what the
#: process holds after its imports (bytes): ``metrics/streamed_merge.json``.
STREAM_LAYERS_HELD = 3.5
STREAM_BASE_BYTES = int(0.26 * 2**30)

#: Hyper-parameters from the config.json of checkpoints users merge (the fields that size the
#: model); ``family`` is the transformers model type.
KNOWN_MODELS: dict[str, dict] = {
    "mistralai/Mixtral-8x7B-v0.1": {
        "family": "mixtral",
        "config": {
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "vocab_size": 32000,
            "tie_word_embeddings": False,
        },
    },
    "Qwen/Qwen3-30B-A3B": {
        "family": "qwen3_moe",
        "config": {
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "moe_intermediate_size": 768,
            "num_hidden_layers": 48,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "vocab_size": 151936,
            "tie_word_embeddings": False,
        },
    },
    "deepseek-ai/DeepSeek-V2-Lite": {
        "family": "deepseek_v2",
        "config": {
            "hidden_size": 2048,
            "intermediate_size": 10944,
            "moe_intermediate_size": 1408,
            "num_hidden_layers": 27,
            "first_k_dense_replace": 1,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "n_routed_experts": 64,
            "n_shared_experts": 2,
            "num_experts_per_tok": 6,
            "n_group": 1,
            "topk_group": 1,
            "kv_lora_rank": 512,
            "q_lora_rank": None,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64,
            "v_head_dim": 128,
            "vocab_size": 102400,
            "tie_word_embeddings": False,
        },
    },
}


@dataclass
class ModelCounts:
    """Parameter counts of an MoE model (meta device)."""

    total: int
    routed_experts: int
    shared_experts: int
    sparse_layers: int
    experts_per_layer: int
    params_per_expert: int
    router_row: int
    largest_layer_experts: int

    @property
    def non_expert(self) -> int:
        return self.total - self.routed_experts


def known_config(name: str):
    """The transformers config of one of :data:`KNOWN_MODELS`."""
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(KNOWN_MODELS)}")
    from transformers import AutoConfig

    entry = KNOWN_MODELS[name]
    return AutoConfig.for_model(entry["family"], **entry["config"])


def count_params(config) -> ModelCounts:
    """Count the parameters of the model ``config`` describes, built on the meta device."""
    adapter = adapter_for(config)
    with default_dtype(torch.bfloat16), torch.device("meta"):
        model = adapter.model_class()(config)
    layers = adapter.sparse_layers(model)
    if not layers:
        raise ValueError(f"model type {config.model_type!r}: the model has no SMoE layer")
    routed = shared = largest = 0
    counts = set()
    for layer in layers:
        n = adapter.num_experts(layer)
        per = sum(t.numel() for t in adapter.expert_weights(layer, 0).values())
        counts.add((n, per))
        routed += n * per
        largest = max(largest, n * per)
        shared += sum(adapter.shared_experts(layer).values())
    if len(counts) != 1:
        raise ValueError(f"model type {config.model_type!r}: SMoE layers differ in expert count or size")
    (n, per) = counts.pop()
    return ModelCounts(
        total=count_unique_params(model),
        routed_experts=routed,
        shared_experts=shared,
        sparse_layers=len(layers),
        experts_per_layer=n,
        params_per_expert=per,
        router_row=int(adapter.router_weight(layers[0]).shape[-1]),
        largest_layer_experts=largest,
    )


def merged_params(counts: ModelCounts, keep: int) -> int:
    """Parameters after a uniform merge to ``keep`` experts per SMoE layer (router rows pruned)."""
    if not 1 <= keep <= counts.experts_per_layer:
        raise ValueError(f"keep={keep} experts per layer: valid choices are 1..{counts.experts_per_layer}")
    dropped = counts.experts_per_layer - keep
    return counts.total - counts.sparse_layers * dropped * (counts.params_per_expert + counts.router_row)


def plan(
    counts: ModelCounts,
    keep: int,
    gpus: int,
    gpu_gb: float = 80.0,
    serve_fraction: float = 0.9,
    bytes_per_param: int = 2,
) -> dict:
    """Memory in GB (10^9 bytes) per step on ``gpus`` GPUs of ``gpu_gb`` each (see the module)."""
    if gpus < 1:
        raise ValueError(f"gpus={gpus} must be at least 1")
    merged = merged_params(counts, keep)
    stock_w, merged_w = counts.total * bytes_per_param / GB, merged * bytes_per_param / GB
    usable = gpu_gb * serve_fraction
    on_gpus = min(stock_w, usable * gpus)
    stream_ram = (
        STREAM_BASE_BYTES + STREAM_LAYERS_HELD * counts.largest_layer_experts * bytes_per_param
    ) / GB

    def fits(x: float) -> bool:
        return x <= usable

    train_stock, train_merged = TRAIN_BYTES * counts.total / GB, TRAIN_BYTES * merged / GB
    return {
        "gpus": gpus,
        "gpu_gb": gpu_gb,
        "weights_gb": round(stock_w, 1),
        "merged_weights_gb": round(merged_w, 1),
        "serve_per_gpu_gb": round(stock_w / gpus, 1),
        "serve_fits": fits(stock_w / gpus),
        "serve_merged_per_gpu_gb": round(merged_w / gpus, 1),
        "serve_merged_fits": fits(merged_w / gpus),
        "min_gpus_stock": math.ceil(stock_w / usable),
        "min_gpus_merged": math.ceil(merged_w / usable),
        "profile_per_gpu_gb": round(on_gpus / gpus, 1),
        "profile_offloaded_gb": round(stock_w - on_gpus, 1),
        "stream_merge_ram_gb": round(stream_ram, 1),
        "stream_merge_disk_gb": round(stock_w + merged_w, 1),
        "finetune_ddp_per_gpu_gb": round(train_stock, 1),
        "finetune_fsdp_per_gpu_gb": round(train_stock / gpus, 1),
        "finetune_fits": fits(train_stock / gpus),
        "kd_merged_ddp_per_gpu_gb": round(train_merged + stock_w, 1),
        "kd_fits": fits(train_merged + stock_w),
    }


def model_plan(config, keep: int, gpu_counts=(1, 8), gpu_gb: float = 80.0) -> dict:
    """Counts and :func:`plan` for each number of GPUs, as one JSON-ready dict."""
    counts = count_params(config)
    return {
        "counts": {**asdict(counts), "non_expert": counts.non_expert, "merged": merged_params(counts, keep)},
        "keep": keep,
        "plans": [plan(counts, keep, g, gpu_gb) for g in gpu_counts],
    }
