"""Ablation studies: a spec of named variants (params overrides) x seeds, and their summary.

The runner (``scripts/ablations.py``) turns each (variant, seed) into one ``dvc exp run --temp``;
this module validates the spec against the pipeline's params and summarises what the runs measured.
"""

from __future__ import annotations

import copy
import math
import re
import statistics
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.config import ParamsError, parse_params
from pipeline.stats import decode_predictions, seed_example_bootstrap_ci

# Models whose accuracy the summary reports: `merged` is before KD, `m_smoe` after, `mc_smoe` after
# compression too.
REPORTED = ("merged", "m_smoe", "mc_smoe")
# The models the table gives a Δ for; the first one decides "Agrees" (the paper's ablations are of
# M-SMoE).
COMPARED = ("m_smoe", "mc_smoe")
LABELS = {"merged": "merged", "m_smoe": "M-SMoE", "mc_smoe": "MC-SMoE"}
# The model whose per-example KL divergence from the full model is compared: right after merging,
# before KD moves it, fidelity shows what grouping, alignment and merge weights did to the function.
FIDELITY = "merged"
CI_LEVEL = 0.95


class Variant(BaseModel):
    """One row of the study: params overrides relative to the default setting."""

    model_config = ConfigDict(extra="forbid")

    name: str
    study: str  # which paper table the row belongs to
    set: dict[str, Any] = Field(default_factory=dict)
    # Where the paper puts this variant relative to its default recipe (None: not in the paper).
    paper: Literal["below", "above"] | None = None
    note: str = ""

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        # The name becomes a DVC experiment name and a git ref component.
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", v):
            raise ValueError(f"variant name {v!r} must be lower-case letters, digits, '-' or '_'")
        return v


class AblationSpec(BaseModel):
    """The whole study: seeds, overrides shared by every run, and the variants."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["ablations"] = "ablations"
    # The study's results file (metrics/<name>.json) and README block (<!-- <name>:start -->);
    # None: the kind. Two studies of one kind (e.g. the baselines on each default) need two names.
    name: str | None = None
    # The DVC pipeline the runs execute, its params file, and the folder its stages write their
    # metrics to (the decoder default: llm/dvc.yaml, llm/params.yaml, metrics/llm).
    pipeline: str = "dvc.yaml"
    params: str = "params.yaml"
    metrics_dir: str = "metrics"
    seed_key: str = "merge_seed"
    seeds: list[int] = Field(min_length=1)
    common: dict[str, Any] = Field(default_factory=dict)
    variants: list[Variant] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> AblationSpec:
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(dupes)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        return self

    @field_validator("name")
    @classmethod
    def _name_slug(cls, v: str | None) -> str | None:
        # It names a file, a README marker and the experiments (a git ref component).
        if v is not None and not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", v):
            raise ValueError(f"study name {v!r} must be lower-case letters, digits, '-' or '_'")
        return v

    @property
    def study_name(self) -> str:
        return self.name or self.kind

    @property
    def experiment_prefix(self) -> str:
        """What each run's DVC experiment name starts with: ``abl``/``bl``, then the study's name
        where it is not the kind (``bl-llm`` for ``baselines-llm``)."""
        short = {"ablations": "abl", "baselines": "bl"}[self.kind]
        rest = self.study_name.removeprefix(self.kind).strip("-_")
        return f"{short}-{rest}" if rest else short

    def variant(self, name: str) -> Variant:
        """The variant called ``name``; an unknown name lists the valid ones."""
        for v in self.variants:
            if v.name == name:
                return v
        raise ValueError(f"unknown variant {name!r}; valid: {', '.join(v.name for v in self.variants)}")

    def overrides(self, variant: Variant, seed: int) -> dict[str, Any]:
        """Every ``key=value`` one run sets: the seed, the shared overrides, then the variant's."""
        return {self.seed_key: seed, **self.common, **variant.set}


def load_spec(path: str | Path) -> AblationSpec:
    """Read and validate a study spec file (``kind: ablations``, the default, or ``baselines``);
    errors name the file and the offending field."""
    from pipeline.baselines import BaselineSpec

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ablation spec {path} not found")
    raw = yaml.safe_load(path.read_text())
    kinds = {"ablations": AblationSpec, "baselines": BaselineSpec}
    kind = raw.get("kind", "ablations") if isinstance(raw, dict) else "ablations"
    if kind not in kinds:
        raise ValueError(f"{path}: unknown kind {kind!r}; valid: {', '.join(kinds)}")
    try:
        return kinds[kind].model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors()
        )
        raise ValueError(f"{path}: {problems}") from None


