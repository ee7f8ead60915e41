"""Stage merge: each group of (aligned) experts becomes one expert (``merge.strategy``: usage-weighted
average by default; ``dominant``, ``zipit`` and the others of pipeline.merging), optionally followed
by REPAIR (``merge.repair``).

Also measures the stable rank of each dominant expert before and after merging (paper Figure 4) and,
with REPAIR, how far merging moved the merged neurons' pre-activation mean and std from their
members' (before and after the repair).
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.analysis import dominant_experts, expert_stable_ranks, stable_rank_change
from pipeline.data import load_tokenizer, read_json
from pipeline.evaluation import expert_stats
from pipeline.expert_pruning import BUDGET_FILE
from pipeline.families import adapter_for
from pipeline.grouping import validate_groups
from pipeline.merging import merge_model
from pipeline.modeling import atomic_dir, count_unique_params, load_model, save_model
from pipeline.plots import plot_stable_rank_change
from pipeline.profiling import load_profile
from pipeline.streaming import meta_model_of, stream_merge
from stages.common import (
    lineage,
    load,
    mlflow_run,
    parser,
    section,
    stop_on_bad_input,
    weights_dtype,
    write_json,
)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True, help="aligned model")
    p.add_argument("--profile", required=True)
    p.add_argument("--groups", required=True, help="groups.json from the group stage")
    p.add_argument("--out", required=True)
    p.add_argument("--plot", default=None, help="PNG of the stable-rank change per merged layer")
    args = p.parse_args(argv)
    params = load(args)
    t0 = time.time()
    if params.runtime.streaming:
        return _streamed(args, params, t0)
    with stop_on_bad_input():
        model = load_model(args.model, dtype=weights_dtype(params))
        profiles = load_profile(Path(args.profile), model)
        groups = read_json(Path(args.groups), "expert groups")
        adapter = adapter_for(model)
        validate_groups(groups, {ly.name: adapter.num_experts(ly) for ly in adapter.sparse_layers(model)})
        tokenizer = load_tokenizer(args.model)
    with mlflow_run(params, args.params, "merge", section(params, "merge")) as run:
        budget = {n: g["budget"] for n, g in groups["layers"].items() if g["merged"] and "budget" in g}
        dominant = dominant_experts(groups)
        before = expert_stable_ranks(model, adapter, dominant)
        report = merge_model(model, adapter, groups, profiles, params.merge.strategy, params.merge.repair)
        # After merging, group g of a layer is its expert g, and groups list their dominant first.
        after = expert_stable_ranks(model, adapter, {n: list(range(len(d))) for n, d in dominant.items()})
        change = stable_rank_change(before, after)
        with atomic_dir(args.out) as tmp:
            save_model(
                model,
                tmp,
                params=lineage(params, ("profile", "group", "merge"), args.model),
                tokenizer=tokenizer,
                # What KD's task-specific pruning must reach (every method records its budget).
                extra={"merge_report.json": report, BUDGET_FILE: budget},
            )
        metrics = {
            **expert_stats(model),
            "params_total": count_unique_params(model),
            "seconds": round(time.time() - t0, 2),
            "stable_rank": {n: {k: round(v, 4) for k, v in c.items()} for n, c in change.items()},
        }
        # Per merged layer: mean |delta mu|, |delta sigma| and std ratio of the merged neurons'
        # pre-activations against their members' (REPAIR's targets), before and after repair.
        shift = {n: r["preactivation_shift"] for n, r in report.items() if "preactivation_shift" in r}
        if shift:
            metrics["preactivation_shift"] = shift
        # Always-on shared experts (Qwen2-MoE, DeepSeek, Llama 4, ...) are not merged: say so.
        shared = {ly.name: s for ly in adapter.sparse_layers(model) if (s := adapter.shared_experts(ly))}
        if shared:
            metrics["shared_expert_params_untouched"] = sum(sum(s.values()) for s in shared.values())
        if args.plot:
            plot = Path(args.plot)
            plot.parent.mkdir(parents=True, exist_ok=True)
            plot_stable_rank_change(change, plot)
            run.log_artifact(plot)
        run.log_metrics(metrics)
        write_json(metrics, args.metrics)


def _streamed(args, params, t0: float) -> None:
    """runtime.streaming: the aligned checkpoint merged one SMoE layer at a time. The parameter
    counts come from the result's shapes; stable_rank (each dominant expert's weights before and
    after) is not measured."""
    m = params.merge
    with stop_on_bad_input():
        groups = read_json(Path(args.groups), "expert groups")
    budget = {n: g["budget"] for n, g in groups["layers"].items() if g["merged"] and "budget" in g}

    def files(report: dict) -> dict:
        merged = {n: e["merge"] for n, e in report["layers"].items() if "merge" in e}
        return {"merge_report.json": merged, BUDGET_FILE: budget}

    with mlflow_run(params, args.params, "merge", section(params, "merge")) as run:
        with stop_on_bad_input():
            report = stream_merge(
                args.model,
                args.out,
                groups,
                args.profile,
                align="none",
                strategy=m.strategy,
                repair=m.repair,
                params=lineage(params, ("profile", "group", "merge"), args.model),
                extra=files,
                progress=lambda msg: print(msg, flush=True),
            )
        saved = meta_model_of(args.out)
        metrics = {
            **expert_stats(saved),
            "params_total": count_unique_params(saved),
            "seconds": round(time.time() - t0, 2),
        }
        shift = {
            n: e["merge"]["preactivation_shift"]
            for n, e in report["layers"].items()
            if "preactivation_shift" in e.get("merge", {})
        }
        if shift:
            metrics["preactivation_shift"] = shift
        adapter = adapter_for(saved)
        shared = {ly.name: s for ly in adapter.sparse_layers(saved) if (s := adapter.shared_experts(ly))}
        if shared:
            metrics["shared_expert_params_untouched"] = sum(sum(s.values()) for s in shared.values())
        if args.plot:
            # The declared plot still exists, empty: stable ranks are not measured when streaming.
            plot = Path(args.plot)
            plot.parent.mkdir(parents=True, exist_ok=True)
            plot_stable_rank_change({}, plot)
            run.log_artifact(plot)
        run.log_metrics(metrics)
        write_json(metrics, args.metrics)


if __name__ == "__main__":
    main()
