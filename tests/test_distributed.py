"""Training under ``accelerate launch``: 2 CPU processes (gloo DDP) train as one process at the same
global batch; only the main process writes; bad launcher values and batches are refused in one line.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.distributed import LauncherError, check_config_file, launched_accelerator, parse_launcher
from tests.conftest import TINY, stage_env

ROOT = Path(__file__).resolve().parents[1]
# Per-step loss of the 2-process run against the 1-process run (measured: at most 5e-7).
LOSS_ATOL = 1e-5
# Each launch starts in ~5 s; a hung rendezvous must fail the test, not CI.
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(port: int) -> list[str]:
    # --multi_gpu: with no GPU, accelerate starts gloo processes on the CPU (`--cpu` would start one).
    launcher = f"accelerate launch --multi_gpu --num_processes 2 --main_process_port {port}"
    return [str(Path(sys.executable).parent / "accelerate"), *launcher.split()[1:]], launcher


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = stage_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_processes_train_as_one_at_the_same_global_batch(tmp_path):
    """Fine-tuning, KD, task-specific pruning and a resumed run: same losses per step, same
    weights, same pruning."""
    from tests.distributed_worker import run

    cmd, _ = _launch(_free_port())
    _run([*cmd, "-m", "tests.distributed_worker", str(tmp_path / "two.json")], ROOT)
    two = json.loads((tmp_path / "two.json").read_text())
    one = run(tmp_path / "ckpt1")
    assert one["pruned"]["pruning_events"]  # the pruner acted
    for name in ("finetune", "kd", "pruned", "resumed"):
        assert two[name]["processes"] == 2 and one[name]["processes"] == 1
        assert two[name]["pruning_events"] == one[name]["pruning_events"]
        assert len(two[name]["losses"]) == len(one[name]["losses"]) == (4 if name == "resumed" else 6)
        assert two[name]["losses"] == pytest.approx(one[name]["losses"], abs=LOSS_ATOL)
        assert two[name]["history"] == one[name]["history"]
        assert two[name]["weights"] == pytest.approx(one[name]["weights"], rel=1e-6)
    # A run stopped after step 3 and resumed from the step-2 checkpoint ends exactly like the
    # uninterrupted one, with 2 processes as with one (only the main process wrote the checkpoint).
    for res in (one, two):
        assert res["resumed"]["weights"] == res["finetune"]["weights"]
        assert res["resumed"]["losses"] == res["finetune"]["losses"][2:]


def test_finetune_stage_in_two_processes_writes_once(prepared, tmp_path):
    port = _free_port()
    cmd, launcher = _launch(port)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(config={**TINY}, init_embeddings_from=None)
    params["finetune"].update(epochs=1, batch_size=4, warmup_steps=1, eval_batch_size=8)
    params["checkpoints"] = {"every_steps": 1, "resume": False}
    params["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"
    params["launch"] = {"launcher": launcher}
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    argv = ["--params", "params.yaml", "--data", str(prepared), "--out", "models/full", "--metrics", "m.json"]
    _run([*cmd, "-m", "stages.finetune", *argv], work)
    metrics = json.loads((work / "m.json").read_text())
    assert metrics["total_steps"] == 2 and metrics["history"][-1]["step"] == 2
    assert (work / "models" / "full" / "model.safetensors").is_file()
    # Nothing but the main process's outputs: no second model, metrics file or leftover checkpoint.
    written = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file())
    assert [p for p in written if not p.startswith(("models/full/", "mlruns/"))] == [
        "m.json",
        "mlflow.db",
        "params.yaml",
    ]
    with sqlite3.connect(work / "mlflow.db") as db:
        runs = db.execute("select name from runs").fetchall()
    assert len(runs) == 2, runs  # the pipeline's parent run and this stage's run, once


@pytest.mark.parametrize(
    "launcher",
    [
        "torchrun --nproc_per_node 2",
        "accelerate launch --num_processes 2",  # accelerate would start ONE process
        "accelerate launch --multi_gpu",
        "accelerate launch --multi_gpu --num_processes 2 --num_processes 4",
        "python -u",
    ],
)
def test_a_bad_launcher_is_refused_in_one_line(launcher):
    with pytest.raises(LauncherError, match="is not one of: python | accelerate launch") as err:
        parse_launcher(launcher)
    assert "\n" not in str(err.value)


def test_deepspeed_config_without_deepspeed_is_refused():
    path = ROOT / "configs" / "accelerate" / "deepspeed_zero3.yaml"
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        with pytest.raises(LauncherError, match="needs the deepspeed package .pip install deepspeed."):
            check_config_file(path)
    else:
        assert check_config_file(path) == "DEEPSPEED"
    assert check_config_file(ROOT / "configs" / "accelerate" / "fsdp.yaml") == "FSDP"
    assert check_config_file(ROOT / "configs" / "accelerate" / "ddp.yaml") == "MULTI_GPU"


def test_process_count_and_global_batch_are_checked(monkeypatch):
    cpu = torch.device("cpu")
    assert launched_accelerator("python", cpu, ("finetune.batch_size", 7)) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LauncherError, match="launch.launcher is python, but this stage runs in 2 processes"):
        launched_accelerator("python", cpu)
    with pytest.raises(LauncherError, match="asks for 4 processes, but this stage runs in 2"):
        launched_accelerator("accelerate launch --multi_gpu --num_processes 4", cpu)
    with pytest.raises(
        LauncherError, match=r"finetune.batch_size=7 \(the global batch\) is not divisible by"
    ):
        launched_accelerator(
            "accelerate launch --multi_gpu --num_processes 2", cpu, ("finetune.batch_size", 7)
        )
