"""lm-evaluation-harness on the local task files: the official task definitions, the model in-process."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.data import DataError
from pipeline.lm_harness import HARNESS_TASKS, check_prepared_subsets, harness_zero_shot, write_task_configs
from pipeline.zeroshot import (
    ZERO_SHOT_TASKS,
    choice_loglikelihoods,
    load_choice_subset,
    load_choice_task,
    subset_indices,
)

LIMIT = 8


@pytest.fixture(scope="module")
def scores(wiki_lm, wiki_tokenizer, data_dir, tmp_path_factory):
    names = list(HARNESS_TASKS.names())
    return harness_zero_shot(
        wiki_lm, wiki_tokenizer, names, data_dir, tmp_path_factory.mktemp("tasks"), limit=LIMIT
    )


def _direct(model, tokenizer, context: str, continuation: str, prefix: tuple[int, ...] = ()) -> float:
    """log p(continuation | context) from one plain forward of ``prefix`` (e.g. a BOS) + the tokens
    of context + continuation, scoring those after the context's own token count."""
    ctx = [*prefix, *tokenizer.encode(context, add_special_tokens=False)]
    cont = [*prefix, *tokenizer.encode(context + continuation, add_special_tokens=False)][len(ctx) :]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].log_softmax(-1)
    return float(logp[len(ctx) - 1 : -1].gather(-1, ids[0, len(ctx) :, None]).sum())


def test_loglikelihoods_are_those_of_a_direct_forward(scores, wiki_lm, wiki_tokenizer):
    # Every example of every task: lm-eval's number for each (context, continuation) it scored is
    # the model's own log-probability of that continuation, with no special token anywhere (this
    # tokenizer appends </s> to every text by default: lm-eval must not see it).
    for name, s in scores.items():
        direct = [[_direct(wiki_lm, wiki_tokenizer, c, k) for c, k in reqs] for reqs in s["requests"]]
        torch.testing.assert_close(
            torch.tensor(s["loglikelihoods"]), torch.tensor(direct), atol=1e-4, rtol=1e-5
        )
        assert len(direct) == len(s["hits"]) == LIMIT
        assert sum(s["hits"]) / LIMIT == pytest.approx(s["accuracy"]), name
        assert ("hits_norm" in s) == ("accuracy_norm" in s) == (name == "openbookqa"), name
        if "hits_norm" in s:
            assert sum(s["hits_norm"]) / LIMIT == pytest.approx(s["accuracy_norm"]), name


def test_a_tokenizer_that_adds_a_bos_gets_it(wiki_lm, wiki_tokenizer, data_dir, tmp_path):
    # Llama-style: the tokenizer itself starts every text with a BOS (here </s>, a token the model
    # knows); lm-eval keeps it, as in published numbers, and so does the project scorer.
    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(wiki_tokenizer)
    eos = tok.eos_token_id
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="</s> $A", special_tokens=[("</s>", eos)]
    )
    tok.bos_token = "</s>"
    assert tok.encode("a b")[0] == eos and tok.bos_token_id == eos
    got = harness_zero_shot(wiki_lm, tok, ["winogrande"], data_dir, tmp_path, limit=4)["winogrande"]
    direct = [[_direct(wiki_lm, tok, c, k, prefix=(eos,)) for c, k in reqs] for reqs in got["requests"]]
    torch.testing.assert_close(
        torch.tensor(got["loglikelihoods"]), torch.tensor(direct), atol=1e-4, rtol=1e-5
    )
    ours = choice_loglikelihoods(
        wiki_lm, tok, load_choice_task("winogrande", data_dir)[:4], 4, torch.device("cpu")
    )
    torch.testing.assert_close(torch.tensor(got["loglikelihoods"]), torch.tensor(ours), atol=1e-4, rtol=1e-5)


def test_both_scorers_offer_the_same_tasks():
    assert HARNESS_TASKS.names() == ZERO_SHOT_TASKS.names() == ["copa", "mrpc", "openbookqa", "winogrande"]


def test_prepared_examples_must_be_those_of_the_data_folder(data_dir, tmp_path):
    examples, idx = load_choice_subset("copa", data_dir, 5, seed=1)
    check_prepared_subsets({"copa": examples}, {"copa": idx}, data_dir)
    with pytest.raises(DataError, match="run prepare again"):
        check_prepared_subsets({"copa": examples}, {}, data_dir)
    with pytest.raises(DataError, match="the 'copa' file is not the one the prepare stage read"):
        check_prepared_subsets({"copa": examples}, {"copa": [i + 1 for i in idx]}, data_dir)


def test_every_task_scores_with_its_version(scores):
    assert set(scores) == {"copa", "winogrande", "openbookqa", "mrpc"}
    for name, s in scores.items():
        assert s["examples"] == LIMIT and 0 <= s["accuracy"] <= 1, name
        assert s["lm_eval_version"] == "0.4.13"
        assert len(s["loglikelihoods"]) == LIMIT and all(len(ll) >= 2 for ll in s["loglikelihoods"])
    assert "accuracy_norm" in scores["openbookqa"] and "accuracy_norm" not in scores["mrpc"]


