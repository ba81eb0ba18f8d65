"""Time under many layers (issue 10): bake time per layer from 1,000 to 10,000 layers, and `inspect` of 200,000 keys
against safetensors' own header read of the same file.

    python benchmarks/bench_scale.py            # 1,000 and 10,000 layers; 200,000 keys
    python benchmarks/bench_scale.py --quick    # 300 and 3,000 layers; 20,000 keys (tests/test_benchmarks_run.py)

Bake: a FLUX-named base of N tiny fp32 weights (`double_blocks.<i>.img_attn.proj.weight`, 8×8) and a kohya
`oft_flux` adapter with one layer on each (2 blocks of 4), baked by `oft_core.bake.bake` from the file (streamed).
Goal: the per-layer time flat, i.e. t(10,000) / t(1,000) ≤ 1.2 × 10.

Inspect: a kohya adapter of 100,000 layers (200,000 keys: `.oft_blocks` + `.alpha`), read and summarised the way
`python -m oft_core inspect FILE` does (`load_adapter` + `describe` + `format_text`), against
`safetensors.safe_open(FILE).keys()` (the header parse in Rust) and `safetensors.torch.load_file` (header and every
tensor). Goal: inspect ≤ 3 × the header read.

Fresh process: the same two, each as the first call of its own new Python process (imports excluded: timed inside
the process around the call), best of 3 processes each, alternated; printed and written as their own ratio beside
the one above (which times both in this process after the bakes, on a grown heap).

Every figure is the best of a few runs measured in this run, so a loaded machine slows both sides of each ratio.
"""

from __future__ import annotations

# ruff: noqa: I001  (`_common` must come first: it puts the repo root on sys.path for `oft_core`)

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import HERE, best_time, kohya_layer, machine, write_results

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from oft_core.bake import bake  # noqa: E402
from oft_core.formats import load_adapter  # noqa: E402
from oft_core.spec import OFTAdapter  # noqa: E402
from oft_core.summary import describe, format_text  # noqa: E402
from oft_core.formats import write_adapter  # noqa: E402

BAKE_GOAL = 1.2
INSPECT_GOAL = 3.0


def bake_case(tmp: Path, n: int) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(n)
    base = tmp / f"base_{n}.safetensors"
    save_file({f"double_blocks.{i}.img_attn.proj.weight": torch.randn(8, 8, generator=g) for i in range(n)}, str(base))
    layers = {}
    for i in range(n):
        name = f"double_blocks_{i}_img_attn_proj"
        layers[("unet", name)] = kohya_layer(name, [(2, 4)], seed=i)[0]
    adapter = write_adapter(OFTAdapter(layers, "kohya_flux"), tmp / f"adapter_{n}.safetensors", "kohya")
    return base, Path(adapter)


def time_bake(tmp: Path, n: int, repeats: int) -> float:
    base, adapter = bake_case(tmp, n)
    out = tmp / f"out_{n}.safetensors"

    def run():
        bake(base, [(adapter, 1.0)], out, overwrite=True, show_progress=False)

    return best_time(run, repeats, warmup=0)


def inspect_case(tmp: Path, layers: int) -> Path:
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(layers):
        key = f"oft_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn{i}_to_q"
        tensors[f"{key}.oft_blocks"] = 1e-3 * torch.randn(2, 4, 4, generator=g)
        tensors[f"{key}.alpha"] = torch.tensor(1e-3)
    path = tmp / f"inspect_{2 * layers}.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.oft"})
    return path


def run_inspect(path: Path) -> str:
    return format_text(describe(load_adapter(path)))


def header_read(path: Path) -> int:
    with safe_open(str(path), "pt") as f:
        return len(list(f.keys()))


# Each side's first call in a new Python process (imports done and excluded: the time is taken inside the process
# around the call alone), as a user's `python -m oft_core inspect FILE` meets it: a cold heap, first-touch memory.
_FRESH = {
    "inspect": "from bench_scale import run_inspect as fn",
    "header_read": "from bench_scale import header_read as fn",
}
_FRESH_RUN = """
import sys, time
sys.path.insert(0, sys.argv[1])
{imp}
import torch
torch.set_num_threads(1)
from pathlib import Path
path = Path(sys.argv[2])
t = time.perf_counter()
fn(path)
print(time.perf_counter() - t)
"""


