"""Stage compress: each merged expert matrix becomes U V (rank r truncated SVD) + S (prunable residual)."""

from __future__ import annotations

import sys
import time

from pipeline.adapters import adapter_for
from pipeline.compression import compress_model
from pipeline.evaluation import expert_stats
from pipeline.modeling import CheckpointError, atomic_dir, count_unique_params, load_model, save_model
from stages.common import lineage, load, mlflow_run, parser, section, write_json


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True, help="merged model")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    params = load(args)
    t0 = time.time()
    try:
        model = load_model(args.model)
        adapter = adapter_for(model)
        # Rank must be below every expert matrix dimension, else U V alone is the full matrix.
        dims = [
            min(w.shape)
            for ly in adapter.sparse_layers(model)
            for w in adapter.expert_weights(ly, 0).values()
        ]
        if params.compress.rank >= min(dims):
            raise ValueError(
                f"compress.rank={params.compress.rank} must be below the smallest expert matrix dimension {min(dims)}"
            )
    except (CheckpointError, ValueError) as err:
        sys.exit(f"error: {err}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    with mlflow_run(params, args.params, "compress", section(params, "compress")) as run:
        before = expert_stats(model)["expert_params"]
        try:
            compress_model(model, adapter, params.compress.rank)
        except ValueError as err:
            sys.exit(f"error: {err}")
        with atomic_dir(args.out) as tmp:
            save_model(
                model, tmp, params=lineage(params, ("compress.rank",), args.model), tokenizer=tokenizer
            )
        stats = expert_stats(model)
        metrics = {
            **stats,
            "expert_params_before": before,
            "params_total": count_unique_params(model),
            "seconds": round(time.time() - t0, 2),
        }
        run.log_metrics(metrics)
        write_json(metrics, args.metrics)


if __name__ == "__main__":
    main()
