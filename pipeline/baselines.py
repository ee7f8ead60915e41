"""The baselines study: every method of the paper's Table 2 (and REAP, HC-SMoE) at M-SMoE's budget.

A baselines spec is an ablation spec (``pipeline.ablations``: variants of params overrides x seeds,
run by ``scripts/ablations.py``) whose variants each name the evaluated models they contribute as
table rows (e.g. HC-SMoE before and after KD). Every row is compared with one reference row
(M-SMoE after KD) by a paired bootstrap over seeds and test examples: on a classification task by
accuracy (and the merged model's KL divergence from the full one); on the decoder default by test
perplexity (resampling test blocks) and mean zero-shot accuracy (resampling examples).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.ablations import CI_LEVEL, FIDELITY, AblationSpec, Variant, fmt_points, fmt_value
from pipeline.stats import decode_correct, decode_predictions, seed_example_bootstrap_ci


class Row(BaseModel):
    """One table row: an evaluated model of a variant's runs, and what its paper says of it."""

    model_config = ConfigDict(extra="forbid")

    model: Literal["full", "merged", "m_smoe", "mc_smoe", "c_smoe"]
    label: str
    # The published figure (e.g. the MC-SMoE paper's switch-base-32 SST-2 accuracy) and where the
    # publication puts the row relative to M-SMoE (None: tied or not compared there).
    published: str = ""
    paper: Literal["below", "above"] | None = None
    # The row this one is compared with ("<variant>/<model>"); None: the spec's reference. A model
    # before KD is compared with M-SMoE before KD.
    compare_to: str | None = None


class Baseline(Variant):
    rows: list[Row] = Field(min_length=1)


class BaselineSpec(AblationSpec):
    kind: Literal["baselines"] = "baselines"
    variants: list[Baseline] = Field(min_length=1)
    # The row every other row is compared with: "<variant>/<model>".
    reference: str = "m-smoe/m_smoe"

    @model_validator(mode="after")
    def _reference_exists(self) -> BaselineSpec:
        rows = {f"{v.name}/{r.model}" for v in self.variants for r in v.rows}
        wanted = [self.reference] + [r.compare_to for v in self.variants for r in v.rows if r.compare_to]
        missing = [w for w in wanted if w not in rows]
        if missing:
            raise ValueError(f"reference rows {missing} are not variant/model rows of the spec")
        return self

    def row_models(self) -> set[str]:
        return {r.model for v in self.variants for r in v.rows}


def _stats(values: list[float]) -> dict[str, Any] | None:
    if not values:
        return None
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": values,
    }


def _paired_arrays(a: dict[int, Any], b: dict[int, Any], binary: bool, n_boot: int, seed: int) -> dict | None:
    """Row minus reference, paired by seed and example, over the seeds both have."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    try:
        ci = seed_example_bootstrap_ci(
            [a[s] for s in seeds],
            [b[s] for s in seeds],
            n_boot=n_boot,
            seed=seed,
            level=CI_LEVEL,
            binary=binary,
        )
    except ValueError as err:
        return {"error": str(err), "seeds": seeds}
    return {**ci, "level": CI_LEVEL, "seeds": seeds}


def _per_seed(runs: list[dict], key: str, field: str) -> dict[int, Any]:
    out = {}
    for r in runs:
        pred = r.get("predictions") or {}
        if key in (pred.get(field) or {}):
            out[r["seed"]] = decode_predictions(pred)[key] if field == "correct" else pred[field][key]
    return out


def _paired(
    mine: list[dict], mine_key: str, ref: list[dict], ref_key: str, field: str, n_boot: int, seed: int
) -> dict | None:
    a, b = _per_seed(mine, mine_key, field), _per_seed(ref, ref_key, field)
    return _paired_arrays(a, b, field == "correct", n_boot, seed)


def block_nll(predictions: dict, model: str) -> list[float] | None:
    """Each test block's NLL, scaled so that their plain mean is the token-level mean NLL (blocks
    may differ in length): a bootstrap over blocks then resamples the perplexity's own statistic."""
    nll = (predictions.get("nll") or {}).get(model)
    if nll is None:
        return None
    tokens = predictions["tokens"]
    if len(nll) != len(tokens):
        raise ValueError(f"predictions: {model} has {len(nll)} block NLLs for {len(tokens)} blocks")
    scale = len(tokens) / sum(tokens)
    return [x * scale for x in nll]


