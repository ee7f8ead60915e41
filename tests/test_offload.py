"""Routing profiles of dispatched / offloaded models (pipeline.offload) on tiny sharded checkpoints."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from benchmarks.offloaded_profile import _largest_block_bytes, measure, write_synthetic_checkpoint
from pipeline.families import adapter_for
from pipeline.family_walk import tiny_config
from pipeline.modeling import STRUCTURE_FILE, CheckpointError, load_model
from pipeline.offload import (
    check_rows,
    load_offloaded,
    plan_device_map,
    profile_checkpoint,
    profile_offloaded,
)
from pipeline.profiling import profile_routing

CPU = torch.device("cpu")
FIELDS = (
    "counts",
    "router_logits",
    "feature_sum",
    "feature_abs_sum",
    "feature_sq_sum",
    "inputs",
    "output_sum",
    "reap_sum",
)
FAMILIES = ("mixtral", "qwen2_moe", "deepseek_v3")


def _save(model_type: str, folder, original_format: bool = False, layers: int = 3) -> None:
    """A tiny random bf16 model of ``model_type`` saved in several shards."""
    tiny = tiny_config(model_type, adapter_for(tiny_config(model_type))).to_dict()
    tiny.pop("layer_types", None)  # derived from the layer count
    if model_type == "deepseek_v3":  # its attention takes as many key/value heads as heads
        tiny["num_key_value_heads"] = tiny["num_attention_heads"]
    config = type(tiny_config(model_type))(**{**tiny, "num_hidden_layers": layers})
    torch.manual_seed(0)
    model = adapter_for(config).model_class()(config).to(torch.bfloat16).eval()
    # Routers with larger weights than the init's: real routing decisions, not near-ties.
    for layer in adapter_for(model).sparse_layers(model):
        w = adapter_for(model).router_weight(layer)
        with torch.no_grad():
            w.copy_(torch.randn_like(w.float()).to(w.dtype))
    model.save_pretrained(str(folder), max_shard_size="20KB", save_original_format=original_format)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for family in FAMILIES:
        out[family] = tmp_path_factory.mktemp(family)
        _save(family, out[family])
    return out


@pytest.fixture(scope="module")
def lm_rows():
    """LM rows of varying length (batches carry padding); labels are the ids."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(10):
        ids = torch.randint(2, 96, (3 + i % 6,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids, "label": 0})
    return rows


def _assert_same(ref: dict, got: dict) -> None:
    assert list(got) == list(ref)
    for name, a in ref.items():
        b = got[name]
        assert (a.tokens, a.routed) == (b.tokens, b.routed), name
        for f in FIELDS:
            x, y = getattr(a, f), getattr(b, f)
            assert (x is None) == (y is None), (name, f)
            if x is not None:
                assert x.dtype == y.dtype and torch.equal(x, y), (name, f, (x - y).abs().max())


def test_shards(checkpoints):
    assert len(list(checkpoints["mixtral"].glob("model-*.safetensors"))) > 3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "device_map, max_memory",
    [({"": "disk"}, None), ("auto", {"cpu": 60_000})],
    ids=["all-disk", "cpu-budget"],
)
def test_offloaded_profile_equals_in_memory(checkpoints, lm_rows, family, device_map, max_memory):
    folder = checkpoints[family]
    ref = profile_routing(load_model(folder), lm_rows, 0, 4, CPU, max_inputs=20, expert_outputs=True)
    model = load_offloaded(folder, device_map, max_memory)
    assert "disk" in model.hf_device_map.values()
    if max_memory is not None:  # the budget keeps the first modules in RAM
        assert "cpu" in model.hf_device_map.values()
    got = profile_offloaded(model, lm_rows, 0, 4, max_inputs=20, expert_outputs=True)
    _assert_same(ref, got)
    if family == "mixtral":  # a second profile of the same dispatched model
        _assert_same(ref, profile_offloaded(model, lm_rows, 0, 4, max_inputs=20, expert_outputs=True))
    # The model stays dispatched: every offloaded weight is back on the meta device.
    assert all(p.device.type == "meta" for n, p in model.named_parameters() if ".layers.2." in n)


def test_profile_routing_alone_refuses_a_dispatched_model(checkpoints, lm_rows):
    """Why profile_offloaded exists: profile_routing's model.to(device) is refused by accelerate."""
    model = load_offloaded(checkpoints["mixtral"], {"": "disk"})
    with pytest.raises(RuntimeError, match="offloaded"):
        profile_routing(model, lm_rows, 0, 4, CPU)


def test_undispatched_device_map_profiles_the_same(checkpoints, lm_rows):
    folder = checkpoints["qwen2_moe"]
    ref = profile_routing(load_model(folder), lm_rows, 0, 4, CPU)
    model = load_offloaded(folder, "cpu")
    assert not hasattr(model, "_hf_hook") and all(p.device.type == "cpu" for p in model.parameters())
    _assert_same(ref, profile_offloaded(model, lm_rows, 0, 4))


