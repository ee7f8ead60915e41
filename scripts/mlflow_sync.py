"""Give every DVC experiment its parent row in MLflow, also where no stage ran.

A variant whose stages DVC restored from its run cache runs no stage script, so nothing logs it.
This script walks the experiments that `dvc exp show` lists (and the workspace), and for each one
whose pipeline execution has no parent run yet, creates it from the experiment's committed params
and evaluate metrics, tagged ``smoe.source=dvc-exp``. Executions that did log are left alone, so
each appears once.

    python -m scripts.mlflow_sync                                   # the default pipeline
    python -m scripts.mlflow_sync --params meo/params.yaml --metrics metrics/meo/compare.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys

import yaml

from pipeline.config import ParamsError, flatten, load_params
from stages import tracking


def _cli(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--metrics", default="metrics/evaluate.json", help="the pipeline's variant metrics")
    p.add_argument("--dry-run", action="store_true", help="list what would be logged and stop")
    return p.parse_args(argv)


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=tracking.repo_root(), capture_output=True, text=True)


def experiments() -> list[tuple[str, str, str]]:
    """(name, git ref, baseline commit) of every DVC experiment stored in this repository."""
    res = _git("for-each-ref", "--format=%(refname)", "refs/exps/")
    out = []
    for ref in res.stdout.split():
        parts = ref.split("/")
        # refs/exps/<sha[:2]>/<sha[2:]>/<name>; DVC's own bookkeeping refs have other shapes.
        if len(parts) == 5 and len(parts[2]) == 2:
            out.append((parts[4], ref, parts[2] + parts[3]))
    return out


def _show(rev: str, path: str) -> str | None:
    res = _git("show", f"{rev}:{path}")
    return res.stdout if res.returncode == 0 else None


def variants(metrics: dict) -> dict[str, dict]:
    """Variant -> scalar metrics, from evaluate.json (variant -> metrics, and records such as the
    zero-shot scorer's) or compare.json (models)."""
    table = metrics.get("models", metrics)
    return {
        v: {k: x for k, x in m.items() if isinstance(x, (int, float)) and not isinstance(x, bool)}
        for v, m in table.items()
        if isinstance(m, dict) and v not in tracking.EVALUATE_RECORDS
    }


def sync(params_path: str, metrics_path: str, dry_run: bool = False) -> list[str]:
    """Log the missing parent runs; returns the names logged (or that would be)."""
    try:
        params = load_params(tracking.resolve_path(params_path))
    except ParamsError as err:
        raise SystemExit(f"error: {err}") from None
    uri = tracking.resolve_uri(params.mlflow.tracking_uri)
    if uri is None:
        raise SystemExit(f"error: {params_path} sets mlflow.tracking_uri: null; there is no store to sync")
    try:
        tracking.check_store(uri)
    except tracking.TrackingError as err:
        raise SystemExit(f"error: {err}") from None
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment_id = tracking.experiment_id_for(client, uri, params.mlflow.experiment)
    logged = []
    for name, ref, baseline in experiments():
        params_text, metrics_text = _show(ref, params_path), _show(ref, metrics_path)
        if params_text is None or metrics_text is None:
            continue
        # An experiment of another pipeline leaves this one's params and metrics as the baseline's.
        if params_text == _show(baseline, params_path) and metrics_text == _show(baseline, metrics_path):
            continue
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{tracking.PIPELINE_TAG}` = '{name}' and tags.`{tracking.ROLE_TAG}` = 'pipeline'",
            max_results=1,
        )
        if found:
            continue
        logged.append(name)
        if dry_run:
            continue
        table = variants(json.loads(metrics_text))
        run = client.create_run(
            experiment_id,
            run_name=name,
            tags={
                tracking.PIPELINE_TAG: name,
                tracking.ROLE_TAG: "pipeline",
                "dvc_experiment": name,
                "git_commit": baseline,
                "params_file": params_path,
                "smoe.source": "dvc-exp",
                "params_sha256": hashlib.sha256(params_text.encode()).hexdigest()[:12],
            },
        )
        from mlflow.entities import Metric, Param, RunStatus

        flat = [Param(k, str(v)[:500]) for k, v in flatten(yaml.safe_load(params_text) or {}).items()]
        metrics = [Metric(f"{v}.{k}", float(x), 0, 0) for v, m in table.items() for k, x in m.items()]
        for i in range(0, max(len(flat), len(metrics)), 90):
            client.log_batch(run.info.run_id, params=flat[i : i + 90], metrics=metrics[i : i + 90])
        rows = [{"variant": v, **m} for v, m in table.items()]
        columns = {k: [r.get(k) for r in rows] for k in dict.fromkeys(k for r in rows for k in r)}
        client.log_table(run.info.run_id, data=columns, artifact_file="variants.json")
        client.set_terminated(run.info.run_id, status=RunStatus.to_string(RunStatus.FINISHED))
    return logged


def main(argv: list[str] | None = None) -> None:
    args = _cli(argv)
    for name in (p for p in (args.params, args.metrics) if not (tracking.resolve_path(p)).exists()):
        sys.exit(f"error: {name} does not exist (run from the repository root)")
    logged = sync(args.params, args.metrics, args.dry_run)
    verb = "would log" if args.dry_run else "logged"
    print(f"{verb} {len(logged)} experiment(s) without an MLflow row: {', '.join(logged) or '-'}")


if __name__ == "__main__":
    main()