@pytest.mark.parametrize("name", ["winogrande", "openbookqa", "mrpc"])
def test_harness_agrees_with_the_project_scorer_where_prompts_match(
    scores, wiki_lm, wiki_tokenizer, data_dir, name
):
    # The first LIMIT examples in file order: what lm-eval's limit takes.
    examples = load_choice_task(name, data_dir)[:LIMIT]
    ours = choice_loglikelihoods(wiki_lm, wiki_tokenizer, examples, 4, torch.device("cpu"))
    theirs = scores[name]["loglikelihoods"]
    assert [len(x) for x in ours] == [len(x) for x in theirs]
    torch.testing.assert_close(torch.tensor(theirs), torch.tensor(ours), atol=1e-4, rtol=1e-5)
    best = [max(range(len(ll)), key=ll.__getitem__) for ll in ours]
    assert scores[name]["hits"] == [b == ex.label for b, ex in zip(best, examples, strict=True)]


def test_copa_keeps_the_official_double_space(scores, wiki_lm, wiki_tokenizer, data_dir):
    # lm-eval's COPA choices start with " " and its target_delimiter adds another: published COPA
    # numbers are scored on "... therefore  the ...", which the project's own scorer does not do.
    ex = load_choice_task("copa", data_dir)[0]
    theirs = scores["copa"]["loglikelihoods"][0]
    direct = [
        _direct(wiki_lm, wiki_tokenizer, c, " " + k)
        for c, k in zip(ex.contexts, ex.continuations, strict=True)
    ]
    torch.testing.assert_close(torch.tensor(theirs), torch.tensor(direct), atol=1e-4, rtol=1e-5)


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(DataError, match="missing data file .*COPA/val.jsonl for lm-eval task 'copa'"):
        write_task_configs(["copa"], tmp_path / "nowhere", tmp_path / "tasks")


def test_a_seeded_subset_scores_the_project_scorers_examples(wiki_lm, wiki_tokenizer, data_dir, tmp_path):
    examples = load_choice_task("mrpc", data_dir, max_samples=6, seed=3)
    n = len(load_choice_task("mrpc", data_dir))
    idx = subset_indices(n, 6, 3)
    assert idx != sorted(idx)  # not the first six: the order of the subset is kept too
    got = harness_zero_shot(wiki_lm, wiki_tokenizer, ["mrpc"], data_dir, tmp_path, indices={"mrpc": idx})[
        "mrpc"
    ]
    ours = choice_loglikelihoods(wiki_lm, wiki_tokenizer, examples, 4, torch.device("cpu"))
    torch.testing.assert_close(torch.tensor(got["loglikelihoods"]), torch.tensor(ours), atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="indices must name examples of every task"):
        harness_zero_shot(
            wiki_lm, wiki_tokenizer, ["mrpc", "copa"], data_dir, tmp_path, indices={"mrpc": idx}
        )
    with pytest.raises(ValueError, match="not both"):
        harness_zero_shot(
            wiki_lm, wiki_tokenizer, ["mrpc"], data_dir, tmp_path, limit=2, indices={"mrpc": idx}
        )


def test_the_evaluate_stage_scorers_agree_where_conventions_match(wiki_lm, wiki_tokenizer, data_dir):
    from pipeline.data import PreparedTask
    from pipeline.lm_harness import score_zero_shot, zero_shot_scorer_record

    subsets = {
        n: load_choice_subset(n, data_dir, 6, seed=2) for n in ("copa", "winogrande", "openbookqa", "mrpc")
    }
    task = PreparedTask(
        "wikitext2",
        [],
        "perplexity",
        {},
        wiki_tokenizer,
        "lm",
        {n: ex for n, (ex, _) in subsets.items()},
        {n: idx for n, (_, idx) in subsets.items()},
    )
    cpu = torch.device("cpu")
    theirs, their_hits = score_zero_shot(wiki_lm, task, "lm-eval", 8, cpu, data_dir=data_dir)
    ours, our_hits = score_zero_shot(wiki_lm, task, "project", 8, cpu)
    for name in ("winogrande", "openbookqa", "mrpc"):
        assert their_hits[name] == our_hits[name] and theirs[name]["accuracy"] == ours[name]["accuracy"], name
    # lm-eval reports acc_norm where its task defines it; the project scorer everywhere.
    assert set(theirs["openbookqa"]) == {"accuracy", "accuracy_norm", "examples"}
    assert set(theirs["copa"]) == set(theirs["mrpc"]) == {"accuracy", "examples"}
    assert all(set(r) == {"accuracy", "accuracy_norm", "examples"} for r in ours.values())
    assert zero_shot_scorer_record("lm-eval") == {"name": "lm-evaluation-harness", "version": "0.4.13"}
    with pytest.raises(ValueError, match="valid choices: lm-eval, project"):
        score_zero_shot(wiki_lm, task, "helm", 8, cpu)


def test_dtype_reaches_lm_evals_forward(wiki_lm, wiki_tokenizer, data_dir):
    # lm-eval wraps each forward in its own autocast: the precision has to be handed to it.
    full = harness_zero_shot(wiki_lm, wiki_tokenizer, ["mrpc"], data_dir, limit=2)["mrpc"]
    half = harness_zero_shot(wiki_lm, wiki_tokenizer, ["mrpc"], data_dir, limit=2, dtype="bfloat16")["mrpc"]
    assert half["loglikelihoods"] != full["loglikelihoods"]
    torch.testing.assert_close(
        torch.tensor(half["loglikelihoods"]), torch.tensor(full["loglikelihoods"]), rtol=0.02, atol=0.2
    )
