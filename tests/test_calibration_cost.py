"""The calibration-cost benchmark, run at tiny dimensions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.calibration_cost import ModelSnapshot, PeakTensorBytes, calibrate, load_methods, main
from benchmarks.switch_base_32 import QUICK, build, random_rows
from pipeline.ablations import load_spec
from pipeline.families import adapter_for

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["--quick", "--num-samples", "4", "--seq-len", "16", "--target-len", "4"]


def test_quick_run_measures_every_method(tmp_path, capsys):
    out = tmp_path / "cost.json"
    main(TINY_RUN + ["--out", str(out)])
    r = json.loads(out.read_text())
    methods = r["methods"]
    assert list(methods) == [v.name for v in load_spec(ROOT / "baselines.yaml").variants]
    for name, m in methods.items():
        assert math.isfinite(m["total_s"]) and m["total_s"] > 0, name
        for step, s in m["steps"].items():
            if "skipped" in s:
                continue
            assert math.isfinite(s["seconds"]) and s["seconds"] > 0, (name, step)
            for key in ("peak_tensor_bytes", "kept_tensor_bytes", "peak_rss_delta_bytes"):
                assert isinstance(s[key], int) and s[key] >= 0, (name, step, key)
            assert s["peak_tensor_bytes"] >= s["kept_tensor_bytes"]
    # Task-specific pruning calibrates nothing but the routing profile.
    assert [s for s, v in methods["task-specific"]["steps"].items() if "skipped" not in v] == ["profile"]
    # Identical steps are measured once: pruning reuses M-SMoE's profile and weight matching.
    assert methods["pruning"]["steps"]["profile"]["measured_in"] == "m-smoe"
    assert methods["pruning"]["steps"]["align"]["measured_in"] == "m-smoe"
    assert methods["hc-smoe"]["steps"]["profile"]["measured_in"] == "reap"
    check = r["expert_outputs_check"]
    # 4 rows x 16 source tokens reach each encoder layer; 8 experts, d_model 64.
    assert check["one_layer_ETd_float32_bytes"] == 8 * 64 * 64 * 4
    assert set(check["methods"]) == {"reap", "hc-smoe"}
    assert all(math.isfinite(c["tensor_ratio"]) for c in check["methods"].values())
    printed = capsys.readouterr().out
    assert "one layer's [E, T, d] float32 expert outputs" in printed and "task-specific" in printed


def test_unknown_method_is_refused_with_the_valid_names(tmp_path):
    out = tmp_path / "cost.json"
    with pytest.raises(SystemExit, match=r"unknown method 'nope'; valid: m-smoe, pruning, .*, hc-smoe"):
        main(TINY_RUN + ["--methods", "m-smoe", "nope", "--out", str(out)])
    assert not out.exists()


def test_restore_gives_back_the_model_as_built():
    model = build(QUICK, seed=0)
    adapter = adapter_for(model)
    snapshot = ModelSnapshot(model, adapter)
    rows = random_rows(4, 16, 4, QUICK["vocab_size"], seed=1)
    for name, p in load_methods(
        ROOT / "baselines.yaml", ROOT / "params.yaml", ["m-smoe", "repair"], 0
    ).items():
        _, moves, _ = calibrate(model, adapter, name, p, rows, {}, reuse=False)
        assert moves, name  # both align the experts, and merge every reduced layer
        snapshot.restore(moves)
    fresh = build(QUICK, seed=0).state_dict()
    state = model.state_dict()
    assert list(state) == list(fresh)
    assert all(torch.equal(state[k], fresh[k]) for k in fresh)


def test_peak_tensor_bytes_counts_new_storages_until_they_die():
    weight = torch.zeros(1000, 1000)
    tracker = PeakTensorBytes()
    with tracker:
        weight.add_(1.0)  # in place into a tensor made before: nothing new
        view = weight[:10]  # a view of it: nothing new either
        y = weight[0] * 2  # 4000 new bytes
        del view
        # A new layer's weight lives on in its nn.Parameter after the tensor that made it is gone.
        layer = torch.nn.Linear(100, 10, bias=False)
    assert tracker.live == 4000 + 4000 and tracker.peak == 8000
    del y
    assert tracker.live == 4000
    del layer
    assert tracker.live == 0
