"""Bake time and peak memory of a FLUX.1 all-linear dim-4 OFT (kohya `networks.oft_flux`) on a synthetic FLUX.1 base.

    python benchmarks/bench_bake.py                       # FLUX.1 width (3072), 1 double + 1 single block
    python benchmarks/bench_bake.py --double 2 --single 2 # more blocks if the time budget allows
    python benchmarks/bench_bake.py --quick               # width 256 (what tests/test_benchmarks_run.py runs)

The base holds every tensor of a FLUX.1 double / single block (BFL names, bf16 as FLUX.1-dev ships; the modulation
weights too, which are copied, not baked) for the chosen number of blocks. The adapter is what sd-scripts
`networks.oft_flux --network_dim 4` makes for "all linear" (the same selection as `oft_core.train`'s flux
"all-linear" preset: every Linear of the double / single blocks except the adaLN modulation): 4 blocks per split,
fused img/txt `qkv` as 3 splits, single `linear1` as q|k|v|mlp splits (block sizes 768, and 3072 for the MLP
projections), written as a real kohya file and read back by `oft_core`, then baked by `oft_core.bake.bake` with the
kohya strength 1.

Reported: seconds per double block and per single block (from the time spent on each block's tensors), their
extrapolation to FLUX.1's 19 double + 38 single blocks (plus the measured copy rate for the rest of a 23.8 GB model),
peak RSS growth during the bake (VmHWM after a reset through /proc/self/clear_refs; Linux), and the ratio of the
bake's block-product FLOPs to the time at the torch.bmm rate measured in the same run. Goal: a full FLUX.1
all-linear bake in under 10 minutes on 2 CPU cores. By default the base and adapter are dropped from the page cache
first (`--cache cold`; `--cache warm` keeps them cached from being written). Results, the cache state and machine load
go to bench_bake.results.json here.
"""

from __future__ import annotations

# ruff: noqa: I001  (`_common` must come first: it puts the repo root on sys.path for `oft_core`)

import argparse
import os
import tempfile
import time
from pathlib import Path

from _common import HERE, best_time, kohya_layer, machine, write_results

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from oft_core.bake import bake  # noqa: E402
from oft_core.rotation import rotate_weight  # noqa: E402
from oft_core.safetensors_io import read_header  # noqa: E402
from oft_core.spec import OFTAdapter  # noqa: E402
from oft_core.formats import write_adapter  # noqa: E402

FLUX_DOUBLE, FLUX_SINGLE = 19, 38
FLUX_PARAMS = 11.9e9  # FLUX.1-dev transformer parameters (23.8 GB in bf16)
DIM = 4  # sd-scripts network_dim = blocks per split


def double_block(h: int) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for s in ("img", "txt"):
        shapes.update({
            f"{s}_mod.lin.weight": (6 * h, h), f"{s}_mod.lin.bias": (6 * h,),
            f"{s}_attn.qkv.weight": (3 * h, h), f"{s}_attn.qkv.bias": (3 * h,),
            f"{s}_attn.norm.query_norm.scale": (128,), f"{s}_attn.norm.key_norm.scale": (128,),
            f"{s}_attn.proj.weight": (h, h), f"{s}_attn.proj.bias": (h,),
            f"{s}_mlp.0.weight": (4 * h, h), f"{s}_mlp.0.bias": (4 * h,),
            f"{s}_mlp.2.weight": (h, 4 * h), f"{s}_mlp.2.bias": (h,),
        })
    return shapes


def single_block(h: int) -> dict[str, tuple[int, ...]]:
    return {"linear1.weight": (7 * h, h), "linear1.bias": (7 * h,), "linear2.weight": (h, 5 * h),
            "linear2.bias": (h,), "norm.query_norm.scale": (128,), "norm.key_norm.scale": (128,),
            "modulation.lin.weight": (3 * h, h), "modulation.lin.bias": (3 * h,)}


def adapted(h: int) -> dict[str, list[int]]:
    """Relative module path -> output split widths (kohya oft_flux all-linear, modulation excluded)."""
    out = {}
    for s in ("img", "txt"):
        out.update({f"{s}_attn.qkv": [h, h, h], f"{s}_attn.proj": [h], f"{s}_mlp.0": [4 * h], f"{s}_mlp.2": [h]})
    single = {"linear1": [h, h, h, 4 * h], "linear2": [h]}
    return out, single


