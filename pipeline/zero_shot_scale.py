"""Whether a decoder does a zero-shot task at all: lm-eval's accuracy on a whole official split
beside the split's trivial baselines, and the paired interval against the majority answer by
``acc`` and, where the task defines it, by ``acc_norm``.

The evaluate stage scores a seeded subset of each task and flags variants; this answers the earlier
question, whether the task is worth scoring at a model's scale. Its measurements are what
:data:`pipeline.config.AT_CHANCE_ZERO_SHOT` cites (``scripts/zero_shot_scale.py`` writes them to
``metrics/llm/zero_shot_scale.json``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from pipeline.ablations import fmt_points
from pipeline.data import DataError
from pipeline.lm_harness import harness_zero_shot
from pipeline.trivial_baselines import choice_baselines, choice_majority_correct, versus_majority
from pipeline.zeroshot import load_choice_task


def score_against_baselines(
    model: nn.Module,
    tokenizer,
    names: list[str],
    data_dir: Path,
    *,
    batch_size: int = 32,
    dtype: str = "float32",
    limit: int | None = None,
) -> dict[str, dict]:
    """Per task of ``names``: lm-eval's ``accuracy`` (and ``accuracy_norm``) on the whole split (or
    its first ``limit`` examples), the split's ``baselines``
    (:func:`~pipeline.trivial_baselines.choice_baselines`), ``versus_majority`` (and
    ``norm_versus_majority``) with their 95% intervals, and ``beats_majority``: whether either
    metric's interval lies above zero.

    Raises DataError when lm-eval's examples are not the project's reading of the same file (the
    hits of each example's most likely choice must be lm-eval's own)."""
    res = harness_zero_shot(
        model, tokenizer, names, data_dir, batch_size=batch_size, limit=limit, dtype=dtype
    )
    out = {}
    for name in names:
        examples = load_choice_task(name, data_dir)[:limit]
        r = res[name]
        # The majority answer is compared example by example: both readings must be in one order.
        # np.argmax takes the first of tied choices, as both scorers do.
        mine = [int(np.argmax(ll)) == ex.label for ll, ex in zip(r["loglikelihoods"], examples, strict=False)]
        if len(examples) != r["examples"] or mine != r["hits"]:
            raise DataError(
                f"{name}: lm-eval's {r['examples']} examples are not the {len(examples)} read from "
                f"{data_dir} in file order"
            )
        majority = choice_majority_correct(examples)
        row = {
            "examples": r["examples"],
            "accuracy": r["accuracy"],
            "baselines": choice_baselines(examples),
            "versus_majority": versus_majority([int(h) for h in r["hits"]], majority),
        }
        if "hits_norm" in r:
            row["accuracy_norm"] = r["accuracy_norm"]
            row["norm_versus_majority"] = versus_majority([int(h) for h in r["hits_norm"]], majority)
        row["beats_majority"] = any(
            row[k]["beats_majority"] for k in ("versus_majority", "norm_versus_majority") if k in row
        )
        out[name] = row
    return out


def _points(versus: dict) -> str:
    return f"{fmt_points(versus['diff'])} [{fmt_points(versus['low'])}, {fmt_points(versus['high'])}]"


def markdown_table(result: dict) -> str:
    """One row per model and task of ``result`` (the script's JSON): examples, accuracy (acc_norm),
    majority and chance, the difference to the majority answer with its interval, and the verdict."""
    lines = [
        "| model | task | examples | accuracy (acc_norm) | majority | chance | Δ vs majority, points [95% CI] | beats majority |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, entry in result["models"].items():
        for task, r in entry["tasks"].items():
            acc = f"{100 * r['accuracy']:.1f}"
            diff = _points(r["versus_majority"])
            if "accuracy_norm" in r:
                acc += f" ({100 * r['accuracy_norm']:.1f})"
                diff += f" ({_points(r['norm_versus_majority'])})"
            base = r["baselines"]
            lines.append(
                f"| `{model}` | {task} | {r['examples']:,} | {acc} | {100 * base['majority']:.1f} | "
                f"{100 * base['chance']:.0f} | {diff} | {'yes' if r['beats_majority'] else 'no'} |"
            )
    return "\n".join(lines)
