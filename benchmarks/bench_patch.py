"""Per-layer OFT patch time: our merge path vs ComfyUI's built-in OFT patch vs a plain einsum, and the bmm floor.

    python benchmarks/bench_patch.py            # FLUX.1 and SD shapes, 8 and 32 blocks, fp32 and bf16
    python benchmarks/bench_patch.py --quick    # a few small shapes (what tests/test_benchmarks_run.py runs)

Per shape (out × in), block count n (block size b = out / n) and weight dtype, best-of-N wall time of what ComfyUI's
patcher (`ModelPatcher.patch_weight_to_device`) does per weight with either adapter: a float32 copy of W, the
adapter's `calculate_weight` on it, the rounding back to W's dtype.

- ours ("patch"): `oft_core.rotate_weight_(layer, temp, 1.0)` on the fp32 copy, which is what our
  `OFTWeightAdapter.calculate_weight` runs on a weight's first patch: the Cayley blocks built from matmuls and the
  block product in place, chunk by chunk, or for blocks large against the weight (b ≥ 512 and ≥ in/4) a blocked
  solve against W that never forms R.
- comfy ("patch"): `comfy.weight_adapter.oft.OFTAdapter.calculate_weight(temp, ..., strength=1)` of ComfyUI 0.3.64
  (its strength is applied twice, s², so it is timed at 1, where s² = s). Only when ComfyUI is found (COMFYUI_PATH,
  else ~/.cache/comfyui-oft/ComfyUI).
- "e2e": the copy + patch + rounding, both sides (the copy and rounding are the same work for both).
- "repeat": our patch when the layer's rotation blocks are already kept (from a weight's second patch on: reloads
  after offloading, ComfyUI's low-VRAM path that patches on every forward); ComfyUI rebuilds its R every time.
- ours (new tensor): `rotate_weight(layer, W, 1.0)`, the library / bake path (W in, a new W' in W's dtype out).
- einsum: the plain reference, R = (I + Q)(I − Q)⁻¹ by an explicit inverse, then einsum("k n m, k n i -> k m i").
- floor: torch.bmm of the same (n, b, b) × (n, b, in) fp32 shapes, i.e. 2·out·in·b FLOPs at the matmul rate measured
  in this run; "ours/floor" is how far the whole patch is from the bare block product.

Goals (the issue): ours ≥ 2× faster than comfy, and within 1.5× of the floor. Results and the machine's load go to
bench_patch.results.json next to this script (or --results).
"""

from __future__ import annotations

# ruff: noqa: I001  (`_common` must come first: it puts the repo root on sys.path for `oft_core`)

import argparse
import statistics
import sys
from pathlib import Path

from _common import HERE, best_time, best_time_on, kohya_layer, machine, write_results

import torch  # noqa: E402

from oft_core.rotation import rotate_weight, rotate_weight_, rotation_blocks  # noqa: E402

FULL_SHAPES = [
    ("flux attn proj", 3072, 3072), ("flux qkv", 9216, 3072), ("flux single linear1", 21504, 3072),
    ("sd 320", 320, 320), ("sd 640", 640, 640), ("sd 1280", 1280, 1280), ("sd ff 1280", 10240, 1280),
]
QUICK_SHAPES = [("sd 320", 320, 320), ("sd 640", 640, 640)]


def load_comfy_oft():
    """ComfyUI's OFTAdapter class, or (None, why)."""
    import os

    root = Path(os.environ.get("COMFYUI_PATH") or Path.home() / ".cache" / "comfyui-oft" / "ComfyUI")
    if not (root / "comfy" / "weight_adapter" / "oft.py").is_file():
        return None, f"ComfyUI not found at {root}"
    sys.path.insert(0, str(root))
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # before comfy.model_management picks a device
        import comfy.model_management  # noqa: F401
        from comfy.weight_adapter.oft import OFTAdapter
    except Exception as e:  # a broken ComfyUI must not stop our own figures
        return None, f"ComfyUI import failed: {type(e).__name__}: {e}"
    return OFTAdapter, str(root)


