"""The decoder families this project merges, as data: one :class:`FamilySpec` each.

A family is listed here once the family walk (``pipeline.family_walk``, run by
``tests/test_family_walk.py``) passes every lossless check on a tiny random model of it; the
walk lists every other MoE model type of the installed transformers with the reason it is not.
"""

from __future__ import annotations

from pipeline.families.base import ADAPTERS
from pipeline.families.decoder import DecoderAdapter, FamilySpec


def _norm_flag(block, router) -> str:
    """``normalise``: "sum" when the router's ``norm_topk_prob`` flag is set, else "none"."""
    return "sum" if router.norm_topk_prob else "none"


# Qwen-style softmax top-k, renormalised per the config's norm_topk_prob.
_QWEN = {"normalise": _norm_flag}
# DeepSeek-V3-style sigmoid scores with a correction bias, group-limited choice and scaling.
_DEEPSEEK_V3 = {
    "correction": "router.e_score_correction_bias",
    "n_group": "router.num_group",
    "topk_group": "router.topk_group",
    "normalise": _norm_flag,
    "scaling": "router.routed_scaling_factor",
}
_DEEPSEEK_V3_ROWS = (("router.weight", 0), ("router.e_score_correction_bias", 0))
# Attention with low-rank (MLA) projections, sized down for the walk.
_MLA_TINY = {
    "kv_lora_rank": 8,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 4,
    "qk_head_dim": 8,
    "head_dim": 4,
    "v_head_dim": 8,
}
# Hybrid linear-attention stacks need one full-attention layer among the two.
_HYBRID_TINY = {"layer_types": ["linear_attention", "full_attention"]}
# Group-limited sigmoid routing scores a group by its two best experts: after a uniform 2:1
# merge each of the 2 routing groups must still hold 2, so these tiny models have 8 experts.
_GROUPED_TINY = {"n_routed_experts": 8}


def _v2_groups(block, router) -> int:
    return router.num_group if router.topk_method == "group_limited_greedy" else 1


