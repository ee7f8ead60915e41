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

# Variants whose dev accuracy the summary reports; `merged` is before KD, `m_smoe` after.
REPORTED = ("merged", "m_smoe")


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
    """Read and validate an ablation spec file; errors name the file and the offending field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ablation spec {path} not found")
    try:
        return AblationSpec.model_validate(yaml.safe_load(path.read_text()))
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


def summarise(spec: AblationSpec, runs: list[dict]) -> dict[str, dict]:
    """Per variant: the seeds that finished and mean/std/min/max of each reported accuracy."""
    out: dict[str, dict] = {}
    for variant in spec.variants:
        done = sorted((r for r in runs if r["variant"] == variant.name), key=lambda r: r["seed"])
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
        out[variant.name] = row
    return out


def _cell(stats: dict | None) -> str:
    if not stats:
        return "not run"
    spread = f" ± {100 * stats['std']:.2f}" if stats["n"] > 1 else ""
    return f"{100 * stats['mean']:.2f}{spread}"


def markdown_table(spec: AblationSpec, summary: dict[str, dict], reference: str = "default") -> str:
    """The README table: one row per variant with the paper's finding beside ours.

    ``Δ`` is the variant's mean M-SMoE accuracy minus the reference variant's. "Agrees" compares its
    sign with the paper's; a difference no larger than the larger of the two seed spreads is reported
    as within the spread rather than as agreement or disagreement.
    """
    ref = summary.get(reference, {}).get("m_smoe")
    lines = [
        "| Study | Variant | Overrides | Seeds | merged acc. (%) | M-SMoE acc. (%) | Δ M-SMoE (pts) | Paper | Agrees |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in spec.variants:
        s = summary[v.name]
        sets = ", ".join(f"`{k}={_fmt(val)}`" for k, val in v.set.items()) or "(default)"
        delta, agrees = "-", "-"
        if ref and s["m_smoe"] and v.name != reference:
            d = s["m_smoe"]["mean"] - ref["mean"]
            delta = f"{100 * d:+.2f}"
            if v.paper:
                if abs(d) <= max(ref["std"], s["m_smoe"]["std"]):
                    agrees = "within spread"
                else:
                    agrees = "yes" if (d < 0) == (v.paper == "below") else "no"
        paper = {"below": "worse than default", "above": "better than default", None: "-"}[v.paper]
        if v.note:
            paper = f"{paper} ({v.note})" if v.paper else v.note
        lines.append(
            f"| {v.study} | {v.name} | {sets} | {len(s['seeds'])} | {_cell(s['merged'])} | "
            f"{_cell(s['m_smoe'])} | {delta} | {paper} | {agrees} |"
        )
    return "\n".join(lines)


def _fmt(value: Any) -> str:
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
