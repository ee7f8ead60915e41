"""Paired bootstrap confidence intervals for accuracy differences, from per-example correctness.

Every variant is evaluated on the same examples in the same order, so two models' 0/1 correctness
vectors are paired by example (and, across an ablation, by seed). Resampling the same example
indices for both sides keeps that pairing: the interval reflects how much the *difference* varies,
which is far less than each accuracy does on its own, since most examples are right (or wrong) for
both models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def decode_correct(correct: str, name: str = "predictions") -> np.ndarray:
    """A ``"0110..."`` string (one char per example, ``1`` = right) as an int8 0/1 array."""
    raw = np.frombuffer(correct.encode("ascii", errors="replace"), dtype=np.uint8)
    bad = np.flatnonzero((raw != ord("0")) & (raw != ord("1")))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{name}: character {i} is {correct[i]!r}; expected only '0' and '1'")
    return (raw - ord("0")).astype(np.int8)


def decode_predictions(predictions: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Every model's correctness array of one run's ``metrics/predictions.json``.

    All strings must have the same length, equal to ``n`` where the file gives it; a mismatch is a
    ValueError naming the models and their lengths.
    """
    correct = predictions.get("correct")
    if not isinstance(correct, Mapping) or not correct:
        raise ValueError("predictions: no 'correct' mapping of model -> '0101...' string")
    out = {name: decode_correct(s, f"predictions[{name!r}]") for name, s in correct.items()}
    lengths = {name: len(v) for name, v in out.items()}
    n = predictions.get("n")
    expected = int(n) if n is not None else next(iter(lengths.values()))
    wrong = {name: k for name, k in lengths.items() if k != expected}
    if wrong:
        given = f"n = {expected}" if n is not None else f"{next(iter(lengths))} has {expected}"
        listed = ", ".join(f"{name} has {k}" for name, k in wrong.items())
        raise ValueError(f"predictions: examples per model differ: {given}, but {listed}")
    return out


def _as_correctness(x: Any, name: str, binary: bool = True) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {arr.shape}")
    if not binary:
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} has non-finite values")
        return arr
    if not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must contain only 0 and 1")
    return arr.astype(np.int8)


def _check_level(n_boot: int, level: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")


def _counts(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    """(n_boot, n) resampling counts: how often each item is drawn in each bootstrap replicate.

    Counts instead of gathered indices turn every replicate's mean into one matrix product.
    """
    idx = rng.integers(0, n, size=(n_boot, n))
    idx += np.arange(n_boot)[:, None] * n
    return np.bincount(idx.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def _interval(stats: np.ndarray, level: float) -> list[float]:
    tail = (1 - level) / 2
    low, high = np.quantile(stats, [tail, 1 - tail])
    return [float(low), float(high)]


def paired_bootstrap_ci(
    a: Sequence[int] | np.ndarray,
    b: Sequence[int] | np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """``mean(a) - mean(b)`` and its percentile bootstrap interval over examples.

    ``a`` and ``b`` are 0/1 correctness of two models on the same examples; each replicate draws
    one set of example indices and uses it for both.
    """
    _check_level(n_boot, level)
    a, b = _as_correctness(a, "a"), _as_correctness(b, "b")
    if a.size != b.size:
        raise ValueError(f"a and b must cover the same examples: a has {a.size}, b has {b.size}")
    d = (a - b).astype(np.float64)
    stats = _counts(np.random.default_rng(seed), d.size, n_boot) @ d / d.size
    low, high = _interval(stats, level)
    return {"diff": float(d.mean()), "low": low, "high": high}


def seed_example_bootstrap_ci(
    a_runs: Sequence[Sequence[int] | np.ndarray],
    b_runs: Sequence[Sequence[int] | np.ndarray],
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    binary: bool = True,
) -> dict[str, Any]:
    """Mean per-seed accuracy difference with two bootstrap intervals.

    With ``binary=False`` the runs hold any finite per-example values (e.g. KL divergence from
    the full model) and the difference is of their means.

    ``a_runs[s]`` and ``b_runs[s]`` are the two models' 0/1 correctness in seed ``s`` (paired by
    seed), all over the same examples. ``ci_seeds_examples`` resamples seeds, then examples, and
    takes the mean over the drawn seeds of the per-seed difference: it counts both the run-to-run
    noise and the finite test set. ``ci_examples`` resamples only examples of the seed-averaged
    per-example difference, i.e. it treats the seeds as fixed.
    """
    _check_level(n_boot, level)
    if len(a_runs) != len(b_runs) or not a_runs:
        raise ValueError(f"a_runs and b_runs must pair one run per seed: got {len(a_runs)} and {len(b_runs)}")
    a = [_as_correctness(x, f"a_runs[{i}]", binary) for i, x in enumerate(a_runs)]
    b = [_as_correctness(x, f"b_runs[{i}]", binary) for i, x in enumerate(b_runs)]
    lengths = {f"a_runs[{i}]": x.size for i, x in enumerate(a)} | {
        f"b_runs[{i}]": x.size for i, x in enumerate(b)
    }
    n = a[0].size
    wrong = {k: v for k, v in lengths.items() if v != n}
    if wrong:
        listed = ", ".join(f"{k} has {v}" for k, v in wrong.items())
        raise ValueError(f"every run must cover the same examples: a_runs[0] has {n}, but {listed}")
    d = (np.stack(a) - np.stack(b)).astype(np.float64)  # (seeds, examples)
    n_seeds = d.shape[0]

    rng = np.random.default_rng(seed)
    seed_counts = _counts(rng, n_seeds, n_boot)
    # One set of example indices per replicate, shared by all drawn seeds: the test set is the same
    # in every run, so a hard example is hard for every seed, and independent draws per seed would
    # understate the test-set part of the variance. The example-only interval reuses the same
    # draws, so the two intervals differ by the seed resampling alone.
    example_counts = _counts(rng, n, n_boot)
    per_seed = example_counts @ d.T / n  # (n_boot, seeds): each seed's difference on the replicate
    two_level = (seed_counts * per_seed).sum(axis=1) / n_seeds
    examples_only = per_seed.mean(axis=1)
    return {
        "diff": float(d.mean()),
        "ci_examples": _interval(examples_only, level),
        "ci_seeds_examples": _interval(two_level, level),
        "n_seeds": n_seeds,
        "n_examples": n,
    }
