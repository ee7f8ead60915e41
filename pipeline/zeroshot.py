"""Zero-shot evaluation of causal LMs: the project's multiple-choice scorer, the task files it reads
(also the seeded subsets that lm-evaluation-harness scores, :mod:`pipeline.lm_harness`), perplexity.

The project scorer (:func:`choice_hits` and the functions built on it) ranks each example's choices
by the summed log-probability of the continuation given the context. Its conventions, and where
they differ from lm-evaluation-harness 0.4.13 as :func:`pipeline.lm_harness.harness_zero_shot`
runs it:

- Prompts: lm-eval's prompts for WinoGrande, OpenBookQA and MRPC, character for character. COPA
  has one space between the connector and the choice ("... because the ..."); lm-eval's has two,
  as its choices start with a space and its target delimiter adds another.
- Tokens: context and continuation are tokenised apart, without special tokens. lm-eval tokenises
  them together and splits at the context's token count; the tokens are the same unless the
  tokenizer merges across the boundary (a byte-level BPE with a space-led continuation does not).
- BOS: the tokenizer's ``bos_token_id`` is prepended whenever it has one. lm-eval adds a BOS only
  where the tokenizer adds one itself (Llama/Mixtral do, GPT-2 and this project's BPE do not).
  An empty context starts from eos in both.
- Length: no truncation unless ``max_length`` is given; lm-eval cuts the context from the left to
  the model's context window.
- acc_norm: log-likelihood per UTF-8 byte of the continuation, leading space included, reported
  for every task. lm-eval divides by the choice's length in characters, without the delimiter's
  space, and reports acc_norm only where the task defines it (OpenBookQA here).
- Ties go to the first choice in both.

With a tokenizer that neither has nor adds a BOS, on WinoGrande, OpenBookQA and MRPC, both give
the same log-likelihoods and accuracy (tests/test_lm_harness.py).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data import DataError, _need_columns, _read_tsv, collate
from pipeline.registry import Registry
from pipeline.training import autocast


@dataclass(frozen=True)
class ChoiceExample:
    """One multiple-choice question: choice i is ``contexts[i] + continuations[i]``; ``label`` is the answer."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    label: int

    def __post_init__(self) -> None:
        # Lists would make the frozen example unhashable; store tuples whatever the caller passed.
        object.__setattr__(self, "contexts", tuple(self.contexts))
        object.__setattr__(self, "continuations", tuple(self.continuations))
        n = len(self.continuations)
        if len(self.contexts) != n:
            raise ValueError(f"{len(self.contexts)} contexts for {n} continuations; need one per choice")
        if n < 2:
            raise ValueError(f"a multiple-choice example needs at least 2 choices, got {n}")
        if not 0 <= self.label < n:
            raise ValueError(f"label {self.label} out of range [0, {n - 1}]")


@dataclass(frozen=True)
class ZeroShotTask:
    """Where a zero-shot task's evaluation split lives (local file or Hub) and how rows become examples."""

    name: str
    # path relative to the data folder
    local_file: str
    read_rows: Callable[[Path], list[dict]]
    from_local_row: Callable[[dict], ChoiceExample]
    hub: tuple[str, str]
    hub_split: str
    # None skips the row (unlabelled Hub test rows)
    from_hub_row: Callable[[dict], ChoiceExample | None]
    # what a well-formed local file looks like, for error messages
    expected: str

    def read_local(self, path: Path) -> list[ChoiceExample]:
        """All examples of the local file ``path``; DataError when it is malformed."""
        return _convert_rows(str(path), self.read_rows(path), self.from_local_row, self.expected)


ZERO_SHOT_TASKS: Registry[ZeroShotTask] = Registry("zero-shot task")


# ---------------------------------------------------------------- reading rows


