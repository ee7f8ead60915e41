"""The README's recipe for a checkpoint bigger than memory, run as written on a tiny one.

A Hub-named bf16 Mixtral in several shards (per-expert ``w1``/``w2``/``w3`` tensors, as the Hub
stores Mixtral-8x7B) goes through: a streamed conversion to the model's own names, the ``profile``
stage with its weights on disk, then ``align``, ``group``, ``merge`` and ``compress`` with
``runtime.streaming``. The merge stage keeps every router row (its model is KD's student, and
``kd_finetune`` prunes them, which needs the whole model); the servable M-SMoE is the same merge
streamed with pruned rows, which stock transformers loads in bf16 and which computes what the merge
stage's model computes with its router pruned in memory.
"""

from __future__ import annotations

import json

import torch
import yaml

from benchmarks.synthetic_checkpoint import write_checkpoint
from pipeline.data import train_bpe_tokenizer
from pipeline.families import adapter_for
from pipeline.modeling import load_model
from pipeline.routing import set_router_mode
from pipeline.streaming import stream_merge
from tests.test_big_model_stages import stored_dtypes
from tests.test_llm_stages import _params


def test_recipe_merges_a_hub_checkpoint_into_one_stock_transformers_serves(tmp_path, data_dir):
    from transformers import AutoModelForCausalLM

    from stages import align, compress, group, merge, prepare, profile

    text = (data_dir / "wikitext-2" / "valid.txt").read_text().splitlines()[:2000]
    tok = train_bpe_tokenizer(text, 400, [])
    hub = tmp_path / "hub"
    write_checkpoint(hub, hidden=32, layers=3, experts=4, intermediate=48, vocab=len(tok), heads=4,
                     kv_heads=2, top_k=2, shard_size=40_000, names="hub")  # fmt: skip
    tok.save_pretrained(str(hub))
    assert len(list(hub.glob("*.safetensors"))) > 2
    assert any(
        ".block_sparse_moe.experts.0.w1." in k
        for k in json.loads((hub / "model.safetensors.index.json").read_text())["weight_map"]
    )

    p = yaml.safe_load(_params(tmp_path, hub).read_text())
    p["runtime"].update(streaming=True, device_map="auto", max_memory={"cpu": "30KB"})
    p["group"].update(ratio="uniform", skip_first_layer=False)
    p["merge"]["router"] = "prune"
    params = tmp_path / "big.yaml"
    params.write_text(yaml.safe_dump(p))
    d = tmp_path / "big"

    def run(stage, *argv):
        name = stage.__name__.split(".")[-1]
        stage.main(["--params", str(params), "--metrics", str(d / f"{name}.json"), *argv])

    run(prepare, "--out", str(d / "data"))
    stream_merge(hub, d / "full", align="none")  # the Hub's names -> the model's own, read once
    run(profile, "--data", str(d / "data"), "--model", str(d / "full"), "--out", str(d / "profile"))
    run(align, "--data", str(d / "data"), "--model", str(d / "full"), "--profile", str(d / "profile"),
        "--out", str(d / "aligned"))  # fmt: skip
    run(group, "--model", str(d / "aligned"), "--profile", str(d / "profile"), "--out", str(d / "groups"))
    run(merge, "--model", str(d / "aligned"), "--profile", str(d / "profile"),
        "--groups", str(d / "groups" / "groups.json"), "--out", str(d / "merged"))  # fmt: skip
    run(compress, "--model", str(d / "merged"), "--full", str(d / "full"), "--out", str(d / "compressed"),
        "--out-c", str(d / "c_compressed"), "--aligned", str(d / "aligned"), "--profile", str(d / "profile"),
        "--groups", str(d / "groups" / "groups.json"))  # fmt: skip

    assert json.loads((d / "profile.json").read_text())["layers"]
    for name in ("full", "aligned", "merged", "compressed", "c_compressed"):
        assert stored_dtypes(d / name) == {"BF16"}, name
    stream_merge(d / "aligned", d / "m_smoe", d / "groups" / "groups.json", d / "profile", align="none",
                 strategy=p["merge"]["strategy"], router="prune")  # fmt: skip
    stock = AutoModelForCausalLM.from_pretrained(str(d / "m_smoe")).eval()
    assert stock.config.num_local_experts == 2 and stock.dtype == torch.bfloat16
    merged = load_model(d / "merged").eval()
    set_router_mode(merged, adapter_for(merged), "prune")
    ids = torch.randint(3, len(tok), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, merged(ids).logits)
