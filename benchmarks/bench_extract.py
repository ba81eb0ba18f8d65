"""OFT → LoRA extraction time per layer on FLUX.1-shaped layers, against the merge of the same layer (same run).

    python benchmarks/bench_extract.py            # FLUX.1 attn proj / qkv / single linear1, kohya dim 4 and 32
    python benchmarks/bench_extract.py --quick    # SD-sized shapes, one repeat (tests/test_benchmarks_run.py)

Per layer: "merge" is `rotate_weight` (what a bake or merge-mode patch does to the weight); "extract r" is what
`oft_core.extract` does per weight at a fixed rank: ΔW = R·W − W plus the truncated SVD (randomized for wide layers,
`low_rank`); "extract err" the relative-error mode (exact SVD of ΔW, fp64), only on the smaller shapes unless
--exact-all (minutes per FLUX.1 layer on a shared CPU). Printed: seconds, the ratios to the merge, the relative
error reached.
Results and the machine's load go to bench_extract.results.json next to this script (or --results).
"""

from __future__ import annotations

# ruff: noqa: I001  (`_common` must come first: it puts the repo root on sys.path for `oft_core`)

import argparse
import time
from pathlib import Path

from _common import HERE, kohya_layer, machine, write_results

import torch  # noqa: E402

from oft_core.extract import low_rank  # noqa: E402
from oft_core.rotation import rotate_weight  # noqa: E402

FULL_SHAPES = [("flux attn proj", 3072, 3072), ("flux qkv", 9216, 3072), ("flux single linear1", 21504, 3072)]
QUICK_SHAPES = [("sd 320", 320, 320), ("sd 640", 640, 640)]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def bench_one(label, o, i, n, rank, exact, repeats):
    layer, _ = kohya_layer(label.replace(" ", "_"), [(n, o // n)], seed=o + n)
    w = torch.randn(o, i, generator=torch.Generator().manual_seed(1)) * 0.02
    t_merge = min(timed(lambda: rotate_weight(layer, w, 1.0))[0] for _ in range(repeats))

    def extract_rank():
        dw = rotate_weight(layer, w, 1.0) - w
        return low_rank(dw, rank)

    best, res = float("inf"), None
    for _ in range(repeats):
        t, res = timed(extract_rank)
        best = min(best, t)
    row = {"shape": label, "out": o, "in": i, "blocks": n, "block_size": o // n, "rank": rank, "merge_s": t_merge,
           "extract_rank_s": best, "extract_rank_over_merge": best / t_merge, "rank_rel_error": res[2],
           "rank_method": res[3]}
    if exact:
        t, res = timed(lambda: low_rank(rotate_weight(layer, w, 1.0) - w, rel_error=0.1))
        row.update(extract_err_s=t, extract_err_over_merge=t / t_merge, err_rank=int(res[0].shape[1]),
                   err_rel_error=res[2])
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, one repeat (smoke run)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 2; quick 1)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--exact-all", action="store_true", help="also time the exact-SVD mode on the large shapes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    ap.add_argument("--results", default=None, help="results file (default: bench_extract[.quick].results.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 2)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    counts = (8,) if args.quick else (4, 32)
    rows = []
    print(f"{'shape':<20} {'out×in':>12} {'n×b':>9} {'merge s':>8} {'extract r s':>11} {'/merge':>7} {'err':>6} "
          f"{'method':>10} {'exact s':>8} {'/merge':>7} {'rank@0.1':>8}")
    for label, o, i in shapes:
        for n in counts:
            exact = args.quick or args.exact_all or o * i <= 3072 * 3072
            r = bench_one(label, o, i, n, args.rank, exact and n == counts[0], repeats)
            rows.append(r)
            ex = (f"{r['extract_err_s']:8.1f} {r['extract_err_over_merge']:6.1f}× {r['err_rank']:8d}"
                  if "extract_err_s" in r else f"{'-':>8} {'-':>7} {'-':>8}")
            print(f"{label:<20} {f'{o}×{i}':>12} {str(n) + '×' + str(o // n):>9} {r['merge_s']:8.2f} "
                  f"{r['extract_rank_s']:11.2f} {r['extract_rank_over_merge']:6.1f}× {r['rank_rel_error']:6.3f} "
                  f"{r['rank_method']:>10} {ex}", flush=True)
    summary = {"extract_rank_over_merge_max": max(r["extract_rank_over_merge"] for r in rows),
               "extract_rank_s_max": max(r["extract_rank_s"] for r in rows)}
    print("ratios: " + ", ".join(f"{k} {v:.3g}" for k, v in summary.items()))
    info = machine()
    print(f"machine: load {info['loadavg_1_5_15']}, nproc {info['nproc']}, torch threads {info['torch_threads']}")
    out = Path(args.results) if args.results else HERE / f"bench_extract{'.quick' if args.quick else ''}.results.json"
    write_results(out, {"benchmark": "bench_extract", "quick": args.quick, "repeats": repeats, "rank": args.rank,
                        "machine": info, "summary": summary, "results": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
