"""End to end: `dvc repro` of the whole pipeline on a tiny params file in a temporary copy of the repo."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
STAGES = ["prepare", "finetune", "profile", "align", "group", "merge", "compress", "kd_finetune", "evaluate"]
VARIANT_KEYS = {
    "accuracy",
    "params_total",
    "expert_params",
    "experts_total",
    "bytes_on_disk",
    "gflops_per_sample",
    "tokens_per_s",
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not DATA.is_dir(), reason="offline data folder ../shared/data missing"),
]


def _dvc(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        # Stage commands say `python`: make it this interpreter.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "SMOE_DATA_DIR": str(DATA),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "SMOE_PIPELINE_ID": "e2e",
    }
    res = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, f"dvc {' '.join(args)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res.stdout + res.stderr


def _ran(log: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", log))


def _deep_update(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = (
            _deep_update(base.get(k) or {}, v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        )
    return base


def tiny_params() -> dict:
    """The default params.yaml with the tiny overrides: every key dvc.yaml names is present."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    return _deep_update(params, yaml.safe_load((ROOT / "tests" / "tiny_params.yaml").read_text()))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("repo")
    for item in ("pipeline", "stages", "dvc.yaml", ".dvc", ".dvcignore"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, dst / item, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
        else:
            shutil.copy2(src, dst / item)
    (dst / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    return dst


def test_repro_then_partial_rerun(repo: Path) -> None:
    log = _dvc(repo, "repro")
    assert _ran(log) == set(STAGES)

    metrics = json.loads((repo / "metrics" / "evaluate.json").read_text())
    assert set(metrics) == {"full", "merged", "m_smoe", "mc_smoe"}
    for name, m in metrics.items():
        assert set(m) >= VARIANT_KEYS, name
        assert 0.0 <= m["accuracy"] <= 1.0
        assert m["tokens_per_s"] > 0 and m["gflops_per_sample"] > 0
    assert metrics["merged"]["experts_total"] < metrics["full"]["experts_total"]
    assert metrics["merged"]["bytes_on_disk"] < metrics["full"]["bytes_on_disk"]
    assert metrics["mc_smoe"]["expert_params"] < metrics["m_smoe"]["expert_params"]
    for stage in STAGES:
        assert (repo / "metrics" / f"{stage}.json").is_file(), stage
    for folder in ("models/full", "models/merged", "models/m_smoe", "models/mc_smoe"):
        saved = yaml.safe_load((repo / folder / "params.yaml").read_text())
        assert "model" in saved and "finetune" in saved, folder

    with sqlite3.connect(repo / "mlflow.db") as db:
        rows = db.execute("SELECT key, value FROM tags WHERE key IN ('stage', 'pipeline_id')").fetchall()
    stages_logged = {v for k, v in rows if k == "stage"}
    assert set(STAGES) | {"pipeline"} <= stages_logged
    assert {v for k, v in rows if k == "pipeline_id"} == {"e2e"}

    # Nothing changed: nothing runs.
    assert _ran(_dvc(repo, "repro")) == set()

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params.setdefault("merge", {})["strategy"] = "uniform"
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert _ran(_dvc(repo, "repro")) == {"merge", "compress", "kd_finetune", "evaluate"}
    assert (
        yaml.safe_load((repo / "models" / "merged" / "params.yaml").read_text())["merge"]["strategy"]
        == "uniform"
    )
