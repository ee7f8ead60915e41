"""Where a pretrained checkpoint named in params lives."""

from __future__ import annotations

import importlib
from pathlib import Path


def dense_source(name: str) -> str:
    """A local folder, the folder an installed package ships (``get_model_path()``), or a Hub id."""
    if Path(name).is_dir():
        return name
    try:
        module = importlib.import_module(name.replace("-", "_"))
    except ImportError:
        return name
    if hasattr(module, "get_model_path"):
        return str(module.get_model_path())
    return name
