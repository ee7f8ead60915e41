"""What every benchmark script shares."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_results(results: dict | list, out: str | Path) -> None:
    """Write a benchmark's results JSON atomically, so an interrupted run leaves the last good file."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {out}")
