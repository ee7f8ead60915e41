"""Stage evaluate: full, merged, M-SMoE, MC-SMoE and C-SMoE side by side, in one run.

Classification tasks are scored on ``evaluate.split`` (default: the labelled test split; dev picks
the checkpoints), and ``--predictions`` records which examples each variant got right, for paired
comparisons, with each variant's per-example KL divergence from the full model's class
distribution: how far merging and compression moved the function, even where no prediction flips,
and the full model's accuracy with every expert of the merged layers zeroed (a knock-out: what
those experts are worth at all).
Language-modelling tasks are scored by test perplexity and zero-shot accuracy on the
prepared multiple-choice tasks, by ``evaluate.zero_shot_scorer``: lm-evaluation-harness on the
official files in ``data.data_dir`` (the prepared examples, found at their recorded positions), or
the project's scorer; its name and version are recorded in the metrics and the MLflow run. There
``--predictions`` records each test block's NLL and each zero-shot example's hit per variant.

Beside every accuracy sit its trivial baselines, from the evaluated examples alone
(:mod:`pipeline.trivial_baselines`: majority share, chance, and for multiple choice always-first and
always-shortest), and each variant's paired difference to the majority answer with its 95% interval:
a variant whose interval does not lie above zero is marked ``beats_majority: false`` (in the metrics,
the MLflow run's ``not_above_majority`` tag and the printed table), since always answering the most
frequent label would do as well.

The merged model is also measured under each router mode (``merged_<mode>``): the same experts,
with the router remapped or pruned to one output per group. A full SMoE upcycled from a dense
decoder (``model.upcycle_from``) has that dense model scored beside it (``dense``).
"""

from __future__ import annotations

import copy
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch

from pipeline.baselines import run_intervals
from pipeline.data import DataError, load_prepared, resolve_data_dir
from pipeline.evaluation import evaluate_lm_variant, evaluate_variant, kl_to_reference, lm_predictions
from pipeline.families import adapter_for
from pipeline.knockout import zero_experts
from pipeline.lm_harness import check_prepared_subsets, score_zero_shot, zero_shot_scorer_record
from pipeline.modeling import cast_weights, load_model, resolve_device, save_model
from pipeline.plots import accuracy_vs_size_figure
from pipeline.routing import router_mode_refusals, router_mode_variants
from pipeline.training import check_token_ids, evaluate_accuracy
from pipeline.trivial_baselines import (
    CI_LEVEL,
    choice_baselines,
    choice_majority_correct,
    classification_baselines,
    describe_versus,
    flat_versus,
    majority_correct,
    versus_majority,
)
from stages.common import load, mlflow_run, parser, section, stop_on_bad_input, weights_dtype, write_json
from stages.tracking import repo_root

