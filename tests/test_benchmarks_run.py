"""The benchmark scripts run (tiny `--quick` mode), print their same-run ratios and write their results file.

No timing is asserted: a loaded CI machine would make that flaky, and the scripts' figures are relative anyway.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script, tmp_path):
    results = tmp_path / f"{script}.json"
    run = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--quick", "--results", str(results)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout, json.loads(results.read_text())


def test_bench_patch_quick(tmp_path):
    out, data = _run("bench_patch", tmp_path)
    assert "ratios: ours_over_floor_median" in out and "machine: load" in out
    assert data["quick"] is True and data["machine"]["nproc"] >= 1 and len(data["machine"]["loadavg_1_5_15"]) == 3
    rows = data["results"]
    assert {(r["out"], r["dtype"]) for r in rows} == {(320, "float32"), (320, "bfloat16"), (640, "float32"),
                                                       (640, "bfloat16")}
    for r in rows:
        assert r["ours_s"] > 0 and r["floor_s"] > 0
        assert r["ours_over_floor"] == pytest.approx(r["ours_s"] / r["floor_s"])
        assert r["block_size"] * r["blocks"] == r["out"]
        if "comfy_s" in r:  # ComfyUI present: at strength 1 its patch computes the same weight as ours
            assert r["comfy_vs_ours_rel_diff"] < (1e-5 if r["dtype"] == "float32" else 1e-2)
            assert "comfy/ours" in out


def test_bench_bake_quick(tmp_path):
    out, data = _run("bench_bake", tmp_path)
    assert "ratios: extrapolated" in out and "per double block" in out and "machine: load" in out
    s = data["summary"]
    assert s["width"] == 256 and s["double_blocks"] == 1 and s["single_blocks"] == 1
    assert s["per_double_block_s"] > 0 and s["per_single_block_s"] > 0 and s["bake_s"] > 0
    assert s["goal_10_min_met"] is None  # not FLUX.1 width: no claim
    # the dim-4 adapter's block products: double = 2 × (qkv 3 splits + proj + mlp.0 + mlp.2), single = linear1 + linear2
    h, b = 256, 64
    double = 2 * (3 * 2 * h * h * b + 2 * h * h * b + 2 * 4 * h * h * (4 * b) + 2 * h * 4 * h * b)
    single = 3 * 2 * h * h * b + 2 * 4 * h * h * (4 * b) + 2 * h * 5 * h * b
    assert data["flops"] == {"double": pytest.approx(double), "single": pytest.approx(single)}
    assert 0 < s["peak_rss_growth_MiB"] < 200
    assert s["page_cache"].startswith("cold") and "page cache: cold" in out


def test_bench_scale_quick(tmp_path):
    out, data = _run("bench_scale", tmp_path)
    assert "ratios: bake per-layer time" in out and "inspect / header read" in out and "machine: load" in out
    s = data["summary"]
    assert data["quick"] is True and s["bake_layers"] == [300, 3000] and s["inspect_keys"] == 20_000
    assert all(t > 0 for t in s["bake_s"]) and s["inspect_s"] > 0 and s["safetensors_header_read_s"] > 0
    assert s["bake_per_layer_ratio"] == pytest.approx((s["bake_s"][1] / s["bake_s"][0]) / 10, rel=0.01)
    assert s["inspect_over_header_read"] == pytest.approx(s["inspect_s"] / s["safetensors_header_read_s"], rel=0.05)
    assert "fresh process" in out and s["fresh_process_inspect_s"] > 0 and s["fresh_process_header_read_s"] > 0
    assert s["fresh_process_inspect_over_header_read"] == pytest.approx(
        s["fresh_process_inspect_s"] / s["fresh_process_header_read_s"], rel=0.05)


def test_bench_bypass_quick(tmp_path):
    out, data = _run("bench_bypass", tmp_path)
    assert "ratios: ready_over_merge_max" in out and "machine: load" in out
    rows = data["layers"]
    assert {(r["out"], r["dtype"]) for r in rows} == {(320, "float32"), (640, "float32")}
    for r in rows:
        assert r["step_ratio"] == pytest.approx(r["step_bypass_s"] / r["step_merged_s"])
        assert r["ready_over_merge"] == pytest.approx(r["bypass_ready_s"] / r["merge_first_patch_s"])
        assert r["step_target"] == pytest.approx(1 + 1.5 * r["block_size"] / r["in"])
        assert r["bypass_err_vs_fp32"] < 1e-5  # fp32: the hooked layer computes the rotated forward
        assert r["step_flop_bound"] == pytest.approx(1 + r["block_size"] / r["in"])
        assert r["product_only_ratio"] == pytest.approx(1 + r["product_s"] / r["step_merged_s"])
        assert r["product_over_target"] == (r["product_only_ratio"] > r["step_target"])
        assert r["step_clock"] == "thread CPU time" and r["step_ratio_wall"] > 0


def test_bench_extract_quick(tmp_path):
    out, data = _run("bench_extract", tmp_path)
    assert "ratios: extract_rank_over_merge_max" in out and "machine: load" in out
    rows = data["results"]
    assert [(r["out"], r["blocks"]) for r in rows] == [(320, 8), (640, 8)]
    for r in rows:
        assert r["extract_rank_over_merge"] == pytest.approx(r["extract_rank_s"] / r["merge_s"])
        assert 0 < r["rank_rel_error"] < 1 and r["rank_method"] == "svd"  # 320/640-wide: exact SVD
        assert r["err_rel_error"] <= 0.1 and 1 <= r["err_rank"] <= r["in"]