def _read_jsonl_rows(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
    return rows


def _tsv_reader(columns: tuple[str, ...]) -> Callable[[Path], list[dict]]:
    def read(path: Path) -> list[dict]:
        rows = _read_tsv(path)
        for row in rows:
            _need_columns(path, row, columns)
        return rows

    return read


def _convert_rows(
    source: str,
    rows: Iterable[dict],
    convert: Callable[[dict], ChoiceExample | None],
    expected: str,
) -> list[ChoiceExample]:
    out = []
    for i, row in enumerate(rows, 1):
        try:
            ex = convert(row)
        except KeyError as err:
            raise DataError(f"{source}: example {i} has no field {err}; expected {expected}") from None
        except (TypeError, ValueError, AttributeError) as err:
            raise DataError(f"{source}: malformed example {i} ({err}); expected {expected}") from None
        if ex is not None:
            out.append(ex)
    return out


def _int_label(value, n: int) -> int:
    # bool is an int subclass; a JSON true/false label is a format error, not class 1/0
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"label {value!r} is not an integer")
    try:
        label = int(value)
    except ValueError:
        raise ValueError(f"label {value!r} is not an integer") from None
    if not 0 <= label < n:
        raise ValueError(f"label {label} out of range [0, {n - 1}]")
    return label


# ---------------------------------------------------------------- COPA

_COPA_CONNECTORS = {"cause": "because", "effect": "therefore"}


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def copa_example(premise: str, choice1: str, choice2: str, question: str, label) -> ChoiceExample:
    """COPA as "<premise without final period> because|therefore" + " <choice, lower-cased first letter>".

    lm-eval's prompt but for one space: lm-eval scores "...therefore" + "  <choice>" (two spaces).
    """
    if question not in _COPA_CONNECTORS:
        raise ValueError(f"question {question!r} is neither 'cause' nor 'effect'")
    premise = premise.strip()
    if premise.endswith("."):
        premise = premise[:-1]
    context = f"{premise} {_COPA_CONNECTORS[question]}"
    conts = tuple(" " + _lower_first(c.strip()) for c in (choice1, choice2))
    return ChoiceExample((context, context), conts, _int_label(label, 2))


def _copa_row(row: dict) -> ChoiceExample:
    return copa_example(row["premise"], row["choice1"], row["choice2"], row["question"], row["label"])


def _copa_hub_row(row: dict) -> ChoiceExample | None:
    return None if row["label"] == -1 else _copa_row(row)


ZERO_SHOT_TASKS.register("copa")(
    ZeroShotTask(
        name="copa",
        local_file="superglue/COPA/val.jsonl",
        read_rows=_read_jsonl_rows,
        from_local_row=_copa_row,
        hub=("super_glue", "copa"),
        hub_split="validation",
        from_hub_row=_copa_hub_row,
        expected="SuperGLUE COPA JSONL with premise, choice1, choice2, question (cause|effect), label (0|1)",
    )
)


# ---------------------------------------------------------------- WinoGrande


def winogrande_example(sentence: str, option1: str, option2: str, answer) -> ChoiceExample:
    """lm-eval's partial scoring: context = text before "_" + option, continuation = " " + text after "_"."""
    if "_" not in sentence:
        raise ValueError("sentence has no '_' blank")
    if str(answer) not in ("1", "2"):
        raise ValueError(f"answer {answer!r} is neither '1' nor '2'")
    blank = sentence.index("_")
    before, after = sentence[:blank], sentence[blank + 1 :]
    cont = " " + after.strip()
    return ChoiceExample((before + option1, before + option2), (cont, cont), int(answer) - 1)


def _winogrande_row(row: dict) -> ChoiceExample:
    return winogrande_example(row["sentence"], row["option1"], row["option2"], row["answer"])


def _winogrande_hub_row(row: dict) -> ChoiceExample | None:
    # the Hub's test split has answer "" (hidden)
    return None if row["answer"] in ("", None) else _winogrande_row(row)


ZERO_SHOT_TASKS.register("winogrande")(
    ZeroShotTask(
        name="winogrande",
        local_file="winogrande/dev.jsonl",
        read_rows=_read_jsonl_rows,
        from_local_row=_winogrande_row,
        hub=("winogrande", "winogrande_xl"),
        hub_split="validation",
        from_hub_row=_winogrande_hub_row,
        expected="WinoGrande JSONL with sentence (one '_'), option1, option2, answer ('1'|'2')",
    )
)


# ---------------------------------------------------------------- OpenBookQA

# "(A) a marsh (B) a tundra ..."; a marker must start the field or follow whitespace so that a
# parenthesised letter glued to a word is not taken for a new choice.
_OBQA_MARKER = re.compile(r"(?:^|\s)\(([A-Z])\)\s")


