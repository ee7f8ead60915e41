"""Layer-streamed align -> merge -> compress of Mixtral-shaped bf16 checkpoints of growing depth.

For each layer count (default 4, 8 and 16; ``--full`` adds 24, a checkpoint of about 9.7 GB) a
random checkpoint (``benchmarks/synthetic_checkpoint.py``: hidden 2048, 8 experts of intermediate
4096, Hub naming) is written to a work folder, then :func:`pipeline.streaming.stream_merge` aligns
every layer (weight matching), merges 8 -> 4 experts per layer (``merge.strategy``, default
frequency) and compresses the merged experts (``--rank``), in a fresh child process per leg. Each
leg reports seconds per phase, seconds per layer, the peak resident set (the child's VmHWM, reset
once the libraries are imported, and a 20 ms sampler of its RSS and its children's), the RSS it
started from, and the bytes read and written; the parent also records ``ru_maxrss`` of its
children. The checkpoints are deleted afterwards unless ``--keep``.

Groups: by default from a rule that needs no forward pass: uniform usage, so the 4 leaders of
every layer are experts 0-3 (``group.ratio: uniform``), and every other expert joins the leader
whose router row is most similar (``group.similarity: router-weight``, ``group.method: m-smoe``,
through :func:`pipeline.grouping.group_experts`). Merging then uses uniform usage frequencies too
(a plain average). ``--groups``/``--profile`` take the group stage's JSON and a profile folder
instead (a profile of a model this size comes from offloaded profiling).

    python -m benchmarks.streamed_merge                  # 4, 8, 16 layers (~25 min on 2 cores)
    python -m benchmarks.streamed_merge --full           # and 24 layers (>= 8 GB on disk)
    python -m benchmarks.streamed_merge --quick --out /tmp/s.json   # tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.common import write_results
from benchmarks.synthetic_checkpoint import DEFAULTS, write_checkpoint

QUICK = dict(hidden=64, experts=8, intermediate=128, vocab=256, heads=4, kv_heads=2)


def _status_kib(pid: int | str, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def tree_rss(pid: int | None = None) -> int:
    """Resident bytes of a process and all its descendants."""
    pid = pid or os.getpid()
    todo, total = [pid], 0
    while todo:
        p = todo.pop()
        total += _status_kib(p, "VmRSS") * 1024
        todo += _children(p)
    return total


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Peak resident set of this process (and children) while the block runs: the larger of the
    sampled RSS (every ``interval`` s) and VmHWM (reset at the start where the kernel allows)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.sampled = 0
        self.start = 0
        self.hwm_reset = False
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self.start = tree_rss()
        self.hwm_reset = reset_peak()
        self.sampled = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sampled = max(self.sampled, tree_rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sampled = max(self.sampled, tree_rss())
        self.hwm = _status_kib("self", "VmHWM") * 1024 if self.hwm_reset else 0

    @property
    def peak(self) -> int:
        return max(self.sampled, self.hwm)


def cheap_groups(model_dir: str | Path, num_experts_avg: int) -> dict:
    """Groups from router weights alone (no forward pass): uniform usage, ``ratio: uniform``,
    ``similarity: router-weight``, ``method: m-smoe``; each router weight is read lazily."""
    from pipeline.grouping import LayerData, group_experts
    from pipeline.shards import CheckpointReader
    from pipeline.streaming import _load_config, _plan_targets, _read_target, meta_skeleton

    reader = CheckpointReader(model_dir)
    skeleton, adapter = meta_skeleton(_load_config(Path(model_dir)))
    targets = _plan_targets(skeleton, reader.names)
    data, freqs = {}, {}
    for ly in adapter.sparse_layers(skeleton):
        n = adapter.num_experts(ly)
        path = adapter.spec.rows[0][0].replace("router.", f"{adapter.spec.router}.", 1)
        weight = _read_target(reader, targets[f"{ly.name}.{path}"]).float()
        freqs[ly.name] = torch.full((n,), 1.0 / n)
        data[ly.name] = LayerData(ly.name, torch.zeros(0, n), weight, [], seed=ly.position)
    return group_experts(
        data, freqs, list(data), num_experts_avg, "router-weight", ratio="uniform", method="m-smoe"
    )


def run_leg(args: argparse.Namespace) -> dict:
    """One streamed run, in this process (the parent starts one child per leg)."""
    from pipeline.streaming import stream_merge

    groups = json.loads(Path(args.groups).read_text())
    before = tree_rss()
    with PeakRSS() as peak:
        report = stream_merge(
            args.model,
            args.leg_out,
            groups,
            args.profile,
            align=args.align,
            strategy=args.strategy,
            router=args.router,
            rank=args.rank or None,
            scope="merged",
            max_shard_size=args.max_shard_size,
        )
    written = sum(p.stat().st_size for p in Path(args.leg_out).glob("*.safetensors"))
    read = sum(p.stat().st_size for p in Path(args.model).glob("*.safetensors"))
    return {
        "seconds": report["seconds"],
        "peak_rss_bytes": peak.peak,
        "peak_rss_sampled_bytes": peak.sampled,
        "peak_rss_vmhwm_bytes": peak.hwm,
        "vmhwm_reset": peak.hwm_reset,
        "rss_before_bytes": before,
        "peak_rss_rise_bytes": max(0, peak.peak - before),
        "bytes_read": read,
        "bytes_written": written,
        "shards_written": report["shards"],
    }


def _results(args: argparse.Namespace, shape: dict, legs: list[dict]) -> dict:
    # Linear in depth: seconds = a + b * layers (least squares over the legs).
    fit = None
    if len(legs) >= 2:
        xs = [leg["layers"] for leg in legs]
        ys = [leg["seconds"]["total"] for leg in legs]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
        fit = {"seconds_per_layer": round(b, 3), "intercept_s": round(my - b * mx, 3)}
    return {
        "shape": {k: shape[k] for k in ("hidden", "experts", "intermediate", "vocab", "heads", "kv_heads")},
        "dtype": "bfloat16",
        "key_layout": "Hub Mixtral naming (block_sparse_moe.experts.N.w1/w2/w3), converted while reading",
        "steps": {
            "align": args.align,
            "merge": f"{args.strategy}, 8 -> {args.num_experts_avg} experts per layer, router {args.router}",
            "compress": f"rank {args.rank}, merged layers" if args.rank else "none",
        },
        "groups": (
            args.groups
            or "no forward pass: uniform usage (leaders: experts 0-3 of every layer, group.ratio uniform), "
            "others join the leader with the most similar router row (group.similarity router-weight, "
            "group.method m-smoe)"
        ),
        "profile": args.profile or "none: uniform usage frequencies (frequency merge = plain average)",
        "max_shard_size": args.max_shard_size,
        "torch_threads": args.threads or torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "legs": legs,
        "linear_fit": fit,
    }


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--full", action="store_true", help="also the 24-layer checkpoint (>= 8 GB on disk)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (hidden 64), for tests")
    p.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints (reused when present)")
    p.add_argument("--groups", default=None, help="groups.json (default: router-weight rule, see above)")
    p.add_argument("--profile", default=None, help="profile folder (default: uniform usage)")
    p.add_argument("--num-experts-avg", type=int, default=4, help="experts kept per layer (8 -> 4)")
    p.add_argument("--align", default="weight-matching")
    p.add_argument("--strategy", default="frequency")
    p.add_argument("--router", default="remap")
    p.add_argument(
        "--rank", type=int, default=64, help="compression rank (hidden 2048: 1/32); 0: no compression"
    )
    p.add_argument("--max-shard-size", default="1GB")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="metrics/streamed_merge.json")
    # Internal: one leg in a child process.
    p.add_argument("--leg", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--leg-out", help=argparse.SUPPRESS)
    p.add_argument("--leg-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.leg:
        Path(args.leg_json).write_text(json.dumps(run_leg(args)))
        return

    shape = {**DEFAULTS, **(QUICK if args.quick else {})}
    layer_counts = sorted(set(args.layers + ([24] if args.full else [])))
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="streamed-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    legs = []
    try:
        for n in layer_counts:
            ckpt = work / f"mixtral-{'quick' if args.quick else 'h2048'}-{n}"
            if not (ckpt / "model.safetensors.index.json").is_file():
                shutil.rmtree(ckpt, ignore_errors=True)
                info = write_checkpoint(
                    ckpt, **{k: shape[k] for k in ("hidden", "experts", "intermediate", "vocab", "heads", "kv_heads")},
                    layers=n, shard_size=200_000 if args.quick else 1_000_000_000,
                )  # fmt: skip
                print(
                    f"wrote {n}-layer checkpoint: {_gib(info['bytes'])} GiB in {info['seconds']} s",
                    flush=True,
                )
            groups_path = Path(args.groups) if args.groups else work / f"groups-{n}.json"
            if not args.groups:
                groups_path.write_text(json.dumps(cheap_groups(ckpt, args.num_experts_avg)))
            leg_json = work / f"leg-{n}.json"
            cmd = [
                sys.executable, "-m", "benchmarks.streamed_merge", "--leg", "--model", str(ckpt),
                "--leg-out", str(work / f"out-{n}"), "--leg-json", str(leg_json), "--groups", str(groups_path),
                "--align", args.align, "--strategy", args.strategy, "--router", args.router,
                "--rank", str(args.rank), "--max-shard-size", str(args.max_shard_size),
            ]  # fmt: skip
            if args.profile:
                cmd += ["--profile", args.profile]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            leg = json.loads(leg_json.read_text())
            leg["layers"] = n
            leg["wall_s"] = round(time.perf_counter() - t0, 2)
            leg["seconds_per_layer"] = round(leg["seconds"]["total"] / n, 3)
            leg["children_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
            legs.append(leg)
            shutil.rmtree(work / f"out-{n}", ignore_errors=True)
            s = leg["seconds"]
            print(
                f"{n} layers: {s['total']:.1f} s ({leg['seconds_per_layer']:.2f} s/layer; align {s['align']:.1f}, "
                f"merge {s['merge']:.1f}, compress {s['compress']:.1f}, read {s['read']:.1f}, "
                f"write {s['write']:.1f}, copy {s['copy']:.1f}); peak RSS {_gib(leg['peak_rss_bytes'])} GiB, "
                f"read {_gib(leg['bytes_read'])} GiB",
                flush=True,
            )
            if not args.keep:
                shutil.rmtree(ckpt, ignore_errors=True)
            # After every leg, so an interrupted run keeps the legs it finished.
            write_results(_results(args, shape, legs), args.out)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(
        "\n| layers | GB on disk | total s | s/layer | align s | merge s | compress s | read s | write s | peak RSS GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for leg in legs:
        s = leg["seconds"]
        print(
            f"| {leg['layers']} | {leg['bytes_read'] / 1e9:.2f} | {s['total']:.1f} | {leg['seconds_per_layer']:.2f} | "
            f"{s['align']:.1f} | {s['merge']:.1f} | {s['compress']:.1f} | {s['read']:.1f} | "
            f"{s['write'] + s['copy']:.1f} | {_gib(leg['peak_rss_bytes'])} |"
        )
    fit = _results(args, shape, legs)["linear_fit"]
    if fit:
        print(f"fit: {fit['seconds_per_layer']} s/layer + {fit['intercept_s']} s")


if __name__ == "__main__":
    main()
