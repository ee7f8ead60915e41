"""Stages on big models: runtime.weights_dtype (the dtype weights are held and saved in, apart from
autocast), runtime.streaming (align, merge, compress layer by layer) and runtime.device_map
(an offloaded profile).

A bf16 checkpoint stays bf16 in every stage's output folder; training runs on float32 master
weights and saves in the storage dtype; float16 refuses weights beyond its range.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.data import train_bpe_tokenizer
from pipeline.modeling import (
    CheckpointError,
    build_model,
    cast_weights,
    float32_master_weights,
    floating_dtype,
    load_model,
    save_model,
)
from tests.conftest import TINY_MIXTRAL, run_decoder_stages
from tests.test_llm_stages import _params

MODEL_FOLDERS = ("full", "aligned", "merged", "compressed", "c_compressed", "m_smoe", "mc_smoe", "c_smoe")


def stored_dtypes(folder: Path) -> set[str]:
    """The safetensors dtypes of every floating tensor a model folder stores (headers only)."""
    out = set()
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        out |= {
            v["dtype"]
            for k, v in header.items()
            if k != "__metadata__" and v["dtype"].startswith(("F", "BF"))
        }
    return out


def _mixtral(dtype=None):
    return build_model("mixtral", {**TINY_MIXTRAL, "num_local_experts": 4}, 96, 0, 1, 0.02, 0, dtype=dtype)


def test_build_model_casts_after_a_float32_init():
    ref, bf = _mixtral(), _mixtral(torch.bfloat16)
    assert floating_dtype(ref) == torch.float32 and floating_dtype(bf) == torch.bfloat16
    for (n, a), (_, b) in zip(ref.named_parameters(), bf.named_parameters(), strict=True):
        assert torch.equal(a.to(torch.bfloat16), b), n


def test_load_model_keeps_the_stored_dtype_or_casts(tmp_path):
    save_model(_mixtral(torch.bfloat16), tmp_path / "bf16")
    assert floating_dtype(load_model(tmp_path / "bf16")) == torch.bfloat16
    assert floating_dtype(load_model(tmp_path / "bf16", dtype=torch.float32)) == torch.float32
    save_model(_mixtral(), tmp_path / "fp32")
    a = load_model(tmp_path / "fp32")
    b = load_model(tmp_path / "fp32", dtype=torch.float32)  # already float32: untouched, bit for bit
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_float16_refuses_weights_beyond_its_range():
    model = _mixtral()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = 1e6
    with pytest.raises(
        CheckpointError, match=r"lm_head.weight holds values beyond float16's range.*bfloat16"
    ):
        cast_weights(model, torch.float16, "m")
    assert floating_dtype(model) == torch.float32  # nothing cast


def test_float32_master_weights_train_in_float32_and_restore_storage():
    model = _mixtral(torch.bfloat16)
    with float32_master_weights(model):
        assert floating_dtype(model) == torch.float32
    assert floating_dtype(model) == torch.bfloat16


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("bf16")
    text = (data_dir / "wikitext-2" / "valid.txt").read_text().splitlines()[:2000]
    tok = train_bpe_tokenizer(text, 400, [])
    cfg = yaml.safe_load((Path(__file__).parent / "tiny_llm_params.yaml").read_text())["model"]["config"]
    model = build_model("mixtral", cfg, len(tok), tok.pad_token_id, tok.eos_token_id, 1.0, 0, torch.bfloat16)
    save_model(model, tmp / "checkpoint", tokenizer=tok)
    p = _params(tmp, tmp / "checkpoint")
    d = tmp / "out"
    run_decoder_stages(p, d)
    return tmp, p, d


def test_bf16_checkpoint_stays_bf16_in_every_output_folder(bf16_run):
    _, _, d = bf16_run
    for name in MODEL_FOLDERS:
        assert stored_dtypes(d / name) == {"BF16"}, name
        assert json.loads((d / name / "config.json").read_text())["dtype"] == "bfloat16", name
    results = json.loads((d / "evaluate.json").read_text())
    flat = json.dumps(results)
    assert "NaN" not in flat and "Infinity" not in flat


def test_finetune_trains_on_float32_master_weights_and_saves_bf16(bf16_run):
    from stages import finetune

    tmp, p, d = bf16_run
    params = yaml.safe_load(p.read_text())
    params["zero_shot"] = False
    params["model"].update({"name_or_path": str(tmp / "checkpoint")})
    params["finetune"].update({"epochs": 0.25, "eval_every_epochs": 1.0})
    q = tmp / "train.yaml"
    q.write_text(yaml.safe_dump(params))
    finetune.main(["--params", str(q), "--metrics", str(tmp / "ft.json"), "--data", str(d / "data"),
                   "--out", str(tmp / "trained")])  # fmt: skip
    assert stored_dtypes(tmp / "trained") == {"BF16"}
    before, after = load_model(tmp / "checkpoint"), load_model(tmp / "trained")
    changed = [n for n, t in after.state_dict().items() if not torch.equal(t, before.state_dict()[n])]
    assert changed, "training moved no bf16 weight"
    assert all(torch.isfinite(t).all() for t in after.state_dict().values())


def test_kd_trains_bf16_students_on_float32_master_weights(bf16_run):
    from stages import kd_finetune

    tmp, p, d = bf16_run
    params = yaml.safe_load(p.read_text())
    params["zero_shot"] = False
    params["kd"]["train"].update({"epochs": 0.25, "eval_every_epochs": 1.0})
    q = tmp / "kd.yaml"
    q.write_text(yaml.safe_dump(params))
    o = tmp / "kd"
    kd_finetune.main(["--params", str(q), "--metrics", str(o / "kd.json"), "--data", str(d / "data"),
        "--teacher", str(d / "full"), "--merged", str(d / "merged"), "--compressed", str(d / "compressed"),
        "--compressed-full", str(d / "c_compressed"), "--out-m-smoe", str(o / "m_smoe"),
        "--out-mc-smoe", str(o / "mc_smoe"), "--out-c-smoe", str(o / "c_smoe")])  # fmt: skip
    for name, source in (("m_smoe", "merged"), ("mc_smoe", "compressed"), ("c_smoe", "c_compressed")):
        assert stored_dtypes(o / name) == {"BF16"}, name
        before, after = _tensors(d / source), _tensors(o / name)
        assert any(not torch.equal(t, before[k]) for k, t in after.items() if k in before), name
        assert all(torch.isfinite(t.float()).all() for t in after.values() if t.is_floating_point()), name


def _variant(p: Path, name: str, **runtime) -> Path:
    params = yaml.safe_load(p.read_text())
    params["runtime"].update(runtime)
    q = p.with_name(f"{name}.yaml")
    q.write_text(yaml.safe_dump(params))
    return q


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(str(f)))
    return out


def test_streamed_align_merge_compress_write_the_in_memory_tensors(bf16_run):
    from stages import align, compress, merge

    tmp, p, d = bf16_run
    q, s = _variant(p, "streaming", streaming=True), tmp / "streamed"
    # The fine-tuned model as a sharded checkpoint (several shards and an index).
    load_model(d / "full").save_pretrained(str(s / "full"), max_shard_size="40KB", save_original_format=False)
    assert len(list((s / "full").glob("*.safetensors"))) > 2

    def run(stage, *argv):
        stage.main(["--params", str(q), "--metrics", str(s / f"{stage.__name__[7:]}.json"), *argv])

    run(align, "--data", str(d / "data"), "--model", str(s / "full"), "--profile", str(d / "profile"),
        "--out", str(s / "aligned"))  # fmt: skip
    run(merge, "--model", str(s / "aligned"), "--profile", str(d / "profile"), "--groups",
        str(d / "groups" / "groups.json"), "--out", str(s / "merged"), "--plot", str(s / "sr.png"))  # fmt: skip
    run(compress, "--model", str(s / "merged"), "--full", str(s / "full"), "--out", str(s / "compressed"),
        "--out-c", str(s / "c_compressed"), "--aligned", str(s / "aligned"), "--profile", str(d / "profile"),
        "--groups", str(d / "groups" / "groups.json"))  # fmt: skip
    for name in ("aligned", "merged", "compressed", "c_compressed"):
        ref, got = _tensors(d / name), _tensors(s / name)
        assert sorted(ref) == sorted(got), name
        for k in ref:
            assert ref[k].dtype == got[k].dtype and torch.equal(ref[k], got[k]), (name, k)
        assert stored_dtypes(s / name) == {"BF16"}, name
        assert json.loads((s / name / "smoe_structure.json").read_text() if name != "aligned" else "{}") == (
            json.loads((d / name / "smoe_structure.json").read_text()) if name != "aligned" else {}
        )
    assert json.loads((s / "merged" / "merge_report.json").read_text()) == json.loads(
        (d / "merged" / "merge_report.json").read_text()
    )
    # Metrics: the in-memory keys, less those that need the whole model's weights.
    for stage, missing in (
        ("align", {"max_abs_logit_change"}),
        ("merge", {"stable_rank"}),
        ("compress", set()),
    ):
        ref, got = (
            json.loads((d / f"{stage}.json").read_text()),
            json.loads((s / f"{stage}.json").read_text()),
        )
        assert set(got) == set(ref) - missing, stage
        if stage == "align":  # per layer: the same permutations, objectives and gains
            assert got["layers"] == ref["layers"] and all("gain" in r for r in got["layers"].values())
            assert got["layers_aligned"] == len(got["layers"])
    ref, got = json.loads((d / "compress.json").read_text()), json.loads((s / "compress.json").read_text())
    for name in ref:
        assert {k: v for k, v in got[name].items() if k != "seconds"} == {
            k: v for k, v in ref[name].items() if k != "seconds"
        }


def test_streamed_group_stage_reads_no_weight_and_gives_the_same_groups(bf16_run):
    from stages import group

    tmp, p, d = bf16_run
    q = _variant(p, "streaming_group", streaming=True)
    group.main(["--params", str(q), "--metrics", str(tmp / "group_s.json"), "--model", str(d / "aligned"),
                "--profile", str(d / "profile"), "--out", str(tmp / "groups_s")])  # fmt: skip
    assert (tmp / "groups_s" / "groups.json").read_text() == (d / "groups" / "groups.json").read_text()


def test_offloaded_profile_stage_gives_the_in_memory_profile(bf16_run):
    from stages import profile

    tmp, p, d = bf16_run
    q = _variant(p, "offload", device_map="auto", max_memory={"cpu": "30KB"}, offload_folder=str(tmp / "off"))
    profile.main(["--params", str(q), "--metrics", str(tmp / "profile_off.json"), "--data", str(d / "data"),
                  "--model", str(d / "full"), "--out", str(tmp / "profile_off")])  # fmt: skip
    ref, got = _tensors(d / "profile"), _tensors(tmp / "profile_off")
    assert sorted(ref) == sorted(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    a, b = json.loads((d / "profile.json").read_text()), json.loads((tmp / "profile_off.json").read_text())
    assert a["layers"] == b["layers"]


def test_bf16_switch_router_modes_compute_in_the_routers_float32(tiny_model, batch):
    # The stock Switch router casts itself to router_dtype (float32) at each forward; the
    # log-sum-exp group router of prune-logsumexp does the same, so a bf16 Switch evaluates.
    from pipeline.families import adapter_for
    from pipeline.routing import set_router_mode
    from tests.conftest import logits
    from tests.test_routing import UNEVEN, _merge

    adapter = _merge(tiny_model, UNEVEN)
    set_router_mode(tiny_model, adapter, "prune-logsumexp")
    cast_weights(tiny_model, torch.bfloat16, "tiny")
    out = logits(tiny_model, batch)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert {
        adapter_for(tiny_model).router(ly).classifier.weight.dtype for ly in adapter.sparse_layers(tiny_model)
    } == {torch.float32}
