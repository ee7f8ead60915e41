"""Stage group: a budget of groups per layer, globally by usage; group.method fills it (m-smoe: the most
used experts lead and every other expert joins its most similar one)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from pipeline.families import adapter_for
from pipeline.grouping import PROFILE_ONLY_SIMILARITIES, group_model
from pipeline.modeling import atomic_dir, load_model
from pipeline.plots import plot_groups
from pipeline.profiling import load_profile
from pipeline.streaming import meta_model_of
from stages.common import load, mlflow_run, parser, section, stop_on_bad_input, weights_dtype, write_json


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True, help="aligned model")
    p.add_argument("--profile", required=True)
    p.add_argument("--out", required=True, help="folder for groups.json")
    p.add_argument("--plot", default=None, help="PNG of the groups per layer")
    args = p.parse_args(argv)
    params = load(args)
    g, t0 = params.group, time.time()
    with stop_on_bad_input():
        if params.runtime.streaming and g.similarity in PROFILE_ONLY_SIMILARITIES:
            # Nothing but the layers' names and expert counts is read from the model.
            model = meta_model_of(args.model)
        else:
            model = load_model(args.model, dtype=weights_dtype(params))
        profiles = load_profile(Path(args.profile), model)
    adapter = adapter_for(model)
    layers = adapter.sparse_layers(model)
    n_exp = {ly.name: adapter.num_experts(ly) for ly in layers}
    # Grouping is cheap: do it (and fail on an impossible budget) before anything is logged or written.
    try:
        groups = group_model(adapter, layers, profiles, g, params.merge_seed)
    except ValueError as err:
        sys.exit(f"error: group: {err}")
    with mlflow_run(params, args.params, "group", section(params, "merge_seed", "group")) as run:
        with atomic_dir(args.out) as tmp:
            (tmp / "groups.json").write_text(json.dumps(groups, indent=1))
        if args.plot:
            plot = Path(args.plot)
            plot.parent.mkdir(parents=True, exist_ok=True)
            plot_groups(groups, plot)
            run.log_artifact(plot)
        merged = {n: len(v["groups"]) for n, v in groups["layers"].items() if v["merged"]}
        metrics = {
            "merged_layers": len(merged),
            "experts_before_merged_layers": sum(n_exp[n] for n in merged),
            "experts_after_merged_layers": sum(merged.values()),
            "kept_fraction_merged_layers": round(sum(merged.values()) / sum(n_exp[n] for n in merged), 4),
            "experts_per_layer": {n: len(v["groups"]) for n, v in groups["layers"].items()},
            # Experts each reduced layer keeps, whichever the method (task-specific: after KD).
            "budget": {n: v["budget"] for n, v in groups["layers"].items() if v["merged"]},
            # Budget left unspent because only unused experts were left (group.dominant_unused).
            "budget_unspent": groups["budget_unspent"],
            "seconds": round(time.time() - t0, 2),
        }
        run.log_metrics(metrics)
        write_json(metrics, args.metrics)


if __name__ == "__main__":
    main()