def zero_shot_values(predictions: dict, model: str) -> list[float] | None:
    """Every zero-shot example's hit (all tasks, concatenated), scaled so that their plain mean is
    the unweighted mean over tasks that evaluate reports as ``mean_accuracy``."""
    tasks = predictions.get("zero_shot") or {}
    if not tasks or any(model not in hits for hits in tasks.values()):
        return None
    bits = {
        t: decode_correct(hits[model], f"predictions[zero_shot][{t}][{model}]") for t, hits in tasks.items()
    }
    total = sum(len(b) for b in bits.values())
    return [float(x) * total / (len(tasks) * len(b)) for b in bits.values() for x in b]


def _lm_paired(mine: list[dict], mine_key: str, ref: list[dict], ref_key: str, how, n_boot: int, seed: int):
    def table(runs: list[dict], key: str) -> dict[int, list[float]]:
        values = {r["seed"]: how(r.get("predictions") or {}, key) for r in runs}
        return {s: v for s, v in values.items() if v is not None}

    return _paired_arrays(table(mine, mine_key), table(ref, ref_key), False, n_boot, seed)


def _metric(runs: list[dict], model: str, key: str) -> dict | None:
    values = [
        float(r["metrics"]["evaluate"][model][key])
        for r in runs
        if key in ((r.get("metrics") or {}).get("evaluate") or {}).get(model, {})
    ]
    return _stats(values)


SIZE_SPEED = ("experts_total", "params_total", "expert_params", "bytes_on_disk", "tokens_per_s")


def _by_variant(spec: BaselineSpec, runs: list[dict]) -> dict[str, list[dict]]:
    return {
        v.name: sorted((r for r in runs if r["variant"] == v.name), key=lambda r: r["seed"])
        for v in spec.variants
    }


def _entry(v: Baseline, row: Row, done: list[dict]) -> dict[str, Any]:
    """What every summary row holds whatever the task: its labels, seeds, size and speed."""
    entry: dict[str, Any] = {
        "label": row.label,
        "set": v.set,
        "seeds": [r["seed"] for r in done],
        "published": row.published,
        "paper": row.paper,
    }
    return entry | {m: _metric(done, row.model, m) for m in SIZE_SPEED}


def is_lm(runs: list[dict]) -> bool:
    """Whether the runs are of a language-modelling default (scored by perplexity)."""
    return any("perplexity" in r for r in runs)


def summarise(spec: BaselineSpec, runs: list[dict], n_boot: int = 2000, seed: int = 0) -> dict[str, dict]:
    """Per row (``variant/model``): the headline metrics and size/speed figures over seeds, and the
    paired difference to the reference row with its 95% CI. Classification: accuracy, and the
    merged model's KL to full; language modelling: test perplexity (as a ratio) and zero-shot accuracy."""
    if is_lm(runs):
        return _summarise_lm(spec, runs, n_boot, seed)
    out = {}
    for key, row, done, entry, compared in _rows(spec, runs):
        entry["accuracy"] = _stats(
            [float(r["accuracy"][row.model]) for r in done if row.model in r["accuracy"]]
        )
        kl = [
            statistics.fmean(r["predictions"]["kl_to_full"][FIDELITY])
            for r in done
            if FIDELITY in ((r.get("predictions") or {}).get("kl_to_full") or {})
        ]
        # A method that merges nothing before KD (task-specific pruning) has the full model as
        # its `merged` one: a KL of 0 would read as perfect fidelity.
        unreduced = any(
            (r.get("metrics") or {}).get("evaluate", {}).get("merged", {}).get("experts_total")
            == (r.get("metrics") or {}).get("evaluate", {}).get("full", {}).get("experts_total")
            for r in done
        )
        entry["merged_kl_to_full"] = None if unreduced else _stats(kl)
        if compared:
            ref_runs, ref_model = compared
            entry["delta"] = _paired(done, row.model, ref_runs, ref_model, "correct", n_boot, seed)
            entry["kl_delta"] = (
                _paired(done, FIDELITY, ref_runs, FIDELITY, "kl_to_full", n_boot, seed)
                if row.model in ("merged", "m_smoe", "mc_smoe") and not unreduced
                else None
            )
        out[key] = entry
    return out


def _rows(spec: BaselineSpec, runs: list[dict]) -> Iterator[tuple[str, Row, list[dict], dict, tuple | None]]:
    """Each table row: its key, spec, runs, entry so far, and ``(runs, model)`` of the row it is
    compared with (None for the reference row and the row it is compared against itself)."""
    by_variant = _by_variant(spec, runs)
    for v in spec.variants:
        done = by_variant[v.name]
        for row in v.rows:
            key = f"{v.name}/{row.model}"
            against = row.compare_to or spec.reference
            ref_name, _, ref_model = against.partition("/")
            entry = _entry(v, row, done)
            entry["compared_with"] = against
            compared = None if key in (against, spec.reference) else (by_variant[ref_name], ref_model)
            yield key, row, done, entry, compared


