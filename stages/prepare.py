"""Stage prepare: official task files (or the Hub) -> tokenizer + tokenized splits.

Classification tasks become text-to-text examples; language-modelling tasks (wikitext2) become
blocks of tokens, with the zero-shot multiple-choice sets stored beside them as text (each example
with its position in the official split, which the lm-eval scorer reads).
"""

from __future__ import annotations

import json
import time

from pipeline.data import (
    LM_TASKS,
    TASKS,
    DataError,
    load_task,
    load_tokenizer,
    resolve_data_dir,
    subsample,
    tokenize_split,
    train_bpe_tokenizer,
    write_jsonl,
)
from pipeline.modeling import atomic_dir
from pipeline.zeroshot import lm_rows, load_choice_subset, load_wikitext
from stages.common import (
    dump_yaml,
    lineage,
    load,
    mlflow_run,
    parser,
    section,
    stop_on_bad_input,
    write_json,
)
from stages.tracking import repo_root


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--out", required=True, help="folder for the tokenizer and tokenized splits")
    args = p.parse_args(argv)
    params = load(args)
    if params.data.task in LM_TASKS:
        return _prepare_lm(args, params)
    d, t0 = params.data, time.time()
    with stop_on_bad_input():
        splits = load_task(d.task, resolve_data_dir(d.data_dir, base=repo_root()))
    splits["train"] = subsample(splits["train"], d.max_train_samples, params.seed)
    splits["dev"] = subsample(splits["dev"], d.max_dev_samples, params.seed)
    if "test" in splits:
        splits["test"] = subsample(splits["test"], d.max_test_samples, params.seed)
    spec = TASKS.get(d.task)
    texts = [e.source for e in splits["train"]] + list(spec.label_words)
    with stop_on_bad_input():
        tokenizer = _tokenizer(params, texts, list(spec.label_words))
    with (
        mlflow_run(params, args.params, "prepare", section(params, *_keys(params))) as run,
        atomic_dir(args.out) as tmp,
    ):
        metrics = {"vocab_size": len(tokenizer)}
        for name, examples in splits.items():
            rows = tokenize_split(tokenizer, examples, d.max_source_length)
            if params.upcycle is not None:
                # A sequence classifier's target is the class itself: one position holding its index.
                rows = [{**r, "labels": [r["label"]]} for r in rows]
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
        (tmp / "params.yaml").write_text(dump_yaml(lineage(params, _keys(params))))
        metrics["seconds"] = round(time.time() - t0, 1)
        run.log_metrics(metrics)
        write_json(metrics, args.metrics)


def _keys(params) -> tuple[str, ...]:
    # Upcycling stores class indices as targets, so whether it is on shapes the prepared rows.
    base = ("seed", "data", "model.name_or_path")
    return base if params.upcycle is None else (*base, "upcycle")


def _tokenizer(params, texts: list[str], extra: list[str]):
    if params.model.upcycle_from is not None:
        from pipeline.upcycle_decoder import describe_source, load_source_tokenizer

        return load_source_tokenizer(describe_source(params.model.upcycle_from.source))
    if params.model.name_or_path:
        from pipeline.sources import dense_source

        return load_tokenizer(
            dense_source(params.model.name_or_path), trust_remote_code=params.model.trust_remote_code
        )
    return train_bpe_tokenizer(texts, params.data.tokenizer_vocab_size, extra)


def _prepare_lm(args, params) -> None:
    d, t0 = params.data, time.time()
    data_dir = resolve_data_dir(d.data_dir, base=repo_root())
    with stop_on_bad_input():
        train_text = load_wikitext(data_dir, d.lm_train_split)
        test_text = load_wikitext(data_dir, "test")
        zero_shot = {
            name: load_choice_subset(name, data_dir, d.zero_shot_max_samples, params.seed)
            for name in d.zero_shot_tasks
        }
        tokenizer = _tokenizer(params, train_text.splitlines(), [])
        blocks = lm_rows(tokenizer, train_text, d.block_size)
        if len(blocks) <= d.dev_blocks:
            raise DataError(
                f"wikitext-2 {d.lm_train_split} gives {len(blocks)} blocks of {d.block_size} tokens: "
                f"too few to hold out data.dev_blocks={d.dev_blocks} for dev"
            )
        # The dev blocks are the split's last ones, so they never overlap the training text.
        splits = {
            "train": subsample(blocks[: -d.dev_blocks], d.max_train_samples, params.seed),
            "dev": subsample(blocks[-d.dev_blocks :], d.max_dev_samples, params.seed),
            "test": lm_rows(tokenizer, test_text, d.block_size, d.max_test_samples),
        }
    keys = ("seed", "data", "model.name_or_path", "model.upcycle_from")
    with (
        mlflow_run(params, args.params, "prepare", section(params, *keys)) as run,
        atomic_dir(args.out) as tmp,
    ):
        metrics = {"vocab_size": len(tokenizer), "block_size": d.block_size}
        for name, rows in splits.items():
            write_jsonl(rows, tmp / f"{name}.jsonl")
            metrics[f"{name}_blocks"] = len(rows)
        (tmp / "zero_shot.json").write_text(
            json.dumps(
                {
                    name: [
                        {
                            "contexts": list(e.contexts),
                            "continuations": list(e.continuations),
                            "label": e.label,
                            # the example's position in the official split: what lm-eval scores
                            "index": i,
                        }
                        for e, i in zip(examples, indices, strict=True)
                    ]
                    for name, (examples, indices) in zero_shot.items()
                }
            )
        )
        for name, (examples, _) in zero_shot.items():
            metrics[f"zero_shot_{name}_examples"] = len(examples)
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        meta = {
            "task": d.task,
            "objective": "lm",
            "label_words": [],
            "metric": "perplexity",
            "splits": sorted(splits),
            "train_split": d.lm_train_split,
        }
        (tmp / "task.json").write_text(json.dumps(meta, indent=1))
        (tmp / "params.yaml").write_text(dump_yaml(lineage(params, keys)))
        metrics["seconds"] = round(time.time() - t0, 1)
        run.log_metrics(metrics)
        write_json(metrics, args.metrics)


if __name__ == "__main__":
    main()
