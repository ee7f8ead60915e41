"""Stage scripts stop on bad input with a clear message, before writing any output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.data import Example, tokenize_split, train_bpe_tokenizer, write_jsonl
from stages import finetune, prepare

ROOT = Path(__file__).resolve().parents[1]


def _params(tmp_path: Path, **overrides) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in overrides.items():
        node = params
        *parents, leaf = dotted.split("__")
        for k in parents:
            node = node[k]
        node[leaf] = value
    params["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _run(main, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return str(exc.value.code)


def test_prepare_unknown_task(tmp_path):
    p = _params(tmp_path, data__task="imagenet")
    msg = _run(
        prepare.main,
        ["--params", str(p), "--out", str(tmp_path / "out"), "--metrics", str(tmp_path / "m.json")],
    )
    assert "data.task" in msg and "valid choices: mrpc, sst2" in msg
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()


def test_prepare_missing_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOE_DATA_DIR", str(tmp_path / "no-data"))
    p = _params(tmp_path)
    msg = _run(
        prepare.main,
        ["--params", str(p), "--out", str(tmp_path / "out"), "--metrics", str(tmp_path / "m.json")],
    )
    assert "no-data does not exist" in msg
    assert not (tmp_path / "out").exists()


def test_params_not_yaml(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("data: [unclosed\n")
    msg = _run(
        prepare.main,
        ["--params", str(p), "--out", str(tmp_path / "out"), "--metrics", str(tmp_path / "m.json")],
    )
    assert "not valid YAML" in msg


def test_finetune_checkpoint_without_weights(tmp_path, tiny_dir):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text((tiny_dir / "config.json").read_text())
    p = _params(tmp_path, model__name_or_path=str(ckpt), model__config=None, model__init_embeddings_from=None)
    prepared = tmp_path / "prepared"
    tok = train_bpe_tokenizer(["a fine film"] * 20, 300, ["negative", "positive"])
    tok.save_pretrained(str(prepared / "tokenizer"))
    (prepared / "task.json").write_text(
        json.dumps({"task": "sst2", "label_words": ["negative", "positive"], "metric": "accuracy"})
    )
    rows = tokenize_split(tok, [Example("sst2 sentence: a fine film", "positive", 1)], 16)
    for split in ("train", "dev"):
        write_jsonl(rows, prepared / f"{split}.jsonl")
    msg = _run(
        finetune.main,
        [
            "--params",
            str(p),
            "--data",
            str(prepared),
            "--out",
            str(tmp_path / "full"),
            "--metrics",
            str(tmp_path / "m.json"),
        ],
    )
    assert "holds no weights" in msg and str(ckpt) in msg
    assert not (tmp_path / "full").exists()
