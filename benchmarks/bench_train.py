"""Input-centric (OFTTrainer, activation side) vs weight-centric OFT training step, same model, same run.

Weight-centric = what core's TrainLoraNode(algorithm="OFT") does per step: build M, materialise W' = M·W for every
adapted layer, run the layer with W'. Input-centric = oft_core.train: y = M·(W x), no W'.

Measured per step (median of `--repeat`): wall time, and the bytes autograd saves for backward (a CPU-portable proxy
of peak activation memory: counted with a saved-tensor hook). Ratios are computed within the same run; results and
machine load (os.getloadavg) are appended to bench_train.results.txt next to this script.

    python benchmarks/bench_train.py [--dim 1024] [--layers 4] [--tokens 256] [--num-blocks 4] [--repeat 5]

Not measured yet: core's TrainLoraNode itself (needs a ComfyUI model and its guider loop).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oft_core.rotation import _apply_rows  # noqa: E402  (the merge path's block product: weight-centric baseline)
from oft_core.train import OFTTrainer, run_training  # noqa: E402


class Stack(nn.Module):
    def __init__(self, dim, layers):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))

    def forward(self, x):
        for lin in self.layers:
            x = F.gelu(lin(x))
        return x


def weight_centric(trainer: OFTTrainer):
    """Patch forwards with a materialised rotated weight (restored by the returned undo)."""
    for tl in trainer.layers:
        def fwd(x, tl=tl):
            weight = tl.module.weight
            w = _apply_rows(tl.layer, trainer.blocks(tl), weight.float().reshape(weight.shape[0], -1))
            return F.linear(x, w.reshape(weight.shape), tl.module.bias)
        tl.module.forward = fwd

    def undo():
        for tl in trainer.layers:
            del tl.module.forward
    return undo


def measure(model, x, target, trainer, mode, repeat):
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    times = []
    for _ in range(repeat):
        saved[0] = 0
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if mode == "input":
                with trainer.attach():
                    run_training(trainer.parameters(), lambda s, m: F.mse_loss(model(x), target), steps=1, lr=1e-3)
            else:
                undo = weight_centric(trainer)
                try:
                    run_training(trainer.parameters(), lambda s, m: F.mse_loss(model(x), target), steps=1, lr=1e-3)
                finally:
                    undo()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), saved[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--num-blocks", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = Stack(args.dim, args.layers).requires_grad_(False)
    x = torch.randn(args.tokens, args.dim)
    target = torch.randn(args.tokens, args.dim)
    trainer = OFTTrainer(list(model.layers.named_children()), num_blocks=args.num_blocks, alpha=0)
    measure(model, x, target, trainer, "input", 1)  # warm-up
    t_in, m_in = measure(model, x, target, trainer, "input", args.repeat)
    t_w, m_w = measure(model, x, target, trainer, "weight", args.repeat)
    load = os.getloadavg()
    lines = [
        f"{time.strftime('%Y-%m-%d %H:%M:%S')} torch {torch.__version__} threads {torch.get_num_threads()} "
        f"loadavg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        f"  model: {args.layers} × Linear({args.dim}, {args.dim}), {args.tokens} tokens, num_blocks {args.num_blocks}",
        f"  input-centric : step {t_in * 1e3:8.1f} ms, saved for backward {m_in / 2**20:8.2f} MiB",
        f"  weight-centric: step {t_w * 1e3:8.1f} ms, saved for backward {m_w / 2**20:8.2f} MiB",
        f"  ratio weight/input: time {t_w / t_in:.2f}×, saved memory {m_w / max(m_in, 1):.2f}×",
    ]
    text = "\n".join(lines)
    print(text)  # noqa: T201  (a benchmark script's output)
    with open(Path(__file__).with_name("bench_train.results.txt"), "a", encoding="utf-8") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
