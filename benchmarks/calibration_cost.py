"""Calibration cost of every expert-reduction method of the baselines study, at switch-base-32 size.

Random weights at google/switch-base-32's dimensions (``SWITCH_BASE_32`` of
``benchmarks/switch_base_32.py``: 32 experts, d_model 768, d_ff 3072, an SMoE layer every other
block; 2.0B parameters, about 8 GB in float32). Every method of ``baselines.yaml`` (m-smoe, pruning,
task-specific, averaging, zipit, repair, git-rebasin, reap, hc-smoe) gets the params the study gives
it (``params.yaml`` plus the variant's ``set``), runs the steps the pipeline's stages run for it on
the same model and the same ``--num-samples`` random rows of ``--seq-len`` source and
``--target-len`` target tokens, and each step is measured. One exception to the study's params:
``group.ratio`` is ``uniform`` (``--ratio``), every reduced layer keeping ``--num-experts-avg``
experts, since random weights route near-uniformly and an adaptive budget would follow sampling
noise (a layer left with one group of 32 would make ZipIt's cost explode).

* ``profile`` (``profile_routing``; every expert on every token with ``profile.expert_outputs``,
  REAP and HC-SMoE), ``align`` (``align_model``, every SMoE layer, as ``stages/align.py``),
  ``group`` (``group_model``) and ``merge`` (``merge_model``, with its REPAIR step);
* seconds (``time.perf_counter``);
* peak extra tensor bytes: the most bytes of tensors made inside the step alive at once, counted by
  a TorchDispatchMode (:class:`PeakTensorBytes`, like ``pipeline.evaluation._LiveTensorBytes``),
  and the bytes still alive at its end (the profile, the merged experts). It sees the torch ops of
  the thread it runs in: not numpy/scipy buffers (ZipIt's linkage distances, the assignment
  solver's), nor weight matching's worker threads;
* peak RSS delta: the process's resident-set high-water mark during the step minus its RSS at the
  start (the mark is reset per step through ``/proc/self/clear_refs``; ``resource.getrusage`` reads
  it). It sees scipy's buffers and other threads too, but not memory the allocator hands out again
  from earlier frees.

The key check: REAP's and HC-SMoE's profile peak against the bytes one layer's (experts x tokens x
d_model) float32 tensor would take (E * T * d * 4, T the profiled tokens of the busiest layer; the
reference REAP implementation holds such a tensor). The peak includes the forward's own
activations, so the telling figure is its excess over the plain profile's (``extra_ratio``): far
below 1, no such tensor ever exists.

Task-specific pruning needs only the routing profile: it prunes during KD from an EMA of training
usage (not measured here); its group and merge stages keep every expert. ``merge.router`` (pruning,
REAP) is applied after KD, not during calibration, so it is not measured either.

One model is built, once. Each method's changes are undone in place afterwards: merging builds new
expert modules and never writes into the originals, so the original layers are kept aside and put
back; alignment permutes neurons in place, so its permutations are recorded and inverted, and a
fingerprint of every expert's neuron order checks the result. That costs no second copy of the
model (a deepcopy would take another 8 GB) and no rebuild (about 40 s of random init per method)
or reload (8 GB written to disk and read back per method). While a method runs, its merged experts
sit beside the kept originals, which the merge stage would free: its merge RSS includes them.

A step whose inputs equal an earlier method's (the same profile params; the same align params on
the same profile rows) computes the same thing, so by default it is measured once and its figures
are reported for every method that needs it (``measured_in`` names where; the table marks them
``*``); the alignment is replayed from its recorded permutations. ``--no-reuse`` measures every
step of every method (the full-size run then takes about twice as long).

    python -m benchmarks.calibration_cost                    # full size: ~25-30 min on 2 cores
    # peak RSS ~19 GB with zipit (scipy's linkage of a random group of ~11 experts), ~10 GB without
    python -m benchmarks.calibration_cost --methods m-smoe reap hc-smoe
    python -m benchmarks.calibration_cost --quick --out /tmp/c.json   # tiny dimensions, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from benchmarks.common import write_results
from benchmarks.switch_base_32 import QUICK, SWITCH_BASE_32, build, random_rows
from pipeline.ablations import apply_overrides, load_spec
from pipeline.align import align_model
from pipeline.assignment import SolverSettings
from pipeline.config import Params, ParamsError, parse_params
from pipeline.evaluation import model_memory_bytes
from pipeline.families import MoEAdapter, SparseLayer, adapter_for
from pipeline.grouping import GROUPING_METHODS, group_model, merged_layer_names
from pipeline.merging import merge_model
from pipeline.modeling import count_unique_params
from pipeline.profiling import LayerProfile, profile_gradients, profile_routing

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("profile", "align", "group", "merge")
CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------- measuring


class PeakTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages allocated inside the mode: their peak and what is still alive.

    The same TorchDispatchMode as ``pipeline.evaluation._LiveTensorBytes`` (``peak_forward_memory``),
    which counts the storage of each op output it has not seen and releases it when that output
    tensor object dies. Outside a forward that misses and adds bytes: a new weight wrapped in an
    ``nn.Parameter`` is a second tensor object, so the merged experts count as freed once the
    first one dies; an in-place write into an older tensor (alignment permuting every expert)
    counts that tensor as new. Here each new storage is released when the storage itself dies
    (torch keeps one Python object per storage), and an output sharing an untracked input's
    storage (an in-place result, a view of an older tensor) is not new.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def _release(self, ptr: int) -> None:
        self.live -= self._sizes.pop(ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0 or ptr in self._sizes or ptr in inputs:
                continue
            self._sizes[ptr] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, ptr)
        return out


def _reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _current_rss() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextmanager
def measure_step(figures: dict) -> Iterator[None]:
    """Time the block and fill ``figures`` with its seconds, tensor bytes and peak RSS delta.

    Without a resettable high-water mark the RSS delta is how far the block raised the process's
    lifetime peak (0 when it stayed below it): a lower bound.
    """
    gc.collect()  # garbage of the previous step must not count against this one, nor be freed in it
    start = _current_rss() if _reset_peak_rss() else None
    base = _peak_rss() if start is None else start
    tracker = PeakTensorBytes()
    t0 = time.perf_counter()
    with tracker:
        yield
    seconds = time.perf_counter() - t0
    figures.update(
        seconds=round(seconds, 6),
        peak_tensor_bytes=int(tracker.peak),
        kept_tensor_bytes=int(tracker.live),
        peak_rss_delta_bytes=max(0, _peak_rss() - base),
    )


# ------------------------------------------------------------------------ keeping one model


class _RecordingAdapter:
    """The family adapter, recording every neuron permutation so it can be replayed or undone."""

    def __init__(self, inner: MoEAdapter) -> None:
        self._inner = inner
        self.moves: list[tuple[str, int, torch.Tensor]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def permute_expert(self, layer: SparseLayer, idx: int, perm: torch.Tensor) -> None:
        self._inner.permute_expert(layer, idx, perm)
        self.moves.append((layer.name, idx, perm))


def _apply_moves(model: nn.Module, adapter: MoEAdapter, moves: list, invert: bool = False) -> None:
    layers = {ly.name: ly for ly in adapter.sparse_layers(model)}
    for name, idx, perm in reversed(moves) if invert else moves:
        adapter.permute_expert(layers[name], idx, torch.argsort(perm) if invert else perm)


class ModelSnapshot:
    """The model's SMoE layers as built: put back after a method merged and aligned them."""

    def __init__(self, model: nn.Module, adapter: MoEAdapter) -> None:
        self.model, self.adapter = model, adapter
        self.layers = {ly.name: ly.module for ly in adapter.sparse_layers(model)}
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> dict[str, torch.Tensor]:
        # One weight per hidden neuron of every expert and matrix: it pins down the neuron order
        # (random weights are distinct), at a few MB for the full model.
        out = {}
        axes = self.adapter.neuron_axes
        for ly in self.adapter.sparse_layers(self.model):
            rows = []
            for e in range(self.adapter.num_experts(ly)):
                for k, w in self.adapter.expert_weights(ly, e).items():
                    if axes[k] is not None:
                        rows.append(w.movedim(axes[k], 0).reshape(w.shape[axes[k]], -1)[:, 0].clone())
            out[ly.name] = torch.cat(rows)
        return out

    def restore(self, moves: list) -> None:
        """Put the original layers back and invert ``moves`` (alignment's permutations)."""
        for name, module in self.layers.items():
            if self.model.get_submodule(name) is not module:
                self.model.set_submodule(name, module)
        _apply_moves(self.model, self.adapter, moves, invert=True)
        now = self._fingerprint()
        changed = [n for n, f in self.fingerprint.items() if not torch.equal(now[n], f)]
        if changed:
            raise RuntimeError(f"restoring the model left layers {changed} changed")


