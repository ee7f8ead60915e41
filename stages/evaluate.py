"""Stage evaluate: full, merged, M-SMoE, MC-SMoE and C-SMoE side by side on the dev split, in one run."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from pipeline.config import flatten
from pipeline.data import DataError, load_prepared
from pipeline.evaluation import evaluate_variant
from pipeline.modeling import CheckpointError, load_model, resolve_device
from stages.common import load, mlflow_run, parser, section, write_json

VARIANTS = ("full", "merged", "m_smoe", "mc_smoe", "c_smoe")


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--data", required=True)
    for v in VARIANTS:
        p.add_argument(f"--{v.replace('_', '-')}", required=True, help=f"{v} model folder")
    args = p.parse_args(argv)
    params = load(args)
    try:
        task = load_prepared(args.data, splits=("dev",))
        device = resolve_device(params.runtime.device)
        folders = {v: Path(getattr(args, v)) for v in VARIANTS}
        models = {v: load_model(f) for v, f in folders.items()}
    except (DataError, CheckpointError, RuntimeError) as err:
        sys.exit(f"error: {err}")
    e = params.evaluate
    results = {}
    with mlflow_run(params, args.params, "evaluate", section(params, "evaluate", "runtime")) as run:
        for v, model in models.items():
            results[v] = evaluate_variant(
                model,
                folders[v],
                task.splits["dev"],
                task.label_token_ids(),
                task.tokenizer.pad_token_id,
                task.metric,
                e.batch_size,
                e.speed_batches,
                device,
                params.runtime.dtype,
            )
            print(f"{v:8s} " + "  ".join(f"{k}={val:.4g}" for k, val in results[v].items()), flush=True)
            run.log_metrics(results[v], prefix=f"{v}.")
        write_json(results, args.metrics)
    # One run per pipeline execution with every param, so runs compare side by side in the MLflow UI.
    all_params = yaml.safe_load(Path(args.params).read_text())
    with mlflow_run(params, args.params, "pipeline", flatten(all_params), run_name="pipeline") as run:
        for v, r in results.items():
            run.log_metrics(r, prefix=f"{v}.")
        run.log_artifact(args.metrics)


if __name__ == "__main__":
    main()
