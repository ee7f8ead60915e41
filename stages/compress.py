"""Stage compress: expert matrices become U V (rank r truncated SVD) + S (prunable residual).

Two models: MC-SMoE's, from the merged model (the layers in ``compress.scope``), and C-SMoE's, from
the full model without merging (every expert; paper Table 7). Both are pruned during kd_finetune.
"""

from __future__ import annotations

import sys
import time

from pipeline.compression import compress_model
from pipeline.data import load_tokenizer
from pipeline.evaluation import expert_stats
from pipeline.families import adapter_for
from pipeline.modeling import atomic_dir, count_unique_params, load_model, save_model
from pipeline.routing import set_router_mode
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
    p.add_argument("--model", required=True, help="merged model")
    p.add_argument("--full", required=True, help="full (unmerged) model, compressed as C-SMoE")
    p.add_argument("--out", required=True, help="compressed merged model (MC-SMoE before KD)")
    p.add_argument("--out-c", required=True, help="compressed full model (C-SMoE before KD)")
    # runtime.streaming: MC-SMoE's model is merged and compressed in one layer-streamed pass from
    # the aligned checkpoint (streaming reads stock checkpoints, not the merged folder).
    p.add_argument("--aligned", default=None, help="aligned model (runtime.streaming)")
    p.add_argument("--profile", default=None, help="profile folder (runtime.streaming)")
    p.add_argument("--groups", default=None, help="groups.json (runtime.streaming)")
    args = p.parse_args(argv)
    params = load(args)
    if params.runtime.streaming:
        return _streamed(args, params)
    c = params.compress
    sources = {"mc_smoe": args.model, "c_smoe": args.full}
    with stop_on_bad_input():
        wd = weights_dtype(params)
        models = {"mc_smoe": load_model(args.model, dtype=wd), "c_smoe": load_model(args.full, dtype=wd)}
        tokenizers = {name: load_tokenizer(f) for name, f in sources.items()}
        adapter = adapter_for(models["mc_smoe"])
        # MC-SMoE's router takes its final form before its experts are compressed.
        routers = set_router_mode(models["mc_smoe"], adapter, params.merge.router)
        # Rank must be below every expert matrix dimension, else U V alone is the full matrix.
        dims = [
            min(w.shape)
            for ly in adapter.sparse_layers(models["mc_smoe"])
            for w in adapter.expert_weights(ly, 0).values()
        ]
        if c.rank >= min(dims):
            raise ValueError(
                f"compress.rank={c.rank} must be below the smallest expert matrix dimension {min(dims)}"
            )
    outs = {"mc_smoe": args.out, "c_smoe": args.out_c}
    scopes = {"mc_smoe": c.scope, "c_smoe": "all"}
    lineage_keys = {
        "mc_smoe": ("merge.router", "compress.rank", "compress.scope"),
        "c_smoe": ("compress.rank",),
    }
    metrics = {}
    with mlflow_run(params, args.params, "compress", section(params, "merge.router", "compress")) as run:
        for name, model in models.items():
            t0 = time.time()
            before = expert_stats(model)["expert_params"]
            with stop_on_bad_input():
                report = compress_model(model, adapter, c.rank, scopes[name])
            with atomic_dir(outs[name]) as tmp:
                save_model(
                    model,
                    tmp,
                    params=lineage(params, lineage_keys[name], sources[name]),
                    tokenizer=tokenizers[name],
                )
            metrics[name] = {
                **expert_stats(model),
                "expert_params_before": before,
                "params_total": count_unique_params(model),
                "layers_compressed": len(report),
                **(
                    {"router_outputs": {n: r["router_outputs"] for n, r in routers.items()}}
                    if name == "mc_smoe"
                    else {}
                ),
                "seconds": round(time.time() - t0, 2),
            }
            run.log_metrics(metrics[name], prefix=f"{name}.")
        write_json(metrics, args.metrics)


def _streamed(args, params) -> None:
    """runtime.streaming: both models compressed one SMoE layer at a time. MC-SMoE's is merged from
    the aligned checkpoint in the same pass (the merged folder's own tensors are what that merge
    wrote); expert counts come from the results' shapes. Every metric of the in-memory stage is kept."""
    c, m = params.compress, params.merge
    missing = [f"--{k}" for k in ("aligned", "profile", "groups") if getattr(args, k) is None]
    if missing:
        sys.exit(f"error: runtime.streaming: true needs {', '.join(missing)} (the merge stage's inputs)")
    runs = {
        "mc_smoe": dict(
            model=args.aligned,
            groups=args.groups,
            profile=args.profile,
            strategy=m.strategy,
            repair=m.repair,
            router=m.router,
            scope=c.scope,
            before=args.model,
        ),
        "c_smoe": dict(model=args.full, scope="all", before=args.full),
    }
    sources = {"mc_smoe": args.model, "c_smoe": args.full}
    outs = {"mc_smoe": args.out, "c_smoe": args.out_c}
    lineage_keys = {
        "mc_smoe": ("merge.router", "compress.rank", "compress.scope"),
        "c_smoe": ("compress.rank",),
    }
    metrics = {}
    with mlflow_run(params, args.params, "compress", section(params, "merge.router", "compress")) as run:
        for name, spec in runs.items():
            t0 = time.time()
            before = spec.pop("before")
            with stop_on_bad_input():
                before = expert_stats(meta_model_of(before))["expert_params"]
                report = stream_merge(
                    spec.pop("model"),
                    outs[name],
                    align="none",
                    rank=c.rank,
                    params=lineage(params, lineage_keys[name], sources[name]),
                    progress=lambda msg: print(msg, flush=True),
                    **spec,
                )
            saved = meta_model_of(outs[name])
            routers = {
                n: {"router_outputs": e["router"]["router_outputs"]}
                for n, e in report["layers"].items()
                if "router" in e
            }
            metrics[name] = {
                **expert_stats(saved),
                "expert_params_before": before,
                "params_total": count_unique_params(saved),
                "layers_compressed": sum("compress" in e for e in report["layers"].values()),
                **(
                    {"router_outputs": {n: r["router_outputs"] for n, r in routers.items()}}
                    if name == "mc_smoe"
                    else {}
                ),
                "seconds": round(time.time() - t0, 2),
            }
            run.log_metrics(metrics[name], prefix=f"{name}.")
        write_json(metrics, args.metrics)


if __name__ == "__main__":
    main()
