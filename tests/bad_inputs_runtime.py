"""Bad-input cases: the run around the stage: MLflow stores, signals, full disks, paths."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import yaml

from stages import finetune, prepare
from tests.bad_input_harness import Case, Ctx

TORCH_DISK_FULL = (
    "[enforce fail at inline_container.cc:664] . unexpected pos 4416 vs 4304 "
    "PytorchStreamWriter failed writing file data/3: file write failed"
)


def _mlflow(uri: str, stage_args: bool = True, **env: str):
    """Params whose MLflow store is ``uri`` (the harness otherwise points it at a scratch db)."""

    def setup(ctx: Ctx):
        path = ctx.params()
        raw = yaml.safe_load(path.read_text())
        raw["mlflow"]["tracking_uri"] = uri.format(tmp=ctx.tmp)
        path.write_text(yaml.safe_dump(raw))
        for k, v in env.items():
            ctx.monkeypatch.setenv(k, v.format(tmp=ctx.tmp))
        return path, ["--data", str(ctx.prepared)] if stage_args else []

    return setup


def _garbage_db(ctx: Ctx):
    (ctx.tmp / "store").mkdir()
    (ctx.tmp / "store" / "mlflow.db").write_bytes(b"this is not an sqlite file" * 100)
    return _mlflow("sqlite:///{tmp}/store/mlflow.db")(ctx)


def _finetune_with(fail):
    """Params for a tiny finetune whose work is replaced by ``fail(ctx, folder)``: a signal or a
    full disk arriving in the middle of the stage, after something was written."""

    def setup(ctx: Ctx):
        from tests.conftest import TINY

        p = ctx.params(**{"model.config": TINY, "model.init_embeddings_from": None})

        def save(model, folder, **kwargs):
            folder = Path(folder)
            (folder / "model.safetensors").write_bytes(b"\0" * 1024)  # half-written
            fail(folder)

        ctx.monkeypatch.setattr(finetune, "save_model", save)
        ctx.monkeypatch.setattr(finetune, "train", _no_training)
        return p, ["--data", str(ctx.prepared)]

    return setup


def _no_training(*args, **kwargs) -> dict:
    return {"best_dev_accuracy": 0.5, "best_step": 0, "total_steps": 0, "history": []}


def _signal(signum: int):
    def fail(folder: Path) -> None:
        os.kill(os.getpid(), signum)

    return fail


def _disk_full(folder: Path) -> None:
    raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.safetensors"))


def _torch_disk_full(folder: Path) -> None:
    raise RuntimeError(TORCH_DISK_FULL)


def _checkpoint_disk_full(ctx: Ctx):
    """torch.save of a training checkpoint fails half-way, as on a full disk."""
    import pipeline.checkpointing
    from tests.conftest import TINY

    def save(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"\0" * 4096)
        raise RuntimeError(TORCH_DISK_FULL)

    ctx.monkeypatch.setattr(pipeline.checkpointing.torch, "save", save)
    p = ctx.params(**{"model.config": TINY, "model.init_embeddings_from": None, "checkpoints.every_steps": 1})
    return p, ["--data", str(ctx.prepared)]


def _data_beside_the_repo(ctx: Ctx):
    # As in `dvc exp run --temp`: DVC_ROOT names the user's repository, whose data folder is absent.
    ctx.monkeypatch.delenv("SMOE_DATA_DIR", raising=False)
    ctx.monkeypatch.setenv("DVC_ROOT", str(ctx.tmp / "repo"))
    (ctx.tmp / "repo").mkdir()
    return ctx.params(**{"data.data_dir": "../shared/data"}), []


CASES = [
    Case(
        "mlflow store folder missing",
        finetune.main,
        _mlflow("sqlite:///{tmp}/no/such/folder/mlflow.db"),
        ("MLflow store sqlite:///", "no/such/folder does not exist", "mlflow.tracking_uri: null"),
    ),
    Case(
        "mlflow store not sqlite",
        finetune.main,
        _garbage_db,
        ("is not a usable SQLite database", "mlflow.tracking_uri: null"),
    ),
    Case(
        "mlflow server down",
        finetune.main,
        _mlflow("http://127.0.0.1:9"),
        ("MLflow server http://127.0.0.1:9 is not reachable", "mlflow.tracking_uri: null"),
    ),
    Case(
        "mlflow server down, from the environment",
        prepare.main,
        _mlflow("sqlite:///{tmp}/mlflow.db", False, MLFLOW_TRACKING_URI="http://127.0.0.1:9/"),
        ("MLflow server http://127.0.0.1:9/ is not reachable", "$MLFLOW_TRACKING_URI"),
    ),
    Case(
        "mlflow file store folder missing",
        finetune.main,
        _mlflow("file://{tmp}/gone/mlruns"),
        ("gone does not exist", "mlflow.tracking_uri: null"),
    ),
    Case(
        "ctrl-c during the stage",
        finetune.main,
        _finetune_with(_signal(signal.SIGINT)),
        ("stopped by signal SIGINT before the stage completed", "outputs were not written"),
    ),
    Case(
        "sigterm while saving",
        finetune.main,
        _finetune_with(_signal(signal.SIGTERM)),
        ("stopped by signal SIGTERM before the stage completed",),
    ),
    Case(
        "disk full while saving",
        finetune.main,
        _finetune_with(_disk_full),
        ("no space left on device while writing", "model.safetensors", "MB free on", "free space"),
    ),
    Case(
        "disk full inside torch.save",
        finetune.main,
        _finetune_with(_torch_disk_full),
        ("no space left on device while writing", "temporary files were removed"),
    ),
    Case(
        "disk full while saving a training checkpoint",
        finetune.main,
        _checkpoint_disk_full,
        ("no space left on device while writing", "temporary files were removed"),
    ),
    Case(
        "relative data folder of a --temp experiment",
        prepare.main,
        _data_beside_the_repo,
        ("repo/../shared/data does not exist",),
    ),
]
