"""Tasks: official files as text-to-text examples, clear errors on bad folders, tokenizer, batching."""

from pathlib import Path

import pytest
import torch

from pipeline.data import (
    TASKS,
    DataError,
    Example,
    batches,
    collate,
    load_task,
    resolve_data_dir,
    tokenize_split,
    train_bpe_tokenizer,
)
from pipeline.registry import UnknownChoiceError

SST2 = Path("glue") / "SST-2"
MRPC = Path("glue") / "MRPC"
MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"


def _write(folder: Path, name: str, content: str, encoding: str = "utf-8") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(content, encoding=encoding)


# ---------------------------------------------------------------- the real files


def test_sst2_official_splits_as_text_to_text(data_dir):
    splits = load_task("sst2", data_dir)
    assert len(splits["train"]) == 67349
    assert len(splits["dev"]) == 872
    for split in ("train", "dev"):
        for ex in splits[split]:
            assert ex.source.startswith("sst2 sentence: ")
            assert ex.target == ("negative", "positive")[ex.label]
    assert {e.target for e in splits["train"]} == {"negative", "positive"}
    assert {e.label for e in splits["dev"]} == {0, 1}


def test_mrpc_reads_files_with_byte_order_mark(data_dir):
    splits = load_task("mrpc", data_dir)
    assert len(splits["train"]) == 3668
    assert len(splits["dev"]) == 408
    ex = splits["train"][0]
    assert ex.source.startswith("mrpc sentence1: ") and " sentence2: " in ex.source
    assert {e.target for e in splits["train"]} == {"not_equivalent", "equivalent"}


# ---------------------------------------------------------------- small files written here


def test_small_sst2_folder_loads(tmp_path):
    _write(tmp_path / SST2, "train.tsv", "sentence\tlabel\na fine film \t1\ndull\t0\n")
    _write(tmp_path / SST2, "dev.tsv", "sentence\tlabel\nok\t1\n")
    splits = load_task("sst2", tmp_path)
    assert "test" not in splits  # the labelled test file is optional
    assert splits["train"] == [
        Example("sst2 sentence: a fine film", "positive", 1),
        Example("sst2 sentence: dull", "negative", 0),
    ]


def test_byte_order_mark_does_not_hide_the_first_column(tmp_path):
    rows = "1\t1\t2\tA cat sat.\tA cat was sitting.\n0\t3\t4\tRain.\tSun.\n"
    for split in ("train", "dev"):
        _write(tmp_path / MRPC, f"{split}.tsv", MRPC_HEADER + rows, encoding="utf-8-sig")
    assert (tmp_path / MRPC / "train.tsv").read_bytes().startswith(b"\xef\xbb\xbf")
    splits = load_task("mrpc", tmp_path)
    assert [e.label for e in splits["train"]] == [1, 0]
    assert splits["train"][0].source == "mrpc sentence1: A cat sat. sentence2: A cat was sitting."
    assert splits["train"][0].target == "equivalent"


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r"data folder .*nowhere does not exist.*data\.data_dir"):
        load_task("sst2", tmp_path / "nowhere")


@pytest.mark.parametrize("missing", ["train", "dev"])
def test_missing_file(tmp_path, missing):
    for split in ("train", "dev"):
        if split != missing:
            _write(tmp_path / SST2, f"{split}.tsv", "sentence\tlabel\ngood\t1\n")
    with pytest.raises(
        DataError, match=rf"missing data file .*{missing}\.tsv for task 'sst2' split '{missing}'"
    ):
        load_task("sst2", tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [
        ("text\tscore\nfine\t1\n", r"train\.tsv: malformed row, missing column\(s\) \['sentence', 'label'\]"),
        ("sentence\tlabel\njust a sentence\n", r"train\.tsv: malformed row, missing column\(s\) \['label'\]"),
        ("sentence\tlabel\nfine\tseven\n", r"train\.tsv: label 'seven' is not an integer in \[0, 1\]"),
        ("sentence\tlabel\nfine\t4\n", r"train\.tsv: label 4 out of range \[0, 1\]"),
        ("sentence\tlabel\nfine\t-1\n", r"train\.tsv: label -1 out of range"),
        ("", r"train\.tsv: empty file \(no header row\)"),
        ("sentence\tlabel\n", "task 'sst2': split 'train' is empty"),
    ],
)
def test_malformed_files(tmp_path, content, message):
    for split in ("train", "dev"):
        _write(tmp_path / SST2, f"{split}.tsv", content)
    with pytest.raises(DataError, match=message):
        load_task("sst2", tmp_path)


def test_malformed_mrpc_file(tmp_path):
    _write(tmp_path / MRPC, "train.tsv", "Quality\tString\n1\tnope\n")
    _write(tmp_path / MRPC, "dev.tsv", MRPC_HEADER)
    with pytest.raises(DataError, match=r"train\.tsv: malformed row, missing column"):
        load_task("mrpc", tmp_path)


@pytest.mark.parametrize("data_dir", [None, Path("/nonexistent")])
def test_unknown_task_lists_choices(data_dir):
    with pytest.raises(
        UnknownChoiceError, match="unknown task 'imagenet'; valid choices: " + ", ".join(TASKS.names())
    ):
        load_task("imagenet", data_dir)
    assert {"sst2", "mrpc"} <= set(TASKS.names())


