"""Tasks: loading official splits (local folder or Hub), text-to-text formatting, tokenisation, batching."""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.registry import Registry

DATA_DIR_ENV = "SMOE_DATA_DIR"
SPLITS = ("train", "dev", "test")
# Any of these makes a folder a tokenizer folder for transformers (fast, WordPiece, BPE, SentencePiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
)
# A real tokenizer knows these words; an empty one built from a bare config maps them all to unk.
TOKENIZER_PROBE = "the quick brown fox jumps over the lazy dog"
# No usable tokenizer has this few tokens besides its special ones (a bare BERT config gives none).
MIN_REGULAR_TOKENS = 4


class DataError(RuntimeError):
    """A data folder, file or split is missing or malformed."""


@dataclass(frozen=True)
class Example:
    source: str
    target: str
    label: int


@dataclass(frozen=True)
class TaskSpec:
    """How one task is read, formatted and scored."""

    name: str
    label_words: tuple[str, ...]
    metric: str
    # split -> path relative to the data folder
    local_files: dict[str, str]
    read_local: Callable[[Path, TaskSpec], list[Example]]
    hub: tuple[str, str]
    hub_splits: dict[str, str]
    from_hub_row: Callable[[dict, TaskSpec], Example | None]
    extra: dict = field(default_factory=dict)


TASKS: Registry[TaskSpec] = Registry("task")
# Language-modelling tasks: trained and scored on blocks of raw text, not on text-to-text examples.
LM_TASKS = ("wikitext2",)


def _read_tsv(path: Path) -> list[dict[str, str]]:
    # utf-8-sig: the GLUE MRPC files start with a byte-order mark that would corrupt the first header.
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = list(reader)
        if reader.fieldnames is None:
            raise DataError(f"{path}: empty file (no header row)")
    return rows


def _need_columns(path: Path, row: dict, cols: tuple[str, ...]) -> None:
    missing = [c for c in cols if c not in row or row[c] is None]
    if missing:
        raise DataError(f"{path}: malformed row, missing column(s) {missing}; expected columns {list(cols)}")


def _parse_label(path: Path, value: str, n: int) -> int:
    try:
        label = int(value)
    except (TypeError, ValueError):
        raise DataError(f"{path}: label {value!r} is not an integer in [0, {n - 1}]") from None
    if not 0 <= label < n:
        raise DataError(f"{path}: label {label} out of range [0, {n - 1}]")
    return label


def _sst2_local(path: Path, spec: TaskSpec) -> list[Example]:
    out = []
    for row in _read_tsv(path):
        _need_columns(path, row, ("sentence", "label"))
        label = _parse_label(path, row["label"], len(spec.label_words))
        out.append(Example(f"sst2 sentence: {row['sentence'].strip()}", spec.label_words[label], label))
    return out


def _sst2_hub(row: dict, spec: TaskSpec) -> Example | None:
    if row["label"] < 0:  # GLUE test labels are hidden on the Hub
        return None
    return Example(f"sst2 sentence: {row['sentence'].strip()}", spec.label_words[row["label"]], row["label"])


TASKS.register("sst2")(
    TaskSpec(
        name="sst2",
        label_words=("negative", "positive"),
        metric="accuracy",
        local_files={
            "train": "glue/SST-2/train.tsv",
            "dev": "glue/SST-2/dev.tsv",
            "test": "glue/SST-2/test_labeled.tsv",
        },
        read_local=_sst2_local,
        hub=("glue", "sst2"),
        hub_splits={"train": "train", "dev": "validation"},
        from_hub_row=_sst2_hub,
    )
)


def _mrpc_source(s1: str, s2: str) -> str:
    return f"mrpc sentence1: {s1.strip()} sentence2: {s2.strip()}"


def _mrpc_local(path: Path, spec: TaskSpec) -> list[Example]:
    out = []
    for row in _read_tsv(path):
        _need_columns(path, row, ("Quality", "#1 String", "#2 String"))
        label = _parse_label(path, row["Quality"], len(spec.label_words))
        out.append(Example(_mrpc_source(row["#1 String"], row["#2 String"]), spec.label_words[label], label))
    return out


