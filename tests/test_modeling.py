"""Building, saving and loading models: clear errors on bad folders, structure checks, counting."""

import json

import pytest
import torch
from torch import nn

from pipeline.families import ModelStructureError, adapter_for
from pipeline.modeling import (
    CheckpointError,
    atomic_dir,
    build_model,
    bytes_on_disk,
    count_unique_params,
    load_model,
    save_model,
)
from tests.conftest import EOS_ID, N_EXPERTS, PAD_ID, TINY, VOCAB, logits, profiles_for


def _build(**overrides):
    return build_model("switch_transformers", {**TINY, **overrides}, VOCAB, PAD_ID, EOS_ID, 0.02, 0)


def test_reloaded_switch_matches(tiny_dir, tiny_model, batch):
    again = load_model(tiny_dir)
    assert not again.training
    assert torch.allclose(logits(again, batch), logits(tiny_model, batch), atol=1e-6)
    layers = adapter_for(again).sparse_layers(again)
    assert [(ly.stack, ly.position) for ly in layers] == [("encoder", 0), ("encoder", 1), ("decoder", 2)]
    assert all(adapter_for(again).num_experts(ly) == N_EXPERTS for ly in layers)


def test_build_is_seeded_and_router_starts_small():
    a, b = _build(), _build()
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    adapter = adapter_for(a)
    for ly in adapter.sparse_layers(a):
        w = adapter.router(ly).classifier.weight
        assert 0.005 < float(w.detach().std()) < 0.05


def test_save_model_round_trip_of_a_stock_model(tiny_model, batch, tmp_path):
    save_model(tiny_model, tmp_path / "m", params={"seed": 1}, extra={"note.json": {"a": 1}})
    assert json.loads((tmp_path / "m" / "note.json").read_text()) == {"a": 1}
    assert bytes_on_disk(tmp_path / "m") > 0
    assert torch.allclose(logits(load_model(tmp_path / "m"), batch), logits(tiny_model, batch), atol=1e-6)


# ---------------------------------------------------------------- loading errors


def test_folder_without_weights(tiny_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"holds no weights: expected one of .*model\.safetensors"):
        load_model(tmp_path)


def test_folder_without_config(tiny_dir, tmp_path):
    (tmp_path / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="is not a model folder: no config.json"):
        load_model(tmp_path)


def test_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)


@pytest.mark.parametrize("rel", ["models/full", "does-not-exist", "./a/b/c"])
def test_nonexistent_path(tmp_path, rel):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / rel)
    if rel.startswith(".") or rel.count("/") != 1:  # a relative path that cannot be a Hub id
        with pytest.raises(CheckpointError, match="does not exist"):
            load_model(rel)


def test_corrupt_weights(tiny_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
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
        {"layers": {name: {"merged": True, "groups": [list(range(4)), list(range(4, 8))]}}},
        profiles_for([name]),
        "uniform",
    )
    save_model(tiny_model, tmp_path)
    spec = json.loads((tmp_path / "smoe_structure.json").read_text())
    spec["layers"][name]["experts"]["expert_2"] = {}
    (tmp_path / "smoe_structure.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="do not match the saved structure"):
        load_model(tmp_path)


def test_structure_naming_a_missing_layer(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path)
    (tmp_path / "smoe_structure.json").write_text(
        json.dumps(
            {"format": 1, "layers": {"encoder.block.9.layer.1.mlp": {"expert_map": [0], "experts": {}}}}
        )
    )
    with pytest.raises(ModelStructureError, match="layers the model lacks"):
        load_model(tmp_path)


# ---------------------------------------------------------------- structure checks


def test_model_without_smoe_layer():
    with pytest.raises(ModelStructureError, match="no SMoE layer"):
        _build(encoder_sparse_step=0, decoder_sparse_step=0)


def test_checkpoint_without_smoe_layer(tmp_path):
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    cfg = SwitchTransformersConfig(
        **{**TINY, "encoder_sparse_step": 0, "decoder_sparse_step": 0},
        vocab_size=VOCAB,
        decoder_start_token_id=0,
    )
    SwitchTransformersForConditionalGeneration(cfg).save_pretrained(str(tmp_path))
    with pytest.raises(ModelStructureError, match="no SMoE layer"):
        load_model(tmp_path)


def test_wrong_model_type(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(
        GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    ).save_pretrained(str(tmp_path))
    with pytest.raises(
        ModelStructureError, match="'gpt2' is not a supported SMoE family; supported: "
    ) as err:
        load_model(tmp_path)
    assert {"deepseek_v3", "gpt_oss", "mixtral", "switch_transformers"} <= set(
        str(err.value).split(": ")[-1].split(", ")
    )


def test_dense_bert_points_to_upcycling(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    ).save_pretrained(str(tmp_path))
    with pytest.raises(ModelStructureError, match="no SMoE layer .* through an upcycle section"):
        load_model(tmp_path)


def test_vocab_smaller_than_tokenizer():
    with pytest.raises(ValueError, match="vocab_size"):
        _build(vocab_size=10)


@pytest.mark.parametrize("override", [{"d_model": 32.5}, {"num_heads": "4"}])
def test_mistyped_config_value_is_a_value_error_naming_model_config(override):
    with pytest.raises(ValueError, match="model.config"):
        _build(**override)


# ---------------------------------------------------------------- counting


def test_shared_parameters_counted_once():
    a = nn.Linear(4, 3, bias=False)
    b = nn.Linear(4, 3, bias=False)
    b.weight = a.weight  # the same Parameter object
    c = nn.Linear(4, 3, bias=False)
    c.weight = nn.Parameter(a.weight.data)  # another Parameter on the same storage
    assert count_unique_params(nn.Sequential(a, b)) == 12
    assert count_unique_params(nn.ModuleList([a, b, c])) == 12
    assert count_unique_params(nn.ModuleList([a, nn.Linear(4, 3)])) == 12 + 15


def test_tied_embeddings_counted_once():
    tied = _build(tie_word_embeddings=True)
    untied = _build(tie_word_embeddings=False)
    table = VOCAB * TINY["d_model"]
    assert tied.get_input_embeddings().weight.data_ptr() == tied.get_output_embeddings().weight.data_ptr()
    distinct = {p.data_ptr(): p.numel() for p in tied.parameters()}
    assert count_unique_params(tied) == sum(distinct.values())
    assert count_unique_params(untied) > count_unique_params(tied)
    assert (count_unique_params(untied) - count_unique_params(tied)) % table == 0


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_target_on_success(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_check_finite_weights_names_the_first_bad_tensor():
    from pipeline.modeling import check_finite_weights

    check_finite_weights({"a": torch.ones(3), "ids": torch.tensor([1, 2])}, "src")
    with pytest.raises(CheckpointError, match=r"src: weight b holds non-finite values \(2 of 3"):
        check_finite_weights(
            {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan"), float("-inf")])}, "src"
        )
