"""Routing profiles of a model bigger than memory: wall time and peak RSS against checkpoint size.

A Mixtral-shaped bf16 checkpoint (``--checkpoint FOLDER``, or, without it, synthetic ones written
here shard by shard, one decoder layer per shard, never whole in memory: ``--layers`` of them,
``--hidden``/``--intermediate``/``--experts``) is profiled on ``--num-samples`` sequences of
``--seq-len`` random token ids in each ``--modes``:

* ``memory``: the profile stage's path, ``pipeline.modeling.load_model`` then ``profile_routing``
  (the whole model in RAM);
* ``disk``: ``pipeline.offload.profile_checkpoint`` with ``device_map={"": "disk"}``: every module's
  weights read from the original shards for its forward only;
* ``budget``: the same with ``device_map="auto"`` and ``max_memory={"cpu": --cpu-budget}``: modules
  fill the RAM budget in order, the rest stay on disk.

A checkpoint in the Hub's original format (one tensor per expert) has its disk-mapped experts
converted and re-saved under a temporary offload folder (``offload_folder_bytes``); this project's
format and the synthetic checkpoints are read from their shards as they are (0 bytes).

Each measurement runs in a fresh Python process (so one mode's freed memory cannot hide another's
peak): after the imports (the family's modeling code included: ~150 MB), its RSS is read, the kernel's high-water mark reset
(``/proc/self/clear_refs``), then the model is loaded and profiled; the peak is ``VmHWM`` minus
that RSS (a thread also samples ``VmRSS`` every 2 ms, as a cross-check). The profiles of all modes
are compared (dispatch counts and router logits exactly equal).

    python -m benchmarks.offloaded_profile                      # 2, 4, 8 layers (~5 min on 2 cores)
    python -m benchmarks.offloaded_profile --checkpoint FOLDER --modes disk budget
    python -m benchmarks.offloaded_profile --quick --out /tmp/o.json   # tiny dimensions, seconds
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.common import write_results

MODES = ("memory", "disk", "budget")
QUICK = dict(hidden=64, intermediate=128, experts=4, vocab=256, heads=4, kv_heads=2)


# ---------------------------------------------------------------------------- synthetic checkpoint


def write_synthetic_checkpoint(
    folder: str | Path,
    layers: int,
    hidden: int = 1024,
    intermediate: int = 2048,
    experts: int = 8,
    top_k: int = 2,
    vocab: int = 8000,
    heads: int = 16,
    kv_heads: int = 4,
    seed: int = 0,
) -> int:
    """Write a random bf16 Mixtral checkpoint of about one shard per decoder layer, tensor names as
    transformers 5 names them (fused experts: read from the shards as they are, no conversion);
    returns its weight bytes. Never whole in memory (:mod:`benchmarks.synthetic_checkpoint`)."""
    from benchmarks.synthetic_checkpoint import write_checkpoint

    head_dim = hidden // heads
    layer_bytes = 2 * (3 * experts * intermediate * hidden + experts * hidden + 2 * hidden)
    layer_bytes += 2 * hidden * head_dim * (2 * heads + 2 * kv_heads)
    info = write_checkpoint(
        folder,
        hidden=hidden,
        layers=layers,
        experts=experts,
        intermediate=intermediate,
        vocab=vocab,
        heads=heads,
        kv_heads=kv_heads,
        top_k=top_k,
        shard_size=layer_bytes,
        seed=seed,
        names="transformers",
    )
    return info["bytes"]


def random_rows(n: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict]:
    """``n`` calibration sequences of random token ids (labels: the ids, as an LM's)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (seq_len,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids, "label": 0})
    return rows


# ---------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakRSS:
    """The process's peak RSS above its RSS at entry: the kernel's ``VmHWM`` (reset at entry via
    ``/proc/self/clear_refs``; None where that is not possible) and a 2 ms sampling of ``VmRSS``."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.start = self.hwm_delta = self.sampled_delta = None
        self._peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = _status_kib("VmRSS")
            if rss is not None:
                self._peak = max(self._peak, rss * 1024)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        rss = _status_kib("VmRSS")
        self.start = None if rss is None else rss * 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._reset = True
        except OSError:
            self._reset = False
        self._peak = self.start or 0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        hwm = _status_kib("VmHWM")
        if self.start is not None:
            self.sampled_delta = max(0, self._peak - self.start)
            if self._reset and hwm is not None:
                self.hwm_delta = max(0, hwm * 1024 - self.start)

    @property
    def peak_delta(self) -> int | None:
        """The high-water mark where the kernel gives one, else the sampled peak."""
        return self.hwm_delta if self.hwm_delta is not None else self.sampled_delta


def run_child(spec: dict) -> dict:
    """One measurement in this (fresh) process: load and profile ``spec["checkpoint"]`` in
    ``spec["mode"]``; the profile is saved to ``spec["profile_out"]`` when given."""
    import accelerate.big_modeling  # noqa: F401  (imported outside the measurement)

    from pipeline.modeling import load_model
    from pipeline.offload import load_offloaded, meta_model, profile_offloaded
    from pipeline.profiling import profile_routing, save_profile

    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    rows = random_rows(spec["num_samples"], spec["seq_len"], spec["vocab"], spec.get("seed", 0))
    mode, folder = spec["mode"], spec["checkpoint"]
    # The family's modeling code costs ~150 MB of RSS to import: not the profile's memory.
    meta_model(folder, torch.bfloat16)
    peak_weights = [0]

    def count_weights(model) -> None:
        # Weight bytes in memory at every module's forward: RAM-mapped modules + what is loaded.
        def pre(*_args) -> None:
            n = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")
            peak_weights[0] = max(peak_weights[0], n)

        for m in model.modules():
            m.register_forward_pre_hook(pre)

    t0 = time.perf_counter()
    with PeakRSS() as rss:
        if mode == "memory":
            model = load_model(folder)
            count_weights(model)
            prof = profile_routing(model, rows, 0, spec["batch_size"], torch.device("cpu"))
        else:
            dm, mm = ({"": "disk"}, None) if mode == "disk" else ("auto", {"cpu": spec["cpu_budget"]})
            model = load_offloaded(folder, dm, mm, spec.get("offload_folder"))
            count_weights(model)
            prof = profile_offloaded(model, rows, 0, spec["batch_size"])
    seconds = time.perf_counter() - t0
    if spec.get("profile_out"):
        Path(spec["profile_out"]).mkdir(parents=True, exist_ok=True)
        save_profile(prof, Path(spec["profile_out"]))
    return {
        "seconds": round(seconds, 2),
        "rss_at_start_bytes": rss.start,
        "peak_rss_delta_bytes": rss.peak_delta,
        "peak_rss_delta_sampled_bytes": rss.sampled_delta,
        "peak_weight_bytes": peak_weights[0],
        # What the profile itself keeps (kept layer inputs, logits, sums): it grows with the layers.
        "profile_bytes": sum(
            t.numel() * t.element_size()
            for p in prof.values()
            for t in (p.counts, p.router_logits, p.feature_sum, p.feature_abs_sum, p.feature_sq_sum, p.inputs)
            if t is not None
        ),
        "checkpoint_passes": -(-spec["num_samples"] // spec["batch_size"]),
        # Weights transformers converted and re-saved (Hub-format experts); 0 for this project's format.
        "offload_folder_bytes": sum(
            f.stat().st_size
            for f in Path(spec.get("offload_folder") or "/nonexistent").glob("*")
            if f.is_file()
        ),
        "tokens": sum(p.tokens for p in prof.values()),
    }


def measure(spec: dict) -> dict:
    """:func:`run_child` in a fresh interpreter; its result (or the error it died with)."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.offloaded_profile", "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": tail}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------- report


