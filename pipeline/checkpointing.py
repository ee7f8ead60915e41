"""Resumable training: the whole training state, saved atomically every N steps.

A checkpoint holds tensors and plain Python values only, so it is read back with
``torch.load(weights_only=True)``: loading one never runs code. Each checkpoint carries the
fingerprint of what made its run (params and input files); a checkpoint of another run is never
resumed.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "training_state.pt"


class TrainingCheckpointError(RuntimeError):
    """A training checkpoint exists but cannot be read."""


def folder_digest(*paths: str | Path) -> str:
    """SHA-256 over the relative names and bytes of every file under ``paths`` (in a fixed order).

    A path that does not exist (e.g. a Hub id rather than a local folder) adds nothing.
    """
    h = hashlib.sha256()
    for root in map(Path, paths):
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            if not f.exists():
                continue
            h.update(str(f.relative_to(root) if root.is_dir() else f.name).encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict:
    """Every random generator training touches (dropout, shuffles), as tensors and lists."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Checkpointing:
    """Where and how often ``train`` saves its state, and whether it resumes from it.

    ``every_steps=0`` never saves. With ``resume=False`` an existing checkpoint is ignored and
    replaced by the new run's.
    """

    folder: Path
    every_steps: int
    resume: bool
    fingerprint: str

    @property
    def path(self) -> Path:
        return Path(self.folder) / STATE_FILE

    def due(self, step: int, total: int) -> bool:
        return self.every_steps > 0 and step < total and step % self.every_steps == 0

    def load(self, total_steps: int) -> dict | None:
        """The saved state of this very run, or None (no checkpoint, resume off, or another run's)."""
        if not self.path.is_file():
            if self.resume:
                print(f"resume: no checkpoint at {self.path}; training from the start", flush=True)
            return None
        if not self.resume:
            print(f"checkpoint {self.path} ignored (resume is off); training from the start", flush=True)
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling errors, truncated files and zip errors all differ
            raise TrainingCheckpointError(
                f"cannot read training checkpoint {self.path} ({type(err).__name__}: {str(err)[:200]}); "
                "delete it to train from the start"
            ) from None
        if not isinstance(state, dict) or state.get("fingerprint") != self.fingerprint:
            print(
                f"checkpoint {self.path} was made by other params or inputs; training from the start",
                flush=True,
            )
            return None
        if state.get("total_steps") != total_steps:
            print(
                f"checkpoint {self.path} plans another number of steps; training from the start", flush=True
            )
            return None
        print(f"resuming from {self.path} at step {state['step']}/{total_steps}", flush=True)
        return state

    def save(self, state: dict) -> None:
        """Write ``state`` atomically: a run killed mid-write leaves the previous checkpoint intact."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{STATE_FILE}.tmp")
        torch.save({**state, "fingerprint": self.fingerprint}, tmp)
        os.replace(tmp, self.path)

    def clear(self) -> None:
        """Remove the checkpoint once the run's output is safely written."""
        shutil.rmtree(self.folder, ignore_errors=True)