def apply_overrides(params: dict, overrides: dict[str, Any]) -> dict:
    """A copy of ``params`` with dotted ``key: value`` overrides applied, as ``dvc exp run -S`` does.

    Only existing keys may be overridden, so a typo fails here instead of silently adding a key.
    """
    out = copy.deepcopy(params)
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                where = ".".join(parts[:i]) or "the top level"
                valid = ", ".join(sorted(node)) if isinstance(node, dict) else "(not a section)"
                raise ParamsError(f"override {dotted!r}: no key {part!r} in {where}; valid keys: {valid}")
            if i == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]
    return out


def check_spec(spec: AblationSpec, params: dict) -> None:
    """Validate every run's resolved params before anything runs; errors name the variant."""
    for variant in spec.variants:
        try:
            parse_params(apply_overrides(params, spec.overrides(variant, spec.seeds[0])))
        except ParamsError as err:
            raise ParamsError(f"variant {variant.name!r}: {err}") from None


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": values,
    }


def _delta(
    variant: list[dict],
    reference: list[dict],
    key: str,
    n_boot: int,
    seed: int,
    field: str = "correct",
) -> dict[str, Any] | None:
    """``key``'s paired difference variant - reference over the seeds both have predictions for.

    ``field`` is ``correct`` (accuracy, from the 0/1 strings) or ``kl_to_full`` (mean per-example
    KL divergence from the full model, from lists of floats).
    """

    def has(r: dict) -> bool:
        return key in ((r.get("predictions") or {}).get(field) or {})

    mine = {r["seed"]: r["predictions"] for r in variant if has(r)}
    theirs = {r["seed"]: r["predictions"] for r in reference if has(r)}
    seeds = sorted(set(mine) & set(theirs))
    if not seeds:
        return None

    def values(pred: dict) -> Any:
        return decode_predictions(pred)[key] if field == "correct" else pred[field][key]

    try:
        for s in seeds:
            if mine[s].get("split") != theirs[s].get("split"):
                raise ValueError(
                    f"seed {s}: split {mine[s].get('split')!r} vs reference {theirs[s].get('split')!r}"
                )
        a = [values(mine[s]) for s in seeds]
        b = [values(theirs[s]) for s in seeds]
        ci = seed_example_bootstrap_ci(
            a, b, n_boot=n_boot, seed=seed, level=CI_LEVEL, binary=field == "correct"
        )
    except ValueError as err:
        # One bad run must not lose the summary of the others (it is rewritten after every run).
        return {"error": str(err), "seeds": seeds}
    return {**ci, "level": CI_LEVEL, "seeds": seeds}


def summarise(
    spec: AblationSpec,
    runs: list[dict],
    reference: str = "default",
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, dict]:
    """Per variant: the seeds that finished, mean/std/min/max of each reported accuracy, and
    (under ``delta``) each reported model's paired difference to ``reference`` with its bootstrap
    CIs over seeds and examples, where the runs carry per-example predictions (else None).
    """
    by_variant = {
        v.name: sorted((r for r in runs if r["variant"] == v.name), key=lambda r: r["seed"])
        for v in spec.variants
    }
    out: dict[str, dict] = {}
    for variant in spec.variants:
        done = by_variant[variant.name]
        row: dict[str, Any] = {
            "study": variant.study,
            "set": variant.set,
            "paper": variant.paper,
            "note": variant.note,
            "seeds": [r["seed"] for r in done],
        }
        for key in REPORTED:
            values = [float(r["accuracy"][key]) for r in done if key in r.get("accuracy", {})]
            row[key] = _stats(values) if values else None
        kls = [
            statistics.fmean(r["predictions"]["kl_to_full"][FIDELITY])
            for r in done
            if FIDELITY in ((r.get("predictions") or {}).get("kl_to_full") or {})
        ]
        row["kl_to_full"] = {FIDELITY: _stats(kls) if kls else None}
        if variant.name != reference and reference in by_variant:
            row["delta"] = {key: _delta(done, by_variant[reference], key, n_boot, seed) for key in REPORTED}
            row["kl_delta"] = {
                FIDELITY: _delta(done, by_variant[reference], FIDELITY, n_boot, seed, "kl_to_full")
            }
        out[variant.name] = row
    return out


def _cell(stats: dict | None) -> str:
    if not stats:
        return "not run"
    spread = f" ± {100 * stats['std']:.2f}" if stats["n"] > 1 else ""
    return f"{100 * stats['mean']:.2f}{spread}"


def fmt_points(x: float) -> str:
    # Rounding a tiny negative to "-0.00" would suggest a direction the number does not have.
    text = f"{100 * x:+.2f}"
    return "+0.00" if text == "-0.00" else text


def _kl_cell(stats: dict | None) -> str:
    if not stats:
        return "-"
    spread = f" ± {1000 * stats['std']:.2f}" if stats["n"] > 1 else ""
    return f"{1000 * stats['mean']:.2f}{spread}"


