"""Stage prepare: official task files (or the Hub) -> text-to-text examples -> tokenizer + tokenized splits."""

from __future__ import annotations

import json
import sys
import time

from pipeline.data import (
    TASKS,
    DataError,
    load_task,
    resolve_data_dir,
    subsample,
    tokenize_split,
    train_bpe_tokenizer,
    write_jsonl,
)
from pipeline.modeling import atomic_dir
from stages.common import ROOT, dump_yaml, lineage, load, mlflow_run, parser, section, write_json


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--out", required=True, help="folder for the tokenizer and tokenized splits")
    args = p.parse_args(argv)
    params = load(args)
    d, t0 = params.data, time.time()
    try:
        splits = load_task(d.task, resolve_data_dir(d.data_dir, base=ROOT))
    except DataError as err:
        sys.exit(f"error: {err}")
    splits["train"] = subsample(splits["train"], d.max_train_samples, params.seed)
    splits["dev"] = subsample(splits["dev"], d.max_dev_samples, params.seed)
    spec = TASKS.get(d.task)
    if params.model.name_or_path:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            params.model.name_or_path, trust_remote_code=params.model.trust_remote_code
        )
    else:
        texts = [e.source for e in splits["train"]] + list(spec.label_words)
        tokenizer = train_bpe_tokenizer(texts, d.tokenizer_vocab_size, list(spec.label_words))
    with (
        mlflow_run(
            params, args.params, "prepare", section(params, "seed", "data", "model.name_or_path")
        ) as run,
        atomic_dir(args.out) as tmp,
    ):
        metrics = {"vocab_size": len(tokenizer)}
        for name, examples in splits.items():
            rows = tokenize_split(tokenizer, examples, d.max_source_length)
            write_jsonl(rows, tmp / f"{name}.jsonl")
            metrics[f"{name}_examples"] = len(rows)
            metrics[f"{name}_mean_source_tokens"] = round(
                sum(len(r["input_ids"]) for r in rows) / len(rows), 2
            )
        targets = [tokenizer(w)["input_ids"] for w in spec.label_words]
        metrics["target_tokens"] = max(len(t) for t in targets)
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        meta = {
            "task": d.task,
            "label_words": list(spec.label_words),
            "metric": spec.metric,
            "splits": sorted(splits),
        }
        (tmp / "task.json").write_text(json.dumps(meta, indent=1))
        (tmp / "params.yaml").write_text(dump_yaml(lineage(params, ("seed", "data", "model.name_or_path"))))
        metrics["seconds"] = round(time.time() - t0, 1)
        run.log_metrics(metrics)
        write_json(metrics, args.metrics)


if __name__ == "__main__":
    main()