def _summarise_lm(spec: BaselineSpec, runs: list[dict], n_boot: int, seed: int) -> dict[str, dict]:
    out = {}
    for key, row, done, entry, compared in _rows(spec, runs):
        entry["perplexity"] = _metric(done, row.model, "test_perplexity")
        entry["zero_shot"] = _metric(done, row.model, "mean_accuracy")
        if compared:
            ref_runs, ref_model = compared
            nll = _lm_paired(done, row.model, ref_runs, ref_model, block_nll, n_boot, seed)
            entry["delta_nll"] = nll
            # exp is monotone: the interval of the NLL difference maps onto the perplexity ratio.
            entry["ppl_ratio"] = (
                {
                    "ratio": math.exp(nll["diff"]),
                    "ci_seeds_examples": [math.exp(x) for x in nll["ci_seeds_examples"]],
                }
                if nll and "error" not in nll
                else None
            )
            entry["delta"] = _lm_paired(done, row.model, ref_runs, ref_model, zero_shot_values, n_boot, seed)
        out[key] = entry
    return out


def _verdict(ci: dict | None, paper: str | None) -> tuple[str, str]:
    if not ci or "error" in ci:
        return "-", "-"
    low, high = ci["ci_seeds_examples"]
    ours = "tie (CI spans 0)" if low <= 0 <= high else ("above" if low > 0 else "below")
    return _ci_points(ci), _found(ours, paper)