def einsum_reference(raw: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    q = raw - raw.transpose(1, 2)
    eye = torch.eye(q.shape[-1])
    r = (eye + q) @ torch.linalg.inv(eye - q)
    n, b, _ = r.shape
    out = torch.einsum("knm,kni->kmi", r, w.to(torch.float32).view(n, b, -1))
    return out.reshape(w.shape).to(w.dtype)


def bench_one(label, out_dim, in_dim, n, dtype, repeats, comfy_cls):
    b = out_dim // n
    layer, raw = kohya_layer(label.replace(" ", "_"), [(n, b)], seed=out_dim + n)
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(out_dim, in_dim, generator=g) * 0.02).to(dtype)
    flops = 2.0 * out_dim * in_dim * b
    rows = {"shape": label, "out": out_dim, "in": in_dim, "blocks": n, "block_size": b, "dtype": str(dtype)[6:]}

    rot = torch.randn(n, b, b, generator=g)
    wb = torch.randn(n, b, in_dim, generator=g)
    t_floor = best_time(lambda: torch.bmm(rot, wb), repeats)
    # What ComfyUI's patcher does per weight (ModelPatcher.patch_weight_to_device), for either adapter: a float32
    # copy of the weight (untimed here: the same for both), the adapter's calculate_weight on it, and the rounding
    # back to the weight's dtype. "patch" times calculate_weight alone; "e2e" times copy + patch + rounding.
    fresh = lambda: w.to(torch.float32, copy=True)  # noqa: E731

    def ours_patch(temp):  # our OFTWeightAdapter.calculate_weight: in place, blocks built (first patch: no cache)
        return rotate_weight_(layer, temp, 1.0)

    t_ours = best_time_on(fresh, ours_patch, repeats)
    cached = rotation_blocks(layer, 1.0)  # what our patch keeps from a layer's second patch on (reloads, low VRAM)
    t_repeat = best_time_on(fresh, lambda temp: rotate_weight_(layer, temp, 1.0, blocks=cached), repeats)
    t_ours_e2e = best_time(lambda: ours_patch(fresh()).to(dtype), repeats)
    t_ours_new = best_time(lambda: rotate_weight(layer, w, 1.0), repeats)  # library/bake path: new tensor, W's dtype
    t_einsum = best_time(lambda: einsum_reference(raw[0], w), repeats)
    ours = rotate_weight(layer, w, 1.0)
    rows.update(floor_s=t_floor, matmul_gflops=flops / t_floor / 1e9, ours_s=t_ours, ours_e2e_s=t_ours_e2e,
                ours_repeat_s=t_repeat, ours_repeat_over_floor=t_repeat / t_floor,
                ours_new_tensor_s=t_ours_new, einsum_s=t_einsum, ours_over_floor=t_ours / t_floor,
                ours_new_tensor_over_floor=t_ours_new / t_floor, einsum_over_ours=t_einsum / t_ours_new)
    if comfy_cls is not None:
        # alpha 0: no clamp in ComfyUI (it would clamp ‖Q‖ at alpha, not alpha·dim); our Q is under our bound, so both
        # compute the same rotation and the results can be compared.
        adapter = comfy_cls(set(), (raw[0], None, 0.0, None))

        def comfy_patch(temp):
            return adapter.calculate_weight(temp, "k", 1.0, 1.0, None, lambda a: a, torch.float32)

        t_comfy = best_time_on(fresh, comfy_patch, repeats)
        t_comfy_e2e = best_time(lambda: comfy_patch(fresh()).to(dtype), repeats)
        diff = float((comfy_patch(fresh()).to(dtype).float() - ours.float()).abs().max() / ours.float().abs().max())
        rows.update(comfy_s=t_comfy, comfy_e2e_s=t_comfy_e2e, comfy_over_ours=t_comfy / t_ours,
                    comfy_over_ours_repeat=t_comfy / t_repeat,
                    comfy_over_ours_e2e=t_comfy_e2e / t_ours_e2e, comfy_vs_ours_rel_diff=diff)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few small shapes, one repeat (smoke run)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 3; quick 1)")
    ap.add_argument("--results", default=None, help="results file (default: bench_patch[.quick].results.json here)")
    args = ap.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    counts = (8,) if args.quick else (8, 32)
    dtypes = (torch.float32, torch.bfloat16)
    comfy_cls, comfy_where = load_comfy_oft()
    results = []
    print(f"{'shape':<20} {'out×in':>12} {'n×b':>9} {'dtype':>8} {'ours ms':>8} {'comfy/ours':>10} {'(e2e)':>6} "
          f"{'(repeat)':>8} {'ours/floor':>10} {'(repeat)':>8} {'new/floor':>9} {'einsum/new':>10} {'GF/s':>5}")
    for label, o, i in shapes:
        for n in counts:
            if o % n:
                continue
            for dtype in dtypes:
                r = bench_one(label, o, i, n, dtype, repeats, comfy_cls)
                results.append(r)
                comfy = f"{r['comfy_over_ours']:.2f}×" if "comfy_s" in r else "n/a"
                e2e = f"{r['comfy_over_ours_e2e']:.2f}×" if "comfy_s" in r else "n/a"
                rep = f"{r['comfy_over_ours_repeat']:.2f}×" if "comfy_s" in r else "n/a"
                print(f"{label:<20} {f'{o}×{i}':>12} {str(n) + '×' + str(r['block_size']):>9} {r['dtype']:>8} "
                      f"{1e3 * r['ours_s']:8.1f} {comfy:>10} {e2e:>6} {rep:>8} {r['ours_over_floor']:9.2f}× "
                      f"{r['ours_repeat_over_floor']:7.2f}× "
                      f"{r['ours_new_tensor_over_floor']:8.2f}× {r['einsum_over_ours']:9.2f}× "
                      f"{r['matmul_gflops']:5.0f}", flush=True)
    def median(key):
        return statistics.median(r[key] for r in results)

    summary = {
        "ours_over_floor_median": median("ours_over_floor"),
        "ours_over_floor_max": max(r["ours_over_floor"] for r in results),
        "ours_repeat_over_floor_median": median("ours_repeat_over_floor"),
        "ours_new_tensor_over_floor_median": median("ours_new_tensor_over_floor"),
        "einsum_over_ours_median": median("einsum_over_ours"),
    }
    if comfy_cls is not None:
        summary.update(comfy_over_ours_median=median("comfy_over_ours"),
                       comfy_over_ours_min=min(r["comfy_over_ours"] for r in results),
                       comfy_over_ours_e2e_median=median("comfy_over_ours_e2e"),
                       comfy_over_ours_repeat_median=median("comfy_over_ours_repeat"),
                       comfy_vs_ours_rel_diff_max=max(r["comfy_vs_ours_rel_diff"] for r in results))
    print("ratios: " + ", ".join(f"{k} {v:.3g}" for k, v in summary.items()))
    print(f"ComfyUI: {comfy_where}")
    info = machine()
    print(f"machine: load {info['loadavg_1_5_15']}, nproc {info['nproc']}, torch threads {info['torch_threads']}")
    out = Path(args.results) if args.results else HERE / f"bench_patch{'.quick' if args.quick else ''}.results.json"
    write_results(out, {"benchmark": "bench_patch", "quick": args.quick, "repeats": repeats, "comfyui": comfy_where,
                        "machine": info, "summary": summary, "results": results})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
