"""The decoder setting's stage scripts in process: a checkpoint merged and compressed zero-shot
(``zero_shot: true``: no fine-tuning, S pruned from gradients without any weight update)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.data import train_bpe_tokenizer
from pipeline.modeling import build_model, load_model, save_model
from tests.conftest import run_decoder_stages

ROOT = Path(__file__).resolve().parents[1]


def _params(tmp_path: Path, checkpoint: Path) -> Path:
    params = yaml.safe_load((ROOT / "llm" / "params.yaml").read_text())
    tiny = yaml.safe_load((ROOT / "tests" / "tiny_llm_params.yaml").read_text())
    for section, values in tiny.items():
        if isinstance(values, dict) and isinstance(params.get(section), dict):
            for k, v in values.items():
                if isinstance(v, dict) and isinstance(params[section].get(k), dict):
                    params[section][k].update(v)
                else:
                    params[section][k] = v
        else:
            params[section] = values
    params["zero_shot"] = True
    params["model"].update({"name_or_path": str(checkpoint), "config": None, "init_embeddings_from": None})
    params["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def zero_shot_run(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("zero_shot")
    text = (data_dir / "wikitext-2" / "valid.txt").read_text().splitlines()[:2000]
    tok = train_bpe_tokenizer(text, 400, [])
    cfg = yaml.safe_load((ROOT / "tests" / "tiny_llm_params.yaml").read_text())["model"]["config"]
    model = build_model("mixtral", cfg, len(tok), tok.pad_token_id, tok.eos_token_id, 1.0, 0)
    save_model(model, tmp / "checkpoint", tokenizer=tok)
    p = str(_params(tmp, tmp / "checkpoint"))
    d = tmp / "out"

    run_decoder_stages(Path(p), d, "--predictions", str(d / "predictions.json"))
    return tmp, d


def _state(folder: Path) -> dict:
    return load_model(folder).state_dict()


def test_zero_shot_finetune_passes_the_checkpoint_through(zero_shot_run):
    tmp, d = zero_shot_run
    metrics = json.loads((d / "finetune.json").read_text())
    assert metrics["total_steps"] == 0 and metrics["perplexity"] > 1
    src, out = _state(tmp / "checkpoint"), _state(d / "full")
    assert src.keys() == out.keys() and all(torch.equal(src[k], out[k]) for k in src)
    assert yaml.safe_load((d / "full" / "params.yaml").read_text())["zero_shot"] is True


def test_zero_shot_kd_prunes_without_training(zero_shot_run):
    _, d = zero_shot_run
    metrics = json.loads((d / "kd_finetune.json").read_text())
    assert metrics["m_smoe"]["total_steps"] == 0
    assert metrics["mc_smoe"]["total_steps"] > 0
    assert metrics["mc_smoe"]["s_kept_fraction"] == pytest.approx(0.1, abs=0.03)
    # M-SMoE is the merged model untouched (router remap is the default).
    merged, m_smoe = _state(d / "merged"), _state(d / "m_smoe")
    assert all(torch.equal(merged[k], m_smoe[k]) for k in merged)
    # In MC-SMoE only S was pruned: U and V are the ones compress computed.
    before, after = _state(d / "compressed"), _state(d / "mc_smoe")
    for k in before:
        if k.endswith((".u", ".v")):
            assert torch.equal(before[k], after[k]), k


def test_zero_shot_evaluate_reports_perplexity_and_zero_shot_accuracy(zero_shot_run):
    tmp, d = zero_shot_run
    metrics = json.loads((d / "evaluate.json").read_text())
    # The default scorer is lm-evaluation-harness, recorded with its version beside the variants.
    assert metrics.pop("zero_shot_scorer") == {"name": "lm-evaluation-harness", "version": "0.4.13"}
    # Each zero-shot task's trivial baselines, from its own examples.
    trivial = metrics.pop("trivial_baselines")
    assert set(trivial) == {"copa", "winogrande", "openbookqa", "mrpc"}
    assert trivial["openbookqa"]["chance"] == 0.25 and trivial["copa"]["chance"] == 0.5
    for b in trivial.values():
        assert b["examples"] == 8 and b["chance"] <= b["majority"] <= 1 and 0 <= b["shortest_choice"] <= 1
    assert {"full", "merged", "m_smoe", "mc_smoe", "c_smoe"} <= set(metrics)
    hits = json.loads((d / "predictions.json").read_text())["zero_shot"]
    for v, m in metrics.items():
        assert m["test_perplexity"] > 1 and m["test_tokens"] == 16 * 31
        for task in ("copa", "winogrande", "openbookqa", "mrpc"):
            assert m[f"{task}_examples"] == 8 and 0 <= m[f"{task}_accuracy"] <= 1
            assert m[f"{task}_accuracy"] == hits[task][v].count("1") / 8
            # Random tiny weights on 8 examples: no interval lies above the majority answer.
            low, diff, high = (m[f"{task}_majority_diff{s}"] for s in ("_low", "", "_high"))
            assert low <= diff <= high and m[f"{task}_beats_majority"] is False
        assert m["beats_majority"] is False
        # acc_norm only where lm-eval's task defines it.
        assert "openbookqa_accuracy_norm" in m and "copa_accuracy_norm" not in m
        assert m["mean_accuracy"] == pytest.approx(sum(m[f"{t}_accuracy"] for t in hits) / 4)
    with sqlite3.connect(tmp / "mlflow.db") as db:
        run = db.execute("SELECT run_uuid FROM tags WHERE key = 'stage' AND value = 'evaluate'").fetchone()[0]
        tags = dict(db.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (run,)).fetchall())
        params = dict(db.execute("SELECT key, value FROM params WHERE run_uuid = ?", (run,)).fetchall())
    assert tags["zero_shot_scorer"] == "lm-evaluation-harness 0.4.13"
    assert set(tags["not_above_majority"].split(", ")) == set(metrics)
    assert params["zero_shot_scorer.version"] == "0.4.13" and params["evaluate.zero_shot_scorer"] == "lm-eval"
    assert metrics["full"]["test_perplexity"] == pytest.approx(
        json.loads((d / "finetune.json").read_text())["perplexity"], rel=0.5
    )