VARIANTS = ("full", "merged", "m_smoe", "mc_smoe", "c_smoe")


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--data", required=True)
    for v in VARIANTS:
        p.add_argument(f"--{v.replace('_', '-')}", required=True, help=f"{v} model folder")
    p.add_argument("--predictions", default=None, help="JSON of per-example correctness per variant")
    p.add_argument(
        "--intervals",
        default=None,
        help="JSON of each language model's perplexity ratio and zero-shot difference to full, with 95%% CIs",
    )
    args = p.parse_args(argv)
    params = load(args)
    e = params.evaluate
    with stop_on_bad_input():
        task = load_prepared(args.data, splits=())
        split = "test" if task.objective == "lm" else e.split
        task = load_prepared(args.data, splits=(split,))
        device = resolve_device(params.runtime.device)
        folders = {v: Path(getattr(args, v)) for v in VARIANTS}
        models = {v: load_model(f, dtype=weights_dtype(params)) for v, f in folders.items()}
        if task.objective != "lm":
            for m in models.values():
                check_token_ids(m, task.splits[split], task.label_token_ids(), f"the prepared {split} split")
        modes = router_mode_variants(models["merged"], adapter_for(models["merged"]))
        # Modes the family's router semantics does not define (e.g. prune-logsumexp of sigmoid scores).
        refused = router_mode_refusals(models["merged"], adapter_for(models["merged"]))
        # Zero-shot tasks: which scorer, and for lm-eval the official files holding the prepared examples.
        scorer = e.zero_shot_scorer if task.objective == "lm" and task.zero_shot else None
        data_dir = None
        if scorer == "lm-eval":
            data_dir = resolve_data_dir(params.data.data_dir, base=repo_root())
            if data_dir is None:
                raise DataError(
                    "evaluate.zero_shot_scorer=lm-eval reads the official task files: set data.data_dir "
                    "(or $SMOE_DATA_DIR) to their folder, or use evaluate.zero_shot_scorer: project"
                )
            check_prepared_subsets(task.zero_shot, task.zero_shot_indices, data_dir)
        scorer_record = zero_shot_scorer_record(scorer) if scorer else None
        up = params.model.upcycle_from
        if up is not None and task.objective == "lm":
            from pipeline.upcycle_decoder import describe_source, load_dense_decoder

            # The pretrained dense model the full SMoE was upcycled from: the reference row.
            dense = load_dense_decoder(describe_source(up.source))
            if weights_dtype(params) is not None:
                cast_weights(dense, weights_dtype(params), up.source)
            models = {"dense": dense, **models}
    trivial, majority = trivial_baselines(task, split)
    labels = None if task.objective == "lm" else torch.tensor([int(r["label"]) for r in task.splits[split]])
    results, logps, kls, lm_details = {}, {}, {}, {}
    below: list[str] = []  # variants that do not beat their majority baseline
    logged = section(params, "evaluate", "runtime") | (section(params, "data.data_dir") if data_dir else {})
    with (
        tempfile.TemporaryDirectory(prefix="router-modes-") as scratch,
        mlflow_run(params, args.params, "evaluate", logged) as run,
    ):
        if scorer_record:
            run.log_params({"zero_shot_scorer": scorer_record})
            run.set_tags({"zero_shot_scorer": " ".join(scorer_record.values())})
        if trivial:
            print(describe_baselines(trivial), flush=True)
            run.log_metrics(trivial, prefix="baseline.")
        for mode, model in modes.items():
            if mode == "remap":
                continue  # that is the merged model itself
            name = f"merged_{mode.replace('-', '_')}"
            folders[name] = Path(scratch) / name  # saved only to measure its bytes on disk
            save_model(model, folders[name])
            models[name] = model
        if "dense" in models:
            # A stock checkpoint (no SMoE layer to describe), saved only to measure its bytes on disk.
            folders["dense"] = Path(scratch) / "dense"
            models["dense"].save_pretrained(str(folders["dense"]), safe_serialization=True)
        for v, model in models.items():
            if task.objective == "lm":
                results[v], lm_details[v] = evaluate_lm_variant(
                    model,
                    folders[v],
                    task,
                    e.batch_size,
                    e.speed_batches,
                    device,
                    params.runtime.dtype,
                    zero_shot=partial(
                        score_zero_shot,
                        task=task,
                        scorer=scorer,
                        batch_size=e.batch_size,
                        device=device,
                        dtype=params.runtime.dtype,
                        data_dir=data_dir,
                    ),
                    dense=v == "dense",
                )
            else:
                results[v], logps[v] = evaluate_variant(
                    model,
                    folders[v],
                    task.splits[split],
                    task.label_token_ids(),
                    task.tokenizer.pad_token_id,
                    task.metric,
                    e.batch_size,
                    e.speed_batches,
                    device,
                    params.runtime.dtype,
                )
            if v in logps and "full" in logps:
                kls[v] = kl_to_reference(logps["full"], logps[v])
                results[v]["kl_to_full"] = float(kls[v].mean())
                results[v]["agreement_with_full"] = float(
                    (logps[v].argmax(-1) == logps["full"].argmax(-1)).float().mean()
                )
            if v == "full" and v in logps:
                adapter = adapter_for(models["merged"])
                merged_layers = {
                    ly.name for ly in adapter.sparse_layers(models["merged"]) if adapter.merged_routing(ly)
                }
                knocked = copy.deepcopy(model)
                zero_experts(knocked, adapter_for(knocked), merged_layers)
                results[v]["accuracy_merged_layers_zeroed"] = evaluate_accuracy(
                    knocked,
                    task.splits[split],
                    task.label_token_ids(),
                    task.tokenizer.pad_token_id,
                    e.batch_size,
                    device,
                    params.runtime.dtype,
                )
                del knocked
            print(f"{v:8s} " + "  ".join(f"{k}={val:.4g}" for k, val in results[v].items()), flush=True)
            if v in logps:
                correct = (logps[v].argmax(-1) == labels).numpy().astype(np.int8)
            else:
                correct = lm_details[v]["zero_shot"] if v in lm_details else None
            flags = versus_baselines(v, results[v], trivial, majority, correct)
            if flags is not None and not flags:
                below.append(v)
            run.log_metrics(results[v], prefix=f"{v}.")
            if flags is not None:
                run.log_metrics({"beats_majority": float(flags)}, prefix=f"{v}.")
        # The scorer once, beside the variants: every zero-shot figure in the file is its.
        records = {"zero_shot_scorer": scorer_record} if scorer_record else {}
        if trivial:
            records["trivial_baselines"] = trivial
            run.set_tags({"not_above_majority": ", ".join(below) or "none"})
            if below:
                print(
                    "warning: not above the majority baseline (always the most frequent answer does as "
                    "well, within the 95% interval): " + ", ".join(below),
                    flush=True,
                )
        if refused:
            records["router_modes_refused"] = refused
            print("router modes not defined for this family: " + "; ".join(refused.values()), flush=True)
        write_json({**results, **records}, args.metrics)
        if args.predictions and lm_details:
            write_json(lm_predictions(lm_details), args.predictions)
        if args.intervals and lm_details:
            intervals = run_intervals(lm_predictions(lm_details), "full")
            for v, iv in intervals.items():
                ratio, acc = iv["perplexity_ratio"], iv.get("mean_accuracy_points")
                print(
                    f"{v:8s} vs full: perplexity x{ratio['ratio']:.3f} [{ratio['low']:.3f}, {ratio['high']:.3f}]"
                    + (
                        f"  zero-shot {acc['diff']:+.1f} [{acc['low']:+.1f}, {acc['high']:+.1f}] points"
                        if acc
                        else ""
                    ),
                    flush=True,
                )
            write_json(intervals, args.intervals)
        if args.predictions and logps:
            rows = task.splits[split]
            write_json(
                {
                    "split": split,
                    "n": len(rows),
                    "correct": {
                        v: "".join("1" if c else "0" for c in (lp.argmax(-1) == labels).tolist())
                        for v, lp in logps.items()
                    },
                    # nats, rounded: enough to compare means over thousands of examples.
                    "kl_to_full": {
                        v: [round(x, 6) for x in kl.tolist()] for v, kl in kls.items() if v != "full"
                    },
                },
                args.predictions,
            )
        # The variant x metric table, on this run and on the pipeline execution's parent run
        # (where the experiment page shows the headline metrics as columns).
        table = [
            {"variant": v, **{k: x for k, x in r.items() if isinstance(x, (int, float))}}
            for v, r in results.items()
        ]
        headline = {
            f"{v}.{k}": x for row in table for v in [row["variant"]] for k, x in row.items() if k != "variant"
        }
        run.log_summary(table, headline, accuracy_vs_size_figure(results))


