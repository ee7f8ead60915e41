"""Benchmark at switch-base-32 size: what merging costs and what it buys, measured in one run.

Random weights at google/switch-base-32's dimensions (d_model 768, d_ff 3072, 12 + 12 blocks, an
SMoE layer every other block, 32 experts; 2.0B parameters), so it runs offline on a CPU. Measures:

* the time of ``align`` (weight matching), ``group`` and ``merge`` for the 11 merged layers (the
  first SMoE layer is kept, as in the paper), after a routing profile of random token sequences;
* for the full model (stock forward and this project's sorted-by-expert forward), the merged model
  (``--num-experts-avg`` per layer on average, router mode ``--router``), the compressed model
  (rank ``--rank``, S pruned to ``--sparse-ratio`` of its columns) and a dense model of the same
  width (every block dense): latency and tokens/s of a teacher-forced forward at ``--batch-size``
  x ``--seq-len`` source tokens, peak forward memory, and bytes of the saved checkpoint.

With ``--align-study`` (or only it, ``--align-only``): the alignment cost per assignment solver
(``--align-solvers``) and, for the exact one, per worker count (``--align-workers``), over the 11
layers at switch-base-32 size, and per expert pair at Mixtral width (one 14336 x 14336 assignment)
and DeepSeek width (``--align-pairs`` of a layer's 255 pairs): seconds and gap to the exact optimum,
with similarities built (and the auction run) on ``--device``.

The merged and compressed models are made from the full one in place, so memory holds one large
model at a time (about 8 GB for the full one in float32). Random experts merge into random experts:
the figures are about time, memory and size, not accuracy. Since no KD runs here, S is pruned by
column norm (the pipeline prunes by |s * grad s| during KD); only the number of kept columns matters
for speed and size.

    python -m benchmarks.switch_base_32                 # the full-size run (about 15-20 min on 2 cores)
    python -m benchmarks.switch_base_32 --quick --out /tmp/b.json   # tiny dimensions, seconds
    python -m benchmarks.switch_base_32 --align-only --device cuda  # alignment cost (make benchmark-align)
"""

from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import write_results
from pipeline.align import align_model, weight_features
from pipeline.assignment import (
    DEFAULT_CANDIDATES,
    DEFAULT_TOLERANCE,
    SOLVERS,
    SolverPool,
    SolverSettings,
    guaranteed_gap,
    resolve_workers,
    solve,
)
from pipeline.compression import as_identity_merged, compress_model, finalize_compact, low_rank_sparse_modules
from pipeline.evaluation import expert_stats, peak_forward_memory
from pipeline.families import SparseLayer, adapter_for
from pipeline.grouping import group_experts, layer_data, merged_layer_names
from pipeline.merging import merge_model
from pipeline.modeling import bytes_on_disk, count_unique_params, resolve_device, save_model
from pipeline.profiling import profile_routing
from pipeline.routing import set_router_mode

SWITCH_BASE_32 = dict(
    d_model=768,
    d_kv=64,
    d_ff=3072,
    num_heads=12,
    num_layers=12,
    num_decoder_layers=12,
    num_experts=32,
    encoder_sparse_step=2,
    decoder_sparse_step=2,
    expert_capacity=64,
    vocab_size=32128,
    dropout_rate=0.0,
)
QUICK = dict(
    SWITCH_BASE_32,
    d_model=64,
    d_kv=16,
    d_ff=128,
    num_heads=4,
    num_layers=4,
    num_decoder_layers=4,
    num_experts=8,
    vocab_size=512,
)


def build(config_kwargs: dict, seed: int, dense: bool = False):
    """A random-weight Switch model (every block dense when ``dense``)."""
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    kwargs = dict(config_kwargs, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    if dense:
        kwargs.update(encoder_sparse_step=0, decoder_sparse_step=0)
    torch.manual_seed(seed)
    return SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(**kwargs)).eval()


