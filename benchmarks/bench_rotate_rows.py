"""The trainer's rotation of fp32 Linear outputs: the delta form vs the rows path, per SD1.x shape, same run.

    python benchmarks/bench_rotate_rows.py            # SD1.x shapes, warm and cache-flushed calls (about a minute)
    python benchmarks/bench_rotate_rows.py --quick    # two small shapes, a few repeats (what tests run)

`oft_core.train._rotated` / `_rotated_backward` (what `_RotateOutput` and `_RotateFromInput` run) on a (rows,
features) fp32 output, blocks of 8 (core's `factorization(features, 8)`), with and without the layer's bias:
- delta: y + D·(y − b), D = M − I, the bypass hook's one-pass product (`train._rotated_rows*`, the path for outputs
  of `train._DELTA_MIN_ELEMENTS` elements or more);
- rows: z = y − b, M·z through transposed row copies, − z, + y (`_rotated`'s own path, for smaller outputs).
Both are taken in the same process by setting `_DELTA_MIN_ELEMENTS` (0: every output in the delta form; huge: none),
interleaved, one torch thread; median per call. "flushed": a 64 MiB buffer written before each call, so y, g and
the blocks come from memory as in a training step (where a layer's output was made long before its backward).

Shapes: SD1.x at 32² latents, batch 2 (rows 2·1024, 2·256, 2·64 tokens; features 320 / 640 / 1280), attn2 to_k /
to_v on a 77-token context (2 × 77 rows, no bias), and bench_train.py's default UNet (128 / 256 wide, 8 context
tokens, 2 time-embedding rows). Results (JSON) go to bench_rotate_rows.results.json next to this script, or --results.
"""

from __future__ import annotations

# ruff: noqa: I001  (`_common` must come first: it puts the repo root on sys.path for `oft_core`)

import argparse
import statistics
import time
from pathlib import Path

from _common import HERE, machine, write_results

import torch

import oft_core.train as train

SHAPES = [  # (label, rows, features, bias)
    ("SD ff.net.2 32²", 2048, 320, True), ("SD ff.net.2 16²", 512, 640, True), ("SD ff.net.2 8²", 128, 1280, True),
    ("SD attn2 k/v 77 tokens", 154, 320, False), ("SD attn2 k/v 77 tokens", 154, 640, False),
    ("SD attn2 k/v 77 tokens", 154, 1280, False),
    ("default ff.net.2 32²", 2048, 128, True), ("default ff.net.2 16²", 512, 256, True),
    ("default attn2 k/v 8 tokens", 16, 256, False), ("default time emb", 2, 256, True),
]
QUICK = [("quick", 64, 64, True), ("quick", 16, 64, False)]


def _case(rows: int, features: int, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, b = features // 8, 8
    q = torch.randn(n, b, b, generator=g) * 0.05
    q = q - q.transpose(-1, -2)
    eye = torch.eye(b)
    blocks = [torch.linalg.solve(eye + q, eye - q)]  # a Cayley rotation of a trained-looking size
    y = torch.randn(rows, features, generator=g)
    return y, (torch.randn(features, generator=g) if bias else None), torch.randn(rows, features, generator=g), \
        ((n, b),), blocks


def measure(shapes, repeats: int, flushed: bool) -> list[dict]:
    flush = torch.empty(16 << 20) if flushed else None
    rows_out = []
    for label, rows, features, bias in shapes:
        y, b, g, sizes, blocks = _case(rows, features, bias)
        calls = {
            "forward": lambda: train._rotated(y, b, 1, sizes, blocks),
            "backward": lambda: train._rotated_backward(y, b, 1, sizes, blocks, g, True, [True]),
        }
        inner = 1 if flushed else max(1, int(2e6 // (rows * features)))
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(repeats):
            for form, threshold in (("rows", 1 << 62), ("delta", 0)):
                train._DELTA_MIN_ELEMENTS = threshold
                for what, fn in calls.items():
                    if flush is not None:
                        flush.fill_(1.0)
                    t = time.perf_counter()
                    for _ in range(inner):
                        fn()
                    times.setdefault((what, form), []).append((time.perf_counter() - t) / inner)
        r = {"label": label, "rows": rows, "features": features, "bias": bias, "flushed": flushed}
        for what in calls:
            old, new = (statistics.median(times[(what, f)]) * 1e3 for f in ("rows", "delta"))
            r[f"{what}_rows_ms"], r[f"{what}_delta_ms"], r[f"{what}_delta_over_rows"] = old, new, new / old
        rows_out.append(r)
    return rows_out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two small shapes, a few repeats (smoke run)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--results", default=None, help="results file (default: bench_rotate_rows[.quick].results.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    threshold = train._DELTA_MIN_ELEMENTS
    shapes = QUICK if args.quick else SHAPES
    repeats = args.repeats or (3 if args.quick else 15)
    before = machine()
    try:
        results = [r for flushed in (False, True) for r in measure(shapes, repeats, flushed)]
    finally:
        train._DELTA_MIN_ELEMENTS = threshold
    print(f"fp32 Linear output rotation, blocks of 8, one thread, median of {repeats}; the trainer takes the delta "
          f"form from {threshold} elements")
    for r in results:
        print(f"  {r['label']:27s} {r['rows']:5d} × {r['features']:4d} {'bias' if r['bias'] else '    '} "
              f"{'flushed' if r['flushed'] else 'warm   '}  forward {r['forward_rows_ms']:7.3f} → "
              f"{r['forward_delta_ms']:7.3f} ms  backward {r['backward_rows_ms']:7.3f} → {r['backward_delta_ms']:7.3f}"
              f" ms")
    ratios = {k: statistics.median(r[f"{k}_delta_over_rows"] for r in results
                                   if r["rows"] * r["features"] >= threshold or args.quick)
              for k in ("forward", "backward")}
    print(f"ratios: delta / rows median over the outputs the trainer puts in the delta form: forward "
          f"{ratios['forward']:.2f}, backward {ratios['backward']:.2f}")
    after = machine()
    print(f"machine: load {before['loadavg_1_5_15']} before, {after['loadavg_1_5_15']} after, "
          f"nproc {before['nproc']}, torch {before['torch']}")
    out = Path(args.results) if args.results else HERE / (
        "bench_rotate_rows.quick.results.json" if args.quick else "bench_rotate_rows.results.json")
    write_results(out, {"benchmark": "bench_rotate_rows", "quick": args.quick, "repeats": repeats,
                        "delta_min_elements": threshold, "machine_before": before, "machine_after": after,
                        "ratios": ratios, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
