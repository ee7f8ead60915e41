"""Trivial baselines of an accuracy, from the evaluated examples alone, and whether a model beats them.

A model that always answers the most frequent class scores the majority share; on a skewed split
(MRPC dev: 68.4% "equivalent") that looks like learning. Every accuracy the stages report gets,
beside it, what no model is needed for:

- ``majority``: the share of the most frequent gold label (classification) or gold choice position
  (multiple choice), ties to the smallest;
- ``chance``: the expected accuracy of a uniform guess, the mean over examples of 1 / choices;
- multiple choice only: ``first_choice`` (always answer the first choice) and ``shortest_choice``
  (always answer the choice with the fewest characters, context and continuation together, ties
  to the first, as the scorers break ties).

A model *beats its majority baseline* when the lower end of the paired bootstrap interval of its
per-example correctness minus the majority answer's is above zero (:func:`versus_majority`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from pipeline.stats import paired_bootstrap_ci

# The project's intervals (pipeline.ablations.CI_LEVEL, pipeline.baselines.run_intervals): 95%,
# 2000 replicates, seed 0; repeated here so that finetune need not import the ablation schema.
CI_LEVEL = 0.95
N_BOOT = 2000
SEED = 0


class Choices(Protocol):
    """A multiple-choice example (:class:`pipeline.zeroshot.ChoiceExample`)."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    label: int


def _labels(labels: Sequence[int]) -> list[int]:
    out = [int(x) for x in labels]
    if not out:
        raise ValueError("trivial baselines need at least one labelled example")
    return out


def majority_label(labels: Sequence[int]) -> int:
    """The most frequent label (the smallest of the most frequent, on a tie)."""
    counts = Counter(_labels(labels))
    top = max(counts.values())
    return min(k for k, c in counts.items() if c == top)


def majority_correct(labels: Sequence[int]) -> np.ndarray:
    """Per example, 1 where always answering :func:`majority_label` is right (int8 0/1)."""
    labels = _labels(labels)
    return (np.asarray(labels) == majority_label(labels)).astype(np.int8)


def classification_baselines(labels: Sequence[int], n_classes: int, label_words: Sequence[str] = ()) -> dict:
    """Majority share and chance accuracy of a classification split with gold ``labels``."""
    if n_classes < 1:
        raise ValueError(f"n_classes must be at least 1, got {n_classes}")
    labels = _labels(labels)
    top = majority_label(labels)
    out: dict[str, Any] = {
        "examples": len(labels),
        "majority": float(majority_correct(labels).mean()),
        "majority_label": label_words[top] if top < len(label_words) else top,
        "chance": 1.0 / n_classes,
    }
    return out


def _shortest(example: Choices) -> int:
    lengths = [len(c) + len(t) for c, t in zip(example.contexts, example.continuations, strict=True)]
    return lengths.index(min(lengths))


def choice_majority_correct(examples: Sequence[Choices]) -> np.ndarray:
    """Per example, 1 where always answering the most frequent gold position is right (int8 0/1)."""
    return majority_correct([ex.label for ex in examples])


def choice_baselines(examples: Sequence[Choices]) -> dict:
    """Majority position, chance, always-first and always-shortest accuracy of a multiple-choice set."""
    if not examples:
        raise ValueError("trivial baselines need at least one multiple-choice example")
    labels = [ex.label for ex in examples]
    n = len(examples)
    return {
        "examples": n,
        "majority": float(majority_correct(labels).mean()),
        "majority_label": majority_label(labels),
        "chance": float(np.mean([1.0 / len(ex.continuations) for ex in examples])),
        "first_choice": sum(label == 0 for label in labels) / n,
        "shortest_choice": sum(_shortest(ex) == ex.label for ex in examples) / n,
    }


def versus_majority(
    correct: Sequence[int] | np.ndarray,
    majority: Sequence[int] | np.ndarray,
    n_boot: int = N_BOOT,
    seed: int = SEED,
    level: float = CI_LEVEL,
) -> dict:
    """A model's accuracy minus the majority answer's on the same examples (``diff``), its paired
    bootstrap interval (``low``, ``high``), and ``beats_majority``: whether ``low`` is above zero."""
    ci = paired_bootstrap_ci(
        np.asarray(correct, dtype=np.int8), majority, n_boot=n_boot, seed=seed, level=level
    )
    return {**ci, "level": level, "beats_majority": ci["low"] > 0}


def flat_versus(prefix: str, versus: dict) -> dict:
    """``versus_majority``'s figures as flat metric keys (``<prefix>majority_diff``, ``..._low``,
    ``..._high``, ``<prefix>beats_majority``) for a variant's row of the metrics file."""
    return {
        f"{prefix}majority_diff": versus["diff"],
        f"{prefix}majority_diff_low": versus["low"],
        f"{prefix}majority_diff_high": versus["high"],
        f"{prefix}beats_majority": versus["beats_majority"],
    }


def describe_versus(name: str, accuracy: float, majority: dict, versus: dict) -> str:
    """One line: a model's accuracy against its majority baseline, and whether it beats it."""
    verdict = "beats it" if versus["beats_majority"] else "DOES NOT BEAT IT"
    label = majority["majority_label"]
    answer = repr(label) if isinstance(label, str) else f"choice {label}"
    return (
        f"{name}: accuracy {100 * accuracy:.2f}% vs majority baseline {100 * majority['majority']:.2f}% "
        f"(always {answer}, {majority['examples']} examples): "
        f"{100 * versus['diff']:+.2f} points [{100 * versus['low']:+.2f}, {100 * versus['high']:+.2f}] "
        f"({100 * versus['level']:g}% CI), {verdict}"
    )
