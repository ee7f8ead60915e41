"""The decoder families' whole recipe on one device, in bf16: what CPU tests cannot show.

For each family a Mixtral-sized-down SMoE is built from config on the device, trained a few steps
with bf16 autocast, then profiled, aligned, grouped, merged (every router mode), compressed, pruned
during KD, saved, re-loaded (and, for a uniform prune-mode merge, loaded by stock transformers),
and scored by perplexity, zero-shot choice accuracy, speed and FLOPs. It prints one JSON line per
family with the timings and figures, and fails loudly on the first device or dtype error.

    python -m benchmarks.decoder_device_check --device cuda --dtype bfloat16
    python -m benchmarks.decoder_device_check --quick     # tiny sizes, CPU, float32
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time

import torch

from benchmarks.common import write_results

SIZES = {
    "full": {"hidden_size": 1024, "intermediate_size": 2816, "moe_intermediate_size": 1408, "layers": 4},
    "quick": {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 64, "layers": 3},
}


def family_configs(size: dict, vocab: int) -> dict[str, dict]:
    base = {
        "vocab_size": vocab,
        "hidden_size": size["hidden_size"],
        "num_hidden_layers": size["layers"],
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 512,
    }
    moe = {"moe_intermediate_size": size["moe_intermediate_size"], "decoder_sparse_step": 1}
    return {
        "mixtral": {**base, "intermediate_size": size["intermediate_size"], "num_local_experts": 8},
        "qwen2_moe": {
            **base,
            **moe,
            "intermediate_size": size["intermediate_size"],
            "shared_expert_intermediate_size": size["intermediate_size"],
            "num_experts": 8,
        },
        "qwen3_moe": {**base, **moe, "intermediate_size": size["intermediate_size"], "num_experts": 8},
        "olmoe": {**base, "intermediate_size": size["moe_intermediate_size"], "num_experts": 8},
    }


def run_family(family: str, cfg: dict, device: torch.device, dtype: str, n_rows: int, block: int) -> dict:
    from transformers import AutoModelForCausalLM

    from pipeline.align import align_model
    from pipeline.compression import SparsePruner, compress_model, finalize_compact
    from pipeline.evaluation import expert_stats, speed_and_flops
    from pipeline.families import adapter_for
    from pipeline.grouping import LayerData, group_experts, merged_layer_names
    from pipeline.merging import merge_model
    from pipeline.modeling import build_model, load_model, save_model
    from pipeline.profiling import profile_routing
    from pipeline.routing import ROUTER_MODES, set_router_mode
    from pipeline.training import KDSettings, TrainSettings, perplexity_metric, train
    from pipeline.zeroshot import ChoiceExample, choice_accuracy

    t: dict[str, float] = {}
    out: dict = {"family": family, "device": str(device), "dtype": dtype}
    vocab = cfg["vocab_size"]
    g = torch.Generator().manual_seed(0)
    # Token streams a model can learn in a few steps: each block repeats one of 8 fixed motifs.
    motifs = [torch.randint(2, vocab, (16,), generator=g) for _ in range(8)]
    rows = []
    for i in range(n_rows):
        ids = motifs[i % 8].repeat(block // 16).tolist()
        rows.append({"input_ids": ids, "labels": ids, "label": 0})
    train_rows, dev_rows = rows[: n_rows * 3 // 4], rows[n_rows * 3 // 4 :]

    t0 = time.perf_counter()
    full = build_model(family, cfg, vocab, 0, 1, 0.02, 0).to(device)
    ppl = perplexity_metric(dev_rows, 0, 16, device, dtype)
    out["ppl_init"] = ppl.compute(full)
    settings = TrainSettings(2, 8, 16, 5e-4, 0.0, 5, 1.0, 1e-3, 1e-2, 1.0)
    train(full, train_rows, dev_rows, [], 0, settings, device, dtype, progress=False, dev_metric=ppl)
    out["ppl_full"] = ppl.compute(full)
    t["train"] = time.perf_counter() - t0

    adapter = adapter_for(full)
    t0 = time.perf_counter()
    profiles = profile_routing(full, train_rows[:32], 0, 8, device)
    t["profile"] = time.perf_counter() - t0
    model = copy.deepcopy(full)
    t0 = time.perf_counter()
    align_model(model, adapter, "weight-matching", "first")
    t["align"] = time.perf_counter() - t0
    layers = adapter.sparse_layers(model)
    names = merged_layer_names([(ly.name, ly.stack) for ly in layers], True, "decoder")
    data = {
        ly.name: LayerData(
            ly.name,
            profiles[ly.name].router_logits,
            adapter.router_weight(ly).float().cpu(),
            [{k: v.float().cpu() for k, v in adapter.expert_weights(ly, e).items()} for e in range(8)],
        )
        for ly in layers
        if ly.name in names
    }
    freqs = {n: p.frequency for n, p in profiles.items()}
    t0 = time.perf_counter()
    groups = group_experts(data, freqs, names, 4, "router-logits")
    merge_model(model, adapter, groups, profiles, "frequency")
    t["group_merge"] = time.perf_counter() - t0
    out["ppl_merged"] = ppl.compute(model)
    for mode in ROUTER_MODES.names():
        if mode != "remap":
            variant = copy.deepcopy(model)
            set_router_mode(variant, adapter, mode)
            out[f"ppl_merged_{mode}"] = ppl.compute(variant)

    # A uniform prune-mode merge of every layer must load in stock transformers and match.
    uniform = copy.deepcopy(full)
    all_names = [ly.name for ly in adapter.sparse_layers(uniform)]
    spec = {"layers": {n: {"merged": True, "groups": [[0, 1], [2, 3], [4, 5], [6, 7]]} for n in all_names}}
    merge_model(uniform, adapter, spec, profiles, "frequency")
    set_router_mode(uniform, adapter, "prune")
    with tempfile.TemporaryDirectory() as tmp:
        save_model(uniform, tmp)
        stock = AutoModelForCausalLM.from_pretrained(tmp).to(device).eval()
        ids = torch.tensor([r["input_ids"] for r in dev_rows[:4]], device=device)
        with torch.no_grad():
            diff = (stock(input_ids=ids).logits - uniform.eval()(input_ids=ids).logits).abs().max()
        out["stock_load_max_abs_diff"] = float(diff)

    t0 = time.perf_counter()
    compress_model(model, adapter, max(8, cfg["hidden_size"] // 32), "all")
    pruner = SparsePruner(model, 0.1, 0.04, 0.16)
    kd = KDSettings(full, 0.2, 2.0)
    train(
        model,
        train_rows,
        dev_rows,
        [],
        0,
        settings,
        device,
        dtype,
        kd=kd,
        step_hook=pruner,
        eligible_from=pruner.final_step,
        progress=False,
        dev_metric=ppl,
    )
    finalize_compact(model)
    t["compress_kd"] = time.perf_counter() - t0
    out["s_kept_fraction"] = round(pruner.kept_fraction(), 4)
    out["ppl_mc_smoe"] = ppl.compute(model)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model.cpu(), tmp)
        reloaded = load_model(tmp).to(device)
    model.to(device)
    out["ppl_mc_smoe_reloaded"] = ppl.compute(reloaded)
    out["expert_params_full"] = expert_stats(full)["expert_params"]
    out["expert_params_mc_smoe"] = expert_stats(reloaded)["expert_params"]

    class Tok:  # token ids are the text: enough for scoring fixed continuations
        bos_token_id = None
        eos_token_id = 1
        pad_token_id = 0

        def __call__(self, texts, add_special_tokens=False):
            if isinstance(texts, str):
                return {"input_ids": [int(x) for x in texts.split()]}
            return {"input_ids": [[int(x) for x in t.split()] for t in texts]}

    motif = [str(x) for x in dev_rows[0]["input_ids"][:16]]
    examples = [
        ChoiceExample((" ".join(motif * 2),) * 2, (" ".join(motif[:4]), " ".join(motif[4:8][::-1])), 0)
    ] * 8
    out["choice_accuracy_mc_smoe"] = choice_accuracy(reloaded, Tok(), examples, 4, device, dtype)["accuracy"]
    for name, m in (("full", full), ("mc_smoe", reloaded)):
        s = speed_and_flops(m, dev_rows, None, 0, 16, 2, device, dtype)
        out[f"{name}_tokens_per_s"] = round(s["tokens_per_s"])
        out[f"{name}_gflops_per_sample"] = round(s["gflops_per_sample"], 3)
    out["seconds"] = {k: round(v, 2) for k, v in t.items()}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a CPU smoke run")
    p.add_argument("--families", nargs="*", default=None)
    p.add_argument("--out", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    size = SIZES["quick" if args.quick else "full"]
    configs = family_configs(size, 512 if args.quick else 32000)
    results = []
    for family in args.families or list(configs):
        res = run_family(
            family, configs[family], device, dtype, 48 if args.quick else 256, 64 if args.quick else 256
        )
        print(json.dumps(res), flush=True)
        results.append(res)
    if args.out:
        write_results(results, args.out)


if __name__ == "__main__":
    main()
