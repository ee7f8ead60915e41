"""MLflow tracking for the stage scripts: one parent run per pipeline execution, one child per stage.

A pipeline execution is named after its DVC experiment (``$DVC_EXP_NAME``, which ``dvc exp run``
sets for plain, ``--temp`` and queued runs alike) or, outside ``dvc exp``, after the commit and a
hash of the params file. Every stage of that execution finds the parent run by that name and logs
itself as a nested child, so the MLflow UI shows one row per execution, expandable to its stages.

Paths resolve against the repository the user ran DVC in (``$DVC_ROOT``), not the temporary copy
that ``dvc exp run --temp`` and queued experiments execute in, so every execution logs to the same
store. No stage result depends on this module, which is why no stage lists it as a DVC dependency
(like the ``mlflow`` params section).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHECKOUT = Path(__file__).resolve().parent.parent
# Seconds an MLflow store may take to answer the up-front check; the budget is 10 s in all.
STORE_TIMEOUT_S = 5.0
PIPELINE_TAG = "pipeline_id"
ROLE_TAG = "smoe.role"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
NO_TRACKING_HINT = "or set mlflow.tracking_uri: null to run without tracking"
# Keys of evaluate.json that are records about the run, not variants: the zero-shot scorer's name
# and version, the router modes the merged model's family does not define (with the reason), and
# the evaluated examples' trivial baselines (majority share, chance, ...).
EVALUATE_RECORDS = ("zero_shot_scorer", "router_modes_refused", "trivial_baselines")


class TrackingError(Exception):
    """The MLflow store cannot be used: unreachable, unwritable or not an MLflow store."""


def repo_root() -> Path:
    """The repository DVC was started in; in a ``--temp`` or queued experiment, not the copy."""
    root = os.environ.get("DVC_ROOT")
    return Path(root).resolve() if root else CHECKOUT


def resolve_path(path: str | Path) -> Path:
    """A relative path from params, taken against the repository root (absolute ones unchanged)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else repo_root() / path


def resolve_uri(uri: str | None) -> str | None:
    """The tracking URI to use: ``$MLFLOW_TRACKING_URI`` wins; relative store paths are anchored at
    the repository root; None means no tracking."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or uri
    if not uri:
        return None
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(resolve_path(uri.removeprefix("sqlite:///")))
    if uri.startswith("file:"):
        rest = uri.removeprefix("file://") if uri.startswith("file://") else uri.removeprefix("file:")
        return "file://" + str(resolve_path(rest))
    if "://" not in uri:
        return str(resolve_path(uri))
    return uri


def _check_writable_folder(uri: str, folder: Path) -> None:
    if not folder.is_dir():
        raise TrackingError(
            f"MLflow store {uri}: folder {folder} does not exist; create it, {NO_TRACKING_HINT}"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise TrackingError(
            f"MLflow store {uri}: folder {folder} is not writable; fix its permissions, {NO_TRACKING_HINT}"
        )


def check_store(uri: str, timeout: float = STORE_TIMEOUT_S) -> None:
    """Fail in seconds, before any work, where the store cannot take a run (MLflow itself retries
    for minutes and then raises a library traceback)."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        path = path if path.is_absolute() else Path("/" + str(path))
        _check_writable_folder(uri, path.parent)
        if path.exists():
            if not os.access(path, os.R_OK | os.W_OK):
                raise TrackingError(
                    f"MLflow store {uri}: {path} is not writable; fix its permissions, {NO_TRACKING_HINT}"
                )
            try:
                con = sqlite3.connect(path, timeout=timeout, isolation_level=None)
                try:
                    # A write lock, released at once: a read-only file or file system fails here.
                    con.execute("BEGIN IMMEDIATE")
                    con.execute("PRAGMA schema_version").fetchone()
                    con.execute("ROLLBACK")
                finally:
                    con.close()
            except sqlite3.Error as err:
                raise TrackingError(
                    f"MLflow store {uri}: {path} is not a usable SQLite database ({err}); "
                    f"move it away, {NO_TRACKING_HINT}"
                ) from None
    elif uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
                resp.read(64)
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(
                f"MLflow server {uri} is not reachable ({reason}); start it (mlflow server ...), "
                f"fix mlflow.tracking_uri / $MLFLOW_TRACKING_URI, {NO_TRACKING_HINT}"
            ) from None
    elif uri.startswith("file://") or "://" not in uri:
        folder = Path(uri.removeprefix("file://"))
        _check_writable_folder(uri, folder if folder.exists() else folder.parent)


def git_commit(root: Path | None = None) -> str:
    """HEAD of the checkout, with ``-dirty`` when tracked files differ from it."""
    root = root or CHECKOUT
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pipeline_name(params_path: str | Path) -> str:
    """The parent run's name: the DVC experiment, else ``<commit>-<params hash>``.

    ``$SMOE_PIPELINE_ID`` overrides both. The commit is HEAD without the dirty flag: DVC rewrites
    the tracked dvc.lock after every stage, which must not start a new parent mid-pipeline.
    """
    for var in ("SMOE_PIPELINE_ID", "DVC_EXP_NAME"):
        if os.environ.get(var):
            return os.environ[var]
    commit = os.environ.get("DVC_EXP_BASELINE_REV") or git_commit().removesuffix("-dirty")
    digest = hashlib.sha256(Path(params_path).read_bytes()).hexdigest()
    return f"{commit[:7]}-{digest[:8]}"