def parse_obqa_choices(text: str) -> tuple[list[str], list[str]]:
    """Split the official TSV's Choices field into (letters, texts); ValueError when it is not "(A) .. (B) ..."."""
    parts = _OBQA_MARKER.split(text.strip())
    letters, texts = parts[1::2], [t.strip() for t in parts[2::2]]
    if parts[0].strip() or len(letters) < 2:
        raise ValueError(f"choices {text!r} are not of the form '(A) ... (B) ...'")
    if letters != [chr(ord("A") + i) for i in range(len(letters))] or not all(texts):
        raise ValueError(f"choices {text!r} are not consecutive non-empty (A), (B), ... options")
    return letters, texts


def obqa_example(stem: str, letters: list[str], texts: list[str], answer_key: str) -> ChoiceExample:
    """lm-eval's OpenBookQA prompt: context = question stem, continuation = " " + choice text."""
    if answer_key not in letters:
        raise ValueError(f"answer key {answer_key!r} is not one of the choices {letters}")
    stem = stem.strip()
    conts = tuple(" " + t.strip() for t in texts)
    return ChoiceExample((stem,) * len(conts), conts, letters.index(answer_key))


def _obqa_row(row: dict) -> ChoiceExample:
    letters, texts = parse_obqa_choices(row["Choices"])
    return obqa_example(row["Question Stem"], letters, texts, row["Answer Key"].strip())


def _obqa_hub_row(row: dict) -> ChoiceExample:
    choices = row["choices"]
    return obqa_example(row["question_stem"], list(choices["label"]), list(choices["text"]), row["answerKey"])


_OBQA_COLUMNS = ("Question Stem", "Choices", "Answer Key")
ZERO_SHOT_TASKS.register("openbookqa")(
    ZeroShotTask(
        name="openbookqa",
        local_file="openbookqa/Main/test.tsv",
        read_rows=_tsv_reader(_OBQA_COLUMNS),
        from_local_row=_obqa_row,
        hub=("openbookqa", "main"),
        hub_split="test",
        from_hub_row=_obqa_hub_row,
        expected="OpenBookQA TSV with columns ID, Question Stem, Choices ('(A) .. (B) ..'), Answer Key",
    )
)


# ---------------------------------------------------------------- MRPC


def mrpc_example(sentence1: str, sentence2: str, label) -> ChoiceExample:
    """lm-eval's MRPC prompt with answers " no" / " yes"; label 1 = equivalent."""
    context = (
        f"Sentence 1: {sentence1.strip()}\nSentence 2: {sentence2.strip()}\n"
        "Question: Do both sentences mean the same thing?\nAnswer:"
    )
    return ChoiceExample((context, context), (" no", " yes"), _int_label(label, 2))


def _mrpc_row(row: dict) -> ChoiceExample:
    return mrpc_example(row["#1 String"], row["#2 String"], row["Quality"])


def _mrpc_hub_row(row: dict) -> ChoiceExample | None:
    return None if row["label"] == -1 else mrpc_example(row["sentence1"], row["sentence2"], row["label"])


_MRPC_COLUMNS = ("Quality", "#1 String", "#2 String")
ZERO_SHOT_TASKS.register("mrpc")(
    ZeroShotTask(
        name="mrpc",
        local_file="glue/MRPC/dev.tsv",
        read_rows=_tsv_reader(_MRPC_COLUMNS),
        from_local_row=_mrpc_row,
        hub=("glue", "mrpc"),
        hub_split="validation",
        from_hub_row=_mrpc_hub_row,
        expected="GLUE MRPC TSV with columns Quality (0|1), #1 ID, #2 ID, #1 String, #2 String",
    )
)


# ---------------------------------------------------------------- loading


def load_choice_task(
    name: str, data_dir: Path | None, max_samples: int | None = None, seed: int = 0
) -> list[ChoiceExample]:
    """The evaluation split of zero-shot task ``name`` from ``data_dir`` (official file) or the Hub.

    ``max_samples`` smaller than the split keeps a seeded random subset.
    """
    return load_choice_subset(name, data_dir, max_samples, seed)[0]


