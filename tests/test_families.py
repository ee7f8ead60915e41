"""The families package: router semantics, expert layouts and router modes on tiny random models of
families whose routers differ (DeepSeek-V3's sigmoid + correction bias + group-limited choice,
GPT-OSS's biased router and interleaved clamped-SwiGLU experts, LFM2's block-held expert bias,
Llama 4's sigmoid of the top logits, DBRX's flat experts behind a logits-only router)."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.config import ParamsError, parse_params
from pipeline.families import ADAPTERS, ModelStructureError
from pipeline.families.layouts import FusedLayout
from pipeline.families.routers import ROUTER_SEMANTICS
from pipeline.family_walk import _decisive_routers, _ids, _logits, _merge, tiny_config
from pipeline.modeling import load_model, save_model
from pipeline.routing import router_mode_refusals, router_mode_variants, set_router_mode

CATALOG = [n for n in ADAPTERS.names() if hasattr(ADAPTERS.get(n), "spec")]


def _tiny(model_type: str, seed: int = 0, dtype=torch.float32):
    adapter = ADAPTERS.get(model_type)
    torch.manual_seed(seed)
    model = adapter.model_class()(tiny_config(model_type, adapter)).eval()
    _decisive_routers(adapter, model, seed)
    return adapter, model.to(dtype), _ids(96, seed)


def _pairs(n: int) -> list[list[int]]:
    return [[e, e + 1] for e in range(0, n, 2)]


# ------------------------------------------------------------------ router semantics


def test_every_catalog_family_names_a_registered_semantics():
    assert len(CATALOG) >= 12
    for name in CATALOG:
        assert ADAPTERS.get(name).spec.semantics in ROUTER_SEMANTICS


@pytest.mark.parametrize("model_type", ["deepseek_v3", "lfm2_moe", "llama4_text", "glm4_moe"])
def test_a_sigmoid_router_refuses_prune_logsumexp_with_a_message(model_type):
    adapter, model, _ = _tiny(model_type)
    _merge(model, adapter, _pairs)
    with pytest.raises(ModelStructureError, match="prune-logsumexp needs softmax probabilities"):
        set_router_mode(copy.deepcopy(model), adapter, "prune-logsumexp")
    assert "prune-logsumexp" in router_mode_refusals(model, adapter)
    assert set(router_mode_variants(model, adapter)) == {"remap", "prune"}


def test_params_refuse_a_router_mode_the_family_does_not_define():
    base = {
        "data": {"task": "wikitext2"},
        "model": {"family": "deepseek_v3", "config": {"hidden_size": 32, "n_routed_experts": 8}},
        "group": {"layers": "decoder"},
    }
    parse_params({**base, "merge": {"router": "prune"}})
    with pytest.raises(ParamsError, match="needs softmax probabilities.*valid: remap, prune"):
        parse_params({**base, "merge": {"router": "prune-logsumexp"}})
    with pytest.raises(ParamsError, match="per-expert score correction"):
        parse_params(
            {
                **base,
                "model": {"family": "ernie4_5_moe", "config": {"hidden_size": 32}},
                "merge": {"router": "prune-logsumexp"},
            }
        )


def test_masked_experts_are_never_chosen_even_with_a_large_correction_bias():
    adapter, model, ids = _tiny("deepseek_v3")
    layer = adapter.sparse_layers(model)[0]
    router = adapter.router(layer)
    with torch.no_grad():
        router.e_score_correction_bias.fill_(0.0)
        router.e_score_correction_bias[3] = 100.0  # expert 3 would win every token
    dead = torch.zeros(adapter.num_experts(layer), dtype=torch.bool)
    dead[3] = True

    def chosen(masked: bool) -> torch.Tensor:
        # Registered after the mask, the recorder sees the choice the block receives.
        hooks = [adapter.mask_router(layer, dead)] if masked else []
        seen = []
        hooks.append(router.register_forward_hook(lambda _m, _i, out: seen.append(out[2])))
        try:
            _logits(adapter, model, ids)
        finally:
            for h in hooks:
                h.remove()
        return seen[0]

    assert (chosen(False) == 3).any(), "without the mask, the bias makes expert 3 a choice"
    assert not (chosen(True) == 3).any()


# ------------------------------------------------------------------ per-expert router tensors


@pytest.mark.parametrize(
    ("model_type", "path"),
    [
        ("deepseek_v3", "router.e_score_correction_bias"),
        ("gpt_oss", "router.bias"),
        ("lfm2_moe", "block.expert_bias"),
        ("ernie4_5_moe", "router.moe_statics.e_score_correction_bias"),
    ],
)
def test_prune_slices_bias_buffers_with_their_rows(model_type, path):
    from pipeline.families.decoder import resolve

    adapter, model, ids = _tiny(model_type)
    spec = adapter.spec
    before = {ly.name: resolve(path, ly.module, spec.router).clone() for ly in adapter.sparse_layers(model)}
    _merge(model, adapter, _pairs)
    merged_out = _logits(adapter, model, ids)
    set_router_mode(model, adapter, "prune")
    for ly in adapter.sparse_layers(model):
        kept = adapter.merged_routing(ly)["dominant"]
        after = resolve(path, ly.module, spec.router)
        assert after.shape[-1] == len(kept)
        torch.testing.assert_close(after, before[ly.name].index_select(-1, torch.tensor(kept)))
    assert _logits(adapter, model, ids).shape == merged_out.shape


def test_group_limited_prune_needs_the_same_count_in_every_routing_group():
    adapter, model, _ = _tiny("deepseek_v3")  # 8 experts in 2 routing groups of 4
    # Group 0 keeps experts 0-3 merged into two, group 1 keeps 4-7 merged into one.
    _merge(model, adapter, lambda n: [[0, 1], [2, 3], [4, 5, 6, 7]])
    refused = router_mode_refusals(model, adapter)
    assert "keeps [2, 1] experts of the router's 2 routing groups" in refused["prune"]
    with pytest.raises(ModelStructureError, match="group-limited routing needs the same number"):
        set_router_mode(model, adapter, "prune")


# ------------------------------------------------------------------ expert layouts


@pytest.mark.parametrize(
    "layout",
    [
        FusedLayout(),
        FusedLayout(transposed=True),
        FusedLayout(transposed=True, interleaved=True, bias=True),
        FusedLayout(gated=False),
        FusedLayout(interleaved=True),
    ],
    ids=lambda lay: lay.name,
)
def test_layout_reads_back_what_it_writes(layout):
    torch.manual_seed(0)
    n, h, i = 3, 8, 5
    width = 2 * i if layout.gated else i
    experts = torch.nn.Module()
    in_shape = (n, h, width) if layout.transposed else (n, width, h)
    experts.register_parameter(layout.in_name, torch.nn.Parameter(torch.randn(in_shape)))
    out_shape = (n, i, h) if layout.transposed else (n, h, i)
    experts.register_parameter("down_proj", torch.nn.Parameter(torch.randn(out_shape)))
    if layout.bias:
        experts.register_parameter(f"{layout.in_name}_bias", torch.nn.Parameter(torch.randn(n, width)))
        experts.register_parameter("down_proj_bias", torch.nn.Parameter(torch.randn(n, h)))
    w = {k: v.clone() for k, v in layout.read(experts, 1).items()}
    assert set(w) == set(layout.keys())
    assert w["up"].shape == (i, h) and w["down"].shape == (h, i)
    layout.write(experts, 2, w)
    for k, v in layout.read(experts, 2).items():
        torch.testing.assert_close(v, w[k])
    # A gated interleaved layout alternates gate and up neuron by neuron.
    if layout.gated and layout.interleaved:
        raw = getattr(experts, layout.in_name)[1]
        first = raw[:, 0] if layout.transposed else raw[0]
        torch.testing.assert_close(first, w["gate"][0])


def test_gpt_oss_merged_experts_keep_the_stock_layout_and_clamped_activation():
    adapter, model, ids = _tiny("gpt_oss")
    layer = adapter.sparse_layers(model)[0]
    layout = adapter._layout(layer.module.experts)
    assert layout.name == "fused-transposed-interleaved-bias"
    assert adapter._activation(layer.module.experts).kind == "clamped-swiglu"
    x = torch.randn(5, model.config.hidden_size)
    gate_up = x @ layer.module.experts.gate_up_proj[1] + layer.module.experts.gate_up_proj_bias[1]
    stock = layer.module.experts._apply_gate(gate_up) @ layer.module.experts.down_proj[1]
    stock = stock + layer.module.experts.down_proj_bias[1]
    torch.testing.assert_close(adapter.expert_output(layer, 1, x), stock, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ storage dtype


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_bf16_save_and_reload_keep_bf16_and_the_logits(model_type, tmp_path):
    from pipeline.compression import compress_model

    adapter, model, ids = _tiny(model_type, dtype=torch.bfloat16)

    def same(a, b):
        # bf16 tolerances: a reloaded model may pick another (equally exact) kernel for its experts.
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1.6e-2)

    save_model(model, tmp_path / "stock")
    reloaded = load_model(tmp_path / "stock")
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    same(_logits(adapter, reloaded, ids), _logits(adapter, model, ids))

    _merge(model, adapter, _pairs)
    save_model(model, tmp_path / "merged")
    merged = load_model(tmp_path / "merged")
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    same(_logits(adapter, merged, ids), _logits(adapter, model, ids))

    pruned = copy.deepcopy(model)
    set_router_mode(pruned, adapter, "prune")
    save_model(pruned, tmp_path / "pruned")
    stock = adapter.model_class().from_pretrained(str(tmp_path / "pruned")).eval()
    assert next(stock.parameters()).dtype == torch.bfloat16
    same(_logits(adapter, stock, ids), _logits(adapter, pruned, ids))

    compress_model(model, adapter, 4, "all")
    save_model(model, tmp_path / "compressed")
    compressed = load_model(tmp_path / "compressed")
    assert {p.dtype for p in compressed.parameters()} == {torch.bfloat16}
    same(_logits(adapter, compressed, ids), _logits(adapter, model, ids))
