"""The switch-base-32 benchmark script, run at tiny dimensions."""

from __future__ import annotations

import json

import pytest

from benchmarks.switch_base_32 import main


def test_quick_benchmark_measures_every_model(tmp_path, capsys):
    out = tmp_path / "benchmark.json"
    main(
        ["--quick", "--batch-size", "4", "--seq-len", "16", "--target-len", "4", "--profile-samples", "8"]
        + ["--rank", "4", "--repeats", "1", "--out", str(out)]
    )
    r = json.loads(out.read_text())
    models = r["models"]
    assert list(models) == ["full", "full_sorted", "merged", "compressed", "dense"]
    full, merged, compressed = models["full"], models["merged"], models["compressed"]
    # 3 of 4 SMoE layers merged from 8 to 2 experts; the first one keeps its 8.
    assert full["experts_total"] == 4 * 8 and merged["experts_total"] == 8 + 3 * 2
    assert full["bytes_on_disk"] > merged["bytes_on_disk"] > compressed["bytes_on_disk"]
    assert full["params"] > merged["params"] > compressed["params"] > 0
    assert models["full_sorted"]["params"] == full["params"]
    assert models["dense"]["experts_total"] == 0 and models["dense"]["params"] < merged["params"]
    for m in models.values():
        assert m["latency_s"] > 0 and m["peak_forward_bytes"] > m["model_memory_bytes"] > 0
    cost = r["merge_cost_s"]
    assert cost["merged_layers"] == 3 and cost["total"] == pytest.approx(
        cost["align"] + cost["group"] + cost["merge"], abs=0.01
    )
    ratio = r["ratios"]["merged_vs_full"]
    assert ratio["bytes_on_disk"] == pytest.approx(merged["bytes_on_disk"] / full["bytes_on_disk"], abs=1e-4)
    assert "align + group + merge of 3 layers" in capsys.readouterr().out


def test_quick_alignment_study_times_every_solver_and_width(tmp_path, capsys):
    out = tmp_path / "align.json"
    main(["--quick", "--align-only", "--align-workers", "1", "2", "--align-pairs", "2", "--device", "cpu"]
         + ["--out", str(out)])  # fmt: skip
    study = json.loads(out.read_text())["alignment"]
    rows = {(r["solver"], r["workers"]): r for r in study["switch-base-32"]}
    assert set(rows) == {("similarities only", 1), ("exact", 1), ("exact", 2), ("sparse", 1), ("auction", 1)}
    assert rows[("similarities only", 1)]["objective"] is None
    assert rows[("sparse", 1)]["relative_gap"] >= -1e-12
    # Worker processes change the time, not the matching.
    assert rows[("exact", 1)]["objective"] == rows[("exact", 2)]["objective"]
    assert rows[("exact", 2)]["relative_gap"] == 0.0 and rows[("auction", 1)]["relative_gap"] >= -1e-12
    for name, width in (("mixtral-pair", 256), ("deepseek-layer", 64)):
        c = study[name]
        assert c["width"] == width and len(c["pairs"]) == (1 if name == "mixtral-pair" else 2)
        for pair in c["pairs"]:
            gap = pair["exact"]["objective"] - pair["auction"]["objective"]
            assert -1e-9 <= gap <= pair["auction_bound"] + 1e-9
            assert pair["sparse"]["relative_gap"] >= -1e-12
        assert c["auction_layer_s_estimate"] >= 0
    assert "alignment on cpu" in capsys.readouterr().out


def test_benchmark_rejects_an_unknown_solver(tmp_path):
    with pytest.raises(
        SystemExit, match="unknown assignment solver 'greedy'; valid choices: auction, exact, sparse"
    ):
        main(["--quick", "--align-only", "--align-solvers", "greedy", "--out", str(tmp_path / "b.json")])
    assert not (tmp_path / "b.json").exists()


def test_benchmark_rejects_an_unknown_router_mode(tmp_path):
    with pytest.raises(
        SystemExit, match="unknown router mode 'top2'; valid choices: prune, prune-logsumexp, remap"
    ):
        main(["--quick", "--router", "top2", "--out", str(tmp_path / "b.json")])
    assert not (tmp_path / "b.json").exists()


def test_quick_meo_benchmark_compares_every_kind_at_every_k(tmp_path):
    from benchmarks.meo_bert_base import main as meo_main

    out = tmp_path / "meo.json"
    meo_main(
        ["--quick", "--num-experts", "4", "--top-k", "1", "4", "--batch-size", "3", "--seq-len", "8"]
        + ["--reps", "1", "--merge-chunks", "1", "--out", str(out)]
    )
    r = json.loads(out.read_text())
    rows = {(row["layer"], row["top_k"]): row for row in r["rows"]}
    assert set(rows) == {("dense", 0)} | {
        (kind, k) for kind in ("moe", "meo-sequence", "meo-token") for k in (1, 4)
    }
    # Vanilla top-k runs k experts per token; MEO one merged expert whatever k (plus the merge).
    assert rows[("moe", 4)]["gflops_per_sample"] > 2 * rows[("moe", 1)]["gflops_per_sample"]
    assert rows[("meo-sequence", 4)]["gflops_per_sample"] == rows[("meo-sequence", 1)]["gflops_per_sample"]
    assert rows[("meo-sequence", 4)]["speedup_vs_moe"] > 0 and 0 < rows[("meo-token", 4)]["merge_share"] < 1
    assert r["merge_chunk"] == [{"top_k": 4, "merge_chunk": 1, "seconds": r["merge_chunk"][0]["seconds"]}]


def test_meo_benchmark_rejects_k_above_e(tmp_path):
    from benchmarks.meo_bert_base import main as meo_main

    with pytest.raises(SystemExit):
        meo_main(["--quick", "--num-experts", "4", "--top-k", "8", "--out", str(tmp_path / "x.json")])
