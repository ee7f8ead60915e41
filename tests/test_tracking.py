"""MLflow tracking of the stages: store paths, pipeline names, parent and child runs, fast failure."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from stages import tracking


def test_relative_store_and_data_paths_resolve_against_dvc_root(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    assert tracking.resolve_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/repo/mlflow.db"
    assert tracking.resolve_uri("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"
    assert tracking.resolve_uri("mlruns") == f"{tmp_path}/repo/mlruns"
    assert tracking.resolve_uri("http://host:5000") == "http://host:5000"
    assert tracking.resolve_uri(None) is None
    assert tracking.resolve_path("../shared/data") == tmp_path / "repo" / ".." / "shared" / "data"
    monkeypatch.delenv("DVC_ROOT")
    assert tracking.repo_root() == tracking.CHECKOUT


def test_the_environment_uri_wins(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:1")
    assert tracking.resolve_uri("sqlite:///mlflow.db") == "http://elsewhere:1"
    assert tracking.resolve_uri(None) == "http://elsewhere:1"


def test_pipeline_name_is_the_experiment_else_commit_and_params_hash(monkeypatch, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("seed: 1\n")
    for var in ("SMOE_PIPELINE_ID", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(var, raising=False)
    plain = tracking.pipeline_name(params)
    commit, digest = plain.split("-")
    assert len(commit) == 7 and len(digest) == 8
    params.write_text("seed: 2\n")
    assert tracking.pipeline_name(params).split("-")[1] != digest
    monkeypatch.setenv("DVC_EXP_NAME", "my-exp")
    assert tracking.pipeline_name(params) == "my-exp"
    monkeypatch.setenv("SMOE_PIPELINE_ID", "forced")
    assert tracking.pipeline_name(params) == "forced"


def test_stages_of_one_execution_share_one_parent(monkeypatch, tmp_path):
    import mlflow

    params = tmp_path / "params.yaml"
    params.write_text("seed: 1\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("DVC_EXP_NAME", "e1")
    for stage in ("prepare", "finetune"):
        with tracking.stage_run(uri, "x", params, stage, {"seed": 1}, {"seed": 1}) as run:
            run.log_metrics({"loss": 1.0})
    with pytest.raises(SystemExit), tracking.stage_run(uri, "x", params, "profile", {}, {"seed": 1}):
        raise SystemExit("error: boom")
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("x")
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert exp.artifact_location == (tmp_path / "mlruns").as_uri()
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "pipeline"]
    assert [p.info.run_name for p in parents] == ["e1"]
    assert parents[0].info.status == "FAILED"  # its last stage failed
    children = {r.data.tags["stage"]: r for r in runs if r not in parents}
    assert set(children) == {"prepare", "finetune", "profile"}
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children.values())
    assert children["profile"].info.status == "FAILED" and children["prepare"].info.status == "FINISHED"
    assert parents[0].data.params == {"seed": "1"}


def test_no_tracking_logs_nothing(tmp_path):
    with tracking.stage_run(None, "x", tmp_path / "p.yaml", "s", {}, {}) as run:
        run.log_metrics({"a": 1.0})
        run.log_summary([{"variant": "full", "accuracy": 1.0}], {"full.accuracy": 1.0})
    assert not list(tmp_path.iterdir())


def test_a_server_that_never_answers_fails_within_10_s():
    # Accepts the connection (the kernel's backlog) and never replies: MLflow itself would retry.
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        uri = f"http://127.0.0.1:{srv.getsockname()[1]}"
        t0 = time.time()
        with pytest.raises(tracking.TrackingError, match=f"MLflow server {uri} is not reachable"):
            tracking.check_store(uri)
        assert time.time() - t0 < 10


def test_store_checks_name_the_problem(tmp_path):
    with pytest.raises(tracking.TrackingError, match="does not exist"):
        tracking.check_store(f"sqlite:///{tmp_path}/nope/mlflow.db")
    bad = tmp_path / "mlflow.db"
    bad.write_bytes(b"x" * 2000)
    with pytest.raises(tracking.TrackingError, match="not a usable SQLite database"):
        tracking.check_store(f"sqlite:///{bad}")
    tracking.check_store(f"sqlite:///{tmp_path}/new.db")  # a new store in an existing folder is fine
    assert not Path(tmp_path / "new.db").exists()


def test_a_read_only_store_is_refused(tmp_path, monkeypatch):
    import os

    db = tmp_path / "mlflow.db"
    tracking.check_store(f"sqlite:///{db}")
    import sqlite3

    sqlite3.connect(db).execute("CREATE TABLE t (x)").connection.close()
    real = os.access
    # Root ignores file modes, so the permission is faked for this file only.
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == db else real(p, mode))
    with pytest.raises(tracking.TrackingError, match="is not writable"):
        tracking.check_store(f"sqlite:///{db}")
