"""What every stage script shares: argument parsing, params, MLflow runs, metrics files.

Library code never touches argv, params.yaml or MLflow; this module is where they meet.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import yaml

from pipeline.checkpointing import Checkpointing, TrainingCheckpointError, folder_digest
from pipeline.config import Params, ParamsError, load_params
from pipeline.data import DataError
from pipeline.families import ModelStructureError
from pipeline.modeling import CheckpointError
from stages import tracking

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


_STOP_REASON: dict[str, str] = {}


def _exit_on_signal(signum, frame) -> None:
    # Unwinding (rather than dying at once) lets temporary output folders be removed and the MLflow
    # run be marked failed; the training checkpoint stays for a resume.
    reason = _STOP_REASON.get("why") or f"stopped by signal {signal.Signals(signum).name}"
    raise SystemExit(f"error: {reason} before the stage completed; its outputs were not written")


def _proc_stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, state, start time) of a Linux process; None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return int(fields[1]), fields[0], fields[19]


def _dvc_ancestor() -> int | None:
    """The ``dvc`` process this stage runs under (through DVC's shell), if any."""
    pid = os.getppid()
    while pid > 1:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        if any(Path(a.decode(errors="replace")).name == "dvc" for a in argv[:3]) or b"dvc" in argv[1:3]:
            return pid
        stat = _proc_stat(pid)
        if stat is None:
            return None
        pid = stat[0]
    return None


def _watch_parent(pid: int, interval: float = 1.0) -> None:
    """Stop this stage when the ``dvc`` that started it dies (e.g. a CI timeout's SIGTERM to
    dvc): an orphaned stage would later write its outputs behind DVC's back."""
    start = _proc_stat(pid)

    def watch() -> None:
        while True:
            now = _proc_stat(pid)
            if now is None or now[1] == "Z" or now[2] != start[2]:
                _STOP_REASON["why"] = f"dvc (pid {pid}), which started this stage, exited"
                os.kill(os.getpid(), signal.SIGTERM)
                return
            threading.Event().wait(interval)

    threading.Thread(target=watch, name="dvc-watch", daemon=True).start()


def load(args: argparse.Namespace) -> Params:
    """Validate params once, before any work; a bad file stops the stage with the key paths at fault.

    Also checks the MLflow store (seconds, not MLflow's minutes of retries), and makes SIGINT,
    SIGTERM and the death of the parent ``dvc`` stop the stage cleanly.
    """
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
    try:
        params = load_params(args.params)
    except ParamsError as err:
        sys.exit(f"error: {err}")
    uri = tracking.resolve_uri(params.mlflow.tracking_uri)
    if uri is not None and is_main_process():
        try:
            tracking.check_store(uri)
        except tracking.TrackingError as err:
            sys.exit(f"error: {err}")
    if os.environ.get("DVC_STAGE") and Path("/proc").is_dir():
        pid = _dvc_ancestor()
        if pid is not None:
            _watch_parent(pid)
    from transformers.utils import logging as hf_logging

    # Per-tensor load/save bars flood DVC's log; the training bar stays.
    hf_logging.disable_progress_bar()
    # An upcycled decoder's shared expert has width 0 (pipeline.upcycle_decoder): torch warns at
    # every build of the model that initialising its empty weights does nothing, which is the point.
    warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
    if params.runtime.num_threads:
        import torch

        torch.set_num_threads(params.runtime.num_threads)
    return params


def weights_dtype(params: Params):
    """The torch dtype of ``runtime.weights_dtype``; None for auto (the checkpoint's own)."""
    from pipeline.modeling import weights_dtype as named

    return named(params.runtime.weights_dtype)


def is_main_process() -> bool:
    """Whether this is the process that writes (the only one unless under ``accelerate launch``,
    whose launcher sets RANK for each process)."""
    return os.environ.get("RANK", "0") == "0"


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


def write_json(obj: dict, path: str | Path) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno == errno.ENOSPC
    # torch.save and safetensors report a full disk as their own errors, without an errno.
    text = str(err)
    return isinstance(err, RuntimeError) and (
        "No space left on device" in text or "file write failed" in text or "StorageFull" in text
    )


def _free_mb(path: Path) -> str:
    for folder in (path, *path.parents):
        if folder.exists():
            return f"{shutil.disk_usage(folder).free / 2**20:.1f} MB free on {folder}"
    return "free space unknown"


@contextmanager
def mlflow_run(params: Params, params_path: str, stage: str, sections: dict, run_name: str | None = None):
    """The stage's MLflow run, a child of its pipeline execution's parent run (``stages.tracking``),
    holding the stage's params; a full disk while inside it ends the stage in one line."""
    all_params = yaml.safe_load(Path(params_path).read_text()) or {}
    # Under accelerate launch only the main process logs: the others would open duplicate runs.
    uri = tracking.resolve_uri(params.mlflow.tracking_uri) if is_main_process() else None
    with tracking.stage_run(
        uri, params.mlflow.experiment, params_path, stage, sections, all_params, run_name
    ) as run:
        try:
            yield run
        except (OSError, RuntimeError) as err:
            if not _disk_full(err):
                raise
            where = Path(getattr(err, "filename", None) or Path.cwd())
            raise SystemExit(
                f"error: no space left on device while writing {where} ({_free_mb(where)}); "
                "free space there and re-run the stage (its temporary files were removed)"
            ) from None


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
