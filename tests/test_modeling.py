import json

import pytest
import torch

from pipeline.adapters import ModelStructureError, adapter_for
from pipeline.modeling import (
    CheckpointError,
    atomic_dir,
    build_model,
    count_unique_params,
    load_model,
    save_model,
)
from tests.conftest import TINY, VOCAB, logits, profiles_for


def test_reloaded_switch_matches(tiny_dir, tiny_model, batch):
    again = load_model(tiny_dir)
    assert torch.allclose(logits(again, batch), logits(tiny_model, batch), atol=1e-5)
    assert len(adapter_for(again).sparse_layers(again)) == 3


def test_folder_without_weights(tiny_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="holds no weights"):
        load_model(tmp_path)


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "models" / "full")


def test_corrupt_weights(tiny_dir, tmp_path):
    for f in ("config.json",):
        (tmp_path / f).write_text((tiny_dir / f).read_text())
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot load weights"):
        load_model(tmp_path)


def test_structure_mismatch(tiny_model, tmp_path):
    from pipeline.merging import merge_model

    adapter = adapter_for(tiny_model)
    name = adapter.sparse_layers(tiny_model)[1].name
    merge_model(
        tiny_model,
        adapter,
        {"layers": {name: {"merged": True, "groups": [list(range(8))]}}},
        profiles_for([name]),
        "uniform",
    )
    save_model(tiny_model, tmp_path)
    spec = json.loads((tmp_path / "smoe_structure.json").read_text())
    spec["layers"][name]["experts"]["expert_1"] = {}
    (tmp_path / "smoe_structure.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="do not match the saved structure"):
        load_model(tmp_path)


def test_model_without_smoe_layer():
    cfg = {**TINY, "encoder_sparse_step": 0, "decoder_sparse_step": 0}
    with pytest.raises(ModelStructureError, match="no SMoE layer"):
        build_model("switch_transformers", cfg, VOCAB, 0, 1, 0.02, 0)


def test_wrong_model_type(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    ).save_pretrained(str(tmp_path))
    with pytest.raises(
        ModelStructureError, match="'bert' is not a supported SMoE family; supported: switch_transformers"
    ):
        load_model(tmp_path)


def test_bad_config_key():
    with pytest.raises(ValueError, match="vocab_size"):
        build_model("switch_transformers", {**TINY, "vocab_size": 10}, VOCAB, 0, 1, 0.02, 0)


def test_tied_parameters_counted_once():
    tied = build_model("switch_transformers", {**TINY, "tie_word_embeddings": True}, VOCAB, 0, 1, 0.02, 0)
    untied = build_model("switch_transformers", {**TINY, "tie_word_embeddings": False}, VOCAB, 0, 1, 0.02, 0)
    # Untied: shared, encoder and decoder tables and lm_head are four separate matrices.
    assert count_unique_params(untied) - count_unique_params(tied) == 3 * VOCAB * TINY["d_model"]


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