SPECS: list[FamilySpec] = [
    FamilySpec(
        "mixtral",
        "MixtralForCausalLM",
        "MixtralConfig",
        "MixtralSparseMoeBlock",
        params={"normalise": "sum"},
        config_experts="num_local_experts",
    ),
    FamilySpec(
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
        "Qwen2MoeConfig",
        "Qwen2MoeSparseMoeBlock",
        params=_QWEN,
        shared=("shared_expert", "shared_expert_gate"),
    ),
    FamilySpec("qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeConfig", "Qwen3MoeSparseMoeBlock", params=_QWEN),
    FamilySpec(
        "qwen3_next",
        "Qwen3NextForCausalLM",
        "Qwen3NextConfig",
        "Qwen3NextSparseMoeBlock",
        params=_QWEN,
        shared=("shared_expert", "shared_expert_gate"),
        tiny=_HYBRID_TINY,
    ),
    FamilySpec(
        "qwen3_5_moe_text",
        "Qwen3_5MoeForCausalLM",
        "Qwen3_5MoeTextConfig",
        "Qwen3_5MoeSparseMoeBlock",
        module="transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
        params={"normalise": "sum"},
        shared=("shared_expert", "shared_expert_gate"),
        tiny=_HYBRID_TINY,
    ),
    FamilySpec("olmoe", "OlmoeForCausalLM", "OlmoeConfig", "OlmoeSparseMoeBlock", params=_QWEN),
    FamilySpec("flex_olmo", "FlexOlmoForCausalLM", "FlexOlmoConfig", "FlexOlmoSparseMoeBlock", params=_QWEN),
    FamilySpec(
        "minimax",
        "MiniMaxForCausalLM",
        "MiniMaxConfig",
        "MiniMaxSparseMoeBlock",
        params={"normalise": "sum"},
        config_experts="num_local_experts",
    ),
    FamilySpec(
        "jamba",
        "JambaForCausalLM",
        "JambaConfig",
        "JambaSparseMoeBlock",
        router="router",
        tiny={
            "attn_layer_period": 2,
            "attn_layer_offset": 1,
            "expert_layer_period": 1,
            "expert_layer_offset": 0,
        },
    ),
    FamilySpec(
        "hunyuan_v1_moe",
        "HunYuanMoEV1ForCausalLM",
        "HunYuanMoEV1Config",
        "HunYuanMoEV1Moe",
        params={"normalise": "sum"},
        rows=(("router.wg.weight", 0),),
        config_top_k="moe_topk",
        shared=("shared_mlp",),
    ),
    FamilySpec(
        "ernie4_5_moe",
        "Ernie4_5_MoeForCausalLM",
        "Ernie4_5_MoeConfig",
        "Ernie4_5_MoeSparseMoeBlock",
        params={
            "normalise": "sum",
            "norm_min": "router.norm_min",
            "correction": "router.moe_statics.e_score_correction_bias",
        },
        rows=(("router.weight", 0), ("router.moe_statics.e_score_correction_bias", -1)),
        shared=("shared_experts",),
    ),
    FamilySpec(
        "granitemoe",
        "GraniteMoeForCausalLM",
        "GraniteMoeConfig",
        "GraniteMoeMoE",
        router="router",
        semantics="topk-softmax",
        config_experts="num_local_experts",
    ),
    FamilySpec(
        "granitemoeshared",
        "GraniteMoeSharedForCausalLM",
        "GraniteMoeSharedConfig",
        "GraniteMoeSharedMoE",
        router="router",
        semantics="topk-softmax",
        config_experts="num_local_experts",
        note="its shared MLP sits in the decoder layer, outside the block, and is left as it is",
    ),
    FamilySpec(
        "gpt_oss",
        "GptOssForCausalLM",
        "GptOssConfig",
        "GptOssMLP",
        router="router",
        semantics="topk-softmax",
        rows=(("router.weight", 0), ("router.bias", 0)),
        activation="clamped-swiglu",
        config_experts="num_local_experts",
    ),
    FamilySpec(
        "phimoe",
        "PhimoeForCausalLM",
        "PhimoeConfig",
        "PhimoeSparseMoeBlock",
        router="router",
        semantics="sparsemixer",
        params={"jitter_eps": "router.router_jitter_noise"},
        config_experts="num_local_experts",
    ),
    FamilySpec(
        "dbrx",
        "DbrxForCausalLM",
        "DbrxConfig",
        "DbrxFFN",
        router="router",
        output="logits",
        params={"normalise": "pnorm", "pnorm": "block.moe_normalize_expert_weights"},
        rows=(("router.layer.weight", 0),),
        counts=("experts.num_experts", "experts.mlp.moe_num_experts"),
        top_k=("block.top_k",),
        layout="flat",
        config_widths=("d_model", "ffn_config.ffn_hidden_size"),
        config_experts="ffn_config.moe_num_experts",
        config_top_k="ffn_config.moe_top_k",
        # DbrxConfig's default attention config lacks the rope_theta its model reads.
        tiny={
            "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
            "ffn_config": {"ffn_hidden_size": 48, "moe_num_experts": 4, "moe_top_k": 2, "hidden_size": 32},
        },
    ),
    FamilySpec(
        "llama4_text",
        "Llama4ForCausalLM",
        "Llama4TextConfig",
        "Llama4TextMoe",
        module="transformers.models.llama4.modeling_llama4",
        router="router",
        output="dense-scores",
        semantics="sigmoid-top-logits",
        layout="fused-transposed",
        convention="slots",
        config_experts="num_local_experts",
        shared=("shared_expert",),
    ),
    FamilySpec(
        "deepseek_v2",
        "DeepseekV2ForCausalLM",
        "DeepseekV2Config",
        "DeepseekV2Moe",
        params={
            "n_group": _v2_groups,
            "topk_group": "router.topk_group",
            "scaling": "router.routed_scaling_factor",
        },
        shared=("shared_experts",),
        tiny=_MLA_TINY,
    ),
    FamilySpec(
        "deepseek_v3",
        "DeepseekV3ForCausalLM",
        "DeepseekV3Config",
        "DeepseekV3MoE",
        semantics="sigmoid-topk",
        params=_DEEPSEEK_V3,
        rows=_DEEPSEEK_V3_ROWS,
        config_experts="num_local_experts",
        shared=("shared_experts",),
        tiny={**_MLA_TINY, **_GROUPED_TINY},
    ),
    FamilySpec(
        "glm4_moe",
        "Glm4MoeForCausalLM",
        "Glm4MoeConfig",
        "Glm4MoeMoE",
        semantics="sigmoid-topk",
        params=_DEEPSEEK_V3,
        rows=_DEEPSEEK_V3_ROWS,
        config_experts="num_local_experts",
        shared=("shared_experts",),
        tiny=_GROUPED_TINY,
    ),
    FamilySpec(
        "dots1",
        "Dots1ForCausalLM",
        "Dots1Config",
        "Dots1MoE",
        semantics="sigmoid-topk",
        params=_DEEPSEEK_V3,
        rows=_DEEPSEEK_V3_ROWS,
        config_experts="num_local_experts",
        shared=("shared_experts",),
        tiny=_GROUPED_TINY,
    ),
    FamilySpec(
        "exaone_moe",
        "ExaoneMoeForCausalLM",
        "ExaoneMoeConfig",
        "ExaoneMoeSparseMoEBlock",
        semantics="sigmoid-topk",
        params=_DEEPSEEK_V3,
        rows=_DEEPSEEK_V3_ROWS,
        shared=("shared_experts",),
        tiny={"num_experts": 8},
    ),
    FamilySpec(
        "lfm2_moe",
        "Lfm2MoeForCausalLM",
        "Lfm2MoeConfig",
        "Lfm2MoeSparseMoeBlock",
        semantics="sigmoid-topk",
        params={
            "correction": lambda block, _router: block.expert_bias if block.use_expert_bias else None,
            "normalise": _norm_flag,
            "norm_eps": 1e-6,
            "scaling": "router.routed_scaling_factor",
        },
        rows=(("router.weight", 0), ("block.expert_bias", 0)),
        tiny={"num_dense_layers": 0, "layer_types": ["full_attention", "conv"]},
    ),
]

for _spec in SPECS:
    ADAPTERS.register(_spec.model_type)(DecoderAdapter(_spec))
