"""Stage compare: dense, MoE and MEO classifiers side by side, in one run.

Each model folder (written by the finetune stage) is scored on ``evaluate.split`` and measured for
size, GFLOPs per sample (torch's counter on the real forward, MEO's weight merges included),
latency and throughput on the same batches. The table groups seeds by (layer kind, k) and gives
paired differences to vanilla MoE at the same k and to the dense model, with bootstrap intervals.
Beside them sit the split's trivial baselines (majority share, chance) and, per model, its paired
difference to always answering the majority label: ``beats_majority: false`` where the 95% interval
does not lie above zero (also the MLflow run's ``not_above_majority`` tag).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import flatten
from pipeline.data import load_prepared
from pipeline.meo_report import comparison_table, evaluate_classifier, read_variant
from pipeline.modeling import resolve_device
from pipeline.plots import accuracy_vs_size_figure
from pipeline.trivial_baselines import (
    CI_LEVEL,
    classification_baselines,
    describe_versus,
    flat_versus,
    majority_correct,
    versus_majority,
)
from pipeline.upcycle import load_classifier
from stages.common import load, mlflow_run, parser, section, stop_on_bad_input, write_json


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="prepared task folder")
    p.add_argument("--models-dir", required=True, help="folder holding one model per params variant")
    p.add_argument("--predictions", default=None, help="JSON of per-example correctness per model")
    args = p.parse_args(argv)
    params = load(args)
    e = params.evaluate
    with stop_on_bad_input():
        task = load_prepared(args.data, splits=(e.split,))
        if not params.variants:
            raise ValueError(
                "compare needs the fine-tuned models listed in params `variants`; there are none"
            )
        folders = {name: Path(args.models_dir) / name for name in params.variants}
        keys = {name: read_variant(f) for name, f in folders.items()}
        device = resolve_device(params.runtime.device)
        rows = task.splits[e.split]
    labels = torch.tensor([int(r["label"]) for r in rows])
    trivial = {
        "split": e.split,
        **classification_baselines(labels.tolist(), len(task.label_words), task.label_words),
        "level": CI_LEVEL,
    }
    majority = majority_correct(labels.tolist())
    results, correct, below = {}, {}, []
    with mlflow_run(
        params, args.params, "compare", section(params, "evaluate", "runtime", "variants")
    ) as run:
        print(
            f"trivial baselines on the {e.split} split ({trivial['examples']} examples): majority "
            f"{100 * trivial['majority']:.2f}% (always {trivial['majority_label']!r}), chance "
            f"{100 * trivial['chance']:.2f}%",
            flush=True,
        )
        run.log_metrics(trivial, prefix="baseline.")
        for name, folder in folders.items():
            with stop_on_bad_input():
                model = load_classifier(folder)
            results[name], logp = evaluate_classifier(
                model,
                folder,
                rows,
                task.tokenizer.pad_token_id,
                e.batch_size,
                e.speed_batches,
                device,
                params.runtime.dtype,
            )
            correct[name] = (logp.argmax(-1) == labels).numpy().astype("int8")
            print(f"{name:24s} " + "  ".join(f"{k}={v:.4g}" for k, v in results[name].items()), flush=True)
            versus = versus_majority(correct[name], majority)
            print("  " + describe_versus(name, float(correct[name].mean()), trivial, versus), flush=True)
            if not versus["beats_majority"]:
                below.append(name)
            results[name].update(keys[name])
            run.log_metrics(results[name], prefix=f"{name}.")
            results[name].update(flat_versus("", versus))
            run.log_metrics(
                {**flat_versus("", versus), "beats_majority": float(versus["beats_majority"])},
                prefix=f"{name}.",
            )
            del model
        run.set_tags({"not_above_majority": ", ".join(below) or "none"})
        if below:
            print(
                "warning: not above the majority baseline (always the most frequent label does as well, "
                "within the 95% interval): " + ", ".join(below),
                flush=True,
            )
        table = comparison_table(results, keys, correct)
        for g, row in table.items():
            run.log_metrics(row, prefix=f"table.{g}.")
        # One row per model of the matrix, on this run and on the pipeline's parent run.
        rows_out = [
            {
                "variant": n,
                **{k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
            }
            for n, r in results.items()
        ]
        headline = {
            f"table.{g}.{k}": v
            for g, row in table.items()
            for k, v in flatten(row).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        run.log_summary(rows_out, headline, accuracy_vs_size_figure(results), name="matrix")
        write_json(
            {
                "split": e.split,
                "n": len(rows),
                "trivial_baselines": trivial,
                "models": results,
                "table": table,
            },
            args.metrics,
        )
        if args.predictions:
            write_json(
                {
                    "split": e.split,
                    "n": len(rows),
                    "correct": {n: "".join(map(str, c.tolist())) for n, c in correct.items()},
                },
                args.predictions,
            )


if __name__ == "__main__":
    main()