def _mean(stats: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    if not stats:
        return "-"
    return f"{scale * stats['mean']:.{digits}f}"


def _found(ours: str, paper: str | None) -> str:
    if paper is None:
        return ours
    tie = ours.startswith("tie")
    return f"{ours}; paper {paper}: {'not shown' if tie else ('agrees' if ours == paper else 'opposite')}"


def _ratio_cells(ratio: dict | None, paper: str | None) -> tuple[str, str]:
    """The perplexity-ratio cell and its verdict in words that cannot be misread: lower perplexity
    is "better" (a spec's ``paper: above``)."""
    if not ratio:
        return "-", "-"
    low, high = ratio["ci_seeds_examples"]
    ours = "tie (CI spans 1)" if low <= 1 <= high else ("better" if high < 1 else "worse")
    claim = {"above": "better", "below": "worse"}.get(paper) if paper else None
    return f"×{ratio['ratio']:.3f} [{low:.3f}, {high:.3f}]", _found(ours, claim)


def _ci_points(ci: dict | None) -> str:
    if not ci or "error" in ci:
        return "-"
    low, high = ci["ci_seeds_examples"]
    return f"{fmt_points(ci['diff'])} [{fmt_points(low)}, {fmt_points(high)}]"


def _seed_cell(stats: dict | None, scale: float, digits: int) -> str:
    if not stats:
        return "not run"
    cell = f"{scale * stats['mean']:.{digits}f}"
    return cell + (f" ± {scale * stats['std']:.{digits}f}" if stats["n"] > 1 else "")


def markdown_table_lm(spec: BaselineSpec, summary: dict[str, dict]) -> str:
    """The decoder default's README table: test perplexity (mean ± std over seeds) and its ratio to
    M-SMoE's with a 95% bootstrap interval over seeds and test blocks (paired), mean zero-shot
    accuracy and its difference in points (paired over seeds and examples), size and speed. The
    verdict is by perplexity, the metric the decoder default trains for."""
    pct = f"{100 * CI_LEVEL:g}%"
    lines = [
        f"| Method | Overrides | Seeds | Test ppl | ppl ratio vs M-SMoE ({pct} CI) | Zero-shot acc. (%) "
        f"| Δ zero-shot (pts, {pct} CI) | Experts | Params (M) | MB on disk | tokens/s | Published "
        "| Ours vs M-SMoE (ppl); paper |",
        "|" + "---|" * 13,
    ]
    for v in spec.variants:
        sets = ", ".join(f"`{k}={fmt_value(val)}`" for k, val in v.set.items()) or "(default)"
        for row in v.rows:
            s = summary[f"{v.name}/{row.model}"]
            if "delta" not in s:
                ratio, verdict, dz = "(reference)", "-", "(reference)"
            else:
                ratio, verdict = _ratio_cells(s.get("ppl_ratio"), row.paper)
                dz = _ci_points(s.get("delta"))
            lines.append(
                f"| {row.label} | {sets} | {len(s['seeds'])} | {_seed_cell(s['perplexity'], 1, 1)} | {ratio} "
                f"| {_seed_cell(s['zero_shot'], 100, 2)} | {dz} | {_mean(s['experts_total'], 1, 0)} "
                f"| {_mean(s['params_total'], 1e-6)} | {_mean(s['bytes_on_disk'], 1e-6, 1)} "
                f"| {_mean(s['tokens_per_s'], 1, 0)} | {row.published or '-'} | {verdict} |"
            )
    return "\n".join(lines)


def markdown_table(spec: BaselineSpec, summary: dict[str, dict]) -> str:
    """The README table: one row per method x evaluated model at the same budget.

    Accuracy is mean ± std over seeds; Δ is the row minus M-SMoE, in points, with its 95% bootstrap
    interval over seeds and test examples (paired). KL is the merged model's mean KL divergence
    from the full model (10⁻³ nats), before KD: what the method did to the function.
    """
    if any("perplexity" in entry for entry in summary.values()):
        return markdown_table_lm(spec, summary)
    pct = f"{100 * CI_LEVEL:g}%"
    lines = [
        f"| Method | Overrides | Seeds | Acc. (%) | Δ vs M-SMoE (pts, {pct} CI) | Experts | Params (M) | MB on disk "
        f"| tokens/s | merged KL (10⁻³) | Δ KL ({pct} CI) | Published | Ours vs M-SMoE; paper |",
        "|" + "---|" * 13,
    ]
    for v in spec.variants:
        sets = ", ".join(f"`{k}={fmt_value(val)}`" for k, val in v.set.items()) or "(default)"
        for row in v.rows:
            s = summary[f"{v.name}/{row.model}"]
            acc = s["accuracy"]
            acc_cell = (
                "not run"
                if not acc
                else f"{100 * acc['mean']:.2f}" + (f" ± {100 * acc['std']:.2f}" if acc["n"] > 1 else "")
            )
            if "delta" not in s:
                delta, verdict = "(reference)", "-"
            else:
                delta, verdict = _verdict(s.get("delta"), row.paper)
            kl_ci = s.get("kl_delta")
            kl_cell = "-"
            if kl_ci and "error" not in kl_ci:
                low, high = kl_ci["ci_seeds_examples"]
                kl_cell = f"{1000 * kl_ci['diff']:+.2f} [{1000 * low:+.2f}, {1000 * high:+.2f}]"
            kl = _mean(s["merged_kl_to_full"], 1000) if row.model != "full" else "-"
            lines.append(
                f"| {row.label} | {sets} | {len(s['seeds'])} | {acc_cell} | {delta} | {_mean(s['experts_total'], 1, 0)} "
                f"| {_mean(s['params_total'], 1e-6)} | {_mean(s['bytes_on_disk'], 1e-6, 1)} | {_mean(s['tokens_per_s'], 1, 0)} "
                f"| {kl} | {kl_cell} | {row.published or '-'} | {verdict} |"
            )
    return "\n".join(lines)


def run_intervals(
    predictions: dict, reference: str = "full", n_boot: int = 2000, seed: int = 0
) -> dict[str, dict]:
    """Each model of one language-modelling evaluation against ``reference``, on the same test
    blocks and zero-shot examples: the perplexity ratio and the mean zero-shot accuracy difference
    (points), each with its paired 95% bootstrap interval (over token-weighted blocks; over
    examples). One run, so the intervals hold the test sets' noise, not run-to-run noise."""
    if reference not in (predictions.get("nll") or {}):
        raise ValueError(f"predictions hold no {reference!r} model to compare with")
    runs = [{"seed": 0, "predictions": predictions}]
    out = {}
    for model in predictions["nll"]:
        if model == reference:
            continue
        nll = _lm_paired(runs, model, runs, reference, block_nll, n_boot, seed)
        zs = _lm_paired(runs, model, runs, reference, zero_shot_values, n_boot, seed)
        entry = {
            "perplexity_ratio": {
                "ratio": math.exp(nll["diff"]),
                "low": math.exp(nll["ci_examples"][0]),
                "high": math.exp(nll["ci_examples"][1]),
            }
        }
        if zs is not None:
            entry["mean_accuracy_points"] = {
                "diff": 100 * zs["diff"],
                "low": 100 * zs["ci_examples"][0],
                "high": 100 * zs["ci_examples"][1],
            }
        out[model] = {"reference": reference, "level": CI_LEVEL, **entry}
    return out
