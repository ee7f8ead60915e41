"""Stage merge: each group of (aligned) experts becomes one expert, weighted by usage frequency."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from pipeline.adapters import adapter_for
from pipeline.evaluation import expert_stats
from pipeline.grouping import validate_groups
from pipeline.merging import merge_model
from pipeline.modeling import CheckpointError, atomic_dir, count_unique_params, load_model, save_model
from pipeline.profiling import load_profile
from stages.common import lineage, load, mlflow_run, parser, section, write_json


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True, help="aligned model")
    p.add_argument("--profile", required=True)
    p.add_argument("--groups", required=True, help="groups.json from the group stage")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    params = load(args)
    t0 = time.time()
    try:
        model = load_model(args.model)
        profiles = load_profile(Path(args.profile))
        groups = json.loads(Path(args.groups).read_text())
        adapter = adapter_for(model)
        validate_groups(groups, {ly.name: adapter.num_experts(ly) for ly in adapter.sparse_layers(model)})
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    with mlflow_run(params, args.params, "merge", section(params, "merge")) as run:
        report = merge_model(model, adapter, groups, profiles, params.merge.strategy)
        with atomic_dir(args.out) as tmp:
            save_model(
                model,
                tmp,
                params=lineage(params, ("profile", "group", "merge"), args.model),
                tokenizer=tokenizer,
                extra={"merge_report.json": report},
            )
        metrics = {
            **expert_stats(model),
            "params_total": count_unique_params(model),
            "seconds": round(time.time() - t0, 2),
        }
        run.log_metrics(metrics)
        write_json(metrics, args.metrics)


if __name__ == "__main__":
    main()
