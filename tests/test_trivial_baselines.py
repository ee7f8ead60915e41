"""Trivial baselines (majority, chance, always-first, always-shortest) and the flag on a model that
does not beat the majority answer: the library on hand-made splits, evaluate and finetune in process."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.ablations import CI_LEVEL
from pipeline.data import Example, tokenize_split, train_bpe_tokenizer, write_jsonl
from pipeline.trivial_baselines import (
    CI_LEVEL as TRIVIAL_LEVEL,
)
from pipeline.trivial_baselines import (
    choice_baselines,
    choice_majority_correct,
    classification_baselines,
    majority_correct,
    majority_label,
    versus_majority,
)
from pipeline.zeroshot import ChoiceExample
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the library


def test_majority_and_chance_of_a_classification_split():
    b = classification_baselines([1, 1, 1, 0], 2, ["negative", "positive"])
    assert b == {"examples": 4, "majority": 0.75, "majority_label": "positive", "chance": 0.5}
    assert classification_baselines([2, 0, 2, 1, 2], 3)["chance"] == pytest.approx(1 / 3)
    assert majority_correct([1, 1, 1, 0]).tolist() == [1, 1, 1, 0]


def test_a_tie_goes_to_the_smallest_label():
    assert majority_label([1, 0, 1, 0]) == 0
    assert classification_baselines([1, 0], 2, ["no", "yes"])["majority_label"] == "no"


def test_no_example_is_an_error():
    with pytest.raises(ValueError, match="at least one"):
        classification_baselines([], 2)
    with pytest.raises(ValueError, match="at least one"):
        choice_baselines([])


def _choice(conts: list[str], label: int, context: str = "q:") -> ChoiceExample:
    return ChoiceExample((context,) * len(conts), tuple(conts), label)


def test_multiple_choice_baselines_on_a_hand_made_set():
    examples = [
        _choice([" a", " bbb"], 0),  # shortest is the answer, first too
        _choice([" ccc", " d"], 1),  # shortest is the answer, not first
        _choice([" e", " ff", " ggg", " hhhh"], 3),  # neither
        _choice([" ii", " jj"], 1),  # a tie in length: the first is "shortest"
    ]
    b = choice_baselines(examples)
    assert b["examples"] == 4
    assert b["majority_label"] == 1 and b["majority"] == 0.5  # gold positions 0, 1, 3, 1
    assert b["chance"] == pytest.approx((0.5 + 0.5 + 0.25 + 0.5) / 4)
    assert b["first_choice"] == 0.25
    assert b["shortest_choice"] == 0.5
    assert choice_majority_correct(examples).tolist() == [0, 1, 0, 1]


def test_shortest_counts_the_context_too():
    # WinoGrande puts the option into the context and shares the continuation.
    ex = ChoiceExample(("The trophy", "The suitcase"), (" is big.", " is big."), 0)
    assert choice_baselines([ex])["shortest_choice"] == 1.0


def test_a_constant_model_does_not_beat_its_majority_baseline():
    labels = [1] * 60 + [0] * 40
    majority = majority_correct(labels)
    v = versus_majority(majority, majority)
    assert v["diff"] == 0 and v["low"] == 0 and v["high"] == 0 and v["beats_majority"] is False
    # The minority class every time: far below.
    v = versus_majority(1 - majority, majority)
    assert v["diff"] == pytest.approx(-0.2) and v["high"] < 0 and not v["beats_majority"]


def test_a_model_that_learned_something_beats_it():
    labels = np.array([1] * 60 + [0] * 40)
    correct = np.ones(100, dtype=np.int8)
    correct[:5] = 0  # 95%, against the majority's 60%
    v = versus_majority(correct, majority_correct(labels))
    assert v["diff"] == pytest.approx(0.35) and v["low"] > 0 and v["beats_majority"] is True
    assert v["level"] == 0.95


def test_a_small_gain_on_few_examples_is_not_enough():
    labels = [1] * 7 + [0] * 3
    correct = majority_correct(labels).copy()
    correct[-1] = 1  # one more right than the majority answer
    v = versus_majority(correct, majority_correct(labels))
    assert v["diff"] == pytest.approx(0.1) and v["low"] <= 0 and not v["beats_majority"]


def test_the_level_is_the_projects():
    assert TRIVIAL_LEVEL == CI_LEVEL


# ---------------------------------------------------------------- the stages


def _prepared(folder: Path) -> Path:
    """A prepared sst2 folder: every train example positive, dev 6 positive and 2 negative."""
    tok = train_bpe_tokenizer(
        ["a fine film", "dull", "great acting", "weak plot"] * 10, 300, ["negative", "positive"]
    )
    tok.save_pretrained(str(folder / "tokenizer"))
    (folder / "task.json").write_text(
        json.dumps({"task": "sst2", "label_words": ["negative", "positive"], "metric": "accuracy"})
    )
    positive = [Example(f"sst2 sentence: {t}", "positive", 1) for t in ("a fine film", "great acting")]
    negative = [Example(f"sst2 sentence: {t}", "negative", 0) for t in ("dull", "weak plot")]
    write_jsonl(tokenize_split(tok, positive * 8, 16), folder / "train.jsonl")
    write_jsonl(tokenize_split(tok, positive * 3 + negative[:1] * 2, 16), folder / "dev.jsonl")
    return folder


def _params(tmp: Path, **finetune) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update({"config": TINY, "init_embeddings_from": None})
    params["finetune"].update(
        {"epochs": 2, "batch_size": 8, "eval_batch_size": 8, "warmup_steps": 1, "lr": 3e-3, **finetune}
    )
    params["evaluate"].update({"split": "dev", "batch_size": 8, "speed_batches": 1})
    params["profile"].update({"num_samples": 16, "batch_size": 8})
    params["group"]["num_experts_avg"] = 2
    params["mlflow"]["tracking_uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def constant_run(tmp_path_factory):
    """A tiny Switch fine-tuned on positive examples only: it answers "positive" whatever it reads."""
    from stages import finetune

    tmp = tmp_path_factory.mktemp("constant")
    data = _prepared(tmp_path_factory.mktemp("prepared"))
    params = _params(tmp)
    argv = ["--params", str(params), "--data", str(data), "--out", str(tmp / "full")]
    finetune.main([*argv, "--metrics", str(tmp / "finetune.json")])
    return tmp, data, params


def test_finetune_warns_and_records_the_majority_baseline(constant_run, capsys):
    tmp, _, _ = constant_run
    metrics = json.loads((tmp / "finetune.json").read_text())
    assert metrics["accuracy"] == 0.75 and metrics["majority_baseline"] == 0.75
    assert metrics["beats_majority"] is False
    assert (tmp / "full" / "model.safetensors").is_file()


def test_finetune_can_require_beating_the_baseline_and_then_writes_nothing(tmp_path, constant_run, capsys):
    from stages import finetune

    _, data, _ = constant_run
    params = _params(tmp_path, require_above_baseline=True)
    out, metrics = tmp_path / "full", tmp_path / "finetune.json"
    with pytest.raises(SystemExit) as exc:
        finetune.main(
            ["--params", str(params), "--data", str(data), "--out", str(out), "--metrics", str(metrics)]
        )
    message = str(exc.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    assert "dev accuracy 75.00% does not beat the majority baseline 75.00% (always 'positive'" in message
    assert "finetune.require_above_baseline: false" in message
    assert not out.exists() and not metrics.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", "params.yaml"]


def test_the_warning_names_the_baseline(tmp_path, constant_run, capsys):
    from stages import finetune

    _, data, _ = constant_run
    params = _params(tmp_path, epochs=1)
    finetune.main(
        [
            "--params",
            str(params),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "m"),
            "--metrics",
            str(tmp_path / "m.json"),
        ]  # fmt: skip
    )
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "the majority baseline 75.00% (always 'positive'" in warnings[0]
    assert "set finetune.require_above_baseline: true to make this an error" in warnings[0]


def test_evaluate_flags_variants_that_do_not_beat_the_majority(constant_run, capsys):
    from stages import evaluate, group, merge, profile

    tmp, data, params = constant_run

    def run(stage, *argv):
        name = stage.__name__.split(".")[-1]
        stage.main(["--params", str(params), "--metrics", str(tmp / f"{name}.json"), *argv])

    full, prof = str(tmp / "full"), str(tmp / "profile")
    run(profile, "--data", str(data), "--model", full, "--out", prof)
    run(group, "--model", full, "--profile", prof, "--out", str(tmp / "groups"))
    run(merge, "--model", full, "--profile", prof, "--groups", str(tmp / "groups" / "groups.json"),
        "--out", str(tmp / "merged"))  # fmt: skip
    merged = str(tmp / "merged")
    run(evaluate, "--data", str(data), "--full", full, "--merged", merged, "--m-smoe", merged,
        "--mc-smoe", merged, "--c-smoe", merged, "--predictions", str(tmp / "predictions.json"))  # fmt: skip
    metrics = json.loads((tmp / "evaluate.json").read_text())
    trivial = metrics.pop("trivial_baselines")
    assert trivial == {
        "split": "dev",
        "examples": 8,
        "majority": 0.75,
        "majority_label": "positive",
        "chance": 0.5,
        "level": 0.95,
    }
    correct = json.loads((tmp / "predictions.json").read_text())["correct"]
    assert correct["full"] == "11111100"  # always "positive": the majority answer
    full = metrics["full"]
    assert full["accuracy"] == 0.75 and full["majority_diff"] == 0.0
    assert full["majority_diff_low"] == full["majority_diff_high"] == 0.0
    for v in ("full", "merged", "m_smoe", "mc_smoe", "c_smoe", "merged_prune"):
        m = metrics[v]
        assert m["majority_diff_low"] <= m["majority_diff"] <= m["majority_diff_high"]
        assert m["majority_diff"] == pytest.approx(m["accuracy"] - 0.75)
        assert m["beats_majority"] is False
    out = capsys.readouterr().out
    assert "trivial baselines on the dev split (8 examples): majority 75.00% (always 'positive')" in out
    assert "full: accuracy 75.00% vs majority baseline 75.00%" in out and "DOES NOT BEAT IT" in out
    assert "warning: not above the majority baseline" in out
    with sqlite3.connect(tmp / "mlflow.db") as db:
        run = db.execute("SELECT run_uuid FROM tags WHERE key = 'stage' AND value = 'evaluate'").fetchone()[0]
        tags = dict(db.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (run,)).fetchall())
        logged = dict(db.execute("SELECT key, value FROM metrics WHERE run_uuid = ?", (run,)).fetchall())
    assert {"full", "merged", "m_smoe", "mc_smoe", "c_smoe"} <= set(tags["not_above_majority"].split(", "))
    assert logged["full.beats_majority"] == 0.0 and logged["baseline.majority"] == 0.75


def _constant_bert(folder: Path, upcycled: dict | None, seed: int) -> None:
    """A tiny BERT classifier (dense, or upcycled into MoE FFNs) whose head always says class 1."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from pipeline.modeling import save_model
    from pipeline.upcycle import upcycle

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24
    )
    model = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 5.0]))
    made_by = {"seed": seed}
    if upcycled is None:
        model.save_pretrained(str(folder), safe_serialization=True)
        (folder / "params.yaml").write_text(yaml.safe_dump(made_by))
    else:
        model = upcycle(model, upcycled["layer"], 4, upcycled["top_k"], upcycled["granularity"])
        save_model(model, folder, params={**made_by, "upcycle": upcycled})


