"""The MLflow UI as a user sees it, in a real headless Chromium: the experiment page lists one row
per pipeline execution (its stages folded under it) with the headline metrics as columns.

Skipped, saying why, where Debian's Chromium (/usr/bin/chromium) or Playwright is missing.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from stages import tracking
from tests.conftest import stage_env

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags this closed network needs: without the background-networking ones, Chromium keeps trying
# Google's hosts at every start.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
EXECUTIONS = ("exp-uniform", "exp-fisher")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_executions(store: Path, params_path: Path, monkeypatch) -> str:
    """Two pipeline executions of two stages each, logged by the stages' own tracking code."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    uri = f"sqlite:///{store}"
    for n, name in enumerate(EXECUTIONS):
        monkeypatch.setenv("DVC_EXP_NAME", name)
        for stage in ("merge", "evaluate"):
            with tracking.stage_run(
                uri, "mc-smoe", params_path, stage, {"merge": {"n": n}}, {"seed": n}
            ) as run:
                run.log_metrics({"seconds": 1.0 + n})
                if stage == "evaluate":
                    table = [
                        {"variant": "full", "accuracy": 0.80, "expert_params": 8e6},
                        {"variant": "mc_smoe", "accuracy": 0.75 - 0.01 * n, "expert_params": 2e6},
                    ]
                    headline = {f"{r['variant']}.accuracy": r["accuracy"] for r in table}
                    run.log_summary(table, headline, plt.figure())
    import mlflow

    return mlflow.MlflowClient(uri).get_experiment_by_name("mc-smoe").experiment_id


@pytest.mark.slow
def test_experiment_page_shows_one_row_per_pipeline_execution(tmp_path, monkeypatch):
    if not Path(CHROMIUM).exists():
        pytest.skip("no Chromium: install Debian's chromium package (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    params_path = tmp_path / "params.yaml"
    params_path.write_text("seed: 1\n")
    store = tmp_path / "mlflow.db"
    experiment_id = _log_executions(store, params_path, monkeypatch)

    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--workers", "1", "--port", str(port)]
    cmd += ["--backend-store-uri", f"sqlite:///{store}", "--host", "127.0.0.1"]
    server = subprocess.Popen(
        cmd, cwd=tmp_path, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()[-3000:]
                assert time.time() < deadline, "mlflow ui did not start in 2 min"
                time.sleep(0.5)
        shot = tmp_path / "experiment_page.png"
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 3200, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs", timeout=60_000)
            for name in EXECUTIONS:
                page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
            # MLflow 3 hides metric columns until chosen: Columns -> Metrics, as a user would.
            page.get_by_role("button", name="Columns").click()
            page.get_by_text("Metrics (", exact=False).first.click()
            page.keyboard.press("Escape")
            page.get_by_role("columnheader", name="mc_smoe.accuracy").first.wait_for(timeout=30_000)
            page.screenshot(path=str(shot), full_page=True)
            rows = page.get_by_role("row").all_inner_texts()
            browser.close()
        assert shot.stat().st_size > 10_000
        # The grid draws each row twice, the pinned name part and the scrolled metrics part, in
        # the same order: one row per execution, the stage runs folded under their parent.
        named = [r for r in rows if "Pin run" in r]
        values = [r for r in rows if r not in named and r.strip()][-len(named) :]
        assert len(named) == len(EXECUTIONS), rows
        header = next(r for r in rows if "mc_smoe.accuracy" in r)
        assert "full.accuracy" in header, header
        for n, name in enumerate(EXECUTIONS):
            (i,) = [i for i, r in enumerate(named) if name in r]
            assert f"{0.75 - 0.01 * n:.2f}" in values[i].split() and "0.8" in values[i].split(), (
                name,
                values,
            )
    finally:
        server.terminate()
        server.wait(timeout=30)
