"""Benchmark at BERT-base size: what MEO's merged experts cost against vanilla top-k MoE and dense.

Random weights at bert-base dimensions (d 768, d_ff 3072, 12 layers), every FFN upcycled into E
(default 16) experts; a batch of ``--batch-size`` x ``--seq-len`` tokens (no padding). For the
dense model and for ``moe`` (token-level top-k), ``meo-sequence`` and ``meo-token`` at each k
(``--top-k``), side by side in one run:

* GFLOPs per sample, counted by torch's FLOP counter on the real forward (MEO's weight merges
  ``gates @ experts`` included), on a small batch since every figure is per sample;
* wall-clock of the whole model's forward (median of ``--reps`` after one warm-up) and samples/s;
* the share of MEO's time spent building merged weights: the same merge matmuls timed alone;
* ``meo-sequence`` at k = ``--chunk-k`` with its merged weights built a few sequences at a time
  (``merge_chunk``), so each merged weight is used while it is still in cache.

The upcycled model is built once per layer kind and its gates' k changed in place; gates get small
random weights so routing is not all ties. Random experts: figures are about cost, not accuracy.

    python -m benchmarks.meo_bert_base --out metrics/meo_benchmark.json     # about 10 min on 2 cores
    python -m benchmarks.meo_bert_base --quick --out /tmp/b.json           # tiny dimensions, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import write_results
from pipeline.meo import MoEFeedForward

# Through pipeline.upcycle, which imports pipeline.families (the family registry) first.
from pipeline.upcycle import ffn_layers, upcycle

BERT_BASE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
QUICK = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
KINDS = ("moe", "meo-sequence", "meo-token")


def _dense(dims: dict, seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(**dims, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


def _set_k(model, k: int) -> None:
    for _name, block in ffn_layers(model):
        m = block.intermediate
        m.top_k = k
        for g in m.gates:
            g.top_k = k


@torch.no_grad()
def _wall(model, ids, mask, reps: int) -> list[float]:
    model(input_ids=ids, attention_mask=mask)  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model(input_ids=ids, attention_mask=mask)
        times.append(time.perf_counter() - t0)
    return times


@torch.no_grad()
def _gflops_per_sample(model, ids, mask) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids, attention_mask=mask)
    return counter.get_total_flops() / 1e9 / ids.shape[0]


@torch.no_grad()
def _merge_seconds(model, batch: int, reps: int) -> float:
    """Time of every merge matmul of one forward (gates [B, E] @ experts [E, O*I]), timed alone."""
    total = []
    mats = []
    for _name, block in ffn_layers(model):
        m = block.intermediate
        if isinstance(m, MoEFeedForward):
            mats += [m.w1, m.w2]
    e = mats[0].shape[0]
    gates = torch.softmax(torch.randn(batch, e), -1)
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        for w in mats:
            merged = gates @ w.reshape(e, -1)
            del merged
        total.append(time.perf_counter() - t0)
    return statistics.median(total[1:])


def run(args) -> dict:
    dims = QUICK if args.quick else BERT_BASE
    torch.manual_seed(args.seed)
    vocab = 30522
    ids = torch.randint(1000, vocab, (args.batch_size, args.seq_len))
    mask = torch.ones_like(ids)
    small_ids, small_mask = ids[:2], mask[:2]
    out = {
        "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__},
        "setting": {
            **dims,
            "num_experts": args.num_experts,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "reps": args.reps,
            "granularity": args.granularity,
        },
        "rows": [],
        # meo-sequence at k = --chunk-k with merged weights built for that many sequences at a time.
        "merge_chunk": [],
    }
    dense = _dense(dims, args.seed)
    t = _wall(dense, ids, mask, args.reps)
    base = {
        "layer": "dense",
        "top_k": 0,
        "seconds": statistics.median(t),
        "samples_per_s": args.batch_size / statistics.median(t),
        "gflops_per_sample": _gflops_per_sample(dense, small_ids, small_mask),
    }
    out["rows"].append(base)
    print(json.dumps(base), flush=True)
    for kind in KINDS:
        model = upcycle(_dense(dims, args.seed), kind, args.num_experts, 1, args.granularity)
        with torch.no_grad():
            for _name, block in ffn_layers(model):
                for g in block.intermediate.gates:
                    g.weight.normal_(0, 0.02)
        for k in args.top_k:
            _set_k(model, k)
            t = _wall(model, ids, mask, args.reps)
            row = {
                "layer": kind,
                "top_k": k,
                "seconds": statistics.median(t),
                "samples_per_s": args.batch_size / statistics.median(t),
                "gflops_per_sample": _gflops_per_sample(model, small_ids, small_mask),
            }
            if kind != "moe":
                row["merge_seconds"] = _merge_seconds(model, args.batch_size, args.reps)
                row["merge_share"] = row["merge_seconds"] / row["seconds"]
            row["flops_vs_dense"] = row["gflops_per_sample"] / base["gflops_per_sample"]
            row["time_vs_dense"] = row["seconds"] / base["seconds"]
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
            if kind == "meo-sequence" and k == args.chunk_k:
                for chunk in args.merge_chunks:
                    for _name, block in ffn_layers(model):
                        block.intermediate.merge_chunk = chunk
                    t = _wall(model, ids, mask, args.reps)
                    out["merge_chunk"].append(
                        {"top_k": k, "merge_chunk": chunk, "seconds": statistics.median(t)}
                    )
                    print(json.dumps(out["merge_chunk"][-1]), flush=True)
                for _name, block in ffn_layers(model):
                    block.intermediate.merge_chunk = 0
        del model
        gc.collect()
    vanilla = {r["top_k"]: r for r in out["rows"] if r["layer"] == "moe"}
    for r in out["rows"]:
        if r["layer"].startswith("meo") and r["top_k"] in vanilla:
            r["speedup_vs_moe"] = vanilla[r["top_k"]]["seconds"] / r["seconds"]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="metrics/meo_benchmark.json")
    p.add_argument("--quick", action="store_true", help="tiny dimensions (a smoke run)")
    p.add_argument("--num-experts", type=int, default=16)
    p.add_argument("--top-k", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--granularity", choices=("linear", "ffn"), default="linear")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--merge-chunks", type=int, nargs="*", default=[1, 4], help="merge_chunk values to time")
    p.add_argument("--chunk-k", type=int, default=4, help="the k at which merge_chunk values are timed")
    args = p.parse_args(argv)
    if any(k < 1 for k in args.top_k) or args.num_experts < 1:
        p.error("--top-k values and --num-experts must be >= 1")
    if any(k > args.num_experts for k in args.top_k):
        p.error(f"--top-k values must be <= --num-experts={args.num_experts}")
    if any(c < 0 for c in args.merge_chunks):
        p.error("--merge-chunks values must be >= 0 (0: the whole batch at once)")
    result = run(args)
    write_results(result, args.out)


if __name__ == "__main__":
    main()
