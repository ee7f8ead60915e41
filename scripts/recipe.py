"""Run a task's recipe (``recipes/<task>.yaml``) as a DVC experiment of the whole pipeline and copy
its metrics to ``metrics/recipes/<task>/`` (`make recipe-mrpc`).

A recipe is a partial params document: the keys it sets, in params.yaml's shape. It is merged into
params.yaml and validated before anything runs; the run is ``dvc exp run --temp`` with one ``-S``
per changed key, so the workspace's params and outputs stay as they are, and the experiment is kept
under the name ``recipe-<task>`` (``dvc exp show``).

    python -m scripts.recipe mrpc              # run it, then copy metrics/*.json of the experiment
    python -m scripts.recipe mrpc --dry-run    # print the command only
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from scripts.ablations import dvc_env, exp_ref, override_value, show_committed

RECIPES = Path("recipes")


def _merge(base: Any, recipe: Any) -> Any:
    if isinstance(base, dict) and isinstance(recipe, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in recipe.items()}}
    return recipe


def overrides(base: dict, recipe: dict, prefix: str = "") -> list[str]:
    """``key=value`` overrides turning ``base`` into ``_merge(base, recipe)``: one per changed leaf,
    or one for a whole mapping where ``base`` has no mapping to descend into (e.g. ``upcycle: null``)."""
    out = []
    for key, value in recipe.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out += overrides(base[key], value, path + ".")
        elif key not in base or base[key] != value:
            out.append(f"{path}={override_value(value)}")
    return out


def load_recipe(task: str, params_file: Path) -> tuple[dict, dict]:
    """params.yaml and the task's recipe, after checking that the merge is valid params."""
    path = RECIPES / f"{task}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in RECIPES.glob("*.yaml"))
        raise ValueError(f"no recipe for task {task!r}; valid choices: {', '.join(known) or 'none'}")
    base = yaml.safe_load(params_file.read_text())
    recipe = yaml.safe_load(path.read_text()) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: a recipe is a mapping of params sections")
    from pipeline.config import ParamsError, parse_params

    try:
        parse_params(_merge(base, recipe))
    except ParamsError as err:
        raise ValueError(f"{path}: {err}") from None
    return base, recipe


def pipeline_metrics(dvc_file: Path = Path("dvc.yaml")) -> list[str]:
    """The JSON files the pipeline's stages write under metrics/ (their ``metrics`` and uncached
    ``outs``, e.g. evaluate's per-example predictions)."""
    stages = yaml.safe_load(dvc_file.read_text())["stages"]
    files = []
    for stage in stages.values():
        for entry in stage.get("metrics", []) + stage.get("outs", []):
            files += list(entry) if isinstance(entry, dict) else [entry]
    return [f for f in files if f.startswith("metrics/") and f.endswith(".json")]


def copy_metrics(name: str, dest: Path) -> list[str]:
    """The pipeline's metrics files as the experiment ``name`` committed them, into ``dest``."""
    ref = exp_ref(name)
    if ref is None:
        raise RuntimeError(f"experiment {name} not found under refs/exps for this commit")
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in pipeline_metrics():
        text = show_committed(ref, f)
        if text is None:
            raise RuntimeError(f"experiment {name} ({ref}) has no {f}")
        json.loads(text)  # whole files only
        (dest / Path(f).name).write_text(text)
        copied.append(Path(f).name)
    return copied


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("task")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--dry-run", action="store_true", help="print the dvc command and stop")
    args = p.parse_args(argv)
    try:
        base, recipe = load_recipe(args.task, Path(args.params))
    except ValueError as err:
        sys.exit(f"error: {err}")
    name = f"recipe-{args.task}"
    cmd = ["dvc", "exp", "run", "--temp", "-n", name]
    for o in overrides(base, recipe):
        cmd += ["-S", o]
    print(shlex.join(cmd), flush=True)
    if args.dry_run:
        return
    subprocess.run([sys.executable, "-m", *cmd], check=True, env=dvc_env())
    copied = copy_metrics(name, Path("metrics/recipes") / args.task)
    print(f"copied {', '.join(copied)} to metrics/recipes/{args.task}/")


if __name__ == "__main__":
    main()
