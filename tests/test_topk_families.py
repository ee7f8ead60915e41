"""Decoder MoE families with top-k routing and fused SwiGLU experts (Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE): the adapter's properties on tiny random models of each, and a tiny end-to-end run per family."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.align import align_model
from pipeline.compression import SparsePruner, compress_model, finalize_compact
from pipeline.data import batches, train_bpe_tokenizer
from pipeline.evaluation import expert_stats, speed_and_flops
from pipeline.families import ADAPTERS, adapter_for
from pipeline.grouping import LayerData, group_experts, merged_layer_names, validate_groups
from pipeline.merging import merge_model
from pipeline.modeling import build_model, load_model, save_model
from pipeline.profiling import profile_gradients, profile_routing
from pipeline.routing import ROUTER_MODES, set_router_mode
from pipeline.training import TrainSettings, model_forward, perplexity_metric, prune_without_training, train
from pipeline.zeroshot import ChoiceExample, choice_accuracy, lm_rows

VOCAB = 96
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 64,
}
# One tiny config per family; Qwen2-MoE keeps its shared expert, OLMoE and Qwen2 leave top-k
# weights unnormalised while Qwen3 normalises them (Mixtral always does).
FAMILIES = {
    "mixtral": {**COMMON, "intermediate_size": 48, "num_local_experts": 4},
    "qwen2_moe": {
        **COMMON,
        "intermediate_size": 48,
        "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": 40,
        "num_experts": 4,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
    },
    "qwen3_moe": {
        **COMMON,
        "intermediate_size": 48,
        "moe_intermediate_size": 24,
        "num_experts": 4,
        "norm_topk_prob": True,
        "head_dim": 8,
        "decoder_sparse_step": 1,
    },
    "olmoe": {**COMMON, "intermediate_size": 24, "num_experts": 4, "norm_topk_prob": False},
}


def _model(family: str, seed: int = 0, **over):
    # Router std 1.0 gives decisive routing, so tiny numerical changes cannot flip top-k choices.
    return build_model(family, {**FAMILIES[family], **over}, VOCAB, 0, 1, 1.0, seed).eval()


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (3, 12), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _merge_all(model, groups_per_layer: list[list[int]], layers=None):
    """Merge the given layers (default all) with the given groups, frequency-weighted."""
    from pipeline.profiling import LayerProfile

    adapter = adapter_for(model)
    spec, profiles = {"layers": {}}, {}
    for ly in adapter.sparse_layers(model):
        n = adapter.num_experts(ly)
        counts = torch.arange(1.0, n + 1)
        profiles[ly.name] = LayerProfile(ly.name, counts, int(counts.sum()), torch.zeros(1, n))
        merged = layers is None or ly.name in layers
        spec["layers"][ly.name] = {
            "merged": merged,
            "groups": groups_per_layer if merged else [[e] for e in range(n)],
        }
    merge_model(model, adapter, spec, profiles, "frequency")


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_registered_and_found(family):
    model = _model(family)
    adapter = adapter_for(model)
    assert adapter is ADAPTERS.get(family) and adapter.shift_labels
    layers = adapter.sparse_layers(model)
    assert [ly.position for ly in layers] == list(range(3))
    assert all(adapter.num_experts(ly) == 4 for ly in layers)
    w = adapter.expert_weights(layers[0], 1)
    inter = adapter.expert_weights(layers[0], 0)["gate"].shape[0]
    assert w["gate"].shape == w["up"].shape == (inter, 32) and w["down"].shape == (32, inter)


@pytest.mark.parametrize("family", FAMILIES)
def test_alignment_leaves_outputs_unchanged(family):
    model, ids = _model(family), _ids()
    before = _logits(model, ids)
    report = align_model(model, adapter_for(model), "weight-matching", "first")
    assert sum(r["neurons_moved"] for r in report.values()) > 0
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_permuting_gate_up_and_down_together_is_exact_but_gate_alone_is_not(family):
    model, ids = _model(family), _ids()
    adapter = adapter_for(model)
    layer = adapter.sparse_layers(model)[1]
    before = _logits(model, ids)
    inter = adapter.expert_weights(layer, 0)["gate"].shape[0]
    perm = torch.randperm(inter, generator=torch.Generator().manual_seed(1))
    for e in range(4):
        adapter.permute_expert(layer, e, perm)
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-5, rtol=1e-4)
    w = adapter.expert_weights(layer, 0)
    adapter.set_expert_weights(layer, 0, {**w, "gate": w["gate"][torch.roll(torch.arange(inter), 1)]})
    assert not torch.allclose(_logits(model, ids), before, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_merging_identical_experts_changes_nothing(family):
    model, ids = _model(family), _ids()
    adapter = adapter_for(model)
    for ly in adapter.sparse_layers(model):
        w = {k: v.clone() for k, v in adapter.expert_weights(ly, 2).items()}
        for e in range(4):
            adapter.set_expert_weights(ly, e, w)
    before = _logits(model, ids)
    _merge_all(model, [[0, 1, 2, 3]])
    assert all(adapter.num_experts(ly) == 1 for ly in adapter.sparse_layers(model))
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_merge_keeps_the_families_top_k_weighting(family):
    # Each expert its own group: the merged layer must weight the top-k experts exactly as the
    # stock block does (normalised or not, per the family).
    model, ids = _model(family), _ids()
    before = _logits(model, ids)
    _merge_all(model, [[0], [1], [2], [3]])
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-5, rtol=1e-4)


def test_unnormalised_top_k_weights_differ_from_normalised_ones():
    # Guard for the test above: the two Qwen settings really give different functions.
    a = _model("qwen2_moe", norm_topk_prob=False)
    b = _model("qwen2_moe", norm_topk_prob=True)
    ids = _ids()
    assert not torch.allclose(_logits(a, ids), _logits(b, ids), atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_profile_counts_every_top_k_selection(family):
    model = _model(family)
    text_rows = [{"input_ids": r.tolist(), "labels": r.tolist(), "label": 0} for r in _ids()]
    profiles = profile_routing(model, text_rows, 0, 2, torch.device("cpu"))
    for p in profiles.values():
        assert p.tokens == 36 and p.routed == 36
        assert int(p.counts.sum()) == 2 * 36  # top-2: two selections per token
        assert p.router_logits.shape == (36, 4)
        torch.testing.assert_close(p.frequency.sum(), torch.tensor(2.0))


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_gradients_come_from_the_fused_parameters(family):
    model = _model(family)
    rows = [{"input_ids": r.tolist(), "labels": r.tolist(), "label": 0} for r in _ids()]
    profiles = profile_routing(model, rows, 0, 3, torch.device("cpu"))
    profile_gradients(model, rows, 0, 3, torch.device("cpu"), profiles)
    p = next(iter(profiles.values()))
    used = [e for e in range(4) if p.counts[e] > 0]
    assert {k.split("::")[0] for k in p.gradients} == {str(e) for e in used}
    assert p.gradients[f"{used[0]}::down"].shape == (
        32,
        adapter_for(model).expert_weights(adapter_for(model).sparse_layers(model)[0], 0)["down"].shape[1],
    )


@pytest.mark.parametrize("mode", ROUTER_MODES.names())
@pytest.mark.parametrize("family", FAMILIES)
def test_router_modes_save_and_reload(family, mode, tmp_path):
    model, ids = _model(family), _ids()
    _merge_all(model, [[0, 1], [2, 3]])
    adapter = adapter_for(model)
    if mode != "remap":
        set_router_mode(model, adapter, mode)
    out = _logits(model, ids)
    save_model(model, tmp_path)
    torch.testing.assert_close(_logits(load_model(tmp_path), ids), out)
    # The router has one output per group unless it is the remapped original.
    assert adapter.router(adapter.sparse_layers(model)[0]).num_experts == (4 if mode == "remap" else 2)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("groups", [[[0, 1], [2, 3]], [[0, 1, 2, 3]]])
def test_compact_save_loads_in_stock_transformers(family, groups, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model, ids = _model(family), _ids()
    _merge_all(model, groups)
    set_router_mode(model, adapter_for(model), "prune")
    out = _logits(model, ids)
    save_model(model, tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert getattr(config, ADAPTERS.get(family).spec.config_experts) == len(groups)
    assert config.num_experts_per_tok == min(2, len(groups))  # top-k capped at the new count
    stock = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(stock).__name__ == ADAPTERS.get(family).spec.causal_lm
    torch.testing.assert_close(_logits(stock, ids), out, atol=1e-5, rtol=1e-4)
    # This project's loader restores the same model from the same folder.
    torch.testing.assert_close(_logits(load_model(tmp_path), ids), out)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_expert_counts_are_not_claimed_stock_loadable(family, tmp_path):
    from transformers import AutoConfig

    model = _model(family)
    layers = [ly.name for ly in adapter_for(model).sparse_layers(model)][1:]
    _merge_all(model, [[0, 1], [2, 3]], layers=layers)
    set_router_mode(model, adapter_for(model), "prune")
    save_model(model, tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert getattr(config, ADAPTERS.get(family).spec.config_experts) == 4  # first layer keeps 4: unchanged
    assert (tmp_path / "smoe_structure.json").is_file()
    ids = _ids()
    torch.testing.assert_close(_logits(load_model(tmp_path), ids), _logits(model, ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_compression_at_full_rank_is_exact_and_reloads(family, tmp_path):
    model, ids = _model(family), _ids()
    _merge_all(model, [[0, 1], [2, 3]])
    before = _logits(model, ids)
    compress_model(model, adapter_for(model), 24, "all")
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-4, rtol=1e-3)
    finalize_compact(model)
    save_model(model, tmp_path)
    torch.testing.assert_close(_logits(load_model(tmp_path), ids), _logits(model, ids))
    counts = [
        c
        for ly in adapter_for(model).sparse_layers(model)
        for c in adapter_for(model).expert_param_counts(ly)
    ]
    assert all(c["present"] > c["dense"] for c in counts)  # full-rank U V plus an unpruned S


def test_shared_expert_is_left_as_is():
    model = _model("qwen2_moe")
    adapter = adapter_for(model)
    layer = adapter.sparse_layers(model)[0]
    shared = {k: v.clone() for k, v in layer.module.shared_expert.state_dict().items()}
    _merge_all(model, [[0, 1], [2, 3]])
    compress_model(model, adapter, 8, "all")
    after = adapter.sparse_layers(model)[0].module.shared_expert.state_dict()
    assert all(torch.equal(shared[k], after[k]) for k in shared)
    # Experts count only the routed experts, not the shared one.
    assert expert_stats(model)["experts_total"] == 3 * 2


@pytest.mark.parametrize("family", FAMILIES)
def test_flops_count_the_fused_experts(family):
    model = _model(family)
    rows = [{"input_ids": r.tolist(), "labels": r.tolist(), "label": 0} for r in _ids()]
    fused = speed_and_flops(model, rows, None, 0, 3, 1, torch.device("cpu"))["gflops_per_sample"]
    merged = copy.deepcopy(model)
    _merge_all(merged, [[0], [1], [2], [3]])  # same experts in the project's modules
    ours = speed_and_flops(merged, rows, None, 0, 3, 1, torch.device("cpu"))["gflops_per_sample"]
    assert fused == pytest.approx(ours, rel=0.05)


@pytest.fixture(scope="module")
def lm_data(data_dir):
    text = "\n".join((data_dir / "wikitext-2" / "valid.txt").read_text().splitlines()[:400])
    tok = train_bpe_tokenizer(text.splitlines(), 300, [])
    rows = lm_rows(tok, text, 16)
    return tok, rows[:96], rows[96:128]


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_end_to_end_run(family, lm_data, tmp_path):
    """Train, profile, align, group, merge, compress, prune during KD, reload, evaluate."""
    tok, train_rows, dev_rows = lm_data
    cpu = torch.device("cpu")
    cfg = {**FAMILIES[family], "vocab_size": len(tok)}
    full = build_model(family, cfg, len(tok), tok.pad_token_id, tok.eos_token_id, 0.02, 0)
    settings = TrainSettings(1, 16, 32, 3e-3, 0.0, 2, 1.0, 1e-3, 1e-2, 1.0)
    ppl = perplexity_metric(dev_rows, tok.pad_token_id, 32, cpu, "float32")
    start = ppl.compute(full)
    summary = train(
        full, train_rows, dev_rows, [], tok.pad_token_id, settings, cpu, progress=False, dev_metric=ppl
    )
    assert summary["best_dev_perplexity"] < start
    adapter = adapter_for(full)
    profiles = profile_routing(full, train_rows[:32], tok.pad_token_id, 16, cpu)
    model = copy.deepcopy(full)
    align_model(model, adapter, "weight-matching", "first")
    layers = adapter.sparse_layers(model)
    names = merged_layer_names([(ly.name, ly.stack) for ly in layers], True, "decoder")
    data = {
        ly.name: LayerData(
            ly.name,
            profiles[ly.name].router_logits,
            adapter.router_weight(ly),
            [adapter.expert_weights(ly, e) for e in range(4)],
        )
        for ly in layers
        if ly.name in names
    }
    groups = group_experts(data, {n: p.frequency for n, p in profiles.items()}, names, 2, "router-logits")
    validate_groups(groups, {ly.name: 4 for ly in layers})
    merge_model(model, adapter, groups, profiles, "frequency")
    counts = [adapter.num_experts(ly) for ly in layers]
    assert counts[0] == 4 and sum(counts[1:]) == 4  # first layer skipped; 2 per merged layer on average
    compress_model(model, adapter, 4, "merged")
    pruner = SparsePruner(model, 0.2, 0.0, 0.2)
    prune_without_training(model, train_rows[:32], tok.pad_token_id, settings, pruner, cpu)
    assert pruner.kept_fraction() == pytest.approx(0.2, abs=0.05)
    finalize_compact(model)
    save_model(model, tmp_path / "mc")
    reloaded = load_model(tmp_path / "mc")
    assert expert_stats(reloaded)["expert_params"] < expert_stats(full)["expert_params"]
    batch = next(batches(dev_rows, 8, tok.pad_token_id))
    with torch.no_grad():
        torch.testing.assert_close(
            model_forward(reloaded, batch, with_router=False).logits,
            model_forward(model.eval(), batch, with_router=False).logits,
        )
    assert ppl.compute(reloaded) < 10 * len(tok)
    example = ChoiceExample(("the game", "the game"), (" began", " xq"), 0)
    assert choice_accuracy(reloaded, tok, [example], 4, cpu)["examples"] == 1


def _bf16(model):
    """``model`` in bfloat16 as transformers loads a bf16 checkpoint: rotary frequencies stay float32."""
    rotary = {n: b.clone() for n, b in model.named_buffers() if n.endswith("inv_freq")}
    model = model.to(torch.bfloat16)
    for name, value in rotary.items():
        owner, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(owner), attr, value)
    return model


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_bf16_checkpoints_reload_in_bf16(family, tmp_path):
    ids = _ids()
    plain = _bf16(_model(family))
    save_model(plain, tmp_path / "stock")
    assert not (tmp_path / "stock" / "smoe_structure.json").is_file()
    model = _model(family)
    layers = [ly.name for ly in adapter_for(model).sparse_layers(model)][1:]
    _merge_all(model, [[0, 1], [2, 3]], layers=layers)  # mixed expert counts: the structured loader
    model = _bf16(model)
    save_model(model, tmp_path / "merged")
    assert (tmp_path / "merged" / "smoe_structure.json").is_file()
    for saved, folder in ((plain, "stock"), (model, "merged")):
        loaded = load_model(tmp_path / folder)
        assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}, folder
        torch.testing.assert_close(_logits(loaded, ids), _logits(saved, ids), atol=0, rtol=0)
    assert torch.get_default_dtype() == torch.float32  # the loader leaves the process default alone