class StageRun:
    """What a stage logs to its run; every call is a no-op when tracking is off."""

    def __init__(self, mlflow: Any | None, parent_id: str | None = None) -> None:
        self._mlflow = mlflow
        self.parent_id = parent_id

    def log_metrics(self, metrics: Mapping, step: int | None = None, prefix: str = "") -> None:
        from pipeline.config import flatten

        if self._mlflow is None:
            return
        flat = {
            f"{prefix}{k}": float(v)
            for k, v in flatten(dict(metrics)).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if flat:
            self._mlflow.log_metrics(flat, step=step)

    def log_params(self, params: Mapping) -> None:
        from pipeline.config import flatten

        if self._mlflow is None:
            return
        flat = {k: str(v)[:500] for k, v in flatten(dict(params)).items()}
        items = list(flat.items())
        for i in range(0, len(items), 90):  # MLflow takes at most 100 params per call
            self._mlflow.log_params(dict(items[i : i + 90]))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self._mlflow is not None:
            self._mlflow.set_tags({k: str(v)[:5000] for k, v in tags.items()})

    def log_artifact(self, path: str | Path) -> None:
        if self._mlflow is not None:
            self._mlflow.log_artifact(str(path))

    def log_summary(
        self, table: list[dict], headline: Mapping[str, float], figure: Any = None, name: str = "variants"
    ) -> None:
        """The pipeline's variant x metric table, headline metrics and plot, on this run and on
        the parent (where the experiment page shows them as columns)."""
        try:
            if self._mlflow is not None:
                self._log_summary(table, headline, figure, name)
        finally:
            if figure is not None:
                import matplotlib.pyplot as plt

                plt.close(figure)

    def _log_summary(self, table: list[dict], headline: Mapping[str, float], figure: Any, name: str) -> None:
        columns = {k: [row.get(k) for row in table] for k in dict.fromkeys(k for row in table for k in row)}
        self._mlflow.log_table(data=columns, artifact_file=f"{name}.json")
        if figure is not None:
            self._mlflow.log_figure(figure, f"{name}_accuracy_vs_size.png")
        if self.parent_id:
            from mlflow.entities import Metric

            client = self._mlflow.MlflowClient()
            client.log_table(self.parent_id, data=columns, artifact_file=f"{name}.json")
            if figure is not None:
                client.log_figure(self.parent_id, figure, f"{name}_accuracy_vs_size.png")
            now = int(time.time() * 1000)
            metrics = [Metric(k, float(v), now, 0) for k, v in headline.items()]
            for i in range(0, len(metrics), 500):
                client.log_batch(self.parent_id, metrics=metrics[i : i + 500])


def experiment_id_for(client: Any, uri: str, name: str) -> str:
    """The id of MLflow experiment ``name``, created on first use.

    An SQLite store gets its artifacts in ``mlruns/`` beside the database file: MLflow's default
    (./mlruns of the working directory) would put them in the temporary copy of a ``--temp``
    experiment, which DVC deletes.
    """
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path("/" + uri.removeprefix("sqlite:///").lstrip("/")).parent / "mlruns").as_uri()
        experiment_id = client.create_experiment(name, artifact_location=location)
    else:
        experiment_id = exp.experiment_id
    if exp is None or EXPERIMENT_KIND_TAG not in exp.tags:
        # Else MLflow 3's UI opens the experiment on its GenAI trace pages, not on the runs table.
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")
    return experiment_id


def _parent(client: Any, experiment_id: str, name: str, tags: dict, params: Mapping) -> str:
    from mlflow.entities import Param, RunStatus

    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PIPELINE_TAG}` = '{name}' and tags.`{ROLE_TAG}` = 'pipeline'",
        max_results=1,
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return run_id
    run = client.create_run(experiment_id, run_name=name, tags={**tags, ROLE_TAG: "pipeline"})
    from pipeline.config import flatten

    flat = [Param(k, str(v)[:500]) for k, v in flatten(dict(params)).items()]
    for i in range(0, len(flat), 90):
        client.log_batch(run.info.run_id, params=flat[i : i + 90])
    return run.info.run_id


@contextmanager
def stage_run(
    uri: str | None,
    experiment: str,
    params_path: str | Path,
    stage: str,
    sections: Mapping,
    all_params: Mapping,
    run_name: str | None = None,
) -> Iterator[StageRun]:
    """A child run for ``stage`` under its pipeline execution's parent run (created on first use).

    Both end FAILED if the stage raises or exits, FINISHED otherwise (the parent is RUNNING again
    while a later stage runs). ``uri`` None yields a run that logs nothing.
    """
    if uri is None:
        yield StageRun(None)
        return
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    import mlflow

    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which would then outrank the params of
    # the next stage run in this process (tests run many); it is put back on the way out.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    try:
        with _child_run(mlflow, uri, experiment, params_path, stage, sections, all_params, run_name) as run:
            yield run
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _child_run(mlflow, uri, experiment, params_path, stage, sections, all_params, run_name):
    from mlflow.entities import RunStatus
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    experiment_id = experiment_id_for(client, uri, experiment)
    name = pipeline_name(params_path)
    tags = {
        PIPELINE_TAG: name,
        "git_commit": git_commit(),
        "params_file": str(params_path),
        "dvc_experiment": os.environ.get("DVC_EXP_NAME", ""),
    }
    parent_id = _parent(client, experiment_id, name, tags, all_params)
    child = client.create_run(
        experiment_id,
        run_name=run_name or stage,
        tags={**tags, "stage": stage, ROLE_TAG: "stage", MLFLOW_PARENT_RUN_ID: parent_id},
    )
    status = "FAILED"
    try:
        with mlflow.start_run(run_id=child.info.run_id):
            run = StageRun(mlflow, parent_id)
            run.log_params(sections)
            yield run
        status = "FINISHED"
    finally:
        client.set_terminated(parent_id, status=RunStatus.to_string(getattr(RunStatus, status)))