def test_env_var_overrides_param(monkeypatch, tmp_path):
    monkeypatch.setenv("SMOE_DATA_DIR", str(tmp_path))
    assert resolve_data_dir("../elsewhere") == tmp_path
    monkeypatch.delenv("SMOE_DATA_DIR")
    assert resolve_data_dir(None) is None
    assert resolve_data_dir("rel", base=tmp_path) == tmp_path / "rel"


# ---------------------------------------------------------------- tokenizer and batches


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["a movie about nothing", "the best film of the year", "not equivalent at all"] * 20
    return train_bpe_tokenizer(texts, 300, ["negative", "positive", "not_equivalent", "equivalent"])


def test_bpe_tokenizer_makes_label_words_single_tokens(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1
    ids = {}
    for word in ("negative", "positive", "not_equivalent", "equivalent"):
        enc = tokenizer(word)["input_ids"]
        assert len(enc) == 2 and enc[-1] == tokenizer.eos_token_id, (word, enc)
        ids[word] = enc[0]
    assert len(set(ids.values())) == 4
    tokenizer.save_pretrained(str(tmp_path))
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ("the best film", "positive"):
        assert again(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_tokenize_split_appends_eos_and_truncates(tokenizer):
    long = " ".join(["film"] * 100)
    rows = tokenize_split(tokenizer, [Example(long, "positive", 1), Example("a movie", "negative", 0)], 16)
    assert len(rows[0]["input_ids"]) == 16
    assert rows[0]["input_ids"][-1] == tokenizer.eos_token_id  # truncation keeps the EOS
    assert rows[1]["input_ids"][-1] == tokenizer.eos_token_id
    assert rows[0]["labels"] == tokenizer("positive")["input_ids"]
    assert [r["label"] for r in rows] == [1, 0]


def test_collate_pads_dynamically():
    rows = [
        {"input_ids": [7, 8, 1], "labels": [5, 1], "label": 0},
        {"input_ids": [9, 1], "labels": [6, 7, 1], "label": 1},
        {"input_ids": [3, 4, 5, 6, 1], "labels": [1], "label": 1},
    ]
    b = collate(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[7, 8, 1, 0, 0], [9, 1, 0, 0, 0], [3, 4, 5, 6, 1]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert b["labels"].tolist() == [[5, 1, -100], [6, 7, 1], [1, -100, -100]]
    assert b["class_label"].tolist() == [0, 1, 1]
    assert all(t.dtype == torch.long for t in b.values())
    # Padding is to the longest row of the batch, not to a fixed length.
    assert collate(rows[:2], pad_id=0)["input_ids"].shape == (2, 3)


def test_batches_cover_every_row_once_and_shuffle_is_seeded():
    rows = [{"input_ids": [i + 2, 1], "labels": [5, 1], "label": i % 2} for i in range(10)]

    def order(**kw):
        return [int(x) for b in batches(rows, 3, 0, **kw) for x in b["input_ids"][:, 0]]

    assert order() == list(range(2, 12))
    assert sorted(order(shuffle=True, seed=1)) == list(range(2, 12))
    assert order(shuffle=True, seed=1) == order(shuffle=True, seed=1)
    assert order(shuffle=True, seed=1) != order(shuffle=True, seed=2)
    assert [len(b["input_ids"]) for b in batches(rows, 3, 0)] == [3, 3, 3, 1]


# ---------------------------------------------------------------- header-only splits and tokenizers


@pytest.mark.parametrize("split,file", [("train", "train.tsv"), ("test", "test_labeled.tsv")])
def test_a_header_only_split_is_refused_naming_the_file(tmp_path, split, file):
    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv", "test_labeled.tsv"):
        (folder / name).write_text("sentence\tlabel\n" + ("" if name == file else "fine\t1\n"))
    with pytest.raises(DataError, match=f"split '{split}' is empty: .*{file} holds only its header row"):
        load_task("sst2", tmp_path)


def _bert_tokenizer(folder: Path, words: list[str]):
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n"
    )
    return BertTokenizer(str(folder / "vocab.txt"))


def test_a_folder_without_tokenizer_files_is_refused(tmp_path):
    from pipeline.data import load_tokenizer

    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(DataError, match="holds no tokenizer files; put the tokenizer"):
        load_tokenizer(tmp_path)


def test_degenerate_tokenizers_are_refused(tmp_path):
    from pipeline.data import check_tokenizer, load_tokenizer

    with pytest.raises(DataError, match="the tokenizer has only 5 tokens"):
        check_tokenizer(_bert_tokenizer(tmp_path / "a", []))
    junk = _bert_tokenizer(tmp_path / "b", [f"zq{i}" for i in range(40)])
    junk.save_pretrained(str(tmp_path / "b"))
    with pytest.raises(DataError, match="reads every word of 'the quick brown fox.*as its unknown token"):
        load_tokenizer(tmp_path / "b")
    with pytest.raises(DataError, match="unknown token"):
        tokenize_split(junk, [Example("a", "b", 0)], 8)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"] + [f"w{i}" for i in range(20)]
    check_tokenizer(_bert_tokenizer(tmp_path / "c", words))  # a real vocabulary passes


def test_a_trained_tokenizer_says_none_is_needed_from_a_checkpoint(capsys):
    tok = train_bpe_tokenizer(["a fine film", "dull"] * 5, 300, ["negative", "positive"])
    assert "none needed; training a byte-level BPE tokenizer" in capsys.readouterr().out
    tokenize_split(tok, [Example("a fine film", "positive", 1)], 8)  # passes the tokenizer check
