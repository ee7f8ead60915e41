"""Walk every MoE model type of the installed transformers and print (or write into the README) the
family table: ``python -m scripts.family_table [--write README.md]``."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

START, END = "<!-- families:start -->", "<!-- families:end -->"


def replace_block(text: str, table: str) -> str:
    """``text`` with the block between the family-table markers replaced by ``table``."""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"error: no {START} ... {END} block to replace")
    return pattern.sub(lambda _m: f"{START}\n{table}{END}", text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--write", type=Path, help="README to update between the family-table markers")
    args = p.parse_args(argv)
    import transformers

    from pipeline.family_walk import family_table, walk

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    t0 = time.time()
    results = walk()
    table = family_table(results)
    supported = sum(r.supported for r in results)
    print(table)
    print(f"{supported} of {len(results)} MoE model types supported ({time.time() - t0:.0f} s)")
    if args.write:
        args.write.write_text(replace_block(args.write.read_text(), table))


if __name__ == "__main__":
    main()
