"""Stage compress: expert matrices become U V (rank r truncated SVD) + S (prunable residual).

Two models: MC-SMoE's, from the merged model (the layers in ``compress.scope``), and C-SMoE's, from
the full model without merging (every expert; paper Table 7). Both are pruned during kd_finetune.
"""

from __future__ import annotations

import time

from pipeline.compression import compress_model
from pipeline.data import load_tokenizer
from pipeline.evaluation import expert_stats
from pipeline.families import adapter_for
from pipeline.modeling import atomic_dir, count_unique_params, load_model, save_model
from pipeline.routing import set_router_mode
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
    args = p.parse_args(argv)
    params = load(args)
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


if __name__ == "__main__":
    main()
