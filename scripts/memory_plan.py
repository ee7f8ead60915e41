"""Memory per workflow step for real MoE checkpoints on 1 and 8 GPUs (`make memory-plan`).

Counts each model's parameters on the meta device from its config (no weights, no network) and
prints the README's table; writes the figures to ``metrics/memory_plan.json``.

    python -m scripts.memory_plan                       # Mixtral-8x7B, Qwen3-30B-A3B, DeepSeek-V2-Lite
    python -m scripts.memory_plan --config path/to/checkpoint --keep 4 --gpus 1 2 8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.memory_plan import KNOWN_MODELS, count_params, known_config, model_plan


def _cli(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", help="a checkpoint folder or config.json (repeatable)")
    p.add_argument("--keep", type=int, help="experts per layer after merging (default: half)")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 8])
    p.add_argument("--gpu-gb", type=float, default=80.0)
    p.add_argument("--out", default="metrics/memory_plan.json")
    return p.parse_args(argv)


def _local_config(path: str):
    from transformers import AutoConfig

    folder = Path(path).parent if Path(path).name == "config.json" else Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{path}: no config.json there; give a checkpoint folder or its config.json")
    return AutoConfig.from_pretrained(str(folder))


def _row(name: str, result: dict) -> list[str]:
    c = result["counts"]
    lines = []
    for p in result["plans"]:
        yes = {True: "yes", False: "no"}
        lines.append(
            f"| {name} | {c['total'] / 1e9:.1f}B -> {c['merged'] / 1e9:.1f}B | {p['gpus']} | "
            f"{p['serve_per_gpu_gb']} ({yes[p['serve_fits']]}) | {p['serve_merged_per_gpu_gb']} "
            f"({yes[p['serve_merged_fits']]}) | {p['profile_per_gpu_gb']} + {p['profile_offloaded_gb']} | "
            f"{p['stream_merge_ram_gb']} | {p['finetune_fsdp_per_gpu_gb']} ({yes[p['finetune_fits']]}) | "
            f"{p['kd_merged_ddp_per_gpu_gb']} ({yes[p['kd_fits']]}) |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    args = _cli(argv)
    try:
        configs = {p: _local_config(p) for p in args.config} if args.config else None
        if configs is None:
            configs = {name: known_config(name) for name in KNOWN_MODELS}
        results = {}
        for name, config in configs.items():
            keep = args.keep or count_params(config).experts_per_layer // 2
            results[name] = model_plan(config, keep, tuple(args.gpus), args.gpu_gb)
    except ValueError as err:
        sys.exit(f"memory_plan: {err}")
    print(
        "| model | params stock -> merged | GPUs | serve stock GB/GPU (fits) | serve merged GB/GPU (fits) "
        "| profile GB/GPU + offloaded | streamed merge RAM GB | finetune FSDP GB/GPU (fits) "
        "| KD DDP GB/GPU (fits) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, result in results.items():
        print("\n".join(_row(name, result)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"gpu_gb": args.gpu_gb, "models": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
