"""Zero-shot evaluation: task files as multiple-choice prompts, perplexity and log-likelihood scoring."""

from __future__ import annotations

import copy
import json
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pipeline.data import DataError
from pipeline.registry import UnknownChoiceError
from pipeline.zeroshot import (
    ZERO_SHOT_TASKS,
    ChoiceExample,
    choice_accuracy,
    choice_loglikelihoods,
    lm_rows,
    load_choice_subset,
    load_choice_task,
    load_wikitext,
    parse_obqa_choices,
    perplexity,
    row_nlls,
    zero_shot_hits,
    zero_shot_suite,
)

CPU = torch.device("cpu")


# ---------------------------------------------------------------- fixtures and fake models


@pytest.fixture(scope="module")
def mixed_examples(data_dir) -> list[ChoiceExample]:
    """A few examples of each task: 2 and 4 choices, shared and per-choice contexts, varying lengths."""
    out = []
    for name, n in (("copa", 4), ("winogrande", 4), ("openbookqa", 3), ("mrpc", 2)):
        out += load_choice_task(name, data_dir, max_samples=n, seed=1)
    return out


class ConstantLM(nn.Module):
    """Same logits at every position: all zeros, or ``boost`` on one favourite token."""

    def __init__(self, vocab: int, favourite: int | None = None, boost: float = 10.0) -> None:
        super().__init__()
        self.vocab, self.favourite, self.boost = vocab, favourite, boost
        self.anchor = nn.Parameter(
            torch.zeros(())
        )  # so that .train()/.eval()/.to() behave as for real models
        self.calls = 0

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        logits = torch.zeros(*input_ids.shape, self.vocab) + self.anchor
        if self.favourite is not None:
            logits[..., self.favourite] = self.boost
        return SimpleNamespace(logits=logits)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _manual_score(model, prefix: list[int], cont: list[int]) -> float:
    """Log-likelihood of ``cont`` after ``prefix`` from one unpadded, unbatched forward."""
    ids = torch.tensor([prefix + cont])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    n = len(prefix)
    return sum(logp[n - 1 + j, t].item() for j, t in enumerate(cont))


