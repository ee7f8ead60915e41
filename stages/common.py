"""What every stage script shares: argument parsing, params, MLflow runs, metrics files.

Library code never touches argv, params.yaml or MLflow; this module is where they meet.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import yaml

from pipeline.adapters import ModelStructureError
from pipeline.checkpointing import Checkpointing, TrainingCheckpointError, folder_digest
from pipeline.config import Params, ParamsError, flatten, load_params
from pipeline.data import DataError
from pipeline.modeling import CheckpointError

ROOT = Path(__file__).resolve().parent.parent


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--metrics", required=True, help="metrics JSON to write")
    return p


# What the library raises for bad input: a missing, corrupt or unsupported file or checkpoint, or a
# value it cannot work with. Anything else is a bug and keeps its traceback.
BAD_INPUT = (
    DataError,
    CheckpointError,
    ModelStructureError,
    TrainingCheckpointError,
    FileNotFoundError,
    ValueError,
)


@contextmanager
def stop_on_bad_input(*errors: type[Exception]):
    """Turn bad input found by the library (``errors``, default BAD_INPUT) into one line naming the
    problem, and exit status 1."""
    caught = errors or BAD_INPUT
    try:
        yield
    except caught as err:
        sys.exit(f"error: {err}")


def _exit_on_sigterm(signum, frame) -> None:
    # Unwinding (rather than dying at once) lets temporary output folders be removed and the MLflow
    # run be marked failed; the training checkpoint stays for a resume.
    raise SystemExit(f"error: stopped by signal {signal.Signals(signum).name} before the stage completed")


def load(args: argparse.Namespace) -> Params:
    """Validate params once, before any work; a bad file stops the stage with the key paths at fault."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        params = load_params(args.params)
    except ParamsError as err:
        sys.exit(f"error: {err}")
    from transformers.utils import logging as hf_logging

    # Per-tensor load/save bars flood DVC's log; the training bar stays.
    hf_logging.disable_progress_bar()
    if params.runtime.num_threads:
        import torch

        torch.set_num_threads(params.runtime.num_threads)
    return params


def section(params: Params, *names: str) -> dict:
    """The given params sections (dotted paths allowed) as plain dicts, for logging and saving."""
    dumped = params.model_dump(mode="json")
    out = {}
    for name in names:
        node = dumped
        for part in name.split("."):
            node = node[part]
        out[name] = node
    return out


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pipeline_id(params_path: str) -> str:
    """One id per pipeline execution: $SMOE_PIPELINE_ID, else a hash of the params file and commit."""
    if os.environ.get("SMOE_PIPELINE_ID"):
        return os.environ["SMOE_PIPELINE_ID"]
    digest = hashlib.sha256(Path(params_path).read_bytes() + git_commit().encode()).hexdigest()
    return digest[:12]


def write_json(obj: dict, path: str | Path) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


class _Run:
    def __init__(self, mlflow) -> None:
        self._mlflow = mlflow

    def log_metrics(self, metrics: dict, step: int | None = None, prefix: str = "") -> None:
        flat = {
            f"{prefix}{k}": float(v)
            for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if flat:
            self._mlflow.log_metrics(flat, step=step)

    def log_artifact(self, path: str | Path) -> None:
        self._mlflow.log_artifact(str(path))

    def log_params(self, params: dict) -> None:
        flat = {k: str(v)[:500] for k, v in flatten(params).items()}
        for i in range(0, len(flat), 90):  # MLflow accepts at most 100 params per call
            self._mlflow.log_params(dict(list(flat.items())[i : i + 90]))


@contextmanager
def mlflow_run(params: Params, params_path: str, stage: str, sections: dict, run_name: str | None = None):
    """An MLflow run tagged with stage, git commit and pipeline id, holding the stage's params."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(ROOT / uri.removeprefix("sqlite:///"))
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(params.mlflow.experiment)
    tags = {"stage": stage, "git_commit": git_commit(), "pipeline_id": pipeline_id(params_path)}
    with mlflow.start_run(run_name=run_name or stage, tags=tags):
        run = _Run(mlflow)
        run.log_params(sections)
        yield run


def dump_yaml(obj: dict) -> str:
    return yaml.safe_dump(obj, sort_keys=False)


def lineage(params: Params, sections: tuple[str, ...], *upstream: str | Path) -> dict:
    """The params that made an output: the upstream folders' own params plus this stage's sections.

    Only sections that really shaped the output are recorded, so a folder never claims a value
    of a param that changed after it was made.
    """
    out: dict = {}
    for folder in upstream:
        f = Path(folder) / "params.yaml"
        if f.is_file():
            out.update(yaml.safe_load(f.read_text()) or {})
    for name, value in section(params, *sections).items():
        node = out
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def checkpointing(params: Params, out: str | Path, made_by: dict, *inputs: str | Path) -> Checkpointing:
    """Training checkpoints of the stage writing ``out``, in a hidden folder beside it.

    Its fingerprint covers the params that made the run (``made_by``) and the bytes of its input
    folders, so a checkpoint is only resumed by the very run that wrote it.
    """
    out = Path(out)
    digest = hashlib.sha256(json.dumps(made_by, sort_keys=True, default=str).encode())
    digest.update(folder_digest(*inputs).encode())
    c = params.checkpoints
    return Checkpointing(out.parent / f".{out.name}.ckpt", c.every_steps, c.resume, digest.hexdigest())