# ------------------------------------------------------------------------------- the methods


def load_methods(spec_path: Path, params_path: Path, names: list[str] | None, seed: int) -> dict[str, Params]:
    """Each selected variant's resolved params (``params_path`` plus its overrides), by name.

    Unknown names raise SystemExit naming the valid ones.
    """
    spec = load_spec(spec_path)
    valid = [v.name for v in spec.variants]
    unknown = [n for n in names or [] if n not in valid]
    if unknown:
        raise SystemExit(
            f"error: unknown method{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"valid: {', '.join(valid)}"
        )
    raw = yaml.safe_load(params_path.read_text())
    wanted = [v for v in spec.variants if names is None or v.name in names]
    try:
        return {v.name: parse_params(apply_overrides(raw, spec.overrides(v, seed))) for v in wanted}
    except ParamsError as err:
        raise SystemExit(f"error: {err}") from None


def _settings(p: Params) -> dict[str, Any]:
    return {
        "profile.expert_outputs": p.profile.expert_outputs,
        "align.method": p.align.method,
        "group.method": p.group.method,
        "group.similarity": p.group.similarity,
        "merge.strategy": p.merge.strategy,
        "merge.repair": p.merge.repair,
    }


def _note(p: Params) -> str:
    if not GROUPING_METHODS.get(p.group.method).equal_budget:
        return (
            "needs only the routing profile: it prunes during KD from an EMA of training usage (not "
            "measured); its group and merge stages keep every expert"
        )
    if p.merge.strategy == "dominant" and p.align.method != "none":
        return "align does not change the result (dominant keeps each leader as it is); the pipeline runs it"
    return ""


