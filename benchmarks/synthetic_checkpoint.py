"""A random Mixtral-shaped bf16 checkpoint, written shard by shard (never whole in memory).

The tensors are named as Mixtral checkpoints on the Hub name them (``block_sparse_moe.experts.N.w1``,
what ``MixtralForCausalLM.save_pretrained`` writes), so reading it exercises transformers' key
conversion as a real Mixtral does. Shards are planned from the shapes first, then each is filled
with freshly drawn tensors and written with ``safetensors.torch.save_file``; the index lists every
tensor with the total size. At most one shard of tensors is in memory.

    python -m benchmarks.synthetic_checkpoint --out /tmp/mixtral-24 --layers 24   # ~9.7 GB
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

DEFAULTS = dict(
    hidden=2048, layers=24, experts=8, intermediate=4096, vocab=4096, heads=16, kv_heads=4, top_k=2
)


def mixtral_config(
    hidden: int,
    layers: int,
    experts: int,
    intermediate: int,
    vocab: int,
    heads: int,
    kv_heads: int,
    top_k: int,
):
    """The ``MixtralConfig`` of the synthetic checkpoint (bf16, untied output layer)."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )


def tensor_shapes(
    hidden: int,
    layers: int,
    experts: int,
    intermediate: int,
    vocab: int,
    heads: int,
    kv_heads: int,
    names: str = "hub",
):
    """Every tensor of the checkpoint in order, with its shape.

    ``names="hub"``: Mixtral's Hub naming (one ``w1``/``w2``/``w3`` per expert), which loaders
    convert; ``"transformers"``: the names and fused expert tensors of transformers 5's own
    ``state_dict`` (read from a meta-device model), which loaders take as they are.
    """
    if names == "transformers":
        from transformers import MixtralForCausalLM

        config = mixtral_config(hidden, layers, experts, intermediate, vocab, heads, kv_heads, 2)
        with torch.device("meta"):
            return [(k, tuple(v.shape)) for k, v in MixtralForCausalLM(config).state_dict().items()]
    if names != "hub":
        raise ValueError(f"unknown tensor naming {names!r}; valid: hub, transformers")
    head_dim = hidden // heads
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.self_attn.q_proj.weight", (heads * head_dim, hidden)),
            (f"{p}.self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
            (f"{p}.self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, heads * head_dim)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
            (f"{p}.block_sparse_moe.gate.weight", (experts, hidden)),
        ]
        for e in range(experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            out += [
                (f"{q}.w1.weight", (intermediate, hidden)),
                (f"{q}.w2.weight", (hidden, intermediate)),
                (f"{q}.w3.weight", (intermediate, hidden)),
            ]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return out


def _draw(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    # Unit-scale routers route decisively; 0.02 is the usual init of the other matrices.
    std = 1.0 if name.endswith((".block_sparse_moe.gate.weight", ".mlp.gate.weight")) else 0.02
    if len(shape) < 3:
        return (torch.randn(shape, generator=gen, dtype=torch.float32) * std).to(torch.bfloat16)
    # A fused experts tensor, one expert at a time: no float32 copy of the whole of it.
    t = torch.empty(shape, dtype=torch.bfloat16)
    for e in range(shape[0]):
        t[e] = (torch.randn(shape[1:], generator=gen, dtype=torch.float32) * std).to(torch.bfloat16)
    return t


def write_checkpoint(
    out: str | Path,
    hidden: int = DEFAULTS["hidden"],
    layers: int = DEFAULTS["layers"],
    experts: int = DEFAULTS["experts"],
    intermediate: int = DEFAULTS["intermediate"],
    vocab: int = DEFAULTS["vocab"],
    heads: int = DEFAULTS["heads"],
    kv_heads: int = DEFAULTS["kv_heads"],
    top_k: int = DEFAULTS["top_k"],
    shard_size: int = 1_000_000_000,
    seed: int = 0,
    names: str = "hub",
) -> dict:
    """Write the checkpoint into the folder ``out``; returns its shape, bytes and seconds.

    ``names``: the tensor naming, ``hub`` or ``transformers`` (see :func:`tensor_shapes`).
    """
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = mixtral_config(hidden, layers, experts, intermediate, vocab, heads, kv_heads, top_k)
    config.save_pretrained(str(out))
    shapes = tensor_shapes(hidden, layers, experts, intermediate, vocab, heads, kv_heads, names)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        n = 2 * torch.Size(shape).numel()
        if shards[-1] and size + n > shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _draw(name, shape, gen) for name, shape in shard}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {
        "hidden": hidden,
        "layers": layers,
        "experts": experts,
        "intermediate": intermediate,
        "vocab": vocab,
        "bytes": total,
        "shards": len(shards),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write")
    for key, value in DEFAULTS.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    p.add_argument("--shard-size", type=int, default=1_000_000_000, help="bytes per shard (default 1 GB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--names", choices=("hub", "transformers"), default="hub", help="tensor naming")
    args = p.parse_args(argv)
    info = write_checkpoint(
        args.out,
        **{k: getattr(args, k) for k in DEFAULTS},
        shard_size=args.shard_size,
        seed=args.seed,
        names=args.names,
    )
    print(json.dumps(info))


if __name__ == "__main__":
    main()