def build(tmp: Path, h: int, n_double: int, n_single: int):
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(n_double):
        for k, s in double_block(h).items():
            tensors[f"double_blocks.{i}.{k}"] = (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
    for i in range(n_single):
        for k, s in single_block(h).items():
            tensors[f"single_blocks.{i}.{k}"] = (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
    base = tmp / "flux_synthetic_base.safetensors"
    save_file(tensors, str(base), metadata={"synthetic": "FLUX.1 layer shapes"})
    del tensors
    layers = {}
    flops = {"double": 0.0, "single": 0.0}
    dbl, sgl = adapted(h)
    seed = 0
    for kind, n, table in (("double", n_double, dbl), ("single", n_single, sgl)):
        for i in range(n):
            for rel, splits in table.items():
                name = f"{kind}_blocks_{i}_{rel.replace('.', '_')}"
                layer, _ = kohya_layer(name, [(DIM, w // DIM) for w in splits], seed=seed)
                seed += 1
                layers[("unet", name)] = layer
                in_dim = {"double": double_block(h), "single": single_block(h)}[kind][f"{rel}.weight"][1]
                flops[kind] += sum(2.0 * w * in_dim * (w // DIM) for w in splits)
    adapter = write_adapter(OFTAdapter(layers, "kohya_flux"), tmp / "flux_all_linear_dim4.safetensors", "kohya")
    return base, Path(adapter), flops


def vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def bmm_rate(h: int, repeats: int) -> float:
    """GFLOP/s of torch.bmm on the bake's dominant shape: 4 blocks of the MLP split (4h rows) times h columns."""
    b = h  # 4·h rows / 4 blocks
    r, w = torch.randn(DIM, b, b), torch.randn(DIM, b, h)
    t = best_time(lambda: torch.bmm(r, w), repeats)
    return 2.0 * DIM * b * b * h / t / 1e9


def drop_from_page_cache(*paths: Path) -> str:
    """Ask the kernel to drop the files' pages (fsync first: only clean pages are dropped). Returns what was done;
    the kernel may keep pages it is not able to drop, so the result is "cold" as far as posix_fadvise goes."""
    if not hasattr(os, "posix_fadvise"):
        return "warm (posix_fadvise unavailable on this platform: the figure is warm)"
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "cold (base and adapter dropped with posix_fadvise DONTNEED before the bake)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="width 256, 1 + 1 blocks (smoke run)")
    ap.add_argument("--double", type=int, default=1, help="double blocks in the synthetic base (default 1)")
    ap.add_argument("--single", type=int, default=1, help="single blocks (default 1)")
    ap.add_argument("--width", type=int, default=None, help="hidden size (default 3072; quick 256)")
    ap.add_argument("--results", default=None, help="results file (default: bench_bake[.quick].results.json here)")
    ap.add_argument("--cache", choices=("cold", "warm"), default="cold",
                    help="cold (default): the base and the adapter are dropped from the page cache before the bake, "
                         "as for a model file not read since boot; warm: they stay cached from being written")
    args = ap.parse_args(argv)
    h = args.width or (256 if args.quick else 3072)
    info_before = machine()
    with tempfile.TemporaryDirectory(prefix="oft-bench-bake-", dir=os.environ.get("OFT_BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        base, adapter, flops = build(tmp, h, args.double, args.single)
        print(f"built a synthetic FLUX base (width {h}, {args.double} double + {args.single} single blocks, "
              f"{base.stat().st_size / 2**30:.2f} GiB bf16) and a kohya oft_flux dim-{DIM} all-linear adapter in "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
        header = read_header(base)
        order = [k for k, _ in sorted(header.tensors.items(), key=lambda kv: kv[1].start)]
        marks = []
        out = tmp / "baked.safetensors"
        warm, _ = kohya_layer("warmup", [(DIM, 64)])  # first-use costs of the LAPACK / bmm kernels, not the bake's
        rotate_weight(warm, torch.randn(DIM * 64, 64), 1.0)
        # The bake reads the adapter file itself, streamed (a skeleton, then one layer at a time), so the peak RSS
        # growth below covers the adapter too: no layer outlives its weight.
        cache = drop_from_page_cache(base, adapter) if args.cache == "cold" else "warm (files cached since written)"
        print(f"page cache: {cache}", flush=True)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss0 = vm("VmRSS")
        start = time.perf_counter()
        result = bake(base, [(adapter, 1.0)], out, progress=lambda d, t: marks.append(time.perf_counter()),
                      show_progress=False)
        total_s = time.perf_counter() - start
        peak = vm("VmHWM") - rss0
        per = {"double": 0.0, "single": 0.0}
        copy_bytes, copy_s = 0, 0.0
        prev = start
        adapted_keys = {m.target.key for r in result.reports for m in r.matched}
        for key, t in zip(order, marks):
            kind = key.split("_", 1)[0]
            if key in adapted_keys:
                per[kind] += t - prev
            else:
                copy_bytes += header.tensors[key].end - header.tensors[key].start
                copy_s += t - prev
            prev = t
        rate = bmm_rate(h, 1 if args.quick else 2)
        adapter_file_mib = adapter.stat().st_size / 2**20
    per_double = per["double"] / max(args.double, 1)
    per_single = per["single"] / max(args.single, 1)
    copy_rate = copy_bytes / copy_s if copy_s > 0 else float("inf")
    scale = 3072 / h  # extrapolation to FLUX.1 width only meaningful at h = 3072
    baked_params = FLUX_DOUBLE * sum(torch.Size(s).numel() for k, s in double_block(3072).items() if "mod" not in k) \
        + FLUX_SINGLE * sum(torch.Size(s).numel() for k, s in single_block(3072).items() if "mod" not in k)
    rest_bytes = max(FLUX_PARAMS - baked_params, 0) * 2
    full_s = FLUX_DOUBLE * per_double + FLUX_SINGLE * per_single + rest_bytes / copy_rate
    floor_s = FLUX_DOUBLE * flops["double"] / max(args.double, 1) / rate / 1e9 \
        + FLUX_SINGLE * flops["single"] / max(args.single, 1) / rate / 1e9
    summary = {
        "width": h, "double_blocks": args.double, "single_blocks": args.single,
        "bake_s": total_s, "adapter_file_MiB": adapter_file_mib, "adapter_streamed": True,
        "per_double_block_s": per_double, "per_single_block_s": per_single,
        "copy_MBps": copy_rate / 1e6, "bmm_gflops": rate,
        "extrapolated_flux1_full_bake_s": full_s, "extrapolated_flux1_bmm_floor_s": floor_s,
        "bake_over_floor": full_s / floor_s, "peak_rss_growth_MiB": peak / 2**20,
        "largest_tensor_MiB": max(ti.end - ti.start for ti in header.tensors.values()) / 2**20,
        "goal_10_min_met": full_s < 600 if h == 3072 else None,
        "page_cache": cache,
    }
    print(f"adapter: {adapter_file_mib:.0f} MiB file, streamed by the bake (one layer in memory at a time)")
    print(f"bake: {total_s:.1f}s; per double block {per_double:.2f}s, per single block {per_single:.2f}s; "
          f"copy {copy_rate / 1e6:.0f} MB/s; peak RSS growth {peak / 2**20:.0f} MiB, adapter included (largest tensor "
          f"{summary['largest_tensor_MiB']:.0f} MiB bf16)")
    what = "FLUX.1 (19 double + 38 single)" if h == 3072 else f"FLUX.1 block counts at width {h} (not FLUX.1 size)"
    goal = ("met" if full_s < 600 else "missed") if h == 3072 else f"n/a at width {h} (FLUX.1 is {scale:g}× wider)"
    print(f"ratios: extrapolated {what} full bake {full_s:.0f}s = {full_s / 60:.1f} min, "
          f"{full_s / floor_s:.2f}× the bmm floor ({floor_s:.0f}s at {rate:.0f} GFLOP/s); goal < 600 s: {goal}")
    info = machine()
    print(f"machine: load {info['loadavg_1_5_15']} (before {info_before['loadavg_1_5_15']}), nproc {info['nproc']}, "
          f"torch threads {info['torch_threads']}")
    path = Path(args.results) if args.results else HERE / f"bench_bake{'.quick' if args.quick else ''}.results.json"
    write_results(path, {"benchmark": "bench_bake", "quick": args.quick, "machine_before": info_before,
                         "machine": info, "summary": summary, "flops": flops})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
