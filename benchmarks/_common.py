"""Shared helpers of the benchmark scripts: repo import path, timing, machine load, results file, kohya-style layers.

Benchmarks are scripts, not tests: they print ratios measured in the same run (so a loaded machine slows both sides)
and write the figures with the machine's load next to the script. `tests/test_benchmarks_run.py` only checks that
each runs in `--quick` mode and prints its ratios.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from oft_core.spec import Constraint, make_layer  # noqa: E402


def machine() -> dict:
    """What the numbers depend on: load average, CPUs, torch threads, versions."""
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "loadavg_1_5_15": [round(x, 2) for x in load],
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def best_time(fn, repeats: int, warmup: int = 1) -> float:
    """Best wall time of `repeats` calls after `warmup` calls (best-of: the least disturbed by other load)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def best_time_on(setup, fn, repeats: int, warmup: int = 1) -> float:
    """Best wall time of fn(setup()) with setup() untimed (a fresh weight copy for a patch that works in place)."""
    for _ in range(warmup):
        fn(setup())
    best = float("inf")
    for _ in range(repeats):
        arg = setup()
        t = time.perf_counter()
        fn(arg)
        best = min(best, time.perf_counter() - t)
    return best


def kohya_layer(name: str, splits: list[tuple[int, int]], seed: int = 0, alpha: float = 1e-3):
    """A kohya-convention layer (output side, Rᵀ applied, ‖Q‖ ≤ alpha·split per split): splits [(blocks, size)].

    Generators are seeded noise of a trained-looking size (about half of the clamp bound)."""
    alpha = float(torch.tensor(alpha, dtype=torch.float32))  # kohya files store alpha in fp32: use that exact value
    g = torch.Generator().manual_seed(seed)
    gens, raw = [], []
    for n, b in splits:
        a = torch.randn(n, b, b, generator=g)
        q = a - a.transpose(1, 2)
        q = q * (0.5 * alpha * n * b / float(q.norm()))
        gens.append(q)
        raw.append(torch.triu(q, 1))  # the stored A with A − Aᵀ = Q, as kohya files hold it
    layer = make_layer(path="", name=name, side="out", blocks=gens, transpose=True,
                       constraint=Constraint("norm_clamp", alpha), source="kohya", key=f"oft_unet_{name}")
    return layer, raw


def write_results(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
