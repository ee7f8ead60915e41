"""Layer-streamed align -> merge -> compress (pipeline/streaming.py) against the in-memory path.

Every checkpoint here is a tiny random model saved by ``save_pretrained`` with a small
``max_shard_size`` (several shards, the Hub's key naming), in bfloat16.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pipeline.align import align_model
from pipeline.assignment import SolverSettings
from pipeline.compression import compress_model
from pipeline.families import ADAPTERS, adapter_for
from pipeline.family_walk import tiny_config
from pipeline.merging import merge_model
from pipeline.modeling import CheckpointError, load_model, save_model
from pipeline.profiling import save_profile
from pipeline.routing import set_router_mode
from pipeline.shards import ShardWriter
from pipeline.streaming import stream_merge
from tests.conftest import profiles_for

ROOT = Path(__file__).resolve().parents[1]


def _config(family: str, layers: int, **overrides):
    adapter = ADAPTERS.get(family)
    base = tiny_config(family, adapter).to_dict()
    base.pop("layer_types", None)  # rebuilt for the new depth
    return type(tiny_config(family, adapter))(**{**base, "num_hidden_layers": layers, **overrides})


def write_checkpoint(
    folder: Path, family: str, layers: int = 3, shard: str = "20KB", seed: int = 0, **cfg
) -> Path:
    """A random bf16 model of ``family`` saved in shards by stock ``save_pretrained``."""
    torch.manual_seed(seed)
    model = ADAPTERS.get(family).model_class()(_config(family, layers, **cfg)).to(torch.bfloat16)
    with torch.no_grad():  # decisive routers: top-k choices far from ties
        for ly in adapter_for(model).sparse_layers(model):
            for p in adapter_for(model).router(ly).parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 1.0)
    model.save_pretrained(str(folder), max_shard_size=shard)
    return folder


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def in_memory(src: Path, out: Path, groups, profiles, *, strategy, router, rank=None, scope="merged"):
    """What the align, merge and compress stages do to the whole model; saved like they save it."""
    model = load_model(src)
    adapter = adapter_for(model)
    freqs = {n: p.frequency for n, p in profiles.items()}
    align_model(model, adapter, "weight-matching", "first", freqs, {})
    if groups is not None:
        merge_model(model, adapter, groups, profiles, strategy)
        set_router_mode(model, adapter, router)
    if rank is not None:
        compress_model(model, adapter, rank, scope)
    save_model(model, out)
    return model


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(0))


CASES = {
    # Every layer 4 -> 2 experts, router pruned: a plain model stock transformers loads.
    "uniform-prune": dict(
        groups=lambda names: {n: [[0, 2], [1, 3]] for n in names},
        strategy="frequency",
        router="prune",
        rank=None,
    ),
    # First layer kept, uneven groups, router remapped, every layer compressed (C-SMoE's scope).
    "uneven-remap-compress": dict(
        groups=lambda names: {names[1]: [[1, 0, 2], [3]], names[2]: [[2], [0, 3], [1]]},
        strategy="frequency",
        router="remap",
        rank=4,
        scope="all",
    ),
}


def _groups(names: list[str], spec: dict[str, list[list[int]]]) -> dict:
    layers = {n: {"merged": False, "groups": [[e] for e in range(4)]} for n in names}
    layers.update({n: {"merged": True, "groups": g} for n, g in spec.items()})
    return {"layers": layers}


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("case", list(CASES))
def test_streamed_equals_in_memory(tmp_path, family, case):
    c = CASES[case]
    src = write_checkpoint(tmp_path / "in", family)
    assert len(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]) > 10
    assert len(list(src.glob("*.safetensors"))) >= 3
    probe = load_model(src)
    names = [ly.name for ly in adapter_for(probe).sparse_layers(probe)]
    groups = _groups(names, c["groups"](names))
    profiles = profiles_for(names, n_experts=4)
    kw = dict(strategy=c["strategy"], router=c["router"], rank=c["rank"], scope=c.get("scope", "merged"))
    ref = in_memory(src, tmp_path / "mem", groups, profiles, **kw)
    (tmp_path / "profile").mkdir()
    save_profile(profiles, tmp_path / "profile")
    report = stream_merge(src, tmp_path / "str", groups, tmp_path / "profile", max_shard_size="30KB", **kw)
    out = tmp_path / "str"
    a, b = weights(tmp_path / "mem"), weights(out)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == (torch.bool if a[k].dtype == torch.bool else a[k].dtype), k
        assert torch.equal(a[k], b[k]), k
    assert {t.dtype for t in b.values() if t.is_floating_point()} == {torch.bfloat16}
    # Structure and config as save_model writes them.
    mem_structure = tmp_path / "mem" / "smoe_structure.json"
    assert json.loads((out / "smoe_structure.json").read_text()) == json.loads(mem_structure.read_text())
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (tmp_path / "mem" / "config.json").read_text()
    )
    # Shards within the size and a correct index.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) == report["shards"] > 1 and shards == {p.name for p in out.glob("*.safetensors")}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in b.values())
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as f:
            keys = list(f.keys())
            size = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys)
        assert all(index["weight_map"][k] == shard for k in keys)
        assert size <= 30_000 or len(keys) == 1
    # load_model reads the streamed result back as the in-memory model.
    loaded = load_model(out)
    ids = _ids(loaded.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref(ids).logits, rtol=0, atol=0)
    assert set(report["layers"]) == set(names)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_uniform_pruned_loads_in_stock_transformers(tmp_path, family):
    from transformers import AutoModelForCausalLM

    src = write_checkpoint(tmp_path / "in", family, seed=1)
    probe = load_model(src)
    names = [ly.name for ly in adapter_for(probe).sparse_layers(probe)]
    groups = _groups(names, {n: [[3, 1], [0, 2]] for n in names})
    in_memory(src, tmp_path / "mem", groups, profiles_for(names, 4), strategy="dominant", router="prune")
    report = stream_merge(src, tmp_path / "str", groups, None, strategy="dominant", router="prune")
    assert report["stock_config_overrides"] is not None
    stock = AutoModelForCausalLM.from_pretrained(str(tmp_path / "str")).eval()
    ours = load_model(tmp_path / "mem")
    assert next(stock.parameters()).dtype == torch.bfloat16
    assert adapter_for(stock).num_experts(adapter_for(stock).sparse_layers(stock)[0]) == 2
    ids = _ids(stock.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, ours(ids).logits, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ memory

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    from benchmarks.streamed_merge import PeakRSS, cheap_groups
    from pipeline.streaming import stream_merge
    src, warm, out = sys.argv[1:4]
    kw = dict(align="none", strategy="frequency", router="remap", max_shard_size="16MB")
    # Imports and lazily loaded code first, on a one-layer model of the same shapes.
    stream_merge(warm, out + "-warm", cheap_groups(warm, 4), None, **kw)
    groups = cheap_groups(src, 4)
    with PeakRSS(interval=0.005) as peak:
        stream_merge(src, out, groups, None, **kw)
    print(json.dumps({"rise": peak.peak - peak.start}))
    """
)