def _write(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8")


# ---------------------------------------------------------------- the real files


def test_copa_prompts_from_official_file(data_dir):
    examples = load_choice_task("copa", data_dir)
    assert len(examples) == 100
    assert Counter(e.label for e in examples) == {0: 55, 1: 45}
    # val.jsonl row 0: "The man turned on the faucet." / effect / label 1
    assert examples[0] == ChoiceExample(
        ("The man turned on the faucet therefore",) * 2,
        (" the toilet filled with water.", " water flowed from the spout."),
        1,
    )
    for ex in examples:
        assert ex.contexts[0] == ex.contexts[1]
        assert ex.contexts[0].endswith((" because", " therefore"))
        assert not ex.contexts[0].endswith(". because") and ". therefore" not in ex.contexts[0]
        assert all(c.startswith(" ") and not c[1].isupper() for c in ex.continuations)
    connectors = Counter(e.contexts[0].rsplit(" ", 1)[1] for e in examples)
    assert connectors == {"because": 52, "therefore": 48}


def test_winogrande_partial_scoring_contexts_differ_per_choice(data_dir):
    examples = load_choice_task("winogrande", data_dir)
    assert len(examples) == 1267
    assert Counter(e.label for e in examples) == {0: 628, 1: 639}
    assert examples[0] == ChoiceExample(
        (
            "Sarah was a much better surgeon than Maria so Sarah",
            "Sarah was a much better surgeon than Maria so Maria",
        ),
        (" always got the easier cases.",) * 2,
        1,
    )
    for ex in examples:
        assert ex.contexts[0] != ex.contexts[1]
        assert ex.continuations[0] == ex.continuations[1]
        assert "_" not in ex.continuations[0] and ex.continuations[0].startswith(" ")


def test_openbookqa_choices_column_is_parsed(data_dir):
    examples = load_choice_task("openbookqa", data_dir)
    assert len(examples) == 500
    assert all(len(e.continuations) == 4 and len(set(e.contexts)) == 1 for e in examples)
    assert Counter(e.label for e in examples) == {0: 138, 1: 126, 2: 132, 3: 104}
    first = examples[0]
    assert first.contexts[0].startswith("A person wants to start saving money")
    assert first.contexts[0].endswith("the best way to save money is to")
    assert first.continuations == (
        " make more phone calls",
        " quit eating lunch out",
        " buy less with monopoly money",
        " have lunch with friends",
    )
    assert first.label == 1
    assert not any("(" + letter + ")" in c for e in examples for c in e.continuations for letter in "ABCD")


def test_mrpc_prompt_and_byte_order_mark(data_dir):
    examples = load_choice_task("mrpc", data_dir)
    assert len(examples) == 408
    assert Counter(e.label for e in examples) == {1: 279, 0: 129}
    assert all(e.continuations == (" no", " yes") for e in examples)
    # the file's first row; its sentence 2 opens a quote it never closes (kept as published)
    assert examples[0].contexts[0] == (
        "Sentence 1: He said the foodservice pie business doesn't fit the company's long-term growth strategy.\n"
        'Sentence 2: "The foodservice pie business does not fit our long-term growth strategy.\n'
        "Question: Do both sentences mean the same thing?\nAnswer:"
    )
    assert examples[0].label == 1


def test_registry_names_and_unknown_task(data_dir):
    assert ZERO_SHOT_TASKS.names() == ["copa", "mrpc", "openbookqa", "winogrande"]
    with pytest.raises(UnknownChoiceError, match="copa, mrpc, openbookqa, winogrande"):
        load_choice_task("hellaswag", data_dir)


def test_subsample_is_seeded(data_dir):
    full = load_choice_task("winogrande", data_dir)
    a = load_choice_task("winogrande", data_dir, max_samples=50, seed=3)
    b = load_choice_task("winogrande", data_dir, max_samples=50, seed=3)
    c = load_choice_task("winogrande", data_dir, max_samples=50, seed=4)
    assert a == b and a != c
    assert len(a) == 50 and len(set(a)) == 50 and set(a) <= set(full)
    examples, positions = load_choice_subset("winogrande", data_dir, max_samples=50, seed=3)
    assert examples == a and [full[i] for i in positions] == a
    assert load_choice_task("copa", data_dir, max_samples=1000) == load_choice_task("copa", data_dir)
    with pytest.raises(ValueError, match="max_samples"):
        load_choice_task("copa", data_dir, max_samples=0)


# ---------------------------------------------------------------- bad local files

COPA_ROW = {"premise": "It rained.", "choice1": "A.", "choice2": "B.", "question": "effect", "label": 0}
OBQA_HEADER = "ID\tQuestion Stem\tChoices\tComplete Question\tAnswer Key\n"
MRPC_HEADER = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"


@pytest.mark.parametrize(
    "task, content, match",
    [
        ("copa", '{"premise": "x",\n', "not valid JSON"),
        ("copa", "[1, 2]\n", "JSON object"),
        ("copa", json.dumps({**COPA_ROW, "question": "why"}) + "\n", "neither 'cause' nor 'effect'"),
        ("copa", json.dumps({**COPA_ROW, "label": 2}) + "\n", "out of range"),
        (
            "copa",
            json.dumps({k: v for k, v in COPA_ROW.items() if k != "premise"}) + "\n",
            "no field 'premise'",
        ),
        ("copa", "\n", "no example"),
        ("winogrande", '{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}\n', "blank"),
        ("winogrande", '{"sentence": "a _ b", "option1": "a", "option2": "b", "answer": "3"}\n', "answer"),
        ("openbookqa", OBQA_HEADER + "1\tstem\tA) x B) y\tq\tA\n", "not of the form"),
        ("openbookqa", OBQA_HEADER + "1\tstem\t(A) x (C) y\tq\tA\n", "consecutive"),
        ("openbookqa", OBQA_HEADER + "1\tstem\t(A) x (B) y\tq\tE\n", "answer key 'E'"),
        ("openbookqa", "", "empty file"),
        ("mrpc", "Quality\t#1 String\n1\tx\n", "missing column"),
        ("mrpc", MRPC_HEADER + "yes\t1\t2\ta\tb\n", "not an integer"),
        ("mrpc", MRPC_HEADER, "no example"),
    ],
)
def test_malformed_local_file_raises_data_error_naming_it(tmp_path, task, content, match):
    path = tmp_path / ZERO_SHOT_TASKS.get(task).local_file
    _write(path, content)
    with pytest.raises(DataError, match=match) as err:
        load_choice_task(task, tmp_path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("task", ["copa", "winogrande", "openbookqa", "mrpc"])
def test_missing_local_file_names_path_and_format(tmp_path, task):
    spec = ZERO_SHOT_TASKS.get(task)
    with pytest.raises(DataError, match="missing data file") as err:
        load_choice_task(task, tmp_path)
    assert str(tmp_path / spec.local_file) in str(err.value)
    assert spec.expected in str(err.value)


def test_small_local_files_load(tmp_path):
    _write(
        tmp_path / "openbookqa/Main/test.tsv", OBQA_HEADER + "7\tFog is near:\t(A) a marsh (B) sand\tq\tA\n"
    )
    _write(tmp_path / "glue/MRPC/dev.tsv", MRPC_HEADER + '0\t1\t2\t"Quoted start\tplain \n')
    (obqa,) = load_choice_task("openbookqa", tmp_path)
    assert obqa == ChoiceExample(("Fog is near:",) * 2, (" a marsh", " sand"), 0)
    (mrpc,) = load_choice_task("mrpc", tmp_path)
    assert mrpc.label == 0 and 'Sentence 1: "Quoted start\nSentence 2: plain\n' in mrpc.contexts[0]
    assert parse_obqa_choices("(A) vitamin(C) pills (B) x") == (["A", "B"], ["vitamin(C) pills", "x"])


def test_choice_example_validates():
    with pytest.raises(ValueError, match="one per choice"):
        ChoiceExample(("a",), (" b", " c"), 0)
    with pytest.raises(ValueError, match="at least 2"):
        ChoiceExample(("a",), (" b",), 0)
    with pytest.raises(ValueError, match="out of range"):
        ChoiceExample(("a", "a"), (" b", " c"), 2)
    ex = ChoiceExample(["a", "a"], [" b", " c"], 1)
    assert ex.contexts == ("a", "a") and hash(ex) == hash(ChoiceExample(("a", "a"), (" b", " c"), 1))


# ---------------------------------------------------------------- Hub fallback

HUB_ROWS = {
    "copa": [
        {
            "premise": "The man fell.",
            "choice1": "He slipped.",
            "choice2": "He won.",
            "question": "cause",
            "label": 0,
        },
        {"premise": "Test row.", "choice1": "A.", "choice2": "B.", "question": "effect", "label": -1},
    ],
    "winogrande": [
        {"sentence": "Ann beat Bo so _ won.", "option1": "Ann", "option2": "Bo", "answer": "1"},
        {"sentence": "Hidden _ row.", "option1": "a", "option2": "b", "answer": ""},
    ],
    "openbookqa": [
        {
            "id": "7",
            "question_stem": "Fog is near",
            "choices": {"text": ["a marsh", "sand", "ice"], "label": ["A", "B", "C"]},
            "answerKey": "C",
        }
    ],
    "mrpc": [
        {"sentence1": "One .", "sentence2": "Two .", "label": 1, "idx": 0},
        {"sentence1": "x", "sentence2": "y", "label": -1, "idx": 1},
    ],
}
HUB_EXPECTED = {
    "copa": (
        ("super_glue", "copa"),
        "validation",
        ChoiceExample(("The man fell because",) * 2, (" he slipped.", " he won."), 0),
    ),
    "winogrande": (
        ("winogrande", "winogrande_xl"),
        "validation",
        ChoiceExample(("Ann beat Bo so Ann", "Ann beat Bo so Bo"), (" won.", " won."), 0),
    ),
    "openbookqa": (
        ("openbookqa", "main"),
        "test",
        ChoiceExample(("Fog is near",) * 3, (" a marsh", " sand", " ice"), 2),
    ),
    "mrpc": (
        ("glue", "mrpc"),
        "validation",
        ChoiceExample(
            (
                "Sentence 1: One .\nSentence 2: Two .\nQuestion: Do both sentences mean the same thing?\nAnswer:",
            )
            * 2,
            (" no", " yes"),
            1,
        ),
    ),
}


@pytest.fixture
def fake_hub(monkeypatch):
    import datasets

    calls = []
    store = {}

    def load_dataset(*args, split=None, **kwargs):
        calls.append((args, split))
        return store[args]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return SimpleNamespace(calls=calls, store=store)


@pytest.mark.parametrize("task", sorted(HUB_ROWS))
def test_hub_fallback_uses_standard_ids_and_skips_hidden_labels(fake_hub, task):
    hub_id, split, expected = HUB_EXPECTED[task]
    fake_hub.store[hub_id] = HUB_ROWS[task]
    assert load_choice_task(task, None) == [expected]
    assert fake_hub.calls == [(hub_id, split)]


def test_hub_fallback_errors(fake_hub):
    fake_hub.store[("glue", "mrpc")] = [{"sentence1": "x", "sentence2": "y", "label": -1}]
    with pytest.raises(DataError, match="no example"):
        load_choice_task("mrpc", None)
    fake_hub.store[("glue", "mrpc")] = [{"sentence1": "x", "label": 0}]
    with pytest.raises(DataError, match="no field 'sentence2'"):
        load_choice_task("mrpc", None)


# ---------------------------------------------------------------- WikiText and LM blocks


def test_wikitext_local_splits(data_dir, wiki_valid):
    assert wiki_valid.startswith(" \n = Homarus gammarus = \n")
    assert len(wiki_valid.splitlines()) == 3760
    assert len(load_wikitext(data_dir, "test").splitlines()) == 4358
    with pytest.raises(DataError, match="Hub") as err:
        load_wikitext(data_dir, "train")
    assert str(data_dir / "wikitext-2" / "train.txt") in str(err.value)
    with pytest.raises(ValueError, match="train, valid, test"):
        load_wikitext(data_dir, "validation")


def test_wikitext_hub_fallback(fake_hub):
    fake_hub.store[("wikitext", "wikitext-2-v1")] = [
        {"text": ""},
        {"text": " = Title = \n"},
        {"text": " body"},
    ]
    assert load_wikitext(None, "valid") == "\n = Title = \n body\n"
    assert fake_hub.calls == [(("wikitext", "wikitext-2-v1"), "validation")]
    fake_hub.store[("wikitext", "wikitext-2-v1")] = [{"text": ""}]
    with pytest.raises(DataError, match="no text"):
        load_wikitext(None, "train")


def test_lm_rows_are_consecutive_exact_blocks(wiki_tokenizer, wiki_valid):
    text = "\n".join(wiki_valid.splitlines()[:60]) + "\n"
    stream = [t for line in text.splitlines(keepends=True) for t in _ids(wiki_tokenizer, line)]
    rows = lm_rows(wiki_tokenizer, text, block_size=32)
    assert len(rows) == len(stream) // 32 > 3
    assert all(len(r["input_ids"]) == 32 and r["labels"] == r["input_ids"] and r["label"] == 0 for r in rows)
    assert [t for r in rows for t in r["input_ids"]] == stream[: 32 * len(rows)]
    assert lm_rows(wiki_tokenizer, text, block_size=32, max_blocks=3) == rows[:3]
    assert lm_rows(wiki_tokenizer, text, block_size=32, max_blocks=10**6) == rows
    with pytest.raises(DataError, match="fewer than one block of 32"):
        lm_rows(wiki_tokenizer, " a short line\n", block_size=32)
    with pytest.raises(ValueError, match="block_size"):
        lm_rows(wiki_tokenizer, text, block_size=1)


# ---------------------------------------------------------------- perplexity


def test_perplexity_of_uniform_model_is_vocab_size():
    vocab = 37
    rows = [{"input_ids": list(range(n)), "labels": list(range(n)), "label": 0} for n in (5, 9, 2)]
    model = ConstantLM(vocab).train()
    out = perplexity(model, rows, pad_id=0, batch_size=2, device="cpu")
    assert out["perplexity"] == pytest.approx(vocab, rel=1e-6)
    assert out["nll"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert out["tokens"] == 4 + 8 + 1
    assert model.training  # the previous mode is restored


@pytest.fixture(scope="module")
def ragged_rows(wiki_tokenizer, wiki_valid) -> list[dict]:
    """LM blocks cut to different lengths (so batches carry padding); one row ignores some labels."""
    rows = lm_rows(wiki_tokenizer, wiki_valid, block_size=48, max_blocks=7)
    out = []
    for i, r in enumerate(rows):
        n = 48 - 5 * i
        labels = r["labels"][:n]
        if i == 2:
            labels = labels[:10] + [-100] * 5 + labels[15:]
        out.append({"input_ids": r["input_ids"][:n], "labels": labels, "label": 0})
    return out


def test_perplexity_matches_manual_computation(wiki_lm, ragged_rows):
    nll, count = 0.0, 0
    with torch.no_grad():
        for r in ragged_rows:
            logits = wiki_lm(input_ids=torch.tensor([r["input_ids"]])).logits[0]
            target = torch.tensor(r["labels"][1:])
            nll += torch.nn.functional.cross_entropy(
                logits[:-1], target, ignore_index=-100, reduction="sum"
            ).item()
            count += int((target != -100).sum())
    out = perplexity(wiki_lm, ragged_rows, pad_id=0, batch_size=3, device=CPU)
    assert out["tokens"] == count == sum(len(r["input_ids"]) - 1 for r in ragged_rows) - 5
    assert out["nll"] == pytest.approx(nll / count, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    # a random model is close to uniform over the vocabulary
    assert 0.5 * wiki_lm.config.vocab_size < out["perplexity"] < 2 * wiki_lm.config.vocab_size


def test_row_nlls_are_the_perplexitys_parts(wiki_lm, ragged_rows):
    nlls, counts = row_nlls(wiki_lm, ragged_rows, pad_id=0, batch_size=3, device=CPU)
    assert counts == [int((torch.tensor(r["labels"][1:]) != -100).sum()) for r in ragged_rows]
    one = [row_nlls(wiki_lm, [r], 0, 1, CPU)[0][0] for r in ragged_rows]
    assert nlls == pytest.approx(one, rel=1e-5)  # a row's sum does not depend on its batch
    out = perplexity(wiki_lm, ragged_rows, 0, 3, CPU)
    assert out["nll"] == pytest.approx(sum(nlls) / sum(counts), rel=1e-6)


def test_perplexity_independent_of_batching_and_pad_id(wiki_lm, ragged_rows):
    ref = perplexity(wiki_lm, ragged_rows, pad_id=0, batch_size=1, device=CPU)["perplexity"]
    for bs in (2, 4, len(ragged_rows)):
        assert perplexity(wiki_lm, ragged_rows, 0, bs, CPU)["perplexity"] == pytest.approx(ref, rel=1e-5)
    # a pad id that also occurs in the text (eos used as pad) must not hide those tokens
    in_text = ragged_rows[0]["input_ids"][3]
    assert perplexity(wiki_lm, ragged_rows, in_text, 7, CPU)["perplexity"] == pytest.approx(ref, rel=1e-5)


def test_perplexity_bfloat16_runs(wiki_lm, ragged_rows):
    full = perplexity(wiki_lm, ragged_rows[:2], 0, 2, CPU)["perplexity"]
    half = perplexity(wiki_lm, ragged_rows[:2], 0, 2, CPU, dtype="bfloat16")["perplexity"]
    assert half == pytest.approx(full, rel=0.05)


# ---------------------------------------------------------------- multiple-choice scoring


@pytest.mark.parametrize("with_bos", [False, True])
def test_choice_scores_match_unbatched_forward(wiki_lm, wiki_tokenizer, mixed_examples, with_bos):
    tok = wiki_tokenizer
    if with_bos:
        tok = copy.deepcopy(wiki_tokenizer)
        tok.bos_token = "</s>"
    prefix = [tok.bos_token_id] if with_bos else []
    scores = choice_loglikelihoods(wiki_lm, tok, mixed_examples, batch_size=5, device=CPU)
    assert [len(s) for s in scores] == [len(e.continuations) for e in mixed_examples]
    for ex, got in zip(mixed_examples, scores, strict=True):
        for ctx, cont, s in zip(ex.contexts, ex.continuations, got, strict=True):
            expected = _manual_score(wiki_lm, prefix + _ids(tok, ctx), _ids(tok, cont))
            assert s == pytest.approx(expected, rel=1e-5, abs=1e-4)


def test_choice_results_independent_of_batch_size(wiki_lm, wiki_tokenizer, mixed_examples):
    ref = choice_loglikelihoods(wiki_lm, wiki_tokenizer, mixed_examples, batch_size=1, device=CPU)
    for bs in (3, 64):
        got = choice_loglikelihoods(wiki_lm, wiki_tokenizer, mixed_examples, batch_size=bs, device=CPU)
        assert got == [pytest.approx(r, rel=1e-5, abs=1e-4) for r in ref]
    accs = [choice_accuracy(wiki_lm, wiki_tokenizer, mixed_examples, bs, CPU) for bs in (1, 7)]
    assert accs[0] == accs[1] and accs[0]["examples"] == len(mixed_examples)


def test_model_preferring_one_token_answers_it(wiki_tokenizer):
    (the,) = _ids(wiki_tokenizer, " the")
    wrong = [" of", " and", " in"]
    assert all(len(_ids(wiki_tokenizer, w)) == 1 for w in wrong)
    examples = []
    for i in range(6):
        conts = list(wrong)
        conts.insert(i % 4, " the")
        examples.append(ChoiceExample((f"context number {i} is",) * 4, tuple(conts), i % 4))
    model = ConstantLM(len(wiki_tokenizer), favourite=the)
    out = choice_accuracy(model, wiki_tokenizer, examples, batch_size=5, device="cpu")
    assert out == {"accuracy": 1.0, "accuracy_norm": 1.0, "examples": 6}
    # 24 pairs in batches of 5
    assert model.calls == 5


def test_accuracy_norm_divides_by_continuation_bytes(wiki_tokenizer):
    short, long = " zx", " the of the and the"
    n_short, n_long = len(_ids(wiki_tokenizer, short)), len(_ids(wiki_tokenizer, long))
    # uniform model: score = -n_tokens * log V, so fewer tokens win on acc, fewer tokens per byte on acc_norm
    assert n_short < n_long and n_short / len(short) > n_long / len(long)
    examples = [ChoiceExample(("a",) * 2, (short, long), 1), ChoiceExample(("b",) * 2, (long, short), 1)]
    out = choice_accuracy(
        ConstantLM(len(wiki_tokenizer)), wiki_tokenizer, examples, batch_size=4, device="cpu"
    )
    assert out == {"accuracy": 0.5, "accuracy_norm": 0.5, "examples": 2}
    out = choice_accuracy(
        ConstantLM(len(wiki_tokenizer)), wiki_tokenizer, examples[:1], batch_size=4, device="cpu"
    )
    assert out["accuracy"] == 0.0 and out["accuracy_norm"] == 1.0


def test_max_length_truncates_context_from_the_left(wiki_lm, wiki_tokenizer, mixed_examples):
    ex = mixed_examples[-1]  # MRPC: a long context
    ctx, cont = _ids(wiki_tokenizer, ex.contexts[0]), _ids(wiki_tokenizer, ex.continuations[1])
    assert len(ctx) > 20
    (got,) = choice_loglikelihoods(wiki_lm, wiki_tokenizer, [ex], 2, CPU, max_length=12)
    seq = (ctx + cont)[-12:]
    expected = _manual_score(wiki_lm, seq[: -len(cont)], cont)
    assert got[1] == pytest.approx(expected, rel=1e-5, abs=1e-4)
    with pytest.raises(ValueError, match="max_length"):
        choice_loglikelihoods(wiki_lm, wiki_tokenizer, [ex], 2, CPU, max_length=1)


def test_training_mode_restored_and_suite_mean(wiki_lm, wiki_tokenizer, mixed_examples):
    tasks = {"first": mixed_examples[:4], "second": mixed_examples[4:8]}
    wiki_lm.train()
    try:
        out = zero_shot_suite(wiki_lm, wiki_tokenizer, tasks, batch_size=8, device=CPU, dtype="float32")
        assert wiki_lm.training
    finally:
        wiki_lm.eval()
    assert set(out) == {"first", "second", "mean_accuracy"}
    for name, examples in tasks.items():
        assert out[name] == choice_accuracy(wiki_lm, wiki_tokenizer, examples, 8, CPU)
    assert out["mean_accuracy"] == pytest.approx((out["first"]["accuracy"] + out["second"]["accuracy"]) / 2)
    assert not wiki_lm.training
    hits = zero_shot_hits(wiki_lm, wiki_tokenizer, tasks, 8, CPU)
    for name, (h, h_norm) in hits.items():
        assert len(h) == len(h_norm) == len(tasks[name])
        assert sum(h) / len(h) == out[name]["accuracy"] and sum(h_norm) / len(h) == out[name]["accuracy_norm"]
    with pytest.raises(ValueError, match="at least one"):
        zero_shot_suite(wiki_lm, wiki_tokenizer, {}, 8, CPU)


def test_accuracy_norm_counts_utf8_bytes_not_characters(monkeypatch):
    import pipeline.zeroshot as zs

    # " ééé" is 4 characters but 7 bytes: per byte it beats " abcde" (-1.0 vs -1.08), per character it loses
    monkeypatch.setattr(zs, "choice_loglikelihoods", lambda *args, **kwargs: [[-7.0, -6.5]])
    ex = ChoiceExample(("q", "q"), (" ééé", " abcde"), 0)
    out = choice_accuracy(None, None, [ex], batch_size=1, device="cpu")
    assert out == {"accuracy": 0.0, "accuracy_norm": 1.0, "examples": 1}
