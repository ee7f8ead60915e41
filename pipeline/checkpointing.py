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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "training_state.pt"


class TrainingCheckpointError(RuntimeError):
    """Training cannot start or go on: its checkpoint cannot be read, or (subclasses) the run diverged
    or its data does not fit the model.

    The stages turn this type into one line around ``train``, so every refusal of a run raises it.
    """


class TrainingDivergedError(TrainingCheckpointError):
    """The loss, the gradients or the weights of a training run became NaN or infinite."""


def first_non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, int, int] | None:
    """``(name, bad values, values)`` of the first floating tensor holding NaN or inf, else None.

    One ``isfinite`` pass per tensor; the bad values are counted only for the tensor that fails.
    """
    for name, t in tensors:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.is_meta:
            continue
        if not bool(torch.isfinite(t).all()):
            return name, int((~torch.isfinite(t)).sum()), t.numel()
    return None


def _state_tensors(state: dict | None, prefix: str) -> Iterable[tuple[str, torch.Tensor]]:
    for name, t in (state or {}).items():
        yield f"{prefix}{name}", t


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
        bad = first_non_finite(
            [*_state_tensors(state.get("model"), ""), *_state_tensors(state.get("best_model"), "best ")]
        )
        if bad is not None:
            raise TrainingCheckpointError(
                f"training checkpoint {self.path} holds non-finite weights ({bad[1]} of {bad[2]} values "
                f"of {bad[0]} are NaN/inf); delete it to train from the start"
            )
        print(f"resuming from {self.path} at step {state['step']}/{total_steps}", flush=True)
        return state

    def save(self, state: dict) -> None:
        """Write ``state`` atomically: a run killed mid-write leaves the previous checkpoint intact.

        A state whose weights are NaN/inf is refused (:class:`TrainingDivergedError`): resuming
        from it could only train on garbage.
        """
        bad = first_non_finite(
            [*_state_tensors(state.get("model"), ""), *_state_tensors(state.get("best_model"), "best ")]
        )
        if bad is not None:
            self.clear()  # an earlier state of the run would only be replayed into the same NaN
            raise TrainingDivergedError(
                f"training diverged: after step {state.get('step')} {bad[1]} of {bad[2]} values of weight "
                f"{bad[0]} are NaN/inf, so no checkpoint is saved; likely causes: a learning rate too high, "
                "non-finite or huge weights, or non-finite inputs"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{STATE_FILE}.tmp")
        try:
            torch.save({**state, "fingerprint": self.fingerprint}, tmp)
            os.replace(tmp, self.path)
        finally:
            # A full disk fails torch.save half-way: the partial file must not stay to fill it.
            tmp.unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove the checkpoint once the run's output is safely written."""
        shutil.rmtree(self.folder, ignore_errors=True)