def random_batch(n: int, src_len: int, tgt_len: int, vocab: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(2, vocab, (n, tgt_len), generator=g)
    return {
        "input_ids": torch.randint(2, vocab, (n, src_len), generator=g),
        "attention_mask": torch.ones(n, src_len, dtype=torch.long),
        "labels": labels,
    }


@torch.no_grad()
def forward(model, batch: dict) -> torch.Tensor:
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=batch["labels"]),
    ).logits


def measure(name: str, model, batch: dict, repeats: int, scratch: Path) -> dict:
    """Latency, throughput, peak memory and checkpoint bytes of one model."""
    forward(model, batch)  # warm-up: allocator, kernel selection
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward(model, batch)
        times.append(time.perf_counter() - t0)
    latency = min(times)
    memory = peak_forward_memory(model, lambda: forward(model, batch), torch.device("cpu"))
    folder = scratch / name
    save_model(model, folder)
    size = bytes_on_disk(folder)
    shutil.rmtree(folder)
    n_tokens = batch["input_ids"].numel()
    out = {
        "latency_s": round(latency, 4),
        "latency_s_all": [round(t, 4) for t in times],
        "tokens_per_s": round(n_tokens / latency, 1),
        "params": count_unique_params(model),
        **expert_stats(model),
        **memory,
        "bytes_on_disk": size,
    }
    print(
        f"  {name:12s} latency {latency:8.3f} s  {out['tokens_per_s']:9.1f} tok/s  "
        f"params {out['params'] / 1e6:8.1f} M  peak {memory['peak_forward_bytes'] / 2**30:6.2f} GiB  "
        f"disk {size / 2**30:6.2f} GiB",
        flush=True,
    )
    return out


def prune_columns_by_norm(model, keep: float) -> None:
    """Keep the ``keep`` share of each S's columns with the largest norms (a KD-free stand-in)."""
    for m in low_rank_sparse_modules(model).values():
        k = max(0, round(keep * m.in_features))
        top = m.s.detach().norm(dim=0).topk(k).indices
        with torch.no_grad():
            m.s_mask.zero_()
            m.s_mask[top] = True
            m.s.mul_(m.s_mask)


def random_rows(n: int, src_len: int, tgt_len: int, vocab: int, seed: int) -> list[dict]:
    b = random_batch(n, src_len, tgt_len, vocab, seed)
    return [
        {"input_ids": i.tolist(), "labels": t.tolist(), "label": 0}
        for i, t in zip(b["input_ids"], b["labels"], strict=True)
    ]


