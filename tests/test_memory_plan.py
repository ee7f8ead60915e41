"""The memory plan counts what transformers builds, and a merge to K experts is the stock model with K."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig

from pipeline.memory_plan import KNOWN_MODELS, count_params, known_config, merged_params, plan
from pipeline.modeling import count_unique_params
from scripts import memory_plan as script

TINY = {
    "mixtral": ("num_local_experts", {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                                      "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96}),
    "qwen3_moe": ("num_experts", {"hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 24,
                                  "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                                  "head_dim": 8, "num_experts_per_tok": 2, "vocab_size": 96,
                                  "tie_word_embeddings": False}),
    "deepseek_v2": ("n_routed_experts", {"hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
                                         "num_hidden_layers": 3, "first_k_dense_replace": 1,
                                         "num_attention_heads": 4, "num_key_value_heads": 4, "n_shared_experts": 1,
                                         "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
                                         "kv_lora_rank": 16, "q_lora_rank": None, "qk_nope_head_dim": 8,
                                         "qk_rope_head_dim": 8, "v_head_dim": 8, "vocab_size": 96}),
}  # fmt: skip


def _config(family: str, experts: int):
    key, kwargs = TINY[family]
    return AutoConfig.for_model(family, **kwargs, **{key: experts})


@pytest.mark.parametrize("family", sorted(TINY))
def test_counts_are_those_of_the_built_model(family):
    config = _config(family, 4)
    counts = count_params(config)
    from pipeline.families import adapter_for

    torch.manual_seed(0)
    model = adapter_for(config).model_class()(config)
    assert counts.total == count_unique_params(model)
    assert counts.experts_per_layer == 4
    assert counts.routed_experts == counts.sparse_layers * 4 * counts.params_per_expert
    assert (counts.shared_experts > 0) == (family == "deepseek_v2")


@pytest.mark.parametrize("family", sorted(TINY))
def test_a_merge_to_k_experts_has_the_stock_k_expert_models_size(family):
    # A uniform pruned merge is saved in the stock layout with K experts: what serving loads.
    assert merged_params(count_params(_config(family, 4)), 2) == count_params(_config(family, 2)).total


def test_known_models_have_their_published_sizes():
    totals = {name: count_params(known_config(name)).total / 1e9 for name in KNOWN_MODELS}
    # Model cards: Mixtral-8x7B 46.7B, Qwen3-30B-A3B 30.5B, DeepSeek-V2-Lite 15.7B.
    assert round(totals["mistralai/Mixtral-8x7B-v0.1"], 1) == 46.7
    assert round(totals["Qwen/Qwen3-30B-A3B"], 1) == 30.5
    assert round(totals["deepseek-ai/DeepSeek-V2-Lite"], 1) == 15.7


def test_plan_splits_over_gpus_and_offloads_the_rest():
    counts = count_params(known_config("mistralai/Mixtral-8x7B-v0.1"))
    one, eight = plan(counts, 4, 1), plan(counts, 4, 8)
    assert one["weights_gb"] == 93.4 and not one["serve_fits"] and one["serve_merged_fits"]
    assert one["profile_per_gpu_gb"] == 72.0 and one["profile_offloaded_gb"] == pytest.approx(21.4)
    assert eight["serve_per_gpu_gb"] == 11.7 and eight["profile_offloaded_gb"] == 0.0
    assert eight["finetune_fsdp_per_gpu_gb"] * 8 == pytest.approx(one["finetune_ddp_per_gpu_gb"], abs=0.5)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda c: merged_params(c, 9), "valid choices are 1..8"),
        (lambda c: plan(c, 4, 0), "gpus=0"),
    ],
)
def test_bad_input_is_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call(count_params(_config("mixtral", 8)))


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="valid choices: mistralai/Mixtral-8x7B-v0.1"):
        known_config("mistralai/Mixtral-8x22B")


def test_script_writes_json_for_a_local_config(tmp_path, capsys):
    _config("qwen3_moe", 4).save_pretrained(str(tmp_path / "ckpt"))
    out = tmp_path / "plan.json"
    script.main(["--config", str(tmp_path / "ckpt"), "--gpus", "1", "2", "--out", str(out)])
    data = json.loads(out.read_text())["models"][str(tmp_path / "ckpt")]
    assert data["keep"] == 2 and [p["gpus"] for p in data["plans"]] == [1, 2]
    assert capsys.readouterr().out.count("\n") == 4  # header, rule, one row per GPU count
    with pytest.raises(SystemExit, match="no config.json"):
        script.main(["--config", str(tmp_path), "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()
