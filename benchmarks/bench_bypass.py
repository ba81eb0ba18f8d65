"""Bypass apply mode vs merge mode: time from apply to ready, and the per-step cost of rotating activations.

    python benchmarks/bench_bypass.py            # FLUX.1-shaped layers (bench_patch's), tiny FLUX / SD forwards
    python benchmarks/bench_bypass.py --quick    # small shapes, one repeat (what tests/test_benchmarks_run.py runs)

Per layer (out × in, n blocks of size b = out/n, kohya convention: output side), best-of-N wall times:

- merge first patch: what merge mode does per weight when ComfyUI loads the model (`rotate_weight_` on the fp32
  copy ComfyUI hands the patch, bench_patch's "ours").
- bypass apply→ready: building the layer's `ModuleBypass` and registering its hooks on the module, i.e. all bypass
  does before the first step (`module_bypasses` + `attach`). Goal (issue 13): ≤ 1 % of the merge first patch.
- bypass first-forward extra: the rotation blocks, built once on a layer's first forward (`rotation_blocks`), shown
  apart so that nothing is hidden in "ready".
- per step: forward of the hooked layer (base W) over T tokens / forward of a plain Linear holding the merged weight;
  target 1 + 1.5·b/in (the block product is b/in of the layer's matmul: FLOP bound 1 + b/in). Timed as the CPU time
  of the calling thread (with the default one torch thread all the work runs there), best of N, the callables
  interleaved: on a shared machine a wall clock also counts the time other processes hold the core (the wall-clock
  ratio is kept in the results as step_ratio_wall). With --threads > 1, wall clock.
- product alone: the bare block product the hook runs (the same (B − I)ᵀ matrices, on the merged layer's output,
  cache warm, no other pass), 1 + its time / the merged step. Where that alone is over the target, no hook built
  on these torch kernels can meet it on this machine: the row says `product_over_target`.

Whole model (when ComfyUI is found): the tiny FLUX of the fixtures with the kohya dim-4 adapter (b = 32, in = 128) and
the tiny SD1.x UNet with LyCORIS diag-oft dim 8 (b = 8): apply + load time (`apply_oft` + `patch_model`) and
`apply_model` time, bypass / merge.
Results and the machine's load go to bench_bypass.results.json next to this script (or --results).
"""

from __future__ import annotations

# ruff: noqa: I001  (`_common` must come first: it puts the repo root on sys.path for `oft_core`)

import argparse
import os
import sys
import time
from pathlib import Path

from _common import HERE, REPO, best_time, best_time_on, kohya_layer, machine, write_results

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from oft_core.bypass import module_bypasses  # noqa: E402
from oft_core.match import Match  # noqa: E402
from oft_core.names import Target  # noqa: E402
from oft_core.rotation import rotate_weight, rotate_weight_, rotation_blocks  # noqa: E402

FULL_SHAPES = [("flux attn proj", 3072, 3072), ("flux qkv", 9216, 3072), ("flux single linear1", 21504, 3072)]
QUICK_SHAPES = [("sd 320", 320, 320), ("sd 640", 640, 640)]




def _interleaved(fns, repeats, clock=time.perf_counter):
    """Best-of times of callables measured in turn, `clock` per call (a load spike from other processes hits all)."""
    for f in fns:
        f()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, f in enumerate(fns):
            t = clock()
            f()
            best[i] = min(best[i], clock() - t)
    return best