def test_bf16_stays_bf16(checkpoints, lm_rows):
    model = load_offloaded(checkpoints["mixtral"], "auto", {"cpu": 60_000})
    assert model.dtype == torch.bfloat16
    seen = []
    block = model.model.layers[2].mlp
    block.experts.register_forward_pre_hook(lambda m, _i: seen.append(m.gate_up_proj.dtype))
    block.experts.register_forward_pre_hook(lambda m, _i: seen.append(m.gate_up_proj.device.type))
    profile_offloaded(model, lm_rows[:2], 0, 2)
    assert seen[:2] == [torch.bfloat16, "cpu"]
    assert block.experts.gate_up_proj.device.type == "meta"


def test_hub_format_needs_an_offload_folder(tmp_path, lm_rows):
    """The Hub's original Mixtral format (one tensor per expert) is fused at load time: disk-mapped
    experts are converted once into offload_folder; everything else is read from the shards."""
    folder = tmp_path / "hub"
    _save("mixtral", folder, original_format=True)
    assert (
        "model.layers.0.mlp.experts.gate_up_proj"
        not in json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    )
    with pytest.raises(ValueError, match="pass an offload_folder"):
        load_offloaded(folder, {"": "disk"})
    ref = profile_routing(load_model(folder), lm_rows, 0, 4, CPU, expert_outputs=True)
    got = profile_checkpoint(folder, lm_rows, 0, 4, {"": "disk"}, offload_folder=tmp_path / "off",
                             expert_outputs=True)  # fmt: skip
    _assert_same(ref, got)
    written = sorted(p.name for p in (tmp_path / "off").iterdir())
    assert written and all(".mlp.experts." in n for n in written)


def test_project_format_copies_nothing(checkpoints, tmp_path, lm_rows):
    off = tmp_path / "off"
    profile_checkpoint(checkpoints["mixtral"], lm_rows[:2], 0, 2, {"": "disk"}, offload_folder=off)
    assert not off.exists() or not any(off.iterdir())