def _key(*sections: dict) -> str:
    return json.dumps(sections, sort_keys=True)


def calibrate(
    model: nn.Module,
    adapter: MoEAdapter,
    name: str,
    p: Params,
    rows: list[dict],
    cache: dict[str, dict],
    reuse: bool,
) -> tuple[dict[str, dict], list, dict[str, LayerProfile]]:
    """Run and measure one method's calibration steps on ``model`` (changed in place).

    Returns the figures per step, alignment's permutations (to undo) and the profile. ``cache``
    holds the profiles and permutations of steps already measured, by their inputs (with ``reuse``).
    """
    steps: dict[str, dict] = {}
    pp = p.profile
    profile_key = _key(pp.model_dump())
    if reuse and profile_key in cache:
        hit = cache[profile_key]
        profiles, steps["profile"] = hit["profiles"], dict(hit["figures"])
    else:
        figures = {"measured_in": name}
        with measure_step(figures):
            profiles = profile_routing(
                model, rows, 0, pp.batch_size, CPU, pp.max_inputs, expert_outputs=pp.expert_outputs
            )
            if pp.gradients:
                profile_gradients(model, rows, 0, pp.batch_size, CPU, profiles)
        steps["profile"] = figures
        if reuse:
            cache[profile_key] = {"profiles": profiles, "figures": figures}

    if not GROUPING_METHODS.get(p.group.method).equal_budget:
        for step in STEPS[1:]:
            steps[step] = {"skipped": "no calibration: the reduction happens during KD"}
        return steps, [], profiles

    # Align reads only the forward's frequencies and inputs, which expert outputs and gradients
    # do not change.
    align_key = _key(p.align.model_dump(), pp.model_dump(exclude={"expert_outputs", "gradients"}))
    recorder = _RecordingAdapter(adapter)
    if reuse and align_key in cache:
        hit = cache[align_key]
        _apply_moves(model, adapter, hit["moves"])
        moves, steps["align"] = hit["moves"], dict(hit["figures"])
    else:
        figures = {"measured_in": name}
        with measure_step(figures):
            # As stages/align.py: every SMoE layer, the first (never merged) one included.
            align_model(
                model,
                recorder,
                p.align.method,
                p.align.reference,
                {n: prof.frequency for n, prof in profiles.items()},
                {n: prof.inputs for n, prof in profiles.items() if prof.inputs is not None},
                include_wo=p.align.include_wo,
                solver=p.align.solver,
                settings=SolverSettings(p.align.solver_tolerance, p.align.solver_candidates),
                workers=p.align.workers,
                min_gain=p.align.min_gain,
            )
        moves, steps["align"] = recorder.moves, figures
        if reuse:
            cache[align_key] = {"moves": moves, "figures": figures}

    figures = {"measured_in": name}
    with measure_step(figures):
        groups = group_model(adapter, adapter.sparse_layers(model), profiles, p.group, p.merge_seed)
    steps["group"] = figures

    figures = {"measured_in": name}
    with measure_step(figures):
        merge_model(model, adapter, groups, profiles, p.merge.strategy, p.merge.repair)
    steps["merge"] = figures
    return steps, moves, profiles