def run(args: argparse.Namespace) -> dict:
    """The whole benchmark; returns what it prints, as a dict."""
    config = QUICK if args.quick else SWITCH_BASE_32
    results: dict = {
        "config": {
            **{k: config[k] for k in ("d_model", "d_ff", "num_layers", "num_decoder_layers", "num_experts")},
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "target_len": args.target_len,
            "num_experts_avg": args.num_experts_avg,
            "router": args.router,
            "rank": args.rank,
            "sparse_ratio": args.sparse_ratio,
            "compress_scope": args.scope,
            "profile_samples": args.profile_samples,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "merge_cost_s": {},
        "models": {},
    }
    batch = random_batch(args.batch_size, args.seq_len, args.target_len, config["vocab_size"], seed=1)
    scratch = Path(tempfile.mkdtemp(prefix="smoe-bench-"))
    models = results["models"]
    try:
        t0 = time.perf_counter()
        model = build(config, seed=0)
        adapter = adapter_for(model)
        print(
            f"built {count_unique_params(model) / 1e9:.3f} B params in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        models["full"] = measure("full", model, batch, args.repeats, scratch)
        # The same full model on the project's sorted-by-expert forward (same function); merging
        # below starts from it.
        for ly in adapter.sparse_layers(model):
            as_identity_merged(model, adapter, ly)
        gc.collect()
        models["full_sorted"] = measure("full_sorted", model, batch, args.repeats, scratch)

        t0 = time.perf_counter()
        rows = random_rows(args.profile_samples, args.seq_len, args.target_len, config["vocab_size"], seed=2)
        profiles = profile_routing(model, rows, 0, args.batch_size, torch.device("cpu"), max_inputs=1)
        results["profile_s"] = round(time.perf_counter() - t0, 2)

        layers = adapter.sparse_layers(model)
        names = merged_layer_names(
            [(ly.name, ly.stack) for ly in layers], skip_first_layer=True, which="both"
        )
        cost = results["merge_cost_s"]
        t0 = time.perf_counter()
        align_model(model, adapter, "weight-matching", "first", layers=names, workers="auto")
        cost["align"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        data = {ly.name: layer_data(adapter, ly, profiles[ly.name]) for ly in layers if ly.name in names}
        freqs = {n: p.frequency for n, p in profiles.items()}
        groups = group_experts(data, freqs, names, args.num_experts_avg, "router-logits", "uniform")
        cost["group"] = round(time.perf_counter() - t0, 3)
        del data
        t0 = time.perf_counter()
        merge_model(model, adapter, groups, profiles, "frequency")
        cost["merge"] = round(time.perf_counter() - t0, 3)
        cost["total"] = round(cost["align"] + cost["group"] + cost["merge"], 2)
        cost["merged_layers"] = len(names)
        print(
            f"merge cost for {len(names)} layers: align {cost['align']} s, group {cost['group']} s, "
            f"merge {cost['merge']} s (profile {results['profile_s']} s, not counted)",
            flush=True,
        )
        gc.collect()
        set_router_mode(model, adapter, args.router)
        models["merged"] = measure("merged", model, batch, args.repeats, scratch)

        t0 = time.perf_counter()
        compress_model(model, adapter, args.rank, args.scope)
        prune_columns_by_norm(model, args.sparse_ratio)
        finalize_compact(model)
        results["compress_s"] = round(time.perf_counter() - t0, 1)
        gc.collect()
        models["compressed"] = measure("compressed", model, batch, args.repeats, scratch)
        del model
        gc.collect()

        model = build(config, seed=0, dense=True)
        models["dense"] = measure("dense", model, batch, args.repeats, scratch)
        del model
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    full = models["full"]
    results["ratios"] = {
        f"{name}_vs_full": {
            "throughput": round(m["tokens_per_s"] / full["tokens_per_s"], 3),
            "bytes_on_disk": round(m["bytes_on_disk"] / full["bytes_on_disk"], 4),
            "params": round(m["params"] / full["params"], 4),
            "peak_memory": round(m["peak_forward_bytes"] / full["peak_forward_bytes"], 4),
        }
        for name, m in models.items()
        if name != "full"
    }
    results["ratios"]["merged_time_vs_dense"] = round(
        models["merged"]["latency_s"] / models["dense"]["latency_s"], 3
    )
    return results


# ---------------------------------------------------------------- alignment cost (issue 22)

# (SMoE layers aligned, experts per layer, hidden size, expert width, matrices per expert)
ALIGN_SHAPES = {
    # switch-base-32: the 11 merged layers, 32 experts of wi [3072, 768] and wo [768, 3072].
    "switch-base-32": (11, 32, 768, 3072, 2),
    # Mixtral-8x7B: one pair of experts of w1, w3 [14336, 4096] and w2 [4096, 14336].
    "mixtral-pair": (1, 2, 4096, 14336, 3),
    # DeepSeek-V3: 256 routed experts of gate/up [2048, 7168] and down [7168, 2048] in a layer.
    "deepseek-layer": (1, 256, 7168, 2048, 3),
}
QUICK_ALIGN_SHAPES = {
    "switch-base-32": (3, 8, 64, 128, 2),
    "mixtral-pair": (1, 2, 64, 256, 3),
    "deepseek-layer": (1, 16, 96, 64, 3),
}


class RandomExperts:
    """Just enough of an adapter for :func:`~pipeline.align.align_model`: SMoE layers of random
    experts, made one layer at a time by :meth:`make` (outside the timed alignment)."""

    def __init__(self, layers: int, experts: int, hidden: int, width: int, matrices: int, seed: int) -> None:
        self.shape = (layers, experts, hidden, width, matrices)
        self.seed = seed
        names = ("w1", "w3")[: matrices - 1]
        self.neuron_axes = {**dict.fromkeys(names, 0), "w2": 1}
        self.layers = [SparseLayer(f"layers.{i}", "decoder", i, nn.Identity()) for i in range(layers)]
        self._experts: list[dict[str, torch.Tensor]] = []

    def make(self, layer: SparseLayer, count: int | None = None) -> None:
        """The layer's first ``count`` experts (all by default): a DeepSeek-width layer whole would
        take 45 GB."""
        _, experts, hidden, width, _ = self.shape
        g = torch.Generator().manual_seed(self.seed * 100_003 + layer.position)
        self._experts = [
            {
                k: torch.randn(*((width, hidden) if ax == 0 else (hidden, width)), generator=g)
                for k, ax in self.neuron_axes.items()
            }
            for _ in range(experts if count is None else min(count, experts))
        ]

    def sparse_layers(self, model) -> list[SparseLayer]:
        return self.layers

    def num_experts(self, layer: SparseLayer) -> int:
        return self.shape[1]

    def expert_weights(self, layer: SparseLayer, e: int) -> dict[str, torch.Tensor]:
        return self._experts[e]

    def permute_expert(self, layer: SparseLayer, e: int, perm: torch.Tensor) -> None:
        pass  # the permutation is the measured result; applying it is the same for every solver


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def align_layers_cost(
    shape: tuple, solvers: list[str], workers: list, settings: SolverSettings, device: torch.device
) -> list[dict]:
    """Seconds of ``align_model`` (weight matching) over every layer of ``shape``, per solver and
    worker count (the auction runs on ``device`` in this process: one row), with the summed
    matching objective and its gap to the exact one."""
    adapter = RandomExperts(*shape, seed=0)
    rows = []
    # The floor every solver shares: building the layers' similarity matrices (no solve).
    seconds = 0.0
    for layer in adapter.layers:
        adapter.make(layer)
        feats = [weight_features(w, adapter.neuron_axes).to(device) for w in adapter._experts]
        t0 = time.perf_counter()
        for f in feats[1:]:
            sim = feats[0] @ f.T
        _sync(device)
        seconds += time.perf_counter() - t0
        del feats, sim
    rows.append(
        {"solver": "similarities only", "workers": 1, "seconds": round(seconds, 3), "objective": None}
    )
    print(f"  similarities only : {seconds:9.2f} s", flush=True)
    for solver in solvers:
        for w in workers if solver == "exact" else [1]:
            seconds, objective, gains = 0.0, 0.0, []
            with SolverPool(w) as pool:
                for layer in adapter.layers:
                    adapter.make(layer)
                    t0 = time.perf_counter()
                    r = align_model(None, adapter, "weight-matching", "first", layers={layer.name},
                                    solver=solver, settings=settings,
                                    device=device, pool=pool)[layer.name]  # fmt: skip
                    _sync(device)
                    seconds += time.perf_counter() - t0
                    objective += r["objective_after"]
                    gains.append(r["gain"])
            rows.append({"solver": solver, "workers": pool.workers, "seconds": round(seconds, 3),
                         "objective": objective, "mean_gain": round(sum(gains) / len(gains), 6)})  # fmt: skip
            print(f"  {solver:8s} workers {pool.workers:3d}: {seconds:9.2f} s", flush=True)
    exact = next((r["objective"] for r in rows if r["solver"] == "exact"), None)
    for r in rows:
        known = exact is not None and r["objective"] is not None
        r["relative_gap"] = (exact - r["objective"]) / abs(exact) if known else None
    return rows


def pair_cost(
    shape: tuple, solvers: list[str], pairs: int, settings: SolverSettings, device: torch.device
) -> dict:
    """Per expert pair of ``shape`` (the first ``pairs`` of its first layer): seconds to build the
    similarity on ``device`` and to solve it with each solver, and each solver's gap to the exact
    optimum (where ``exact`` is among ``solvers``)."""
    adapter = RandomExperts(*shape, seed=1)
    adapter.make(adapter.layers[0], count=min(pairs, shape[1] - 1) + 1)
    ref = weight_features(adapter.expert_weights(adapter.layers[0], 0), adapter.neuron_axes).to(device)
    out: dict = {"pairs": [], "width": shape[3], "pairs_per_layer": shape[1] - 1}
    for e in range(1, min(pairs, shape[1] - 1) + 1):
        t0 = time.perf_counter()
        sim = (
            ref
            @ weight_features(adapter.expert_weights(adapter.layers[0], e), adapter.neuron_axes).to(device).T
        )
        _sync(device)
        row = {"expert": e, "similarity_s": round(time.perf_counter() - t0, 3)}
        for solver in solvers:
            t0 = time.perf_counter()
            found = solve(sim, solver, settings)
            _sync(device)
            row[solver] = {"seconds": round(time.perf_counter() - t0, 3), "objective": found.objective}
        if "exact" in solvers:
            best = row["exact"]["objective"]
            for solver in solvers:
                row[solver]["relative_gap"] = (best - row[solver]["objective"]) / abs(best)
            bound = guaranteed_gap(sim, "auction", settings)
            row["auction_bound"] = bound
        out["pairs"].append(row)
        print(f"  pair 0-{e}: " + ", ".join(f"{s} {row[s]['seconds']:.2f} s" for s in solvers), flush=True)
        del sim
    for solver in solvers:
        mean = sum(p[solver]["seconds"] for p in out["pairs"]) / len(out["pairs"])
        out[f"{solver}_mean_s"] = round(mean, 3)
        out[f"{solver}_layer_s_estimate"] = round(mean * out["pairs_per_layer"], 1)
    return out


def alignment_study(args: argparse.Namespace) -> dict:
    """Alignment cost at switch-base-32, Mixtral and DeepSeek widths, per solver (and, for the
    exact solver at switch-base-32 size, per worker count)."""
    shapes = QUICK_ALIGN_SHAPES if args.quick else ALIGN_SHAPES
    device = resolve_device(args.device)
    settings = SolverSettings(args.align_tolerance, args.align_candidates)
    out = {
        "device": str(device),
        "tolerance": settings.tolerance,
        "candidates": settings.candidates,
        "shapes": shapes,
    }
    print(f"alignment cost on {device} (solvers {', '.join(args.align_solvers)}):", flush=True)
    print(
        f" {shapes['switch-base-32'][0]} layers x {shapes['switch-base-32'][1] - 1} pairs of width {shapes['switch-base-32'][3]}",
        flush=True,
    )
    out["switch-base-32"] = align_layers_cost(
        shapes["switch-base-32"], args.align_solvers, args.align_workers, settings, device
    )
    for name in ("mixtral-pair", "deepseek-layer"):
        print(f" {name}: width {shapes[name][3]}", flush=True)
        out[name] = pair_cost(shapes[name], args.align_solvers, args.align_pairs, settings, device)
    return out


def print_table(results: dict) -> None:
    full = results["models"]["full"]
    print()
    print(
        f"{'model':12s} {'latency s':>10s} {'tokens/s':>10s} {'x full':>7s} {'params M':>9s} "
        f"{'peak GiB':>9s} {'disk GiB':>9s} {'disk/full':>9s}"
    )
    for name, m in results["models"].items():
        print(
            f"{name:12s} {m['latency_s']:10.3f} {m['tokens_per_s']:10.1f} "
            f"{m['tokens_per_s'] / full['tokens_per_s']:7.2f} {m['params'] / 1e6:9.1f} "
            f"{m['peak_forward_bytes'] / 2**30:9.2f} {m['bytes_on_disk'] / 2**30:9.2f} "
            f"{m['bytes_on_disk'] / full['bytes_on_disk']:9.3f}"
        )
    c = results["merge_cost_s"]
    print(
        f"\nalign + group + merge of {c['merged_layers']} layers: {c['total']} s "
        f"(align {c['align']}, group {c['group']}, merge {c['merge']})"
    )
    print(f"merged time / dense time: {results['ratios']['merged_time_vs_dense']}")


def print_alignment(study: dict) -> None:
    print(f"\nalignment on {study['device']}: switch-base-32 size, every merged layer")
    for r in study["switch-base-32"]:
        gap = "" if r["relative_gap"] is None else f"  relative gap to exact {r['relative_gap']:.2e}"
        print(f"  {r['solver']:8s} workers {r['workers']:3d}  {r['seconds']:9.2f} s{gap}")
    for name in ("mixtral-pair", "deepseek-layer"):
        c = study[name]
        solvers = [k for k, v in c["pairs"][0].items() if isinstance(v, dict)]
        worst = {s: max(p[s].get("relative_gap", 0.0) for p in c["pairs"]) for s in solvers}
        line = ", ".join(f"{s} {c[f'{s}_mean_s']:.2f} s/pair (worst gap {g:.2e})" for s, g in worst.items())
        print(f"  {name} (width {c['width']}, {c['pairs_per_layer']} pairs a layer): {line}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny dimensions (a smoke run)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128, help="source tokens per sequence")
    p.add_argument("--target-len", type=int, default=16, help="decoder tokens per sequence")
    p.add_argument("--repeats", type=int, default=2, help="timed forwards per model (the best counts)")
    p.add_argument("--profile-samples", type=int, default=64)
    p.add_argument(
        "--num-experts-avg",
        type=int,
        default=None,
        help="experts per merged layer (8 of 32; --quick: 2 of 8)",
    )
    p.add_argument("--router", default="prune", help="router mode of the merged model")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--sparse-ratio", type=float, default=0.1)
    p.add_argument("--scope", default="merged", help="compression scope: merged (the paper) | all")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--device", default="auto", help="where alignment builds similarities and runs the auction"
    )
    p.add_argument(
        "--align-solvers",
        nargs="+",
        default=["exact", "sparse", "auction"],
        help="assignment solvers compared",
    )
    p.add_argument(
        "--align-workers", nargs="+", default=["1", "auto"], help="exact-solver process counts (N or auto)"
    )
    p.add_argument("--align-tolerance", type=float, default=DEFAULT_TOLERANCE, help="auction tolerance")
    p.add_argument(
        "--align-candidates", type=int, default=DEFAULT_CANDIDATES, help="sparse solver: columns kept per row"
    )
    p.add_argument("--align-pairs", type=int, default=4, help="expert pairs timed at Mixtral/DeepSeek width")
    p.add_argument("--align-only", action="store_true", help="only the alignment cost study")
    p.add_argument(
        "--align-study", action="store_true", help="also the alignment cost study (after the models)"
    )
    p.add_argument("--out", default="metrics/benchmark.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from pipeline.compression import SCOPES
    from pipeline.routing import ROUTER_MODES

    try:
        ROUTER_MODES.get(args.router)
        SCOPES.get(args.scope)
        for solver in args.align_solvers:
            SOLVERS.get(solver)
        args.align_workers = [w if w == "auto" else int(w) for w in args.align_workers]
        for w in args.align_workers:
            resolve_workers(w)
        if not 0 < args.align_tolerance < 1 or args.align_pairs < 1 or args.align_candidates < 1:
            raise ValueError("--align-tolerance must be in (0, 1), --align-pairs and --align-candidates >= 1")
        resolve_device(args.device)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if args.num_experts_avg is None:
        args.num_experts_avg = 2 if args.quick else 8
    if args.align_only:
        results = {"alignment": alignment_study(args)}
    else:
        results = run(args)
        if args.align_study:
            results["alignment"] = alignment_study(args)
        print_table(results)
    if "alignment" in results:
        print_alignment(results["alignment"])
    write_results(results, args.out)


if __name__ == "__main__":
    main()
