"""Run a study: every variant x seed of a spec (ablations.yaml, baselines.yaml) as one `dvc exp run --temp`.

Each run is a named DVC experiment (`abl-<variant>-s<seed>`, or `bl-...` for the baselines; kept
for `dvc exp show`) of the spec's pipeline (dvc.yaml, or llm/dvc.yaml for the decoder default)
whose stages log to the repository's MLflow store. Results go to metrics/<name>.json after every
run, so an interrupted study resumes where it stopped; the README table between
`<!-- <name>:start/end -->` is rewritten at the end (<name>: the spec's name, else its kind).

    python -m scripts.ablations                        # the ablation study (make ablations)
    python -m scripts.ablations --spec baselines.yaml  # the baselines (make baselines)
    python -m scripts.ablations --spec baselines_llm.yaml  # the baselines on the decoder default
    python -m scripts.ablations --variants default sim-random --seeds 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from pipeline import baselines
from pipeline.ablations import (
    FIDELITY,
    REPORTED,
    AblationSpec,
    check_spec,
    load_spec,
    markdown_table,
    replace_block,
    summarise,
)
from pipeline.config import ParamsError
from scripts.mlflow_sync import sync
from stages import tracking

METRIC_FILES = ("evaluate", "kd_finetune", "merge", "group", "align")
# Per-example results of every evaluated model (<metrics_dir>/predictions.json), for the paired
# bootstrap CIs of the summary. Experiments from before evaluate wrote it have none; their rows
# fall back to seed means.
PREDICTIONS_FILE = "predictions.json"


def _cli() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default="ablations.yaml")
    p.add_argument("--params", default=None, help="params file (default: the spec's)")
    p.add_argument("--out", default=None, help="results file (default: metrics/<name>.json)")
    p.add_argument(
        "--readme", default="README.md", help="file with <!-- <name>:start/end --> markers; '' to skip"
    )
    p.add_argument("--variants", nargs="*", help="run only these variants (default: all)")
    p.add_argument("--seeds", nargs="*", type=int, help="run only these seeds (default: the spec's)")
    p.add_argument("--rerun", action="store_true", help="run again even where a result exists")
    p.add_argument("--dry-run", action="store_true", help="print the dvc commands and stop")
    p.add_argument(
        "--report", action="store_true", help="only rewrite the summary and table from earlier results"
    )
    return p.parse_args()


def override_value(value) -> str:
    """``value`` as `dvc exp run -S` parses it (Hydra's override grammar): JSON for scalars and
    lists, but a mapping's keys go bare (``{a:1}``), as Hydra reads no quoted key, and a float is
    written positionally (the grammar reads ``5e-05`` as a string, ``0.00005`` as a float)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, float) and math.isfinite(value):
        return np.format_float_positional(value, trim="0")
    return json.dumps(value)


def _run(cmd: list[str], env: dict[str, str], log) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log.write(f"$ {' '.join(cmd)}\n{res.stdout}\n")
    log.flush()
    return res


def exp_ref(name: str) -> str | None:
    """The git ref DVC stored experiment ``name`` under, for the current baseline commit."""
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    refs = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname)", f"refs/exps/{head[:2]}/{head[2:]}/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return next((r for r in refs if r.rsplit("/", 1)[-1] == name), None)


def require_block(readme: str, name: str) -> None:
    """Stop with a one-line error, before any work, unless the file ``readme`` ('' for none) has the
    ``<!-- name:start -->`` marker that :func:`pipeline.ablations.replace_block` rewrites after it."""
    if readme and f"<!-- {name}:start -->" not in Path(readme).read_text():
        sys.exit(f"error: {readme} has no <!-- {name}:start --> ... <!-- {name}:end --> markers")


def show_committed(ref: str, path: str) -> str | None:
    """The text of ``path`` as committed in ``ref``; None where the ref has no such file."""
    res = subprocess.run(["git", "show", f"{ref}:{path}"], capture_output=True, text=True)
    return res.stdout if res.returncode == 0 else None


def _show_json(ref: str, path: str) -> dict | None:
    text = show_committed(ref, path)
    return json.loads(text) if text is not None else None


def _metrics(ref: str, folder: str) -> dict[str, dict]:
    found = {stage: _show_json(ref, f"{folder}/{stage}.json") for stage in METRIC_FILES}
    return {stage: m for stage, m in found.items() if m is not None}


def dvc_env() -> dict[str, str]:
    env = dict(os.environ)
    # The stages anchor the data folder and the MLflow store at the repository ($DVC_ROOT), not
    # at the temporary copy each experiment runs in.
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _reported(spec: AblationSpec) -> set[str]:
    return spec.row_models() if isinstance(spec, baselines.BaselineSpec) else set(REPORTED)


def _trim(predictions: dict | None, reported: set[str]) -> dict | None:
    """What the summary compares (the reported models' correctness, the merged model's KL), so
    that the results file stays small."""
    if predictions is None:
        return None
    if predictions.get("objective") == "lm":
        return {
            **{k: predictions.get(k) for k in ("split", "objective", "n", "tokens")},
            "nll": {k: v for k, v in predictions.get("nll", {}).items() if k in reported},
            "zero_shot": {
                task: {k: v for k, v in hits.items() if k in reported}
                for task, hits in predictions.get("zero_shot", {}).items()
            },
        }
    return {
        "split": predictions.get("split"),
        "n": predictions.get("n"),
        "correct": {k: v for k, v in predictions.get("correct", {}).items() if k in reported},
        "kl_to_full": {k: v for k, v in predictions.get("kl_to_full", {}).items() if k == FIDELITY},
    }