def test_resident_weights_stay_within_one_block(checkpoints, lm_rows):
    """At every module's forward, the weights in memory are at most the RAM-mapped modules plus one
    offloaded block; far below the whole model."""
    folder = checkpoints["mixtral"]
    model = load_offloaded(folder, {"": "disk"})
    block, rest = _largest_block_bytes(folder)
    total = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    peak = []

    def resident(*_args):
        peak.append(sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta"))

    for m in model.modules():
        m.register_forward_pre_hook(resident)
    profile_offloaded(model, lm_rows, 0, 4, expert_outputs=True)
    sparse = max(
        sum(p.numel() * p.element_size() for p in ly.module.parameters())
        for ly in adapter_for(model).sparse_layers(model)
    )
    assert 0 < max(peak) <= max(sparse, rest) < block < total / 2


def test_peak_rss_stays_flat(tmp_path):
    """Peak RSS (a fresh process, kernel high-water mark) of the offloaded profile of a 12-layer,
    ~150 MB bf16 checkpoint stays under two layers plus a fixed overhead (imports done before: the
    first forward's own allocations, ~35 MB), below the checkpoint's size; loading it whole needs
    more than the checkpoint, so the measurement can tell."""
    folder = tmp_path / "ck"
    write_synthetic_checkpoint(folder, 12, hidden=256, intermediate=1024, experts=8, vocab=256, heads=4,
                               kv_heads=2)  # fmt: skip
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    block, _rest = _largest_block_bytes(folder)
    assert size > 140 * 2**20 and block < 14 * 2**20
    spec = {"checkpoint": str(folder), "num_samples": 4, "seq_len": 16, "batch_size": 4, "vocab": 256,
            "cpu_budget": "0", "threads": 1}  # fmt: skip
    disk = measure({**spec, "mode": "disk"})
    whole = measure({**spec, "mode": "memory"})
    assert "error" not in disk and "error" not in whole, (disk, whole)
    bound = 2 * block + 80 * 2**20  # measured: about 73 MiB
    assert disk["peak_rss_delta_bytes"] < bound < size, (disk, block, size)
    assert disk["peak_weight_bytes"] <= block
    assert whole["peak_rss_delta_bytes"] > size, (whole, size)


# ---------------------------------------------------------------------------- bad input, before work


@pytest.fixture
def no_loading(monkeypatch, checkpoints):
    """Any weight loading fails the test: the errors must come before it."""
    cls = type(load_model(checkpoints["mixtral"]))

    def boom(*_a, **_k):
        raise AssertionError("weights were read before the bad input was found")

    monkeypatch.setattr(cls, "from_pretrained", boom)


@pytest.mark.parametrize(
    "device_map, max_memory, message",
    [
        ({"": "tpu"}, None, r"device_map\[''\]: unknown device 'tpu'; valid here: .*cpu, disk"),
        ("cuda:7", None, r"unknown device 'cuda:7'; valid here: .*cpu, disk"),
        ("fastest", None, r"neither a strategy \(auto, balanced, balanced_low_0, sequential\) nor a device"),
        ({"model.nope": "cpu"}, None, r"names module 'model.nope', which the model lacks"),
        ({"model.layers": "cpu"}, None, r"places no module holding model.embed_tokens.weight"),
        ("auto", {"gpu": "1GiB"}, r"max_memory: unknown device 'gpu'"),
        ("auto", {"cpu": "lots"}, r"max_memory\['cpu'\]: 'lots' is not a memory size"),
    ],
)
def test_bad_device_maps_fail_before_loading(checkpoints, no_loading, device_map, max_memory, message):
    with pytest.raises(ValueError, match=message) as err:
        load_offloaded(checkpoints["mixtral"], device_map, max_memory)
    assert "\n" not in str(err.value)


def test_missing_shard_fails_before_loading(checkpoints, tmp_path, no_loading):
    import shutil

    folder = tmp_path / "ck"
    shutil.copytree(checkpoints["mixtral"], folder)
    victim = sorted(folder.glob("model-*.safetensors"))[2]
    victim.unlink()
    with pytest.raises(
        CheckpointError, match=f"shard {victim.name} named by model.safetensors.index.json is missing"
    ):
        load_offloaded(folder, {"": "disk"})


def test_shard_not_matching_its_index_fails(checkpoints, tmp_path, no_loading):
    import shutil

    folder = tmp_path / "ck"
    shutil.copytree(checkpoints["mixtral"], folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    other = next(s for s in sorted(set(index["weight_map"].values())) if s != index["weight_map"][name])
    index["weight_map"][name] = other
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError,
        match=f"model.safetensors.index.json places {name} in {other}, which does not hold it",
    ):
        load_offloaded(folder)


def test_merged_checkpoint_and_missing_folder_are_refused(checkpoints, tmp_path, no_loading):
    import shutil

    with pytest.raises(CheckpointError, match="does not exist"):
        load_offloaded(tmp_path / "nowhere")
    folder = tmp_path / "merged"
    shutil.copytree(checkpoints["mixtral"], folder)
    (folder / STRUCTURE_FILE).write_text("{}")
    with pytest.raises(CheckpointError, match="merged checkpoint"):
        load_offloaded(folder)


def test_bad_rows_fail_before_loading(checkpoints, no_loading):
    with pytest.raises(ValueError, match="no samples to profile"):
        profile_checkpoint(checkpoints["mixtral"], [], 0, 4)
    with pytest.raises(ValueError, match="sample 1: token id 500 is outside the model's vocabulary of 96"):
        profile_checkpoint(checkpoints["mixtral"], [{"input_ids": [1]}, {"input_ids": [2, 500]}], 0, 4)
    check_rows([{"input_ids": [95]}], 96)


def test_plan_spreads_over_gpus_when_there_are_some(checkpoints):
    """The same call on a GPU machine maps layers to GPU indices (here: the CPU/disk fallback)."""
    from pipeline.offload import meta_model

    model = meta_model(checkpoints["mixtral"], torch.bfloat16)
    plan = plan_device_map(model, "auto", {"cpu": 60_000})
    gpus = torch.cuda.device_count()
    assert set(plan.values()) <= {*range(gpus), "cpu", "disk"}
    if not gpus:
        assert plan.get("model.embed_tokens", plan.get("")) in ("cpu", "disk")
    assert sys.modules.get("pipeline.offload") is not None


def test_quick_benchmark_compares_the_modes(tmp_path, capsys):
    from benchmarks.offloaded_profile import main

    out = tmp_path / "o.json"
    main(["--quick", "--layers", "2", "--modes", "memory", "disk", "--out", str(out)])
    (run,) = json.loads(out.read_text())["runs"]
    assert run["layers"] == 2 and run["profiles_equal"] is True
    for mode in ("memory", "disk"):
        r = run["modes"][mode]
        assert r["seconds"] > 0 and r["peak_rss_delta_bytes"] >= 0 and r["tokens"] > 0, r
    # Offloaded, the weights in memory never exceed one layer; in memory, they are the whole model.
    assert run["modes"]["disk"]["peak_weight_bytes"] <= run["largest_layer_bytes"]
    assert run["modes"]["memory"]["peak_weight_bytes"] >= 0.9 * run["checkpoint_bytes"]
    assert "equal" in capsys.readouterr().out


def test_benchmark_rejects_an_unknown_mode(tmp_path):
    from benchmarks.offloaded_profile import main

    with pytest.raises(SystemExit, match="unknown mode 'ram'; valid: memory, disk, budget"):
        main(["--quick", "--modes", "ram", "--out", str(tmp_path / "o.json")])
