"""Stage kd_finetune: recover M-SMoE, MC-SMoE and C-SMoE with task loss + KD from the full SMoE.

For the compressed students (MC-SMoE, C-SMoE) the sparse parts S are pruned column-wise during
training on the configured schedule, then stored compactly; the share of each expert's parameters
that remains is plotted (paper Figure 5). With ``zero_shot: true`` nothing is trained: S is pruned on
the same schedule from task-loss gradients alone.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from pipeline.analysis import remaining_param_ratios
from pipeline.compression import SparsePruner, finalize_compact
from pipeline.data import load_prepared
from pipeline.distributed import LauncherError, launched_accelerator
from pipeline.evaluation import expert_stats
from pipeline.expert_pruning import KD_PRUNERS, TaskSpecificPruner, read_budget
from pipeline.families import adapter_for
from pipeline.modeling import (
    atomic_dir,
    cast_weights,
    count_unique_params,
    floating_dtype,
    load_model,
    resolve_device,
    save_model,
)
from pipeline.plots import plot_remaining_params
from pipeline.routing import set_router_mode
from pipeline.training import (
    KDSettings,
    TrainSettings,
    dev_metric_for,
    freeze_routers,
    prune_without_training,
    train,
)
from stages.common import (
    checkpointing,
    lineage,
    load,
    mlflow_run,
    parser,
    section,
    stop_on_bad_input,
    weights_dtype,
    write_json,
)

# The compress keys that act during KD (the rank acted in the compress stage).
COMPRESS_KEYS = (
    "compress.sparse_ratio",
    "compress.schedule",
    "compress.warmup_frac",
    "compress.cooldown_frac",
    "compress.beta1",
    "compress.beta2",
    "compress.prune_axis",
    "compress.prune_score",
    "compress.regrow",
)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--data", required=True)
    p.add_argument("--teacher", required=True, help="the full fine-tuned SMoE")
    p.add_argument("--merged", required=True)
    p.add_argument("--compressed", required=True)
    p.add_argument("--out-m-smoe", required=True)
    p.add_argument("--compressed-full", required=True, help="compressed unmerged model (C-SMoE)")
    p.add_argument("--out-mc-smoe", required=True)
    p.add_argument("--out-c-smoe", required=True)
    p.add_argument("--plot", default=None, help="PNG heatmap of remaining parameters per expert")
    args = p.parse_args(argv)
    params = load(args)
    with stop_on_bad_input():
        task = load_prepared(args.data)
        teacher = load_model(args.teacher, dtype=weights_dtype(params))
        sources = {"m_smoe": args.merged, "mc_smoe": args.compressed, "c_smoe": args.compressed_full}
        students = {name: load_model(folder, dtype=weights_dtype(params)) for name, folder in sources.items()}
        progressive = params.kd.prune.method != "none"
        # M-SMoE's router takes its final form before KD trains it (MC-SMoE's did in compress);
        # under task-specific pruning it keeps every row until the pruner drops the dead ones.
        if not progressive:
            set_router_mode(students["m_smoe"], adapter_for(students["m_smoe"]), params.merge.router)
        budget = read_budget(args.merged) if progressive else None
        device = resolve_device(params.runtime.device)
    tok, kd, c = task.tokenizer, params.kd, params.compress
    settings = TrainSettings(**kd.train.model_dump())
    # Under accelerate launch: one process per device; only the main one writes. The teacher is
    # replicated on every process (DDP, like the students).
    with stop_on_bad_input(LauncherError):
        acc = launched_accelerator(
            params.launch.launcher, device, ("kd.train.batch_size", settings.batch_size)
        )
    if acc is not None:
        device = acc.device
        if acc.distributed_type.value in ("FSDP", "DEEPSPEED") and not params.zero_shot:
            sys.exit(
                f"error: kd_finetune prunes the compressed students' S during training, which needs whole "
                f"weights; {acc.distributed_type.value} shards them: use DDP (accelerate launch --multi_gpu "
                "--num_processes N, or configs/accelerate/ddp.yaml)"
            )
    main_process = acc is None or acc.is_main_process
    outs = {"m_smoe": args.out_m_smoe, "mc_smoe": args.out_mc_smoe, "c_smoe": args.out_c_smoe}
    metrics, remaining = {}, {}
    for name, student in students.items():
        t0 = time.time()
        compressed = name != "m_smoe"
        keys = ("merge_seed", "zero_shot", "runtime", "kd") + (
            COMPRESS_KEYS if compressed else ("merge.router",)
        )
        sections = section(params, *keys)
        made_by = lineage(params, keys, sources[name])
        # Trained (or pruned from gradients) on float32 weights, saved in the dtype it was loaded in
        # (pipeline.modeling.float32_master_weights says why); the teacher only runs forward.
        storage = floating_dtype(student)
        if storage != torch.float32:
            student.float()
        with mlflow_run(params, args.params, "kd_finetune", sections, run_name=f"kd_finetune/{name}") as run:
            pruner = None
            if name == "m_smoe" and progressive:
                kp = params.kd.prune
                with stop_on_bad_input():
                    pruner = KD_PRUNERS.get(kp.method)(
                        student,
                        adapter_for(student),
                        budget,
                        ema_beta=kp.ema_beta,
                        ema_every=kp.ema_every,
                        threshold=kp.threshold,
                        times=kp.times,
                    )
            if compressed:
                pruner = SparsePruner(
                    student,
                    c.sparse_ratio,
                    c.warmup_frac,
                    c.cooldown_frac,
                    c.schedule,
                    c.beta1,
                    c.beta2,
                    axis=c.prune_axis,
                    score=c.prune_score,
                    regrow=c.regrow,
                )
            if kd.freeze_router:
                freeze_routers(student)
            dev = dev_metric_for(task, "dev", settings.eval_batch_size, device, params.runtime.dtype)
            ckpt = None
            if params.zero_shot:
                summary = {"best_step": 0, "total_steps": 0}
                if pruner is not None:
                    with stop_on_bad_input():
                        summary = prune_without_training(
                            student,
                            task.splits["train"],
                            tok.pad_token_id,
                            settings,
                            pruner,
                            device,
                            params.runtime.dtype,
                            params.merge_seed,
                        )
                    summary["best_step"] = summary["total_steps"]
                summary[f"best_dev_{dev.name}"] = dev.compute(student.to(device))
            else:
                ckpt = checkpointing(params, outs[name], made_by, args.data, args.teacher, sources[name])
                with stop_on_bad_input():
                    summary = train(
                        student,
                        task.splits["train"],
                        task.splits["dev"],
                        task.label_token_ids() if task.objective != "lm" else [],
                        tok.pad_token_id,
                        settings,
                        device,
                        params.runtime.dtype,
                        seed=params.merge_seed,
                        kd=KDSettings(teacher, kd.alpha, kd.temperature, kd.loss),
                        step_hook=pruner,
                        eligible_from=pruner.final_step if pruner else None,
                        log=run.log_metrics,
                        dev_metric=dev,
                        checkpointing=ckpt,
                        accelerator=acc,
                    )
                student = summary.pop("model", student)  # FSDP/DeepSpeed: the gathered weights
            if not main_process:
                continue
            m = {
                task.metric: summary[f"best_dev_{dev.name}"],
                "best_step": summary["best_step"],
                "total_steps": summary["total_steps"],
            }
            if isinstance(pruner, TaskSpecificPruner):
                with stop_on_bad_input():
                    pruned = pruner.finalize()
                m["pruning_events"] = pruned["events"]
                m["experts_kept"] = {n: len(v["kept"]) for n, v in pruned["layers"].items()}
            elif pruner is not None:
                m["s_kept_fraction"] = round(pruner.kept_fraction(), 4)
                ratios = finalize_compact(student)
                m["mean_remaining_param_ratio"] = round(sum(ratios.values()) / len(ratios), 4)
                remaining[name] = remaining_param_ratios(student, adapter_for(student))
                m["remaining_param_ratio"] = {
                    layer: round(sum(r) / len(r), 4) for layer, r in remaining[name].items()
                }
            student.cpu()
            if storage != torch.float32:
                with stop_on_bad_input():
                    cast_weights(student, storage, f"the {name} student")
            with atomic_dir(outs[name]) as tmp:
                save_model(student, tmp, params=made_by, tokenizer=tok)
            if ckpt is not None:
                ckpt.clear()
            m.update(expert_stats(student))
            m["params_total"] = count_unique_params(student)
            m["seconds"] = round(time.time() - t0, 1)
            run.log_metrics(m)
            metrics[name] = m
    if not main_process:
        return
    if args.plot:
        plot = Path(args.plot)
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot_remaining_params(remaining, plot)
        with mlflow_run(params, args.params, "kd_finetune", {}, run_name="kd_finetune/plots") as run:
            run.log_artifact(plot)
    write_json(metrics, args.metrics)


if __name__ == "__main__":
    main()
