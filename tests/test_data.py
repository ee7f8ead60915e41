import shutil

import pytest

from pipeline.data import DataError, collate, load_task, resolve_data_dir, tokenize_split, train_bpe_tokenizer
from pipeline.registry import UnknownChoiceError
from tests.conftest import DATA_DIR

needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason="offline data folder missing")


@needs_data
def test_sst2_official_splits_as_text_to_text():
    splits = load_task("sst2", DATA_DIR)
    assert len(splits["train"]) == 67349 and len(splits["dev"]) == 872 and len(splits["test"]) == 1821
    ex = splits["dev"][0]
    assert ex.source.startswith("sst2 sentence: ") and ex.target in ("negative", "positive")
    assert {e.target for e in splits["train"]} == {"negative", "positive"}


@needs_data
def test_mrpc_reads_files_with_byte_order_mark():
    splits = load_task("mrpc", DATA_DIR)
    assert len(splits["train"]) == 3668 and len(splits["dev"]) == 408
    assert splits["train"][0].source.startswith("mrpc sentence1: ")


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_task("sst2", tmp_path / "nowhere")


def test_missing_file(tmp_path):
    (tmp_path / "glue" / "SST-2").mkdir(parents=True)
    (tmp_path / "glue" / "SST-2" / "train.tsv").write_text("sentence\tlabel\ngood\t1\n")
    with pytest.raises(DataError, match="missing data file .*dev.tsv"):
        load_task("sst2", tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [
        ("text\tscore\nfine\t1\n", "missing column"),
        ("sentence\tlabel\nfine\tseven\n", "not an integer"),
        ("sentence\tlabel\nfine\t4\n", "out of range"),
        ("", "empty file"),
        ("sentence\tlabel\n", "empty"),
    ],
)
def test_malformed_files(tmp_path, content, message):
    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    for split in ("train", "dev"):
        (folder / f"{split}.tsv").write_text(content)
    with pytest.raises(DataError, match=message):
        load_task("sst2", tmp_path)


def test_unknown_task_lists_choices():
    with pytest.raises(UnknownChoiceError, match="valid choices: mrpc, sst2"):
        load_task("imagenet", None)


def test_env_var_overrides_param(monkeypatch, tmp_path):
    monkeypatch.setenv("SMOE_DATA_DIR", str(tmp_path))
    assert resolve_data_dir("../elsewhere") == tmp_path
    monkeypatch.delenv("SMOE_DATA_DIR")
    assert resolve_data_dir(None) is None
    assert resolve_data_dir("rel", base=tmp_path) == tmp_path / "rel"


def test_bpe_tokenizer_keeps_label_words_whole(tmp_path):
    from transformers import AutoTokenizer

    tok = train_bpe_tokenizer(["a movie about nothing", "the best film"] * 20, 300, ["negative", "positive"])
    for word in ("negative", "positive"):
        ids = tok(word)["input_ids"]
        assert len(ids) == 2 and ids[-1] == tok.eos_token_id
    tok.save_pretrained(str(tmp_path))
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert again("the best film")["input_ids"] == tok("the best film")["input_ids"]
    shutil.rmtree(tmp_path)


def test_collate_pads_dynamically():
    tok = train_bpe_tokenizer(["short", "a much longer sentence here"] * 10, 300, ["negative", "positive"])
    from pipeline.data import Example

    rows = tokenize_split(
        tok, [Example("short", "negative", 0), Example("a much longer sentence here", "positive", 1)], 64
    )
    b = collate(rows, tok.pad_token_id)
    assert b["input_ids"].shape[1] == max(len(r["input_ids"]) for r in rows)
    assert b["attention_mask"][0].sum() == len(rows[0]["input_ids"])
    assert (b["labels"] != -100).sum() == sum(len(r["labels"]) for r in rows)
