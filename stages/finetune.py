"""Stage finetune: build (from config) or load (checkpoint) the SMoE and fine-tune it on the task.

Language-modelling tasks train next-token prediction; with ``zero_shot: true`` the checkpoint is
saved as it is, untrained (the paper's decoder setting).

A classifier's selected checkpoint is checked against the dev split's majority baseline (always
the most frequent label): one that does not beat it (paired 95% interval) is a warning, or with
``finetune.require_above_baseline: true`` an error before anything is written.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import ParamsError, with_overrides
from pipeline.data import load_prepared
from pipeline.distributed import LauncherError, launched_accelerator
from pipeline.modeling import (
    atomic_dir,
    build_model,
    cast_weights,
    count_unique_params,
    float32_master_weights,
    floating_dtype,
    load_model,
    resolve_device,
    save_model,
    transfer_embeddings,
)
from pipeline.training import TrainSettings, correct_per_example, dev_metric_for, train
from pipeline.trivial_baselines import (
    classification_baselines,
    majority_correct,
    versus_majority,
)
from stages.common import (
    checkpointing,
    dump_yaml,
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
    p.add_argument("--data", required=True, help="prepared task folder")
    p.add_argument("--out", required=True, help="folder for the fine-tuned model")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="params overrides (one model of a matrix, e.g. upcycle.layer=moe seed=1)",
    )
    args = p.parse_args(argv)
    params = load(args)
    if args.set:
        with stop_on_bad_input(ParamsError):
            params = with_overrides(params, args.set)
    t0 = time.time()
    with stop_on_bad_input():
        task = load_prepared(args.data)
        tok = task.tokenizer
        m = params.model
        up = params.upcycle
        if up is not None:
            from pipeline.upcycle import load_dense_classifier, upcycle

            model = load_dense_classifier(m.name_or_path, len(task.label_words), params.seed)
            upcycle(
                model,
                up.layer,
                up.num_experts,
                up.top_k,
                up.granularity,
                up.bias,
                up.gate_noise,
                up.token_block_ratio,
                up.merge_chunk,
            )
        elif m.upcycle_from is not None:
            from pipeline.upcycle_decoder import describe_source, load_dense_decoder, upcycle_decoder

            source = describe_source(m.upcycle_from.source)
            u = m.upcycle_from
            model = upcycle_decoder(
                load_dense_decoder(source), u.layers, u.num_experts, u.top_k, m.router_init_std, params.seed
            )
        elif m.name_or_path:
            model = load_model(m.name_or_path, trust_remote_code=m.trust_remote_code)
        else:
            model = build_model(
                m.family,
                m.config,
                len(tok),
                tok.pad_token_id,
                tok.eos_token_id,
                m.router_init_std,
                params.seed,
            )
            if m.init_embeddings_from:
                print("embeddings:", transfer_embeddings(model, tok, m.init_embeddings_from), flush=True)
        if weights_dtype(params) is not None:
            cast_weights(model, weights_dtype(params), "the model to fine-tune")
        storage = floating_dtype(model)
        device = resolve_device(params.runtime.device)
    ft = params.finetune
    # Under accelerate launch: one process per device; only the main one writes.
    with stop_on_bad_input(LauncherError):
        acc = launched_accelerator(params.launch.launcher, device, ("finetune.batch_size", ft.batch_size))
    if acc is not None:
        device = acc.device
    main_process = acc is None or acc.is_main_process
    settings = TrainSettings(**ft.model_dump(exclude={"require_above_baseline"}))
    keys = ("seed", "zero_shot", "model", "runtime", "finetune") + (("upcycle",) if up else ())
    made_by = lineage(params, keys, args.data)
    # One model of a matrix is told apart from its siblings in the MLflow UI by its output folder.
    run_name = f"finetune {Path(args.out).name}" if args.set else None
    with mlflow_run(params, args.params, "finetune", section(params, *keys), run_name=run_name) as run:
        dev = dev_metric_for(task, "dev", ft.eval_batch_size, device, params.runtime.dtype)
        if params.zero_shot:
            model.to(device)
            summary = {
                f"best_dev_{dev.name}": dev.compute(model),
                "best_step": 0,
                "total_steps": 0,
                "history": [],
            }
            ckpt = None
        else:
            # The weights it starts from: a resumed checkpoint must have started from the same ones.
            inputs = [args.data] + ([m.name_or_path] if m.name_or_path else [])
            if m.upcycle_from is not None:
                inputs.append(source.path)
            ckpt = checkpointing(params, args.out, made_by, *inputs)
            with stop_on_bad_input(), float32_master_weights(model):
                summary = train(
                    model,
                    task.splits["train"],
                    task.splits["dev"],
                    task.label_token_ids() if task.objective != "lm" else [],
                    tok.pad_token_id,
                    settings,
                    device,
                    params.runtime.dtype,
                    seed=params.seed,
                    log=run.log_metrics,
                    dev_metric=dev,
                    checkpointing=ckpt,
                    accelerator=acc,
                )
            model = summary.pop("model", model)  # FSDP/DeepSpeed: the gathered weights
        if not main_process:
            return
        baseline = None
        if task.objective != "lm":
            baseline = check_above_baseline(
                model, task, ft.eval_batch_size, device, params.runtime.dtype, ft.require_above_baseline
            )
            if not baseline["beats_majority"] and ft.require_above_baseline:
                if ckpt is not None:
                    ckpt.clear()  # training is over: a resume would only reach the same checkpoint
                sys.exit(f"error: {baseline['message']}")
        if storage != torch.float32:
            # Stock routers computing in float32 (Switch) cast themselves there at each forward.
            cast_weights(model, storage, "the fine-tuned model")
        with atomic_dir(args.out) as tmp:
            if up is not None and up.layer == "dense":
                # No SMoE layer to describe: a stock checkpoint with its params beside it.
                model.cpu().save_pretrained(str(tmp), safe_serialization=True)
                tok.save_pretrained(str(tmp))
                (tmp / "params.yaml").write_text(dump_yaml(made_by))
            else:
                save_model(model.cpu(), tmp, params=made_by, tokenizer=tok)
        if ckpt is not None:
            ckpt.clear()
        metrics = {
            task.metric: summary[f"best_dev_{dev.name}"],
            "best_step": summary["best_step"],
            "total_steps": summary["total_steps"],
            "params_total": count_unique_params(model),
            "seconds": round(time.time() - t0, 1),
        }
        if baseline is not None:
            metrics["majority_baseline"] = baseline["majority"]
            metrics["beats_majority"] = baseline["beats_majority"]
            run.log_metrics({"beats_majority": float(baseline["beats_majority"])})
        run.log_metrics(metrics)
        write_json({**metrics, "history": summary["history"]}, args.metrics)


def check_above_baseline(model, task, batch_size: int, device, dtype: str, required: bool) -> dict:
    """The selected classifier against the dev split's majority baseline: its share, whether the
    model beats it (paired 95% interval above zero) and, where it does not, the one-line message,
    printed here as a warning unless ``required`` (then the caller stops with it)."""
    rows = task.splits["dev"]
    labels = [int(r["label"]) for r in rows]
    correct = np.asarray(
        correct_per_example(
            model.to(device),
            rows,
            task.label_token_ids(),
            task.tokenizer.pad_token_id,
            batch_size,
            device,
            dtype,
        ),
        dtype=np.int8,
    )
    majority = classification_baselines(labels, len(task.label_words), task.label_words)
    versus = versus_majority(correct, majority_correct(labels))
    out = {"majority": majority["majority"], "beats_majority": versus["beats_majority"]}
    if not versus["beats_majority"]:
        out["message"] = (
            f"the selected checkpoint's dev accuracy {100 * correct.mean():.2f}% does not beat the majority "
            f"baseline {100 * majority['majority']:.2f}% (always {majority['majority_label']!r}, "
            f"{majority['examples']} dev examples; difference {100 * versus['diff']:+.2f} points, "
            f"{100 * versus['level']:g}% CI [{100 * versus['low']:+.2f}, {100 * versus['high']:+.2f}]): "
            "it may always answer one class; set finetune.require_above_baseline: "
            + ("false to keep it anyway" if required else "true to make this an error")
        )
        if not required:
            print(f"warning: {out['message']}", flush=True)
    return out


if __name__ == "__main__":
    main()