def bench_layer(label, out_dim, in_dim, n, dtype, tokens, repeats, step_repeats, clock):
    b = out_dim // n
    layer, _ = kohya_layer(label.replace(" ", "_"), [(n, b)], seed=out_dim + n)
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(out_dim, in_dim, generator=g) * 0.02).to(dtype)
    bias = (torch.randn(out_dim, generator=g) * 0.1).to(dtype)
    x = torch.randn(tokens, in_dim, generator=g).to(dtype)
    row = {"shape": label, "out": out_dim, "in": in_dim, "blocks": n, "block_size": b, "dtype": str(dtype)[6:],
           "tokens": tokens}

    t_merge = best_time_on(lambda: w.to(torch.float32, copy=True), lambda t: rotate_weight_(layer, t, 1.0), repeats)
    lin = torch.nn.Linear(in_dim, out_dim, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(bias)
    match = Match(layer, Target(key="layer.weight"))

    def apply_to_ready():
        mods = module_bypasses([match], lambda _: 1.0, "kohya", lambda p: (False, 1))
        handles = mods["layer"].attach(lin)
        for h in handles:
            h.remove()

    t_ready = best_time(apply_to_ready, max(repeats, 5))
    t_blocks = best_time(lambda: rotation_blocks(layer, 1.0), repeats)

    merged = torch.nn.Linear(in_dim, out_dim, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        merged.weight.copy_(rotate_weight(layer, w, 1.0))
        merged.bias.copy_(bias)
    mods = module_bypasses([match], lambda _: 1.0, "kohya", lambda p: (False, 1))
    mb = mods["layer"]
    handles = mb.attach(lin)
    try:
        with torch.no_grad():
            y_b = lin(x)  # first forward builds the blocks (not timed below)
            y_m = merged(x)
            # the hook's own right factors (grouped as it groups them) on the merged output's rows, as it reads y
            dt = mb.product_blocks(mb.out_targets[0], x.device, dtype)[0]
            z = y_m.view(tokens, dt.shape[0], dt.shape[1]).transpose(0, 1)
            t_bypass, t_plain, t_product = _interleaved([lambda: lin(x), lambda: merged(x), lambda: torch.bmm(z, dt)],
                                                        step_repeats, clock)
            w_bypass, w_plain = _interleaved([lambda: lin(x), lambda: merged(x)], repeats)
    finally:
        for h in handles:
            h.remove()
    target = 1 + 1.5 * b / in_dim
    ref = F.linear(x.float(), rotate_weight(layer, w.float(), 1.0), bias.float())
    row.update(merge_first_patch_s=t_merge, bypass_ready_s=t_ready, ready_over_merge=t_ready / t_merge,
               first_forward_blocks_s=t_blocks, blocks_over_merge=t_blocks / t_merge,
               step_bypass_s=t_bypass, step_merged_s=t_plain, step_ratio=t_bypass / t_plain, step_target=target,
               step_within_target=t_bypass / t_plain <= target, step_flop_bound=1 + b / in_dim,
               product_s=t_product, product_only_ratio=1 + t_product / t_plain,
               product_over_target=1 + t_product / t_plain > target,
               step_ratio_wall=w_bypass / w_plain,
               step_clock="thread CPU time" if clock is time.thread_time else "wall",
               bypass_err_vs_fp32=float((y_b.float() - ref).abs().max() / ref.abs().max()),
               merged_err_vs_fp32=float((y_m.float() - ref).abs().max() / ref.abs().max()))
    return row


def bench_models(repeats):
    """Whole tiny FLUX / SD1.x forward and apply+load time, bypass vs merge, through ComfyUI (None when absent)."""
    root = Path(os.environ.get("COMFYUI_PATH") or Path.home() / ".cache" / "comfyui-oft" / "ComfyUI")
    if not (root / "comfy" / "model_patcher.py").is_file():
        return None, f"ComfyUI not found at {root}"
    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO.parent))
    import importlib.util

    import comfy_models

    comfy_models.import_comfy()
    spec = importlib.util.spec_from_file_location("comfyui_oft", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_oft"] = pack
    spec.loader.exec_module(pack)
    from comfyui_oft.nodes import files, patch

    fx = comfy_models.FIXTURES
    cases = [("tiny FLUX + kohya dim 4 (b 32, in 128)", comfy_models.flux_tiny, comfy_models.flux_inputs,
              fx / "kohya" / "flux_tiny_oft_attn_dim4.safetensors"),
             ("tiny SD1.x + LyCORIS dim 8 (b 8)", comfy_models.sd15_tiny, comfy_models.sd15_tiny_inputs,
              fx / "lycoris" / "lycoris_diag_oft_dim8" / "lycoris_diag_oft_dim8.safetensors")]
    rows = []
    for label, make, make_inputs, path in cases:
        base = make()
        adapter = files.load(path)
        inputs = make_inputs(batch=2, size=32)
        times = {}
        for mode in ("merge", "bypass"):
            def apply_and_load():
                m, _, _ = patch.apply_oft(base, None, adapter, 1.0, "kohya", mode)
                m.patch_model()
                m.unpatch_model()

            times[f"{mode}_apply_load_s"] = best_time(apply_and_load, repeats)
        # forwards measured alternately: the shared model is patched for one clone, then the other, per repeat
        loaded = {mode: patch.apply_oft(base, None, adapter, 1.0, "kohya", mode)[0] for mode in ("merge", "bypass")}
        for mode in ("merge", "bypass"):
            times[f"{mode}_forward_s"] = float("inf")
        for _ in range(repeats + 1):
            for mode, m in loaded.items():
                m.patch_model()
                try:
                    times[f"{mode}_forward_s"] = min(times[f"{mode}_forward_s"],
                                                     best_time(lambda: comfy_models.apply_model(m, inputs), 2))
                finally:
                    m.unpatch_model()
        times["apply_load_ratio"] = times["bypass_apply_load_s"] / times["merge_apply_load_s"]
        times["forward_ratio"] = times["bypass_forward_s"] / times["merge_forward_s"]
        rows.append({"model": label, **times})
    return rows, str(root)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, one repeat (smoke run)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; quick 1)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per forward (default 256; quick 64)")
    ap.add_argument("--step-repeats", type=int, default=None,
                    help="timed repeats of the per-step comparison (default 11; quick 1)")
    ap.add_argument("--results", default=None, help="results file (default: bench_bypass[.quick].results.json here)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine two threads made small products "
                         "10-100x slower from one run to the next, oversubscribed; both sides use the same setting)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 5)
    step_repeats = args.step_repeats or (1 if args.quick else 11)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    tokens = args.tokens or (64 if args.quick else 256)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    counts = (8,) if args.quick else (4, 32, None)  # None: 16-wide blocks (LyCORIS-style small blocks)
    dtypes = (torch.float32,) if args.quick else (torch.float32, torch.bfloat16)
    rows = []
    print(f"{'shape':<20} {'out×in':>12} {'n×b':>10} {'dtype':>8} {'merge ms':>8} {'ready µs':>8} {'ready/merge':>11} "
          f"{'blocks/merge':>12} {'step ratio':>10} {'target':>7} {'bound':>6} {'product':>8}")
    for label, o, i in shapes:
        for n in counts:
            n = n or o // 16
            for dtype in dtypes:
                r = bench_layer(label, o, i, n, dtype, tokens, repeats, step_repeats, clock)
                rows.append(r)
                print(f"{label:<20} {f'{o}×{i}':>12} {str(n) + '×' + str(r['block_size']):>10} {r['dtype']:>8} "
                      f"{1e3 * r['merge_first_patch_s']:8.1f} {1e6 * r['bypass_ready_s']:8.0f} "
                      f"{100 * r['ready_over_merge']:10.3f}% {100 * r['blocks_over_merge']:11.1f}% "
                      f"{r['step_ratio']:9.3f}× {r['step_target']:6.3f}× {r['step_flop_bound']:5.3f}× "
                      f"{r['product_only_ratio']:7.3f}×" + ("  (product alone over target)"
                                                           if r["product_over_target"] else ""), flush=True)
    models, where = bench_models(repeats) if not args.quick else (None, "skipped in --quick")
    if models:
        for m in models:
            print(f"{m['model']}: apply+load bypass/merge {m['apply_load_ratio']:.3f}×, forward bypass/merge "
                  f"{m['forward_ratio']:.3f}×")
    summary = {
        "ready_over_merge_max": max(r["ready_over_merge"] for r in rows),
        "blocks_over_merge_max": max(r["blocks_over_merge"] for r in rows),
        "step_ratio_max": max(r["step_ratio"] for r in rows),
        "step_within_target": sum(r["step_within_target"] for r in rows),
        "product_alone_over_target": sum(r["product_over_target"] for r in rows),
        "rows": len(rows),
    }
    print("ratios: " + ", ".join(f"{k} {v:.3g}" for k, v in summary.items()))
    info = machine()
    print(f"machine: load {info['loadavg_1_5_15']}, nproc {info['nproc']}, torch threads {info['torch_threads']}")
    out = Path(args.results) if args.results else HERE / f"bench_bypass{'.quick' if args.quick else ''}.results.json"
    write_results(out, {"benchmark": "bench_bypass", "quick": args.quick, "repeats": repeats,
                        "step_repeats": step_repeats, "step_clock": "thread CPU time" if args.threads == 1 else "wall",
                        "tokens": tokens,
                        "comfyui": where, "machine": info, "summary": summary, "layers": rows, "models": models})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
