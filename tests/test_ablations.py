"""The ablation spec, its validation against params.yaml, and the summary table."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.ablations import (
    AblationSpec,
    apply_overrides,
    check_spec,
    load_spec,
    markdown_table,
    replace_block,
    summarise,
)
from pipeline.align import ALIGNERS
from pipeline.config import ParamsError
from pipeline.grouping import SIMILARITIES
from pipeline.merging import MERGE_STRATEGIES
from pipeline.stats import seed_example_bootstrap_ci

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shipped() -> AblationSpec:
    return load_spec(ROOT / "ablations.yaml")


@pytest.fixture(scope="module")
def params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_shipped_spec_is_valid_for_shipped_params(shipped, params):
    check_spec(shipped, params)
    assert len(shipped.seeds) >= 3


def test_shipped_spec_covers_every_ablated_choice(shipped, params):
    def values(key: str) -> set:
        default = apply_overrides(params, {})
        section, name = key.split(".")
        found = {default[section][name]}
        return found | {v.set[key] for v in shipped.variants if key in v.set}

    assert values("group.similarity") == set(SIMILARITIES.names())
    # The baseline methods' strategies (pruning, ZipIt) are run by the baselines study instead.
    baselines = load_spec(ROOT / "baselines.yaml")
    in_baselines = {v.set["merge.strategy"] for v in baselines.variants if "merge.strategy" in v.set}
    assert values("merge.strategy") | in_baselines == set(MERGE_STRATEGIES.names())
    assert values("group.ratio") == {"adaptive", "uniform"}
    assert values("align.method") == set(ALIGNERS.names())
    assert values("group.layers") == {"encoder", "decoder", "both"}
    assert values("group.skip_first_layer") == {True, False}
    assert 0.0 in values("kd.alpha")


def test_overrides_order_seed_then_common_then_variant(shipped):
    v = shipped.variant("sim-expert-gradient")
    o = shipped.overrides(v, 2)
    assert list(o)[0] == "merge_seed" and o["merge_seed"] == 2
    assert o["group.similarity"] == "expert-gradient" and o["profile.gradients"] is True
    assert o["kd.train.epochs"] == shipped.common["kd.train.epochs"]


def test_apply_overrides_sets_nested_keys_without_touching_input(params):
    out = apply_overrides(params, {"kd.train.epochs": 0.5, "merge.strategy": "uniform"})
    assert out["kd"]["train"]["epochs"] == 0.5 and out["merge"]["strategy"] == "uniform"
    assert params["kd"]["train"]["epochs"] == 0.3


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("group.simlarity", "no key 'simlarity' in group; valid keys: .*similarity"),
        ("nope", "no key .nope. in the top level"),
    ],
)
def test_unknown_override_key_names_it_and_the_valid_keys(params, key, message):
    with pytest.raises(ParamsError, match=message):
        apply_overrides(params, {key: 1})


def test_check_spec_names_the_variant_with_a_bad_value(params):
    spec = AblationSpec(
        seeds=[1],
        variants=[
            {"name": "ok", "study": "s"},
            {"name": "bad", "study": "s", "set": {"group.similarity": "cosine"}},
        ],
    )
    with pytest.raises(ParamsError, match="(?s)variant .bad.*cosine.*router-logits"):
        check_spec(spec, params)


def test_gradient_choices_without_gradients_are_caught_before_running(params):
    spec = AblationSpec(
        seeds=[1], variants=[{"name": "f", "study": "s", "set": {"merge.strategy": "fisher"}}]
    )
    with pytest.raises(ParamsError, match="profile.gradients"):
        check_spec(spec, params)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"seeds": [], "variants": [{"name": "a", "study": "s"}]}, "seeds"),
        ({"seeds": [1, 1], "variants": [{"name": "a", "study": "s"}]}, "distinct"),
        (
            {"seeds": [1], "variants": [{"name": "a", "study": "s"}, {"name": "a", "study": "t"}]},
            "repeated: a",
        ),
        ({"seeds": [1], "variants": [{"name": "Has Space", "study": "s"}]}, "lower-case"),
        ({"seeds": [1], "variants": [{"name": "a", "study": "s", "paper": "worse"}]}, "paper"),
        ({"seeds": [1], "variants": [], "extra": 1}, "extra"),
    ],
)
def test_bad_spec_files_are_errors_naming_the_field(tmp_path, raw, message):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=message):
        load_spec(path)


def test_missing_spec_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_spec(tmp_path / "nope.yaml")


def test_unknown_variant_lists_valid_ones(shipped):
    with pytest.raises(ValueError, match="unknown variant 'x'; valid: default, sim-router-weight"):
        shipped.variant("x")


def _spec() -> AblationSpec:
    return AblationSpec(
        seeds=[1, 2, 3],
        variants=[
            {"name": "default", "study": "ref"},
            {"name": "worse", "study": "t", "set": {"merge.strategy": "uniform"}, "paper": "below"},
            {"name": "better", "study": "t", "set": {"align.method": "none"}, "paper": "below"},
            {"name": "noisy", "study": "t", "set": {"group.ratio": "uniform"}, "paper": "below"},
            {"name": "unrun", "study": "t", "set": {"kd.alpha": 0.0}, "note": "not in the paper"},
        ],
    )


def _runs() -> list[dict]:
    acc = {
        "default": [0.80, 0.81, 0.82],
        "worse": [0.70, 0.71, 0.72],
        "better": [0.90, 0.90, 0.90],
        "noisy": [0.78, 0.84, 0.81],
    }
    return [
        {"variant": name, "seed": s + 1, "accuracy": {"merged": a - 0.01, "m_smoe": a, "mc_smoe": a - 0.02}}
        for name, values in acc.items()
        for s, a in enumerate(values)
    ]


def test_summary_statistics():
    summary = summarise(_spec(), _runs())
    d = summary["default"]["m_smoe"]
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.81) and d["std"] == pytest.approx(0.01)
    assert (d["min"], d["max"]) == (0.80, 0.82)
    assert summary["default"]["merged"]["mean"] == pytest.approx(0.80)
    assert summary["default"]["seeds"] == [1, 2, 3]
    assert summary["unrun"]["m_smoe"] is None and summary["unrun"]["seeds"] == []


def _rows(table: str) -> dict[str, list[str]]:
    """Table cells by variant name, from the rows below the header."""
    return {
        line.split("|")[2].strip(): [c.strip() for c in line.split("|")[1:-1]]
        for line in table.splitlines()[2:]
    }


# Columns of the table.
ACC_M, ACC_MC, DELTA_M, DELTA_MC, KL, DELTA_KL, PAPER, AGREES = 5, 6, 7, 8, 9, 10, 11, 12


def test_table_header_has_every_reported_model_and_both_deltas():
    header = markdown_table(_spec(), summarise(_spec(), _runs())).splitlines()[0]
    cols = [c.strip() for c in header.split("|")[1:-1]]
    assert cols[4:] == [
        "merged acc. (%)",
        "M-SMoE acc. (%)",
        "MC-SMoE acc. (%)",
        "Δ M-SMoE (pts, 95% CI)",
        "Δ MC-SMoE (pts, 95% CI)",
        "merged KL to full (10⁻³ nats)",
        "Δ KL (10⁻³ nats, 95% CI)",
        "Paper",
        "Agrees: accuracy; fidelity",
    ]


def test_without_predictions_the_table_falls_back_to_seed_means():
    summary = summarise(_spec(), _runs())
    assert summary["worse"]["delta"]["m_smoe"] is None and "delta" not in summary["default"]
    rows = _rows(markdown_table(_spec(), summary))
    assert rows["worse"][DELTA_M] == "-10.00 (no CI)" and rows["worse"][AGREES] == "yes"
    assert rows["worse"][DELTA_MC] == "-10.00 (no CI)"
    assert rows["better"][DELTA_M] == "+9.00 (no CI)" and rows["better"][AGREES] == "no"
    assert rows["noisy"][AGREES] == "within spread"
    assert rows["unrun"][ACC_M] == "not run" and rows["unrun"][DELTA_M] == "-"
    assert rows["unrun"][AGREES] == "-" and rows["unrun"][PAPER] == "not in the paper"
    assert rows["default"][ACC_M] == "81.00 ± 1.00" and rows["default"][ACC_MC] == "79.00 ± 1.00"
    assert rows["default"][DELTA_M] == "-" and rows["default"][AGREES] == "-"
    assert rows["worse"][2] == "`merge.strategy=uniform`"


# Predictions over N examples. The reference is right on 160 of 200 in every seed; the variants
# differ from it on a few examples, so each Δ is known exactly.
N = 200


def _flip(base: np.ndarray, positions: slice, value: int) -> np.ndarray:
    out = base.copy()
    out[positions] = value
    return out


BASE = (np.arange(N) % 5 != 0).astype(int)  # 160 right
MINUS_10 = _flip(BASE, slice(1, None, 10), 0)  # 20 fewer right
PLUS_5 = _flip(BASE, slice(0, None, 20), 1)  # 10 more right, all where BASE is wrong
MINUS_5 = _flip(BASE, slice(1, None, 20), 0)  # 10 fewer right

# variant -> model -> one correctness vector per seed 1, 2, 3
CORRECT = {
    "default": {"m_smoe": [BASE] * 3, "mc_smoe": [BASE] * 3},
    "worse": {"m_smoe": [MINUS_10] * 3, "mc_smoe": [BASE] * 3},
    "better": {"m_smoe": [PLUS_5] * 3, "mc_smoe": [PLUS_5] * 3},
    # The seeds disagree: +5, -5 and 0 points average to 0.
    "noisy": {"m_smoe": [PLUS_5, MINUS_5, BASE], "mc_smoe": [BASE] * 3},
    "unpapered": {"m_smoe": [MINUS_10] * 3, "mc_smoe": [MINUS_10] * 3},
}


def _pred_spec() -> AblationSpec:
    return AblationSpec(
        seeds=[1, 2, 3],
        variants=[
            {"name": "default", "study": "ref"},
            {"name": "worse", "study": "t", "paper": "below"},
            {"name": "better", "study": "t", "paper": "below"},
            {"name": "noisy", "study": "t", "paper": "above"},
            {"name": "unpapered", "study": "t", "note": "ours"},
        ],
    )


def _pred_runs() -> list[dict]:
    runs = []
    for name, models in CORRECT.items():
        for s in range(3):
            correct = {k: "".join(map(str, v[s])) for k, v in models.items()} | {
                "merged": "".join(map(str, BASE))
            }
            runs.append(
                {
                    "variant": name,
                    "seed": s + 1,
                    "accuracy": {k: float(np.mean([int(c) for c in v])) for k, v in correct.items()},
                    "predictions": {"split": "test", "n": N, "correct": correct},
                }
            )
    return runs


def _cell(ci: dict) -> str:
    low, high = ci["ci_seeds_examples"]
    return f"{100 * ci['diff']:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"


def test_summary_has_the_paired_bootstrap_against_the_reference():
    summary = summarise(_pred_spec(), _pred_runs())
    worse = summary["worse"]["delta"]["m_smoe"]
    assert worse == {
        **seed_example_bootstrap_ci(CORRECT["worse"]["m_smoe"], CORRECT["default"]["m_smoe"]),
        "level": 0.95,
        "seeds": [1, 2, 3],
    }
    assert worse["diff"] == pytest.approx(-0.10) and worse["ci_seeds_examples"][1] < 0
    assert summary["worse"]["delta"]["merged"]["ci_seeds_examples"] == [0.0, 0.0]
    assert summary["worse"]["mc_smoe"]["mean"] == pytest.approx(0.80)
    noisy = summary["noisy"]["delta"]["m_smoe"]
    assert noisy["diff"] == pytest.approx(0.0)
    assert noisy["ci_seeds_examples"][0] < noisy["ci_examples"][0] < 0 < noisy["ci_examples"][1]


def test_table_shows_delta_with_ci_and_decides_agreement_by_it():
    summary = summarise(_pred_spec(), _pred_runs())
    rows = _rows(markdown_table(_pred_spec(), summary))
    worse = rows["worse"]
    assert worse[DELTA_M] == _cell(summary["worse"]["delta"]["m_smoe"])
    assert re.fullmatch(r"-10\.00 \[-1\d\.\d\d, -\d\.\d\d\]", worse[DELTA_M])
    assert worse[DELTA_MC] == "+0.00 [+0.00, +0.00]"
    assert worse[ACC_M] == "70.00 ± 0.00" and worse[ACC_MC] == "80.00 ± 0.00"
    assert worse[AGREES] == "yes"  # below default, as the paper says
    assert rows["better"][DELTA_M].startswith("+5.00 [+") and rows["better"][AGREES] == "no"
    assert rows["noisy"][DELTA_M].startswith("+0.00 [-")
    assert rows["noisy"][AGREES] == "no difference (CI spans 0)"
    assert rows["unpapered"][DELTA_M].startswith("-10.00 [") and rows["unpapered"][AGREES] == "-"
    assert rows["default"][DELTA_M] == "-" and rows["default"][AGREES] == "-"


def test_runs_are_paired_by_seed_and_missing_predictions_fall_back():
    runs = [
        r
        for r in _pred_runs()
        if not (r["variant"] == "worse" and r["seed"] == 3)
        and not (r["variant"] == "default" and r["seed"] == 1)
    ]
    for r in runs:
        if r["variant"] == "better":
            r["predictions"] = None  # an old run, from before evaluate wrote predictions
    summary = summarise(_pred_spec(), runs)
    assert summary["worse"]["delta"]["m_smoe"]["seeds"] == [2]
    assert summary["worse"]["delta"]["m_smoe"]["n_seeds"] == 1
    assert summary["better"]["delta"]["m_smoe"] is None
    rows = _rows(markdown_table(_pred_spec(), summary))
    assert rows["better"][DELTA_M] == "+5.00 (no CI)" and rows["better"][AGREES] == "no"


def test_inconsistent_predictions_are_recorded_not_raised():
    runs = _pred_runs()
    runs[3]["predictions"]["correct"]["m_smoe"] = "1" * (N - 1)  # worse, seed 1
    summary = summarise(_pred_spec(), runs)
    err = summary["worse"]["delta"]["m_smoe"]["error"]
    assert f"n = {N}, but m_smoe has {N - 1}" in err
    # The whole file is suspect, not just the one string; other variants are unaffected.
    assert "error" in summary["worse"]["delta"]["mc_smoe"]
    assert "error" not in summary["better"]["delta"]["m_smoe"]
    assert _rows(markdown_table(_pred_spec(), summary))["worse"][DELTA_M].endswith("(no CI)")


def test_replace_block_keeps_the_rest_of_the_file():
    text = "intro\n<!-- ablations:start -->\nold\n<!-- ablations:end -->\noutro\n"
    out = replace_block(text, "| new |", "ablations")
    assert out == "intro\n<!-- ablations:start -->\n| new |\n<!-- ablations:end -->\noutro\n"
    with pytest.raises(ValueError, match="markers"):
        replace_block("no markers", "x", "ablations")


def test_fidelity_delta_is_the_paired_kl_difference_and_lower_kl_is_better():
    # "worse" moves the merged model twice as far from the full one as "default" on every example.
    runs = _pred_runs()
    rng = np.random.default_rng(0)
    base = rng.uniform(0.001, 0.01, size=N)
    for r in runs:
        scale = {"worse": 2.0, "better": 0.5}.get(r["variant"], 1.0)
        r["predictions"]["kl_to_full"] = {"merged": (base * scale).tolist()}
    summary = summarise(_pred_spec(), runs)
    assert summary["default"]["kl_to_full"]["merged"]["mean"] == pytest.approx(base.mean())
    worse = summary["worse"]["kl_delta"]["merged"]
    assert worse["diff"] == pytest.approx(base.mean()) and worse["ci_seeds_examples"][0] > 0
    assert summary["noisy"]["kl_delta"]["merged"]["ci_seeds_examples"] == [0.0, 0.0]
    rows = _rows(markdown_table(_pred_spec(), summary))
    assert rows["worse"][KL] == f"{2000 * base.mean():.2f} ± 0.00"
    assert rows["worse"][DELTA_KL].startswith(f"{1000 * base.mean():+.2f} [")
    # Paper says "below" for both: a higher KL agrees, a lower one does not.
    assert rows["worse"][AGREES] == "yes; yes"
    assert rows["better"][AGREES].endswith("; no")
    assert rows["noisy"][AGREES].endswith("; no difference")
    assert rows["unpapered"][AGREES] == "-"