def load_choice_subset(
    name: str, data_dir: Path | None, max_samples: int | None = None, seed: int = 0
) -> tuple[list[ChoiceExample], list[int]]:
    """:func:`load_choice_task`'s examples and their positions in the split (:func:`subset_indices`)."""
    spec = ZERO_SHOT_TASKS.get(name)
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
    if data_dir is not None:
        path = Path(data_dir) / spec.local_file
        if not path.is_file():
            raise DataError(
                f"missing data file {path} for zero-shot task {name!r}; expected {spec.expected} "
                "(or set the data folder to null to download it from the Hub)"
            )
        source = str(path)
        examples = spec.read_local(path)
    else:
        import datasets  # heavy import, only needed online

        source = f"Hub dataset {spec.hub} split {spec.hub_split!r}"
        rows = datasets.load_dataset(*spec.hub, split=spec.hub_split)
        examples = _convert_rows(source, rows, spec.from_hub_row, f"the Hub's {spec.hub} columns")
    if not examples:
        raise DataError(f"{source} yields no example for zero-shot task {name!r}; expected {spec.expected}")
    chosen = subset_indices(len(examples), max_samples, seed)
    return [examples[i] for i in chosen], chosen


def subset_indices(n: int, max_samples: int | None, seed: int) -> list[int]:
    """Which of a split's ``n`` examples an evaluation of ``max_samples`` scores, in scoring order:
    all of them in file order, or a seeded random subset (the same for every scorer)."""
    if max_samples is None or max_samples >= n:
        return list(range(n))
    return random.Random(seed).sample(range(n), max_samples)


WIKITEXT_FILE = "wikitext-2/{split}.txt"
# our split names -> the Hub's
WIKITEXT_SPLITS = {"train": "train", "valid": "validation", "test": "test"}


def load_wikitext(data_dir: Path | None, split: str) -> str:
    """The raw text of a WikiText-2 split (train|valid|test) from ``data_dir`` or the Hub."""
    if split not in WIKITEXT_SPLITS:
        raise ValueError(f"unknown WikiText split {split!r}; valid splits: {', '.join(WIKITEXT_SPLITS)}")
    if data_dir is not None:
        path = Path(data_dir) / WIKITEXT_FILE.format(split=split)
        if not path.is_file():
            raise DataError(
                f"missing WikiText-2 file {path}; the Hub copy ('wikitext', 'wikitext-2-v1') has every split, "
                "set the data folder to null to download it"
            )
        source = str(path)
        text = path.read_text(encoding="utf-8")
    else:
        import datasets  # heavy import, only needed online

        source = f"Hub dataset wikitext-2-v1 split {WIKITEXT_SPLITS[split]!r}"
        rows = datasets.load_dataset("wikitext", "wikitext-2-v1", split=WIKITEXT_SPLITS[split])
        # Hub rows are the file's lines; keep line breaks so that lines do not run into each other.
        text = "".join(t if t.endswith("\n") else t + "\n" for t in (r["text"] for r in rows))
    if not text.strip():
        raise DataError(f"{source} holds no text")
    return text