# ------------------------------------------------------------------------------------ the run


def run(args: argparse.Namespace) -> dict:
    """The whole benchmark; returns what it writes, as a dict."""
    methods = load_methods(Path(args.spec), Path(args.params), args.methods, args.seed)
    config = QUICK if args.quick else SWITCH_BASE_32
    for name, p in methods.items():
        update = {"num_samples": args.num_samples}
        if args.batch_size is not None:
            update["batch_size"] = args.batch_size
        methods[name] = p.model_copy(
            update={
                "profile": p.profile.model_copy(update=update),
                "group": p.group.model_copy(
                    update={"num_experts_avg": args.num_experts_avg, "ratio": args.ratio}
                ),
            }
        )

    t0 = time.perf_counter()
    model = build(config, seed=args.seed)
    adapter = adapter_for(model)
    build_s = time.perf_counter() - t0
    rows = random_rows(
        args.num_samples, args.seq_len, args.target_len, config["vocab_size"], seed=args.seed + 1
    )
    layers = adapter.sparse_layers(model)
    first = next(iter(methods.values())).group
    reduced = merged_layer_names([(ly.name, ly.stack) for ly in layers], first.skip_first_layer, first.layers)
    results: dict = {
        "config": {
            **{k: config[k] for k in ("d_model", "d_ff", "num_layers", "num_decoder_layers", "num_experts")},
            "params": count_unique_params(model),
            "model_memory_bytes": model_memory_bytes(model),
            "smoe_layers": len(layers),
            "reduced_layers": len(reduced),
            "num_experts_avg": args.num_experts_avg,
            "group_ratio": args.ratio,
            "num_samples": args.num_samples,
            "seq_len": args.seq_len,
            "target_len": args.target_len,
            "profile_batch_size": next(iter(methods.values())).profile.batch_size,
            "seed": args.seed,
            "reuse": not args.no_reuse,
            "rss_peak_reset": _reset_peak_rss(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "build_s": round(build_s, 2),
        },
        "notes": {
            "seconds": "time.perf_counter of the step (inside the tensor tracker)",
            "peak_tensor_bytes": "most bytes of tensors made in the step alive at once (its thread's torch ops only)",
            "kept_tensor_bytes": "of those, the bytes still alive when the step ended (profile, merged experts)",
            "peak_rss_delta_bytes": "resident-set high-water mark during the step minus RSS at its start",
            "measured_in": "the method whose identical step was measured (reused figures)",
            "total_s": "the method's steps' seconds, reused ones included",
            "merge": "merged experts sit beside the kept originals (the merge stage frees those)",
        },
        "methods": {},
    }
    print(
        f"built {results['config']['params'] / 1e9:.3f} B params "
        f"({_fmt_bytes(results['config']['model_memory_bytes'])}B) in {build_s:.1f} s; "
        f"{len(reduced)} of {len(layers)} SMoE layers reduced to {args.num_experts_avg} experts "
        f"({args.ratio}); {args.num_samples} rows x {args.seq_len} + {args.target_len} tokens",
        flush=True,
    )

    # The process's first forward pays one-off costs (allocator growth, kernel selection) that
    # would otherwise land on whichever method profiles first.
    warm = results["config"]["profile_batch_size"]
    profile_routing(model, rows[:warm], 0, warm, CPU, 1)
    snapshot = ModelSnapshot(model, adapter)
    cache: dict[str, dict] = {}
    tokens: dict[str, int] = {}
    # Each step starts with a full collection; with the model and the imported libraries moved out
    # of gc's reach it takes milliseconds instead of a third of a second.
    gc.collect()
    gc.freeze()
    try:
        for name, p in methods.items():
            results["methods"][name], profiled = _run_method(
                model, adapter, snapshot, name, p, rows, cache, args
            )
            tokens = tokens or profiled
    finally:
        gc.unfreeze()
    results["config"]["profiled_tokens_per_layer"] = tokens
    results["expert_outputs_check"] = expert_outputs_check(results, methods, config, max(tokens.values()))
    return results


def _run_method(
    model: nn.Module,
    adapter: MoEAdapter,
    snapshot: ModelSnapshot,
    name: str,
    p: Params,
    rows: list[dict],
    cache: dict[str, dict],
    args: argparse.Namespace,
) -> tuple[dict, dict[str, int]]:
    """One method's figures, the model restored after it; and the tokens its profile saw per layer."""
    steps, moves, profiles = calibrate(model, adapter, name, p, rows, cache, reuse=not args.no_reuse)
    tokens = {n: prof.tokens for n, prof in profiles.items()}
    del profiles
    snapshot.restore(moves)
    gc.collect()
    measured = [s for s in steps.values() if "seconds" in s]
    cells = "  ".join(
        f"{step} {s['seconds']:.3f} s {_fmt_bytes(s['peak_tensor_bytes'])}B"
        + ("*" if s["measured_in"] != name else "")
        for step, s in steps.items()
        if "seconds" in s
    )
    print(f"  {name:14s} {cells}", flush=True)
    figures = {
        "settings": _settings(p),
        "note": _note(p),
        "steps": steps,
        "total_s": round(sum(s["seconds"] for s in measured), 6),
        "peak_tensor_bytes": max(s["peak_tensor_bytes"] for s in measured),
        "peak_rss_delta_bytes": max(s["peak_rss_delta_bytes"] for s in measured),
    }
    return figures, tokens


def expert_outputs_check(results: dict, methods: dict[str, Params], config: dict, tokens: int) -> dict:
    """Each expert-output profile's peak against one layer's ``[E, T, d]`` float32 tensor."""
    e, d = config["num_experts"], config["d_model"]
    full = e * tokens * d * 4
    out: dict[str, Any] = {"experts": e, "tokens": tokens, "d_model": d, "one_layer_ETd_float32_bytes": full}
    plain = [
        results["methods"][n]["steps"]["profile"]["peak_tensor_bytes"]
        for n, p in methods.items()
        if not p.profile.expert_outputs
    ]
    out["plain_profile_peak_tensor_bytes"] = plain[0] if plain else None
    out["methods"] = {}
    for name, p in methods.items():
        if p.profile.expert_outputs:
            prof = results["methods"][name]["steps"]["profile"]
            c = {
                "profile_peak_tensor_bytes": prof["peak_tensor_bytes"],
                "tensor_ratio": round(prof["peak_tensor_bytes"] / full, 4),
                "profile_peak_rss_delta_bytes": prof["peak_rss_delta_bytes"],
                "rss_ratio": round(prof["peak_rss_delta_bytes"] / full, 4),
            }
            if plain:
                # What running every expert on every token adds to the forward's own activations.
                c["extra_over_plain_profile_bytes"] = prof["peak_tensor_bytes"] - plain[0]
                c["extra_ratio"] = round(c["extra_over_plain_profile_bytes"] / full, 4)
            out["methods"][name] = c
    return out


# ---------------------------------------------------------------------------------- reporting


def _fmt_bytes(n: float) -> str:
    """Binary units, to be followed by ``B``: ``512 ``, ``1.5 Ki``, ``3.2 Gi``."""
    unit = ""
    for bigger in ("Ki", "Mi", "Gi"):
        if n < 1024:
            break
        n, unit = n / 1024, bigger
    return f"{n:.1f} {unit}" if unit else f"{n:.0f} "


def print_table(results: dict) -> None:
    """Seconds, then peak tensor bytes / peak RSS delta, per method and step."""

    def cell(name: str, s: dict, text: str) -> str:
        if "skipped" in s:
            return "-"
        return text + ("*" if s["measured_in"] != name else "")

    methods = results["methods"]
    print(f"\n{'seconds':14s}" + "".join(f"{s:>11s}" for s in STEPS) + f"{'total':>11s}")
    for name, m in methods.items():
        cells = [cell(name, m["steps"][s], f"{m['steps'][s].get('seconds', 0):.3f}") for s in STEPS]
        print(f"{name:14s}" + "".join(f"{c:>11s}" for c in cells) + f"{m['total_s']:11.3f}")
    print(f"\n{'peak tensors / RSS delta':24s}" + "".join(f"{s:>22s}" for s in STEPS))
    for name, m in methods.items():
        cells = [
            cell(
                name,
                m["steps"][s],
                f"{_fmt_bytes(m['steps'][s].get('peak_tensor_bytes', 0))}B / "
                f"{_fmt_bytes(m['steps'][s].get('peak_rss_delta_bytes', 0))}B",
            )
            for s in STEPS
        ]
        print(f"{name:24s}" + "".join(f"{c:>22s}" for c in cells))
    print("* measured once, in an earlier method's identical step;  - not needed")
    for name, m in methods.items():
        if m["note"]:
            print(f"{name}: {m['note']}")
    check = results["expert_outputs_check"]
    print(
        f"\none layer's [E, T, d] float32 expert outputs: E {check['experts']} x T {check['tokens']} x "
        f"d {check['d_model']} x 4 = {_fmt_bytes(check['one_layer_ETd_float32_bytes'])}B"
    )
    for name, c in check["methods"].items():
        extra = ""
        if "extra_ratio" in c:
            extra = (
                f"; {c['extra_over_plain_profile_bytes']:+,d} B over the plain profile's "
                f"{_fmt_bytes(check['plain_profile_peak_tensor_bytes'])}B = {c['extra_ratio']:.3f}x"
            )
        print(
            f"  {name:8s} profile peak {_fmt_bytes(c['profile_peak_tensor_bytes'])}B of tensors = "
            f"{c['tensor_ratio']:.3f}x, RSS +{_fmt_bytes(c['profile_peak_rss_delta_bytes'])}B = "
            f"{c['rss_ratio']:.3f}x{extra}"
        )


def main(argv: list[str] | None = None) -> None:
    """Command line: parse, check, run, print the tables and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny dimensions (a smoke run)")
    p.add_argument("--methods", nargs="+", default=None, help="a subset of baselines.yaml's variants")
    p.add_argument("--num-samples", type=int, default=None, help="profiled rows (64; --quick: 16)")
    p.add_argument("--seq-len", type=int, default=None, help="source tokens per row (128; --quick: 32)")
    p.add_argument("--target-len", type=int, default=None, help="decoder tokens per row (16; --quick: 8)")
    p.add_argument("--batch-size", type=int, default=None, help="profile batch size (profile.batch_size)")
    p.add_argument(
        "--num-experts-avg",
        type=int,
        default=None,
        help="experts per reduced layer (8 of 32; --quick: 2 of 8)",
    )
    p.add_argument(
        "--ratio",
        choices=("uniform", "adaptive"),
        default="uniform",
        help="group.ratio: random weights route near-uniformly, so adaptive budgets follow sampling noise",
    )
    p.add_argument("--seed", type=int, default=0, help="model weights, rows (seed + 1) and merge_seed")
    p.add_argument("--no-reuse", action="store_true", help="measure every step of every method")
    p.add_argument("--spec", default=str(ROOT / "baselines.yaml"))
    p.add_argument("--params", default=str(ROOT / "params.yaml"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="metrics/calibration_cost.json")
    args = p.parse_args(argv)
    if args.methods is not None:
        # "a b", "a,b" and repeats all name the same subset (run in baselines.yaml's order).
        args.methods = list(dict.fromkeys(m for a in args.methods for m in a.split(",") if m))
        if not args.methods:
            raise SystemExit("error: --methods names no method")
    if args.batch_size is not None and args.batch_size < 1:
        raise SystemExit("error: --batch-size must be at least 1")
    defaults = (16, 32, 8, 2) if args.quick else (64, 128, 16, 8)
    for attr, value in zip(
        ("num_samples", "seq_len", "target_len", "num_experts_avg"), defaults, strict=True
    ):
        if getattr(args, attr) is None:
            setattr(args, attr, value)
        if getattr(args, attr) < 1:
            raise SystemExit(f"error: --{attr.replace('_', '-')} must be at least 1")
    n_experts = (QUICK if args.quick else SWITCH_BASE_32)["num_experts"]
    if args.num_experts_avg > n_experts:
        raise SystemExit(
            f"error: --num-experts-avg {args.num_experts_avg} exceeds the {n_experts} experts per layer"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args)  # it checks the methods and their params before it builds the model
    print_table(results)
    write_results(results, args.out)


if __name__ == "__main__":
    main()
