"""The ablation spec, its validation against params.yaml, and the summary table."""

from __future__ import annotations

from pathlib import Path

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
    assert values("merge.strategy") == set(MERGE_STRATEGIES.names())
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
    assert params["kd"]["train"]["epochs"] == 1


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


def test_table_compares_sign_with_paper_and_respects_spread():
    table = markdown_table(_spec(), summarise(_spec(), _runs()))
    rows = {
        line.split("|")[2].strip(): [c.strip() for c in line.split("|")[1:-1]]
        for line in table.splitlines()[2:]
    }
    assert rows["worse"][6] == "-10.00" and rows["worse"][8] == "yes"
    assert rows["better"][6] == "+9.00" and rows["better"][8] == "no"
    assert rows["noisy"][8] == "within spread"
    assert (
        rows["unrun"][5] == "not run" and rows["unrun"][8] == "-" and rows["unrun"][7] == "not in the paper"
    )
    assert rows["default"][5] == "81.00 ± 1.00"
    assert rows["worse"][2] == "`merge.strategy=uniform`"


def test_replace_block_keeps_the_rest_of_the_file():
    text = "intro\n<!-- ablations:start -->\nold\n<!-- ablations:end -->\noutro\n"
    out = replace_block(text, "| new |", "ablations")
    assert out == "intro\n<!-- ablations:start -->\n| new |\n<!-- ablations:end -->\noutro\n"
    with pytest.raises(ValueError, match="markers"):
        replace_block("no markers", "x", "ablations")