def lm_rows(tokenizer, text: str, block_size: int, max_blocks: int | None = None) -> list[dict]:
    """Cut the tokenised ``text`` into consecutive non-overlapping blocks of ``block_size`` tokens.

    The tail shorter than a block is dropped; ``max_blocks`` keeps the first blocks. Rows are
    ``{"input_ids", "labels", "label"}`` as :func:`pipeline.data.batches` expects.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 to predict any token, got {block_size}")
    if max_blocks is not None and max_blocks < 1:
        raise ValueError(f"max_blocks must be >= 1 or None, got {max_blocks}")
    # A batch of lines tokenises in parallel, unlike one huge string; tokens can differ only where a
    # line break meets the next line's leading space, which does not matter for perplexity.
    lines = [line for line in text.splitlines(keepends=True) if line]
    ids = list(chain.from_iterable(tokenizer(lines, add_special_tokens=False)["input_ids"])) if lines else []
    n_blocks = len(ids) // block_size
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    if n_blocks == 0:
        raise DataError(f"the text gives {len(ids)} tokens, fewer than one block of {block_size}")
    rows = []
    for b in range(n_blocks):
        block = ids[b * block_size : (b + 1) * block_size]
        rows.append({"input_ids": block, "labels": list(block), "label": 0})
    return rows


# ---------------------------------------------------------------- scoring


def _length_mask(lengths: list[int], width: int, device: torch.device) -> torch.Tensor:
    # From lengths, not ids != pad: a pad id that also occurs in text (eos as pad) must stay visible.
    return (
        torch.arange(width, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    ).long()


@torch.no_grad()
def row_nlls(
    model: nn.Module, rows: list[dict], pad_id: int, batch_size: int, device, dtype: str = "float32"
) -> tuple[list[float], list[int]]:
    """Per row of ``rows``: the summed next-token NLL (nats) and the number of predicted tokens
    (labels -100 are ignored), so that paired comparisons can resample rows."""
    if not rows:
        raise ValueError("perplexity needs at least one row")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    nlls, counts = [], []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            if any(len(r["labels"]) != len(r["input_ids"]) for r in chunk):
                raise ValueError("perplexity rows need labels aligned with input_ids (same length)")
            batch = collate(chunk, pad_id)
            ids = batch["input_ids"].to(device)
            labels = batch["labels"].to(device)
            mask = _length_mask([len(r["input_ids"]) for r in chunk], ids.shape[1], device)
            with autocast(device, dtype):
                logits = model(input_ids=ids, attention_mask=mask).logits
            targets = labels[:, 1:]
            # Row by row: a float32 copy of the whole [B, T, V] logits can be large for real vocabularies.
            for i in range(ids.shape[0]):
                nlls.append(
                    F.cross_entropy(
                        logits[i, :-1].float(), targets[i], ignore_index=-100, reduction="sum"
                    ).item()
                )
                counts.append(int((targets[i] != -100).sum()))
    finally:
        model.train(was_training)
    return nlls, counts


def perplexity_from_rows(nlls: list[float], counts: list[int]) -> dict:
    """Token-level perplexity from :func:`row_nlls`: NLL summed over every predicted token, then
    averaged, so batching and padding do not change the result."""
    total_tokens = sum(counts)
    if total_tokens == 0:
        raise ValueError("no token to predict: every row is shorter than 2 tokens or fully masked")
    nll = sum(nlls) / total_tokens
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": total_tokens}


def perplexity(
    model: nn.Module, rows: list[dict], pad_id: int, batch_size: int, device, dtype: str = "float32"
) -> dict:
    """Token-level perplexity of next-token prediction on ``rows`` (labels -100 are ignored)."""
    return perplexity_from_rows(*row_nlls(model, rows, pad_id, batch_size, device, dtype))


def _encode_choices(
    tokenizer, examples: list[ChoiceExample], max_length: int | None
) -> tuple[list[list[int]], list[int]]:
    """Token ids of every (example, choice) pair, flattened, and each pair's continuation length."""
    contexts = [c for ex in examples for c in ex.contexts]
    conts = [c for ex in examples for c in ex.continuations]
    # Context and continuation are tokenised apart so that the scored tokens are exactly the
    # continuation's, whatever merges the tokenizer would make across the boundary.
    ctx_ids = tokenizer(contexts, add_special_tokens=False)["input_ids"]
    cont_ids = tokenizer(conts, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    prefix = [] if bos is None else [bos]
    seqs, n_conts = [], []
    for ctx, cont, text in zip(ctx_ids, cont_ids, conts, strict=True):
        if not cont:
            raise ValueError(f"continuation {text!r} has no token to score")
        head = prefix + list(ctx)
        if not head:
            # Nothing to condition the first continuation token on: start from eos as lm-eval does.
            if tokenizer.eos_token_id is None:
                raise ValueError("empty context and the tokenizer has neither bos nor eos token")
            head = [tokenizer.eos_token_id]
        seq = head + list(cont)
        if max_length is not None and len(seq) > max_length:
            if len(cont) >= max_length:
                raise ValueError(
                    f"continuation {text!r} has {len(cont)} tokens; max_length {max_length} leaves no context"
                )
            seq = seq[-max_length:]  # keep the continuation and the context nearest to it
        seqs.append(seq)
        n_conts.append(len(cont))
    return seqs, n_conts


@torch.no_grad()
def choice_loglikelihoods(
    model: nn.Module,
    tokenizer,
    examples: list[ChoiceExample],
    batch_size: int,
    device,
    dtype: str = "float32",
    max_length: int | None = None,
) -> list[list[float]]:
    """Sum of log-probabilities of each choice's continuation given its context, per example.

    Context and continuation are tokenised apart without special tokens, the tokenizer's BOS (if
    it has one) is prepended, and the context is cut from the left only beyond ``max_length``.
    """
    device = torch.device(device)
    seqs, n_conts = _encode_choices(tokenizer, examples, max_length)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    # Longest first: similar lengths share a batch (less padding) and running out of memory shows up at once.
    order = sorted(range(len(seqs)), key=lambda k: -len(seqs[k]))
    scores = [0.0] * len(seqs)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            lengths = [len(seqs[k]) for k in idx]
            ids = torch.full((len(idx), max(lengths)), pad, dtype=torch.long)
            for row, k in enumerate(idx):
                ids[row, : lengths[row]] = torch.tensor(seqs[k])
            ids = ids.to(device)
            mask = _length_mask(lengths, ids.shape[1], device)
            with autocast(device, dtype):
                logits = model(input_ids=ids, attention_mask=mask).logits
            for row, k in enumerate(idx):
                end, n = lengths[row], n_conts[k]
                # logits at position t predict token t + 1
                logp = logits[row, end - n - 1 : end - 1].float().log_softmax(-1)
                target = ids[row, end - n : end]
                scores[k] = logp.gather(-1, target[:, None]).sum().item()
    finally:
        model.train(was_training)
    out, pos = [], 0
    for ex in examples:
        out.append(scores[pos : pos + len(ex.continuations)])
        pos += len(ex.continuations)
    return out


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


@torch.no_grad()
def choice_hits(
    model: nn.Module,
    tokenizer,
    examples: list[ChoiceExample],
    batch_size: int,
    device,
    dtype: str = "float32",
    max_length: int | None = None,
) -> tuple[list[bool], list[bool]]:
    """Per example: whether the most likely choice is the label, by log-likelihood and by
    log-likelihood per UTF-8 byte of the continuation, leading space included (lm-eval's acc_norm
    divides by characters of the choice without that space: see the module docstring)."""
    if not examples:
        raise ValueError("choice_accuracy needs at least one example")
    scores = choice_loglikelihoods(model, tokenizer, examples, batch_size, device, dtype, max_length)
    hits, hits_norm = [], []
    for ex, s in zip(examples, scores, strict=True):
        hits.append(_argmax(s) == ex.label)
        per_byte = [v / len(c.encode("utf-8")) for v, c in zip(s, ex.continuations, strict=True)]
        hits_norm.append(_argmax(per_byte) == ex.label)
    return hits, hits_norm


def _accuracy(hits: list[bool], hits_norm: list[bool]) -> dict:
    n = len(hits)
    return {"accuracy": sum(hits) / n, "accuracy_norm": sum(hits_norm) / n, "examples": n}


def choice_accuracy(
    model: nn.Module,
    tokenizer,
    examples: list[ChoiceExample],
    batch_size: int,
    device,
    dtype: str = "float32",
    max_length: int | None = None,
) -> dict:
    """Multiple-choice accuracy by log-likelihood (acc) and by log-likelihood per continuation byte (acc_norm)."""
    return _accuracy(*choice_hits(model, tokenizer, examples, batch_size, device, dtype, max_length))


def zero_shot_hits(
    model: nn.Module,
    tokenizer,
    tasks: dict[str, list[ChoiceExample]],
    batch_size: int,
    device,
    dtype: str = "float32",
) -> dict[str, tuple[list[bool], list[bool]]]:
    """:func:`choice_hits` of every task."""
    if not tasks:
        raise ValueError("zero_shot_suite needs at least one task")
    if "mean_accuracy" in tasks:
        raise ValueError("'mean_accuracy' is reserved for the suite's mean; rename that task")
    return {name: choice_hits(model, tokenizer, ex, batch_size, device, dtype) for name, ex in tasks.items()}


def suite_accuracy(hits: dict[str, tuple[list[bool], list[bool]]]) -> dict[str, dict | float]:
    """Per task accuracy from :func:`zero_shot_hits`, plus ``"mean_accuracy"``: the unweighted mean over tasks."""
    results: dict[str, dict | float] = {name: _accuracy(*h) for name, h in hits.items()}
    results["mean_accuracy"] = sum(r["accuracy"] for r in results.values()) / len(hits)
    return results


def zero_shot_suite(
    model: nn.Module,
    tokenizer,
    tasks: dict[str, list[ChoiceExample]],
    batch_size: int,
    device,
    dtype: str = "float32",
) -> dict[str, dict | float]:
    """:func:`choice_accuracy` of every task, plus ``"mean_accuracy"``: the unweighted mean over tasks."""
    return suite_accuracy(zero_shot_hits(model, tokenizer, tasks, batch_size, device, dtype))