def trivial_baselines(task, split: str) -> tuple[dict, dict | np.ndarray]:
    """The evaluated examples' trivial baselines (the metrics file's ``trivial_baselines`` record)
    and the majority answer's per-example correctness (per zero-shot task for a language model)."""
    if task.objective == "lm":
        baselines = {name: choice_baselines(ex) for name, ex in task.zero_shot.items()}
        return baselines, {name: choice_majority_correct(ex) for name, ex in task.zero_shot.items()}
    labels = [int(r["label"]) for r in task.splits[split]]
    baselines = classification_baselines(labels, len(task.label_words), task.label_words)
    return {"split": split, **baselines, "level": CI_LEVEL}, majority_correct(labels)


def describe_baselines(trivial: dict) -> str:
    """The trivial baselines, one line per evaluated set, for the printed table."""
    if "majority" in trivial:  # one classification split
        return (
            f"trivial baselines on the {trivial['split']} split ({trivial['examples']} examples): majority "
            f"{100 * trivial['majority']:.2f}% (always {trivial['majority_label']!r}), chance "
            f"{100 * trivial['chance']:.2f}%"
        )
    return "\n".join(
        f"trivial baselines of {name} ({b['examples']} examples): majority {100 * b['majority']:.2f}% "
        f"(always choice {b['majority_label']}), chance {100 * b['chance']:.2f}%, always first "
        f"{100 * b['first_choice']:.2f}%, always shortest {100 * b['shortest_choice']:.2f}%"
        for name, b in trivial.items()
    )


def versus_baselines(
    variant: str, result: dict, trivial: dict, majority: dict | np.ndarray, correct: dict | np.ndarray | None
) -> bool | None:
    """Add a variant's paired difference to the majority answer to its ``result`` and print it.

    ``correct``: its per-example correctness on the classification split, or its hits per zero-shot
    task. Returns whether it beats the majority baseline (on every zero-shot task), None where
    nothing was scored against one.
    """
    if correct is None or not trivial:
        return None
    if isinstance(correct, np.ndarray):
        versus = versus_majority(correct, majority)
        result.update(flat_versus("", versus))
        print("  " + describe_versus(variant, float(correct.mean()), trivial, versus), flush=True)
        return versus["beats_majority"]
    beaten = []
    for name, hits in correct.items():
        hits = np.asarray(hits, dtype=np.int8)
        versus = versus_majority(hits, majority[name])
        result.update(flat_versus(f"{name}_", versus))
        print(
            "  " + describe_versus(f"{variant} on {name}", float(hits.mean()), trivial[name], versus),
            flush=True,
        )
        beaten.append(versus["beats_majority"])
    if not beaten:
        return None
    result["beats_majority"] = all(beaten)
    return result["beats_majority"]


if __name__ == "__main__":
    main()