def test_peak_memory_is_bounded_by_layer_size_not_depth(tmp_path):
    """A streamed merge of a 12-layer model stays under a bound computed from one layer's size (plus
    a constant for lazily built state), which the model as a whole is far above. (Weight matching
    adds a constant of its own, its worker thread's heap: benchmarks/streamed_merge.py measures
    the whole recipe.)"""
    from benchmarks.synthetic_checkpoint import write_checkpoint as synthetic

    shape = dict(hidden=256, experts=8, intermediate=1024, vocab=256, heads=4, kv_heads=2)
    synthetic(tmp_path / "deep", layers=12, shard_size=8_000_000, **shape)
    synthetic(tmp_path / "warm", layers=1, shard_size=8_000_000, **shape)
    layer_bytes = shape["experts"] * 3 * shape["hidden"] * shape["intermediate"] * 2  # bf16
    model_bytes = sum(p.stat().st_size for p in (tmp_path / "deep").glob("*.safetensors"))
    bound = 4 * layer_bytes + 48 * 2**20
    assert model_bytes > 1.5 * bound  # the bound would fail for a whole-model load
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            _MEMORY_SCRIPT,
            str(tmp_path / "deep"),
            str(tmp_path / "warm"),
            str(tmp_path / "out"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    rise = json.loads(run.stdout.strip().splitlines()[-1])["rise"]
    print(
        f"peak RSS rise {rise / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB, model {model_bytes / 2**20:.1f} MiB"
    )
    assert rise < bound, f"peak RSS rose {rise / 2**20:.1f} MiB; bound {bound / 2**20:.1f} MiB"
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1


# ------------------------------------------------------------------------------------ bad input


def _bad(tmp_path, expect: type[Exception], match: str, src: Path, groups, **kw):
    out = tmp_path / "out"
    with pytest.raises(expect, match=match) as err:
        stream_merge(src, out, groups, None, **kw)
    assert "\n" not in str(err.value)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


@pytest.fixture
def small(tmp_path):
    src = write_checkpoint(tmp_path / "in", "mixtral")
    names = [f"model.layers.{i}.mlp" for i in range(3)]
    return src, _groups(names, {n: [[0, 1], [2, 3]] for n in names})


def test_unsupported_or_unknown_method_is_refused_before_any_work(tmp_path, small):
    src, groups = small
    _bad(
        tmp_path,
        ValueError,
        r"merge.strategy=nonesuch .*supported: frequency",
        src,
        groups,
        strategy="nonesuch",
    )
    _bad(
        tmp_path,
        ValueError,
        "merge.strategy=fisher needs the profiled layer fisher",
        src,
        groups,
        strategy="fisher",
    )
    _bad(
        tmp_path,
        ValueError,
        "align.method=activation-matching needs",
        src,
        groups,
        align="activation-matching",
    )
    _bad(tmp_path, ValueError, "compress.rank=48 must be", src, groups, rank=48)


def test_missing_shard_is_refused(tmp_path, small):
    src, groups = small
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.unlink()
    _bad(
        tmp_path,
        CheckpointError,
        f"shard {shard.name} named by model.safetensors.index.json is missing",
        src,
        groups,
    )


def test_groups_of_a_layer_the_model_lacks_are_refused(tmp_path, small):
    src, groups = small
    groups["layers"]["model.layers.7.mlp"] = {"merged": True, "groups": [[0, 1], [2, 3]]}
    _bad(
        tmp_path,
        ValueError,
        "groups name layer model.layers.7.mlp, which the model does not have",
        src,
        groups,
    )


def test_corrupt_late_layer_leaves_no_output(tmp_path, small):
    """A NaN found while streaming (after earlier layers were written) still leaves no folder."""
    from safetensors.torch import load_file, save_file

    src, groups = small
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.2.block_sparse_moe.experts.1.w2.weight"
    state = load_file(str(src / index[name]))
    state[name][0, 0] = float("nan")
    save_file(state, str(src / index[name]), metadata={"format": "pt"})
    # Named as the model names it (the converted, stacked experts tensor).
    _bad(
        tmp_path, CheckpointError, "weight model.layers.2.mlp.experts.down_proj holds non-finite", src, groups
    )


def test_unconvertible_family_is_refused_by_name(tmp_path):
    """Switch Transformers is an encoder-decoder: streaming takes decoder families only."""
    from pipeline.modeling import build_model
    from tests.conftest import EOS_ID, PAD_ID, TINY, VOCAB

    build_model("switch_transformers", TINY, VOCAB, PAD_ID, EOS_ID, 0.02, 0).save_pretrained(
        str(tmp_path / "sw")
    )
    with pytest.raises(Exception, match="'switch_transformers': streaming takes decoder families"):
        stream_merge(tmp_path / "sw", tmp_path / "out", None, None)
    assert not (tmp_path / "out").exists()


def test_shard_writer_splits_and_pads_headers(tmp_path):
    w = ShardWriter(tmp_path, max_bytes=100, header_room=256)
    tensors = {f"t.{i}": torch.arange(i * 10, i * 10 + 10, dtype=torch.float32) for i in range(5)}
    tensors["flag"] = torch.tensor([True, False])
    for k, t in tensors.items():
        w.add(k, t)
    weight_map = w.finish()
    assert len(set(weight_map.values())) > 2  # 40-byte tensors, 100-byte shards
    got = weights(tmp_path)
    assert sorted(got) == sorted(tensors) and all(torch.equal(got[k], tensors[k]) for k in tensors)
    # A header's room also closes a shard: many small tensors in one shard's byte budget.
    w = ShardWriter(tmp_path / "h", max_bytes=10**9, header_room=512)
    (tmp_path / "h").mkdir()
    for i in range(40):
        w.add(f"layer.{i}.weight", torch.zeros(1))
    assert len(set(w.finish().values())) > 1


def test_synthetic_checkpoint_loads(tmp_path):
    from benchmarks.synthetic_checkpoint import write_checkpoint as synthetic

    info = synthetic(
        tmp_path / "s",
        hidden=32,
        layers=2,
        experts=4,
        intermediate=48,
        vocab=64,
        heads=4,
        kv_heads=2,
        shard_size=20_000,
    )
    assert info["shards"] > 1
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    assert (
        index["metadata"]["total_size"]
        == info["bytes"]
        == sum(t.numel() * 2 for t in weights(tmp_path / "s").values())
    )
    model = load_model(tmp_path / "s")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert adapter_for(model).num_experts(adapter_for(model).sparse_layers(model)[1]) == 4


def test_benchmark_groups_need_no_forward_pass(tmp_path):
    """The benchmark's default groups: from router rows alone, leaders 0..k-1 in every layer."""
    from benchmarks.streamed_merge import cheap_groups
    from benchmarks.synthetic_checkpoint import write_checkpoint as synthetic

    synthetic(tmp_path / "s", hidden=32, layers=3, experts=8, intermediate=48, vocab=64, heads=4, kv_heads=2)
    groups = cheap_groups(tmp_path / "s", 4)
    assert sorted(groups["layers"]) == [f"model.layers.{i}.mlp" for i in range(3)]
    for spec in groups["layers"].values():
        assert spec["merged"] and [g[0] for g in spec["groups"]] == [0, 1, 2, 3]
        assert sorted(e for g in spec["groups"] for e in g) == list(range(8))


def test_streamed_alignment_takes_the_solver_workers_and_min_gain(tmp_path):
    """The align params beyond the method reach each streamed layer as they do in memory."""
    src = write_checkpoint(tmp_path / "in", "mixtral")
    probe = load_model(src)
    adapter = adapter_for(probe)
    gains = {n: r["gain"] for n, r in align_model(probe, adapter, "weight-matching", "first").items()}
    threshold = sorted(gains.values())[1]
    kw = dict(solver="auction", settings=SolverSettings(tolerance=1e-6), min_gain=threshold)
    model = load_model(src)
    mem = align_model(model, adapter_for(model), "weight-matching", "first", **kw)
    report = stream_merge(src, tmp_path / "str", None, None, workers=2, **kw)
    assert {n: e["align"] for n, e in report["layers"].items()} == mem
    assert sorted(r["aligned"] for r in mem.values()) == [False, True, True]
    save_model(model, tmp_path / "mem")
    a, b = weights(tmp_path / "mem"), weights(tmp_path / "str")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