def _headline(evaluation: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Each evaluated model's headline figures: accuracy (classification), or test perplexity and
    mean zero-shot accuracy (language modelling)."""
    keys = {"accuracy": "accuracy", "perplexity": "test_perplexity", "zero_shot": "mean_accuracy"}
    out = {name: {model: m[key] for model, m in evaluation.items() if key in m} for name, key in keys.items()}
    return {name: v for name, v in out.items() if v}


def _progress(head: dict[str, dict[str, float]]) -> str:
    return " ".join(
        f"{model}:{name}={value:.4g}"
        for name, values in head.items()
        for model, value in values.items()
        if model in ("merged", "m_smoe", "mc_smoe")
    )


def _write(out: Path, spec: AblationSpec, runs: list[dict]) -> dict:
    result = {
        "seed_key": spec.seed_key,
        "seeds": spec.seeds,
        "common": spec.common,
        "runs": runs,
        "summary": baselines.summarise(spec, runs)
        if isinstance(spec, baselines.BaselineSpec)
        else summarise(spec, runs),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    # One line per run: each carries thousands of per-example values, which one-per-line
    # indentation would turn into megabytes of whitespace.
    head = json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2)
    runs_text = ",\n".join("    " + json.dumps(r, separators=(",", ":")) for r in runs)
    tmp.write_text(f'{head[:-2]},\n  "runs": [\n{runs_text}\n  ]\n}}\n')
    tmp.replace(out)
    return result


def main() -> None:
    args = _cli()
    try:
        spec = load_spec(args.spec)
        params_path = args.params or spec.params
        params = yaml.safe_load(Path(params_path).read_text())
        check_spec(spec, params)
        variants = [spec.variant(n) for n in args.variants] if args.variants else spec.variants
    except (OSError, ValueError, ParamsError) as err:
        sys.exit(f"error: {err}")
    kind = spec.study_name
    require_block(args.readme, kind)
    seeds = args.seeds or spec.seeds
    unknown = sorted(set(seeds) - set(spec.seeds))
    if unknown:
        sys.exit(f"error: seeds {unknown} are not in {args.spec} (seeds: {spec.seeds})")

    out = Path(args.out or f"metrics/{kind}.json")
    prefix = spec.experiment_prefix
    previous = json.loads(out.read_text()).get("runs", []) if out.is_file() else []
    # A result is reused only if it was made with exactly the overrides this spec now asks for.
    names = {v.name for v in spec.variants}
    runs = [
        r
        for r in previous
        if not args.rerun
        and r["variant"] in names
        and r["overrides"] == spec.overrides(spec.variant(r["variant"]), r["seed"])
    ]
    env = dvc_env()
    log_path = out.with_suffix(".log")
    todo = [
        (s, v)
        for s in seeds
        for v in variants
        if not args.report and not any(r["variant"] == v.name and r["seed"] == s for r in runs)
    ]
    print(f"{len(todo)} runs to do ({len(runs)} reused); log: {log_path}", flush=True)

    with open(log_path, "a") as log:
        for i, (seed, variant) in enumerate(todo, 1):
            name = f"{prefix}-{variant.name}-s{seed}"
            overrides = spec.overrides(variant, seed)
            cmd = [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", name]
            if spec.pipeline != "dvc.yaml":
                cmd.append(spec.pipeline)
            # `-S file:key=value` for any params file but DVC's default one.
            where = "" if params_path == "params.yaml" else f"{params_path}:"
            for key, value in overrides.items():
                cmd += ["-S", f"{where}{key}={override_value(value)}"]
            if args.dry_run:
                print(" ".join(cmd))
                continue
            if exp_ref(name):
                _run([sys.executable, "-m", "dvc", "exp", "remove", name], env, log)
            start = time.time()
            res = _run(cmd, env, log)
            ref = exp_ref(name) if res.returncode == 0 else None
            if ref is None:
                sys.exit(f"error: experiment {name} failed (exit {res.returncode}); see {log_path}")
            metrics = _metrics(ref, spec.metrics_dir)
            # A run whose stages all came from DVC's run cache logged nothing: give it its row.
            sync(params_path, f"{spec.metrics_dir}/evaluate.json")
            # Variant -> figures; records (the zero-shot scorer, refused router modes) sit beside them.
            evaluation = {
                k: v for k, v in metrics.get("evaluate", {}).items() if k not in tracking.EVALUATE_RECORDS
            }
            head = _headline(evaluation)
            runs.append(
                {
                    "variant": variant.name,
                    "seed": seed,
                    "overrides": overrides,
                    "experiment": name,
                    "seconds": round(time.time() - start, 1),
                    **head,
                    "expert_params": {k: v["expert_params"] for k, v in evaluation.items()},
                    "metrics": metrics,
                    "predictions": _trim(
                        _show_json(ref, f"{spec.metrics_dir}/{PREDICTIONS_FILE}"), _reported(spec)
                    ),
                }
            )
            _write(out, spec, runs)
            print(
                f"[{i}/{len(todo)}] {name}: {_progress(head)} ({runs[-1]['seconds']:.0f} s)",
                flush=True,
            )
    if args.dry_run:
        return
    result = _write(out, spec, runs)
    if isinstance(spec, baselines.BaselineSpec):
        table = baselines.markdown_table(spec, result["summary"])
    else:
        table = markdown_table(spec, result["summary"])
    print(table)
    if args.readme:
        readme = Path(args.readme)
        readme.write_text(replace_block(readme.read_text(), table, kind))


if __name__ == "__main__":
    main()
