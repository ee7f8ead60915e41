"""Resumable training: an interrupted run resumed from its checkpoint ends exactly like an
uninterrupted one; checkpoints of other runs, or unreadable ones, are never resumed silently."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from pipeline.checkpointing import STATE_FILE, Checkpointing, TrainingCheckpointError
from pipeline.compression import SparsePruner, compress_model
from pipeline.families import adapter_for
from pipeline.merging import merge_model
from pipeline.modeling import build_model
from pipeline.training import KDSettings, train
from tests.conftest import CLASS_TARGETS, EOS_ID, PAD_ID, TINY, VOCAB, profiles_for, stage_env, train_settings

CPU = torch.device("cpu")
SETTINGS = train_settings(
    epochs=3, batch_size=8, eval_batch_size=48, lr=1e-3, weight_decay=0.01, warmup_steps=2
)
TOTAL = 18  # 48 rows / 8 per batch x 3 epochs


class Interrupted(Exception):
    pass


def _dropout_model():
    # Dropout on, so that resuming must also restore the random generators to match.
    return build_model(
        "switch_transformers", {**TINY, "dropout_rate": 0.1}, VOCAB, PAD_ID, EOS_ID, 0.02, seed=3
    )


def _student(teacher):
    model = copy.deepcopy(teacher)
    adapter = adapter_for(model)
    names = [ly.name for ly in adapter.sparse_layers(model)][1:]
    groups = {"layers": {n: {"merged": True, "groups": [[0, 1, 2, 3], [4, 5, 6, 7]]} for n in names}}
    merge_model(model, adapter, groups, profiles_for(names), "frequency")
    compress_model(model, adapter, rank=4)
    return model


def _stop_at(step_hook, at: int):
    def hook(step: int, total: int) -> None:
        if step_hook is not None:
            step_hook(step, total)
        if step == at:
            raise Interrupted

    return hook


def _kd_run(teacher, rows, ckpt=None, interrupt_at=None):
    """KD with column pruning (the kd_finetune recipe); optionally interrupted after a step."""
    model = _student(teacher)
    pruner = SparsePruner(model, target=0.25, warmup_frac=0.1, cooldown_frac=0.2)
    hook = pruner if interrupt_at is None else _stop_at(pruner, interrupt_at)
    # The pruner's state must travel in the checkpoint even when wrapped: expose it.
    if interrupt_at is not None:
        hook.state_dict, hook.load_state_dict = pruner.state_dict, pruner.load_state_dict
    summary = train(
        model,
        rows,
        rows[:24],
        CLASS_TARGETS,
        PAD_ID,
        SETTINGS,
        CPU,
        seed=5,
        kd=KDSettings(teacher, alpha=0.2, temperature=2.0),
        step_hook=hook,
        eligible_from=pruner.final_step,
        progress=False,
        checkpointing=ckpt,
    )
    return model, pruner, summary


def _same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _plain_run(rows, ckpt=None, interrupt_at=None):
    model = _dropout_model()
    summary = train(
        model,
        rows,
        rows[:24],
        CLASS_TARGETS,
        PAD_ID,
        SETTINGS,
        CPU,
        seed=11,
        step_hook=None if interrupt_at is None else _stop_at(None, interrupt_at),
        progress=False,
        checkpointing=ckpt,
    )
    return model, summary


@pytest.mark.parametrize("interrupt_at", [4, 7, 12])  # mid-epoch, and just after an epoch's eval
def test_resumed_training_ends_exactly_like_an_uninterrupted_run(rows, tmp_path, interrupt_at):
    reference, ref_summary = _plain_run(rows)
    ckpt = Checkpointing(tmp_path / "ckpt", every_steps=3, resume=True, fingerprint="run-a")
    with pytest.raises(Interrupted):
        _plain_run(rows, ckpt, interrupt_at=interrupt_at)
    saved = torch.load(ckpt.path, weights_only=True)
    assert saved["step"] == 3 * ((interrupt_at + 1) // 3)  # the last multiple of 3 reached
    resumed, summary = _plain_run(rows, ckpt)
    _same_weights(resumed, reference)
    assert summary == ref_summary


def test_resumed_kd_with_pruning_ends_exactly_like_an_uninterrupted_run(tiny_model, rows, tmp_path):
    reference, ref_pruner, ref_summary = _kd_run(tiny_model, rows)
    ckpt = Checkpointing(tmp_path / "ckpt", every_steps=5, resume=True, fingerprint="kd")
    # Step 11 is inside the pruning window (steps 1..14 of 18): masks and importances are in flux.
    with pytest.raises(Interrupted):
        _kd_run(tiny_model, rows, ckpt, interrupt_at=11)
    resumed, pruner, summary = _kd_run(tiny_model, rows, ckpt)
    _same_weights(resumed, reference)
    assert summary == ref_summary
    assert pruner.kept_fraction() == ref_pruner.kept_fraction() < 1.0
    for a, b in zip(pruner.ipt + pruner.unc, ref_pruner.ipt + ref_pruner.unc, strict=True):
        assert torch.equal(a, b)


def test_without_resume_a_checkpoint_is_ignored_and_replaced(rows, tmp_path, capsys):
    ckpt = Checkpointing(tmp_path / "ckpt", every_steps=3, resume=True, fingerprint="run-a")
    with pytest.raises(Interrupted):
        _plain_run(rows, ckpt, interrupt_at=7)
    fresh = Checkpointing(tmp_path / "ckpt", every_steps=3, resume=False, fingerprint="run-a")
    reference, _ = _plain_run(rows)
    model, summary = _plain_run(rows, fresh)
    assert "ignored (resume is off)" in capsys.readouterr().out
    _same_weights(model, reference)
    # The new run's last checkpoint (step 15 of 18) replaced the old one.
    assert torch.load(fresh.path, weights_only=True)["step"] == 15


def test_a_checkpoint_of_other_params_is_not_resumed(rows, tmp_path, capsys):
    ckpt = Checkpointing(tmp_path / "ckpt", every_steps=3, resume=True, fingerprint="lr=1e-3")
    with pytest.raises(Interrupted):
        _plain_run(rows, ckpt, interrupt_at=7)
    other = Checkpointing(tmp_path / "ckpt", every_steps=3, resume=True, fingerprint="lr=5e-4")
    reference, _ = _plain_run(rows)
    model, _ = _plain_run(rows, other)
    assert "made by other params or inputs; training from the start" in capsys.readouterr().out
    _same_weights(model, reference)


def test_resume_without_a_checkpoint_trains_from_the_start(rows, tmp_path, capsys):
    ckpt = Checkpointing(tmp_path / "none", every_steps=0, resume=True, fingerprint="x")
    reference, _ = _plain_run(rows)
    model, _ = _plain_run(rows, ckpt)
    assert "no checkpoint" in capsys.readouterr().out
    _same_weights(model, reference)
    assert not ckpt.path.exists()  # every_steps=0 never saves


def test_a_truncated_checkpoint_is_an_error_naming_the_file(rows, tmp_path):
    ckpt = Checkpointing(tmp_path / "ckpt", every_steps=3, resume=True, fingerprint="run-a")
    ckpt.folder.mkdir()
    ckpt.path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(
        TrainingCheckpointError, match=rf"cannot read training checkpoint .*{STATE_FILE}.*delete it"
    ):
        _plain_run(rows, ckpt)


class _Payload:
    """Unpickling this would run code: it must never happen when a checkpoint is read."""

    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('ran')",))


def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = Checkpointing(tmp_path / "ckpt", every_steps=3, resume=True, fingerprint="run-a")
    ckpt.folder.mkdir()
    torch.save({"fingerprint": "run-a", "payload": _Payload()}, ckpt.path)
    with pytest.raises(TrainingCheckpointError, match="cannot read training checkpoint"):
        _plain_run(rows, ckpt)
    assert not (tmp_path / "PWNED").exists()


def test_checkpoints_are_written_atomically(tmp_path):
    ckpt = Checkpointing(tmp_path / "ckpt", every_steps=1, resume=True, fingerprint="f")
    ckpt.save({"step": 1, "total_steps": 2})
    assert [p.name for p in ckpt.folder.iterdir()] == [STATE_FILE]
    assert ckpt.load(2)["step"] == 1
    ckpt.clear()
    assert not ckpt.folder.exists()


def _long_finetune(prepared, tmp_path) -> tuple[list[str], Path]:
    """A finetune stage command that trains for minutes, checkpointing every 5 steps."""
    import sys
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["model"].update(config={**TINY}, init_embeddings_from=None)
    params["finetune"].update(epochs=100, batch_size=1, warmup_steps=1)
    params["checkpoints"] = {"every_steps": 5, "resume": False}
    params["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "models" / "full"
    cmd = [sys.executable, "-m", "stages.finetune", "--params", str(tmp_path / "params.yaml")]
    cmd += ["--data", str(prepared), "--out", str(out), "--metrics", str(tmp_path / "m.json")]
    return cmd, out


def _wait_for_checkpoint(proc, out) -> Path:
    import time

    state = out.parent / ".full.ckpt" / STATE_FILE
    deadline = time.time() + 300
    while not state.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.01)
    return state


# SIGINT takes the same handler; the catalogue sends it to a stage in process ("ctrl-c during the stage").
@pytest.mark.parametrize("signame", ["SIGTERM"])
def test_a_signal_stops_finetune_cleanly_and_keeps_the_checkpoint(prepared, tmp_path, signame):
    """SIGTERM (what schedulers and `kill` send) and SIGINT (Ctrl-C) unwind the stage: one line,
    no output or temporary folder left, the MLflow runs marked failed, the checkpoint kept for a
    resume."""
    import signal
    import sqlite3
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd, out = _long_finetune(prepared, tmp_path)
    proc = subprocess.Popen(
        cmd, cwd=root, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    state = _wait_for_checkpoint(proc, out)
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert f"error: stopped by signal {signame} before the stage completed" in err, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert not out.exists() and not (tmp_path / "m.json").exists()
    assert not list(out.parent.glob(".full.tmp-*"))
    assert torch.load(state, weights_only=True)["step"] % 5 == 0
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        # The pipeline's parent run and the stage's child run.
        assert db.execute("SELECT status FROM runs").fetchall() == [("FAILED",), ("FAILED",)]


def test_a_stage_stops_when_its_dvc_dies(prepared, tmp_path):
    """SIGTERM to `dvc` (a CI timeout) ends dvc, not the shell's child it started: the stage sees
    its dvc gone and stops, instead of writing its outputs later behind DVC's back."""
    import shlex
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd, out = _long_finetune(prepared, tmp_path)
    # A stand-in for dvc: a process named dvc that runs the stage through a shell, as DVC does.
    fake = tmp_path / "bin" / "dvc"
    fake.parent.mkdir()
    fake.write_text(
        f"#!{sys.executable}\nimport subprocess, sys\n"
        f"sys.exit(subprocess.call(['/bin/sh', '-c', {shlex.join(cmd)!r}], cwd={str(root)!r}))\n"
    )
    fake.chmod(0o755)
    env = {**stage_env(), "DVC_STAGE": "finetune"}
    dvc = subprocess.Popen([str(fake)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(dvc, out)
    (stage_pid,) = _stage_pids(str(out))
    dvc.send_signal(signal.SIGKILL)
    dvc.wait(timeout=30)
    # It notices within a second; unwinding can take long on a loaded machine.
    deadline = time.time() + 120
    while (
        Path(f"/proc/{stage_pid}").exists() and Path(f"/proc/{stage_pid}/stat").read_text().split()[2] != "Z"
    ):
        assert time.time() < deadline, "the stage outlived its dvc by two minutes"
        time.sleep(0.2)
    assert not out.exists() and not list(out.parent.glob(".full.tmp-*"))


def _stage_pids(text: str) -> list[int]:
    """Python processes running a stage module with ``text`` among their arguments."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if proc.name.isdigit() and argv[1:2] == ["-m"] and argv[2].startswith("stages.") and text in argv:
            found.append(int(proc.name))
    return found