def _mrpc_hub(row: dict, spec: TaskSpec) -> Example | None:
    if row["label"] < 0:
        return None
    return Example(
        _mrpc_source(row["sentence1"], row["sentence2"]), spec.label_words[row["label"]], row["label"]
    )


TASKS.register("mrpc")(
    TaskSpec(
        name="mrpc",
        label_words=("not_equivalent", "equivalent"),
        metric="accuracy",
        local_files={
            "train": "glue/MRPC/train.tsv",
            "dev": "glue/MRPC/dev.tsv",
            # GLUE's MRPC test.tsv is unlabelled; the original release file carries the labels.
            "test": "glue/MRPC/msr_paraphrase_test.txt",
        },
        read_local=_mrpc_local,
        hub=("glue", "mrpc"),
        hub_splits={"train": "train", "dev": "validation", "test": "test"},
        from_hub_row=_mrpc_hub,
    )
)


def resolve_data_dir(data_dir: str | None, base: Path | None = None) -> Path | None:
    """The local data folder to read: ``$SMOE_DATA_DIR`` wins over the param; None means the Hub."""
    value = os.environ.get(DATA_DIR_ENV) or data_dir
    if value in (None, "", "hub"):
        return None
    path = Path(value)
    if not path.is_absolute() and base is not None:
        path = base / path
    return path


def load_task(task: str, data_dir: Path | None) -> dict[str, list[Example]]:
    """Load every available split of ``task`` from ``data_dir`` (official files) or the Hub."""
    spec = TASKS.get(task)
    splits: dict[str, list[Example]] = {}
    if data_dir is not None:
        if not data_dir.is_dir():
            raise DataError(
                f"data folder {data_dir} does not exist; set data.data_dir (or ${DATA_DIR_ENV}) to the folder "
                f"holding {sorted(spec.local_files.values())}, or to null to download from the Hub"
            )
        for split, rel in spec.local_files.items():
            path = data_dir / rel
            if not path.is_file():
                if split == "test":
                    continue
                raise DataError(f"missing data file {path} for task {task!r} split {split!r}")
            splits[split] = spec.read_local(path, spec)
            if not splits[split]:
                # A present but empty test file would otherwise be scored on no example at all.
                skip = " (or remove the file to run without a test split)" if split == "test" else ""
                raise DataError(
                    f"task {task!r}: split {split!r} is empty: {path} holds only its header row; "
                    f"restore the file's examples{skip}"
                )
    else:
        import datasets  # heavy import, only needed online

        ds = datasets.load_dataset(*spec.hub)
        for split, hub_split in spec.hub_splits.items():
            rows = [spec.from_hub_row(r, spec) for r in ds[hub_split]]
            splits[split] = [r for r in rows if r is not None]
    for split in SPLITS:
        if (split in splits or split != "test") and not splits.get(split):
            raise DataError(f"task {task!r}: split {split!r} is empty")
    return splits


