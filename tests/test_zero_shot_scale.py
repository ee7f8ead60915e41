"""Zero-shot scoring on whole splits against the trivial baselines (pipeline.zero_shot_scale) and
its script: the figures are lm-eval's, the baselines the split's, the flag the paired interval's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.data import DataError
from pipeline.trivial_baselines import choice_baselines, choice_majority_correct
from pipeline.zero_shot_scale import score_against_baselines
from pipeline.zeroshot import load_choice_task

LIMIT = 24


@pytest.fixture(scope="module")
def rows(wiki_lm, wiki_tokenizer, data_dir):
    names = ["copa", "openbookqa", "mrpc"]
    return score_against_baselines(wiki_lm, wiki_tokenizer, names, data_dir, limit=LIMIT)


def test_baselines_are_those_of_the_scored_examples(rows, data_dir):
    for name, r in rows.items():
        examples = load_choice_task(name, data_dir)[:LIMIT]
        assert r["examples"] == LIMIT
        assert r["baselines"] == choice_baselines(examples)
        assert r["baselines"]["chance"] == (0.25 if name == "openbookqa" else 0.5)


def test_the_majority_difference_is_accuracy_minus_the_majority_share(rows):
    for r in rows.values():
        diff = r["accuracy"] - r["baselines"]["majority"]
        assert r["versus_majority"]["diff"] == pytest.approx(diff)
        assert r["versus_majority"]["low"] <= diff <= r["versus_majority"]["high"]
        flags = [r[k]["beats_majority"] for k in ("versus_majority", "norm_versus_majority") if k in r]
        assert r["beats_majority"] == any(flags)


def test_acc_norm_gets_its_own_interval_where_the_task_defines_it(rows):
    assert set(rows["openbookqa"]) >= {"accuracy_norm", "norm_versus_majority"}
    assert "norm_versus_majority" not in rows["copa"] and "norm_versus_majority" not in rows["mrpc"]
    r = rows["openbookqa"]
    assert r["norm_versus_majority"]["diff"] == pytest.approx(r["accuracy_norm"] - r["baselines"]["majority"])


def test_a_random_model_does_not_beat_the_majority_on_mrpc(rows, data_dir):
    # 24 MRPC dev pairs: the majority answer ('yes') is right on most; a random 2-layer model is not
    # reliably better than that, and the flag must say so.
    majority = choice_majority_correct(load_choice_task("mrpc", data_dir)[:LIMIT])
    assert np.mean(majority) > 0.5
    assert rows["mrpc"]["beats_majority"] is False


def test_examples_read_in_another_order_are_refused(wiki_lm, wiki_tokenizer, data_dir, monkeypatch):
    import pipeline.zero_shot_scale as zss

    monkeypatch.setattr(zss, "load_choice_task", lambda name, d: list(reversed(load_choice_task(name, d))))
    with pytest.raises(
        DataError, match=r"copa: lm-eval's 24 examples are not the 24 read from .* in file order"
    ):
        score_against_baselines(wiki_lm, wiki_tokenizer, ["copa"], data_dir, limit=LIMIT)


def test_the_script_scores_a_saved_checkpoint_and_checks_the_refused_tasks(
    wiki_lm, wiki_tokenizer, data_dir, tmp_path, capsys
):
    from scripts import zero_shot_scale as cli

    folder = tmp_path / "model"
    wiki_lm.save_pretrained(folder)
    wiki_tokenizer.save_pretrained(folder)
    out = tmp_path / "scale.json"
    argv = ["--source", "none", "--checkpoint", str(folder), "--tasks", "mrpc", "--data-dir", str(data_dir)]
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- zero_shot_scale:start -->\nold\n<!-- zero_shot_scale:end -->\nafter\n")
    cli.main([*argv, "--dtype", "float32", "--out", str(out), "--check", "--readme", str(readme)])
    table = readme.read_text()
    assert "old" not in table and table.startswith("before\n") and table.endswith("after\n")
    assert f"| `{folder}` | mrpc | 408 | " in table and "| 68.4 | 50 | " in table
    found = json.loads(out.read_text())
    assert set(found["models"]) == {str(folder)} and found["tasks"] == ["mrpc"]
    assert found["models"][str(folder)]["tasks"]["mrpc"]["examples"] == 408
    assert "majority baseline 68.38%" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="error: no model folder"):
        cli.main(["--source", "none", "--checkpoint", str(tmp_path / "absent"), "--out", str(out)])
    with pytest.raises(
        SystemExit, match="has no <!-- zero_shot_scale:start --> ... <!-- zero_shot_scale:end --> markers"
    ):
        cli.main([*argv, "--out", str(out), "--readme", str(out)])