def fresh_time(which: str, path: Path, processes: int) -> float:
    """Best over `processes` new Python processes of the first call of `which` (see `_FRESH`)."""
    code = _FRESH_RUN.format(imp=_FRESH[which])
    best = float("inf")
    for _ in range(processes):
        out = subprocess.run([sys.executable, "-c", code, str(HERE), str(path)], check=True, capture_output=True,
                             text=True).stdout
        best = min(best, float(out.split()[-1]))
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (seconds): what the test suite runs")
    p.add_argument("--results", type=Path, default=HERE / "bench_scale.results.json")
    args = p.parse_args(argv)
    small, large = (300, 3000) if args.quick else (1000, 10_000)
    keys = 20_000 if args.quick else 200_000
    repeats = 2
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="oft-bench-scale-") as tmp:
        tmp = Path(tmp)
        t_small = time_bake(tmp, small, repeats)
        t_large = time_bake(tmp, large, repeats)
        path = inspect_case(tmp, keys // 2)
        t_header = best_time(lambda: header_read(path), 3)
        t_load = best_time(lambda: load_file(str(path)), 2)
        t_inspect = best_time(lambda: run_inspect(path), 2, warmup=0)
        t0 = time.perf_counter()
        load_adapter(path)
        t_load_adapter = time.perf_counter() - t0
        t_fresh_header = t_fresh_inspect = float("inf")
        for _ in range(3):  # alternated, so a change of machine load falls on both sides
            t_fresh_header = min(t_fresh_header, fresh_time("header_read", path, 1))
            t_fresh_inspect = min(t_fresh_inspect, fresh_time("inspect", path, 1))
    bake_ratio = (t_large / t_small) / (large / small)
    inspect_ratio = t_inspect / t_header
    fresh_ratio = t_fresh_inspect / t_fresh_header
    summary = {
        "bake_layers": [small, large],
        "bake_s": [round(t_small, 3), round(t_large, 3)],
        "bake_ms_per_layer": [round(1e3 * t_small / small, 3), round(1e3 * t_large / large, 3)],
        "bake_per_layer_ratio": round(bake_ratio, 3),
        "bake_goal": BAKE_GOAL,
        "bake_goal_met": bake_ratio <= BAKE_GOAL,
        "inspect_keys": keys,
        "inspect_s": round(t_inspect, 3),
        "load_adapter_s": round(t_load_adapter, 3),
        "safetensors_header_read_s": round(t_header, 4),
        "safetensors_load_file_s": round(t_load, 4),
        "inspect_over_header_read": round(inspect_ratio, 2),
        "inspect_over_load_file": round(t_inspect / t_load, 2),
        "fresh_process_inspect_s": round(t_fresh_inspect, 3),
        "fresh_process_header_read_s": round(t_fresh_header, 4),
        "fresh_process_inspect_over_header_read": round(fresh_ratio, 2),
        "inspect_goal": INSPECT_GOAL,
        "inspect_goal_met": inspect_ratio <= INSPECT_GOAL,
    }
    info = machine()
    print(f"bake: {small} layers {t_small:.2f}s ({1e3 * t_small / small:.2f} ms/layer), {large} layers "
          f"{t_large:.2f}s ({1e3 * t_large / large:.2f} ms/layer)")
    print(f"inspect of {keys} keys: {t_inspect:.3f}s (load_adapter alone {t_load_adapter:.3f}s); safetensors header "
          f"read {t_header:.4f}s, load_file {t_load:.4f}s")
    print(f"ratios: bake per-layer time {large} vs {small} layers = {bake_ratio:.2f} (goal ≤ {BAKE_GOAL}); inspect / "
          f"header read = {inspect_ratio:.2f} (goal ≤ {INSPECT_GOAL}); inspect / load_file = "
          f"{t_inspect / t_load:.2f}")
    print(f"fresh process (each side's first call in its own new Python process, best of 3, imports excluded): "
          f"inspect {t_fresh_inspect:.3f}s, header read {t_fresh_header:.4f}s, inspect / header read = "
          f"{fresh_ratio:.2f}")
    print(f"machine: load {info['loadavg_1_5_15']}, {info['nproc']} CPUs, torch threads {info['torch_threads']}")
    write_results(args.results, {"quick": args.quick, "machine": info, "summary": summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