def _largest_block_bytes(folder: Path) -> tuple[int, int]:
    """(bytes of the largest decoder layer, bytes of everything else) from the shard headers."""
    from safetensors import safe_open

    from pipeline.offload import checkpoint_shards

    sizes: dict[str, int] = {}
    for name, file in checkpoint_shards(folder).items():
        with safe_open(str(file), framework="pt") as f:
            sl = f.get_slice(name)
            n = 1
            for s in sl.get_shape():
                n *= s
            key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else "rest"
            sizes[key] = sizes.get(key, 0) + n * {"BF16": 2, "F16": 2, "F32": 4}.get(sl.get_dtype(), 4)
    rest = sizes.pop("rest", 0)
    return max(sizes.values(), default=0), rest


def _same_profiles(folders: list[Path]) -> bool:
    from pipeline.profiling import load_profile

    loaded = [load_profile(f) for f in folders]
    first = loaded[0]
    return all(
        set(p) == set(first)
        and all(
            torch.equal(p[n].counts, first[n].counts)
            and torch.equal(p[n].router_logits, first[n].router_logits)
            for n in first
        )
        for p in loaded[1:]
    )


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint", default=None, help="a safetensors MoE checkpoint folder (default: synthetic)"
    )
    p.add_argument("--out", default="metrics/offloaded_profile.json")
    p.add_argument("--modes", nargs="+", default=list(MODES), help=f"of {', '.join(MODES)}")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8], help="synthetic layer counts")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--cpu-budget", default="256MiB", help="max_memory['cpu'] of the budget mode")
    p.add_argument("--threads", type=int, default=0, help="torch threads per measurement (0: default)")
    p.add_argument("--workdir", default=None, help="where synthetic checkpoints go (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="tiny dimensions (a smoke run)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(run_child(json.loads(args.child))))
        return
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        sys.exit(f"error: unknown mode {bad[0]!r}; valid: {', '.join(MODES)}")
    dims = dict(hidden=args.hidden, intermediate=args.intermediate, experts=args.experts, vocab=args.vocab)
    dims.update(heads=16 if args.hidden % 16 == 0 else 4, kv_heads=4 if args.hidden % 16 == 0 else 2)
    if args.quick:
        dims = dict(QUICK)
        args.num_samples, args.seq_len, args.batch_size = min(args.num_samples, 4), min(args.seq_len, 16), 2
    if args.checkpoint is not None:
        from pipeline.offload import checkpoint_shards

        try:
            checkpoint_shards(args.checkpoint)
        except Exception as err:
            sys.exit(f"error: {err}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="offload-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    try:
        targets = [(None, Path(args.checkpoint))] if args.checkpoint else [(n, None) for n in args.layers]
        for layers, folder in targets:
            if folder is None:
                folder = work / f"mixtral-{layers}l"
                t0 = time.perf_counter()
                write_synthetic_checkpoint(folder, layers, top_k=2, **dims)
                print(f"wrote {folder} in {time.perf_counter() - t0:.1f} s")
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(str(folder))
            block, rest = _largest_block_bytes(folder)
            size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            row = {
                "checkpoint": str(folder) if args.checkpoint else None,
                "layers": config.num_hidden_layers,
                "checkpoint_bytes": size,
                "largest_layer_bytes": block,
                "non_layer_bytes": rest,
                "modes": {},
            }
            profiles = []
            for mode in args.modes:
                out = work / f"profile-{config.num_hidden_layers}-{mode}"
                spec = {
                    "checkpoint": str(folder),
                    "mode": mode,
                    "num_samples": args.num_samples,
                    "seq_len": args.seq_len,
                    "batch_size": args.batch_size,
                    "vocab": config.vocab_size,
                    "cpu_budget": args.cpu_budget,
                    "offload_folder": str(work / f"offload-{config.num_hidden_layers}-{mode}"),
                    "threads": args.threads,
                    "profile_out": str(out),
                }
                r = measure(spec)
                shutil.rmtree(spec["offload_folder"], ignore_errors=True)
                row["modes"][mode] = r
                if "error" not in r:
                    profiles.append(out)
                    print(
                        f"  {config.num_hidden_layers} layers, {mode:6s}: {r['seconds']:7.1f} s, "
                        f"peak RSS +{_mib(r['peak_rss_delta_bytes'])} MiB, weights in memory at most "
                        f"{_mib(r['peak_weight_bytes'])} MiB, profile {_mib(r['profile_bytes'])} MiB "
                        f"(checkpoint {_mib(size)} MiB)"
                    )
                else:
                    print(f"  {config.num_hidden_layers} layers, {mode}: failed: {r['error']}")
            row["profiles_equal"] = _same_profiles(profiles) if len(profiles) > 1 else None
            runs.append(row)
            if args.checkpoint is None:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print()
    header = f"{'layers':>6} {'ckpt MiB':>9} {'layer MiB':>9} | " + " | ".join(
        f"{m + ' s':>10} {m + ' MiB':>11} {'weights':>8}" for m in args.modes
    )
    print(header + " | equal")
    for row in runs:
        cells = []
        for m in args.modes:
            r = row["modes"][m]
            cells.append(
                f"{'fail':>10} {'':>11} {'':>8}"
                if "error" in r
                else f"{r['seconds']:>10.1f} {_mib(r['peak_rss_delta_bytes']):>11} "
                f"{_mib(r['peak_weight_bytes']):>8}"
            )
        print(
            f"{row['layers']:>6} {_mib(row['checkpoint_bytes']):>9} {_mib(row['largest_layer_bytes']):>9} | "
            + " | ".join(cells)
            + f" | {row['profiles_equal']}"
        )
    write_results(
        {
            "dims": dims,
            "num_samples": args.num_samples,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "cpu_budget": args.cpu_budget,
            "torch_threads": args.threads or torch.get_num_threads(),
            "runs": runs,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
