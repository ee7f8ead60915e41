"""Side-by-side evaluation of upcycled classifiers (dense, MoE, MEO) and the comparison table.

Variants are grouped by (layer kind, k); seeds of one group are paired with the same seeds of the
group compared to, and differences carry bootstrap intervals over seeds and test examples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from pipeline.evaluation import speed_and_flops
from pipeline.modeling import bytes_on_disk, count_unique_params
from pipeline.stats import seed_example_bootstrap_ci
from pipeline.training import class_log_probs
from pipeline.upcycle import expert_parameter_counts


def evaluate_classifier(
    model: nn.Module,
    folder: Path,
    rows: list[dict],
    pad_id: int,
    batch_size: int,
    speed_batches: int,
    device: torch.device,
    dtype: str = "float32",
) -> tuple[dict, torch.Tensor]:
    """Accuracy, size, GFLOPs/sample (the real forward, weight merges included), latency and
    throughput of one classifier, and its ``[rows, classes]`` log-probabilities."""
    logp = class_log_probs(model, rows, [], pad_id, batch_size, device, dtype)
    labels = torch.tensor([int(r["label"]) for r in rows])
    out = {
        "accuracy": int((logp.argmax(-1) == labels).sum()) / len(rows),
        "params_total": count_unique_params(model),
        **expert_parameter_counts(model),
        "bytes_on_disk": bytes_on_disk(folder),
    }
    out.update(speed_and_flops(model, rows, None, pad_id, batch_size, speed_batches, device, dtype))
    return out, logp


def variant_key(made_by: dict) -> dict:
    """``{"layer", "top_k", "granularity", "seed"}`` of a model folder's params (dense: k = 0)."""
    up = made_by.get("upcycle") or {}
    layer = up.get("layer", "dense")
    dense = layer == "dense"
    return {
        "layer": layer,
        "top_k": 0 if dense else int(up["top_k"]),
        "granularity": None if dense else up.get("granularity", "linear"),
        "seed": int(made_by["seed"]),
    }


def read_variant(folder: Path) -> dict:
    f = Path(folder) / "params.yaml"
    if not f.is_file():
        raise FileNotFoundError(f"{folder} has no params.yaml: not a model written by the finetune stage")
    return variant_key(yaml.safe_load(f.read_text()) or {})


def group_name(layer: str, top_k: int, granularity: str | None = "linear") -> str:
    """``dense``, ``<layer>-k<k>`` (linear granularity) or ``<layer>-ffn-k<k>``."""
    if layer == "dense":
        return "dense"
    return f"{layer}-k{top_k}" if granularity in (None, "linear") else f"{layer}-{granularity}-k{top_k}"


def comparison_table(
    results: dict[str, dict],
    keys: dict[str, dict],
    correct: dict[str, np.ndarray],
    n_boot: int = 2000,
) -> dict:
    """Per (layer, granularity, k): mean accuracy over seeds, and paired differences to vanilla
    ``moe`` at the same k and granularity and to the dense model, with intervals over seeds and examples (seeds paired by value;
    only seeds both groups have count)."""
    groups: dict[str, dict[int, str]] = {}
    for name, key in keys.items():
        by_seed = groups.setdefault(group_name(key["layer"], key["top_k"], key.get("granularity")), {})
        if key["seed"] in by_seed:
            raise ValueError(f"{by_seed[key['seed']]} and {name} are the same variant with the same seed")
        by_seed[key["seed"]] = name
    table = {}
    for g, by_seed in sorted(groups.items()):
        key = keys[next(iter(by_seed.values()))]
        row = {
            "layer": key["layer"],
            "top_k": key["top_k"],
            "granularity": key.get("granularity"),
            "seeds": sorted(by_seed),
            "accuracy_mean": float(np.mean([results[n]["accuracy"] for n in by_seed.values()])),
            "accuracy_per_seed": [results[by_seed[s]]["accuracy"] for s in sorted(by_seed)],
        }
        for field in ("gflops_per_sample", "samples_per_s", "tokens_per_s", "latency_ms_per_batch"):
            row[field] = float(np.mean([results[n][field] for n in by_seed.values()]))
        for field in ("params_total", "expert_params", "active_expert_params"):
            row[field] = results[next(iter(by_seed.values()))][field]
        refs = {"dense": "dense"}
        if key["layer"] != "moe" and key["layer"] != "dense":
            refs["moe"] = group_name("moe", key["top_k"], key.get("granularity"))
        for label, ref in refs.items():
            if ref == g or ref not in groups:
                continue
            seeds = sorted(set(by_seed) & set(groups[ref]))
            if not seeds:
                continue
            ci = seed_example_bootstrap_ci(
                [correct[by_seed[s]] for s in seeds], [correct[groups[ref][s]] for s in seeds], n_boot=n_boot
            )
            row[f"vs_{label}"] = {
                "diff": ci["diff"],
                "ci_seeds_examples": ci["ci_seeds_examples"],
                "ci_examples": ci["ci_examples"],
                "n_seeds": ci["n_seeds"],
            }
        table[g] = row
    return table
