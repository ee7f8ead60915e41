"""Stage kd_finetune: recover M-SMoE and MC-SMoE with task loss + KD from the full SMoE.

For MC-SMoE the sparse parts S are pruned column-wise during training on the configured schedule,
then stored compactly.
"""

from __future__ import annotations

import sys
import time

from pipeline.compression import ColumnPruner, finalize_compact
from pipeline.data import DataError, load_prepared
from pipeline.evaluation import expert_stats
from pipeline.modeling import (
    CheckpointError,
    atomic_dir,
    count_unique_params,
    load_model,
    resolve_device,
    save_model,
)
from pipeline.training import KDSettings, TrainSettings, train
from stages.common import lineage, load, mlflow_run, parser, section, write_json

# The compress keys that act during KD (the rank acted in the compress stage).
COMPRESS_KEYS = (
    "compress.sparse_ratio",
    "compress.schedule",
    "compress.warmup_frac",
    "compress.cooldown_frac",
    "compress.beta1",
    "compress.beta2",
)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--data", required=True)
    p.add_argument("--teacher", required=True, help="the full fine-tuned SMoE")
    p.add_argument("--merged", required=True)
    p.add_argument("--compressed", required=True)
    p.add_argument("--out-m-smoe", required=True)
    p.add_argument("--out-mc-smoe", required=True)
    args = p.parse_args(argv)
    params = load(args)
    try:
        task = load_prepared(args.data)
        teacher = load_model(args.teacher)
        students = {"m_smoe": load_model(args.merged), "mc_smoe": load_model(args.compressed)}
        device = resolve_device(params.runtime.device)
    except (DataError, CheckpointError, RuntimeError) as err:
        sys.exit(f"error: {err}")
    tok, kd, c = task.tokenizer, params.kd, params.compress
    settings = TrainSettings(**kd.train.model_dump())
    outs = {"m_smoe": args.out_m_smoe, "mc_smoe": args.out_mc_smoe}
    metrics = {}
    for name, student in students.items():
        t0 = time.time()
        sections = section(
            params, "merge_seed", "runtime", "kd", *(COMPRESS_KEYS if name == "mc_smoe" else ())
        )
        with mlflow_run(params, args.params, "kd_finetune", sections, run_name=f"kd_finetune/{name}") as run:
            pruner = None
            if name == "mc_smoe":
                pruner = ColumnPruner(
                    student, c.sparse_ratio, c.warmup_frac, c.cooldown_frac, c.schedule, c.beta1, c.beta2
                )
            summary = train(
                student,
                task.splits["train"],
                task.splits["dev"],
                task.label_token_ids(),
                tok.pad_token_id,
                settings,
                device,
                params.runtime.dtype,
                seed=params.merge_seed,
                kd=KDSettings(teacher, kd.alpha, kd.temperature),
                step_hook=pruner,
                eligible_from=pruner.final_step if pruner else None,
                log=run.log_metrics,
            )
            m = {
                task.metric: summary["best_dev_accuracy"],
                "best_step": summary["best_step"],
                "total_steps": summary["total_steps"],
            }
            if pruner is not None:
                m["s_kept_fraction"] = round(pruner.kept_fraction(), 4)
                ratios = finalize_compact(student)
                m["mean_remaining_param_ratio"] = round(sum(ratios.values()) / len(ratios), 4)
            student.cpu()
            with atomic_dir(outs[name]) as tmp:
                save_model(
                    student,
                    tmp,
                    params=lineage(
                        params,
                        ("merge_seed", "runtime", "kd") + (COMPRESS_KEYS if name == "mc_smoe" else ()),
                        args.merged if name == "m_smoe" else args.compressed,
                    ),
                    tokenizer=tok,
                )
            m.update(expert_stats(student))
            m["params_total"] = count_unique_params(student)
            m["seconds"] = round(time.time() - t0, 1)
            run.log_metrics(m)
            metrics[name] = m
    write_json(metrics, args.metrics)


if __name__ == "__main__":
    main()