def _kl_compare(row: dict, paper: str | None) -> tuple[str, str]:
    """The Δ KL cell (10^-3 nats) and the verdict against ``paper``: a lower KL is closer to full."""
    ci = (row.get("kl_delta") or {}).get(FIDELITY)
    if not ci or "error" in ci:
        return "-", "-"
    low, high = ci["ci_seeds_examples"]
    cell = f"{1000 * ci['diff']:+.2f} [{1000 * low:+.2f}, {1000 * high:+.2f}]"
    if not paper or low <= 0 <= high:
        return cell, "-" if not paper else "no difference"
    # The paper's "below" (worse) means further from the full model: a higher KL.
    return cell, "yes" if (low > 0) == (paper == "below") else "no"


def _compare(row: dict, ref: dict, key: str, paper: str | None) -> tuple[str, str]:
    """The Δ cell for ``key`` and the verdict against ``paper`` ("-" where there is nothing to say)."""
    mine, theirs = row.get(key), ref.get(key)
    ci = (row.get("delta") or {}).get(key)
    if ci and "error" not in ci:
        low, high = ci["ci_seeds_examples"]
        cell = f"{fmt_points(ci['diff'])} [{fmt_points(low)}, {fmt_points(high)}]"
        if not paper:
            return cell, "-"
        if low <= 0 <= high:
            return cell, "no difference (CI spans 0)"
        return cell, "yes" if (high < 0) == (paper == "below") else "no"
    if not (mine and theirs):
        return "-", "-"
    # Results from before evaluate wrote per-example predictions: compare the seed means, and call
    # a difference no larger than either seed spread "within spread".
    d = mine["mean"] - theirs["mean"]
    cell = f"{fmt_points(d)} (no CI)"
    if not paper:
        return cell, "-"
    if abs(d) <= max(theirs["std"], mine["std"]):
        return cell, "within spread"
    return cell, "yes" if (d < 0) == (paper == "below") else "no"


def markdown_table(spec: AblationSpec, summary: dict[str, dict], reference: str = "default") -> str:
    """The README table: one row per variant with the paper's finding beside ours.

    Accuracies are mean ± std over seeds. ``Δ`` is the variant minus the reference variant, in
    points, with its 95% bootstrap CI over seeds and test examples (paired by seed and example).
    The fidelity columns give the merged model's mean KL divergence from the full model's class
    distribution (10^-3 nats) and its Δ with the same CI. "Agrees" compares the M-SMoE Δ with the
    paper's direction ("no difference" where the CI contains 0), then the fidelity Δ. Without
    per-example predictions the Δ is of seed means ("no CI") and a difference no larger than either
    seed spread is "within spread".
    """
    ref = summary.get(reference, {})
    pct = f"{100 * CI_LEVEL:g}%"
    accs = " | ".join(f"{LABELS[k]} acc. (%)" for k in REPORTED)
    deltas = " | ".join(f"Δ {LABELS[k]} (pts, {pct} CI)" for k in COMPARED)
    fid = f"{LABELS[FIDELITY]} KL to full (10⁻³ nats) | Δ KL (10⁻³ nats, {pct} CI)"
    lines = [
        f"| Study | Variant | Overrides | Seeds | {accs} | {deltas} | {fid} | Paper | Agrees: accuracy; fidelity |",
        "|" + "---|" * (8 + len(REPORTED) + len(COMPARED)),
    ]
    for v in spec.variants:
        s = summary[v.name]
        sets = ", ".join(f"`{k}={fmt_value(val)}`" for k, val in v.set.items()) or "(default)"
        cells, verdicts = [], []
        for key in COMPARED:
            cell, verdict = _compare(s, ref, key, v.paper) if v.name != reference else ("-", "-")
            cells.append(cell)
            verdicts.append(verdict)
        kl_cell, kl_verdict = _kl_compare(s, v.paper) if v.name != reference else ("-", "-")
        agrees = verdicts[0] if kl_verdict == "-" else f"{verdicts[0]}; {kl_verdict}"
        paper = {"below": "worse than default", "above": "better than default", None: "-"}[v.paper]
        if v.note:
            paper = f"{paper} ({v.note})" if v.paper else v.note
        lines.append(
            f"| {v.study} | {v.name} | {sets} | {len(s['seeds'])} | "
            + " | ".join(_cell(s.get(k)) for k in REPORTED)
            + f" | {' | '.join(cells)} | {_kl_cell((s.get('kl_to_full') or {}).get(FIDELITY))} | {kl_cell}"
            + f" | {paper} | {agrees} |"
        )
    return "\n".join(lines)


def fmt_value(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:g}"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def replace_block(text: str, block: str, name: str) -> str:
    """Replace what sits between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``text``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"markers {start} ... {end} not found")
    return text[: i + len(start)] + "\n" + block.strip() + "\n" + text[j:]