def test_meo_compare_flags_models_that_do_not_beat_the_majority(tmp_path, capsys):
    from transformers import BertTokenizer

    from stages import compare

    data = tmp_path / "prepared"
    (data / "tokenizer").mkdir(parents=True)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"]
    (tmp_path / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n"
    )
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(str(data / "tokenizer"))
    (data / "task.json").write_text(
        json.dumps({"task": "sst2", "label_words": ["negative", "positive"], "metric": "accuracy"})
    )
    labels = [1, 1, 1, 0, 1, 1, 0, 1]
    rows = [{"input_ids": [2, 5 + i, 6 + i, 3], "labels": [y], "label": y} for i, y in enumerate(labels)]
    write_jsonl(rows, data / "test.jsonl")
    models = tmp_path / "models"
    moe = {"layer": "moe", "top_k": 2, "granularity": "ffn"}
    _constant_bert(models / "dense-s1", None, 1)
    _constant_bert(models / "moe-ffn-k2-s1", moe, 1)
    params = yaml.safe_load((ROOT / "meo" / "params.yaml").read_text())
    params["variants"] = {
        "dense-s1": {"layer": "dense", "top_k": 1, "granularity": "linear", "seed": 1},
        "moe-ffn-k2-s1": {**moe, "seed": 1},
    }
    params["merge_source"] = "moe-ffn-k2-s1"
    params["evaluate"].update({"split": "test", "batch_size": 4, "speed_batches": 1})
    params["mlflow"]["tracking_uri"] = None
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    compare.main(
        [
            "--params",
            str(tmp_path / "params.yaml"),
            "--data",
            str(data),
            "--models-dir",
            str(models),
            "--metrics",
            str(tmp_path / "compare.json"),
        ]  # fmt: skip
    )
    report = json.loads((tmp_path / "compare.json").read_text())
    assert report["trivial_baselines"] == {
        "split": "test",
        "examples": 8,
        "majority": 0.75,
        "majority_label": "positive",
        "chance": 0.5,
        "level": 0.95,
    }
    for name in ("dense-s1", "moe-ffn-k2-s1"):
        m = report["models"][name]
        assert m["accuracy"] == 0.75 and m["majority_diff"] == 0.0 and m["beats_majority"] is False
    out = capsys.readouterr().out
    assert "warning: not above the majority baseline" in out and "dense-s1, moe-ffn-k2-s1" in out