def subsample(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    """A seeded random subset of ``n`` examples (all of them when n is None or too large)."""
    if n is None or n >= len(examples):
        return examples
    rng = random.Random(seed)
    return rng.sample(examples, n)


def train_bpe_tokenizer(texts: list[str], vocab_size: int, extra_tokens: list[str]):
    """Train a byte-level BPE tokenizer on ``texts``; returns a transformers fast tokenizer.

    Label words are added whole so that each class is one decoder step.
    """
    # Said once, so that a run without a checkpoint tokenizer is seen to be intended, not missed.
    print(
        f"tokenizer: none taken from a checkpoint (model.name_or_path is null), none needed; training a "
        f"byte-level BPE tokenizer of up to {vocab_size} tokens (data.tokenizer_vocab_size) on {len(texts)} texts",
        flush=True,
    )
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.add_tokens(list(extra_tokens))
    return fast


def _first_line(err: Exception) -> str:
    # transformers' messages run over several lines; the stage prints one.
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def has_tokenizer_files(folder: str | Path) -> bool:
    """Whether ``folder`` holds any file transformers builds a tokenizer from."""
    return any((Path(folder) / f).is_file() for f in TOKENIZER_FILES)


def check_tokenizer(tokenizer, source: str | Path | None = None, fix: str | None = None) -> None:
    """Refuse a degenerate tokenizer: a handful of tokens, or one that reads plain English as unk.

    transformers builds such a tokenizer from a model folder that has a config but no tokenizer
    files; every word then becomes ``<unk>`` and all examples (and both labels) look the same.
    """
    where = str(source or getattr(tokenizer, "name_or_path", "") or "the tokenizer")
    fix = fix or (f"put the tokenizer the model was trained with there (any of {', '.join(TOKENIZER_FILES)})")
    n = len(tokenizer)
    regular = n - len(set(tokenizer.all_special_ids))
    if regular < MIN_REGULAR_TOKENS:
        raise DataError(
            f"{where}: the tokenizer has only {n} tokens ({regular} besides its special tokens), so it "
            f"cannot tell words apart; {fix}"
        )
    ids = tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    unk = tokenizer.unk_token_id
    if not ids or (unk is not None and all(i == unk for i in ids)):
        raise DataError(
            f"{where}: the tokenizer ({n} tokens) reads every word of {TOKENIZER_PROBE!r} as its unknown "
            f"token, so it cannot tell words apart; {fix}"
        )


def load_tokenizer(source: str | Path, trust_remote_code: bool = False, fix: str | None = None):
    """A checkpoint's tokenizer (local folder or Hub id), refused when missing or degenerate.

    ``fix`` ends the message (what the user should do); by default it is about model.name_or_path.
    """
    from transformers import AutoTokenizer

    fix = fix or (
        "put the tokenizer the checkpoint was trained with there (any of "
        f"{', '.join(TOKENIZER_FILES)}), or leave model.name_or_path null to build a model and train "
        "a tokenizer (data.tokenizer_vocab_size)"
    )
    if Path(source).is_dir() and not has_tokenizer_files(source):
        raise DataError(f"{source} holds no tokenizer files; {fix}")
    try:
        tok = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot load the tokenizer of {source} ({_first_line(err)}); {fix}") from None
    check_tokenizer(tok, source, fix)
    return tok


def tokenize_split(tokenizer, examples: list[Example], max_source_length: int) -> list[dict]:
    """Encode sources and targets; targets end with EOS as in T5 fine-tuning."""
    check_tokenizer(tokenizer)
    src = tokenizer([e.source for e in examples], truncation=True, max_length=max_source_length)["input_ids"]
    tgt = tokenizer([e.target for e in examples], truncation=True, max_length=16)["input_ids"]
    return [
        {"input_ids": s, "labels": t, "label": e.label} for s, t, e in zip(src, tgt, examples, strict=True)
    ]


def write_jsonl(rows: list[dict], path: Path) -> None:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")


def read_json(path: Path, what: str) -> Any:
    """A JSON file an earlier stage wrote; a missing or corrupt one is named, with the fix."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing {what} {path}; run the stage that writes it first")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(
            f"{path}: {what} is not valid JSON ({err}); run the stage that writes it again"
        ) from None


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"missing tokenized split {path}; run the prepare stage first")
    rows = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise DataError(
                    f"{path}:{lineno}: not valid JSON ({err}); run the prepare stage again"
                ) from None
            if not isinstance(row, dict) or "input_ids" not in row:
                raise DataError(f"{path}:{lineno}: expected a tokenized example with input_ids")
            rows.append(row)
    if not rows:
        raise DataError(f"{path} holds no examples")
    return rows


@dataclass
class PreparedTask:
    """The prepare stage's output, re-read by later stages."""

    task: str
    label_words: list[str]
    metric: str
    splits: dict[str, list[dict]]
    tokenizer: object
    objective: str = "classification"  # or "lm" (next-token prediction on text blocks)
    zero_shot: dict[str, list] = field(default_factory=dict)  # task -> zeroshot.ChoiceExample list
    # task -> each example's position in the official split (what lm-eval is asked to score)
    zero_shot_indices: dict[str, list[int]] = field(default_factory=dict)

    def label_token_ids(self) -> list[list[int]]:
        """Token ids (with EOS) of each class's target."""
        return [self.tokenizer(w)["input_ids"] for w in self.label_words]


def load_prepared(folder: str | Path, splits: tuple[str, ...] = ("train", "dev")) -> PreparedTask:
    """Load the tokenizer and tokenized splits written by the prepare stage."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    meta_path = folder / "task.json"
    if not meta_path.is_file():
        raise DataError(f"{folder} is not a prepared task folder (no task.json); run the prepare stage first")
    meta = read_json(meta_path, "task description")
    tok_dir = folder / "tokenizer"
    again = "run the prepare stage again"
    if not has_tokenizer_files(tok_dir):
        raise DataError(
            f"{folder}: no tokenizer in {tok_dir} (expected any of {', '.join(TOKENIZER_FILES)}); {again}"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
    except (OSError, ValueError) as err:
        raise DataError(f"{folder}: cannot load its tokenizer ({_first_line(err)}); {again}") from None
    check_tokenizer(tok, tok_dir, again)
    data = {s: read_jsonl(folder / f"{s}.jsonl") for s in splits}
    zero_shot, zero_shot_indices = {}, {}
    if (folder / "zero_shot.json").is_file():
        from pipeline.zeroshot import ChoiceExample

        raw = json.loads((folder / "zero_shot.json").read_text())
        zero_shot = {
            name: [ChoiceExample(tuple(e["contexts"]), tuple(e["continuations"]), e["label"]) for e in rows]
            for name, rows in raw.items()
        }
        # Folders prepared before the positions were recorded have none (the lm-eval scorer says so).
        zero_shot_indices = {
            name: [e["index"] for e in rows] for name, rows in raw.items() if all("index" in e for e in rows)
        }
    return PreparedTask(
        meta["task"],
        meta["label_words"],
        meta["metric"],
        data,
        tok,
        meta.get("objective", "classification"),
        zero_shot,
        zero_shot_indices,
    )


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Dynamic padding to the longest sequence of the batch; label padding is -100 (ignored by the loss)."""
    n_src = max(len(r["input_ids"]) for r in rows)
    n_tgt = max(len(r["labels"]) for r in rows)
    ids = torch.full((len(rows), n_src), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n_tgt), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        labels[i, : len(r["labels"])] = torch.tensor(r["labels"])
    return {
        "input_ids": ids,
        "attention_mask": (ids != pad_id).long(),
        "labels": labels,
        "class_label": torch.tensor([r["label"] for r in rows]),
    }


def batches(
    rows: list[dict],
    batch_size: int,
    pad_id: int,
    shuffle: bool = False,
    seed: int = 0,
    bucket_batches: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield padded batches; shuffled with a seeded generator so data order is reproducible.

    With ``bucket_batches`` = N > 0 (and ``shuffle``), each window of N batches' worth of shuffled
    rows is sorted by source length before it is cut into batches, and the batches are shuffled
    again: batches hold rows of similar length, so far less padding is computed.
    """
    order = list(range(len(rows)))
    if shuffle:
        rng = random.Random(seed)
        rng.shuffle(order)
        if bucket_batches > 0:
            window = bucket_batches * batch_size
            chunks = []
            for w in range(0, len(order), window):
                part = sorted(order[w : w + window], key=lambda j: len(rows[j]["input_ids"]))
                chunks.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
            rng.shuffle(chunks)
            order = [j for chunk in chunks for j in chunk]
    for i in range(0, len(order), batch_size):
        yield collate([rows[j] for j in order[i : i + batch_size]], pad_id)
