"""Stage align: permute each expert's hidden neurons to match its layer's reference expert."""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from pipeline.align import align_model
from pipeline.assignment import SolverSettings
from pipeline.data import collate, load_prepared
from pipeline.families import adapter_for
from pipeline.modeling import (
    atomic_dir,
    cast_weights,
    floating_dtype,
    load_model,
    resolve_device,
    save_model,
)
from pipeline.profiling import load_profile
from pipeline.streaming import stream_merge
from pipeline.training import model_forward
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


@torch.no_grad()
def _logits(model, batch):
    return model_forward(model, batch, with_router=False).logits


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--profile", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    params = load(args)
    t0 = time.time()
    if params.runtime.streaming:
        return _streamed(args, params, t0)
    with stop_on_bad_input():
        task = load_prepared(args.data, splits=("dev",))
        model = load_model(args.model, dtype=weights_dtype(params))
        storage = floating_dtype(model)
        profiles = load_profile(Path(args.profile), model)
        device = resolve_device(params.runtime.device)
    check = collate(
        random.Random(params.merge_seed).sample(task.splits["dev"], min(64, len(task.splits["dev"]))),
        task.tokenizer.pad_token_id,
    )
    before = _logits(model, check)
    with mlflow_run(params, args.params, "align", section(params, "align")) as run:
        report = align_model(
            model,
            adapter_for(model),
            params.align.method,
            params.align.reference,
            {n: p.frequency for n, p in profiles.items()},
            {n: p.inputs for n, p in profiles.items() if p.inputs is not None},
            include_wo=params.align.include_wo,
            solver=params.align.solver,
            settings=SolverSettings(params.align.solver_tolerance, params.align.solver_candidates),
            workers=params.align.workers,
            min_gain=params.align.min_gain,
            device=device,
        )
        # Alignment must not change what the model computes; record the evidence.
        diff = float((_logits(model, check) - before).abs().max())
        if storage != torch.float32:
            # Stock routers computing in float32 (Switch) cast themselves there at each forward.
            cast_weights(model, storage, args.model)
        with atomic_dir(args.out) as tmp:
            save_model(model, tmp, params=lineage(params, ("align",), args.model), tokenizer=task.tokenizer)
        metrics = {
            "neurons_moved": sum(r["neurons_moved"] for r in report.values()),
            "layers_aligned": sum(r.get("aligned", False) for r in report.values()),
            "max_abs_logit_change": diff,
            "seconds": round(time.time() - t0, 2),
            "layers": report,
        }
        run.log_metrics(metrics)
        write_json(metrics, args.metrics)


def _streamed(args, params, t0: float) -> None:
    """runtime.streaming: the checkpoint aligned one SMoE layer at a time, never whole in memory.
    max_abs_logit_change (a forward pass of the whole model before and after) is not measured."""
    a = params.align
    with mlflow_run(params, args.params, "align", section(params, "align")) as run:
        with stop_on_bad_input():
            report = stream_merge(
                args.model,
                args.out,
                profile=args.profile,
                align=a.method,
                reference=a.reference,
                include_wo=a.include_wo,
                solver=a.solver,
                settings=SolverSettings(a.solver_tolerance, a.solver_candidates),
                workers=a.workers,
                min_gain=a.min_gain,
                device=resolve_device(params.runtime.device),
                params=lineage(params, ("align",), args.model),
                progress=lambda msg: print(msg, flush=True),
            )
        layers = {n: e["align"] for n, e in report["layers"].items()}
        metrics = {
            "neurons_moved": sum(r["neurons_moved"] for r in layers.values()),
            "layers_aligned": sum(r.get("aligned", False) for r in layers.values()),
            "seconds": round(time.time() - t0, 2),
            "layers": layers,
        }
        run.log_metrics(metrics)
        write_json(metrics, args.metrics)


if __name__ == "__main__":
    main()
