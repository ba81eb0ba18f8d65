"""OFT training step: our OFTTrainer node vs core's TrainLoraNode(algorithm="OFT"), same model, same data, same run.

    python benchmarks/bench_train.py            # SD1.x-family UNet, 128 channels, 32×32 latents, 6 steps
    python benchmarks/bench_train.py --quick    # the tiny UNet, 3 steps (what tests run; seconds)

Part 1, ComfyUI (only when found: COMFYUI_PATH, else ~/.cache/comfyui-oft/ComfyUI). Each trainer runs in a FRESH
subprocess (same model built from the same seed, same latents and conditioning, same batch size, steps, learning
rate, optimizer, training dtype, gradient checkpointing):

- core: `comfy_extras.nodes_train.TrainLoraNode().train(..., algorithm="OFT", rank=R)`. Core's OFT adapts every
  Linear / Conv2d of the diffusion model (every layer with a `weight_function`, weight ndim ≥ 2) with
  `block_size, block_num = factorization(out_dim, R)`: so core's "rank" is a BLOCK SIZE (R when R | out and
  R² ≤ out, else the divisor pair of out closest to it), and it also trains a bias delta for every bias and a weight
  delta for every norm.
- ours: the node's `train()` (nodes/train_node.py: objective, noise levels, autocast, checkpointing, cancel checks,
  progress) with the trainer built on exactly core's layers and per-layer blocks: every Linear / Conv2d, block size
  from the same `factorization(out_dim, R)` (one `oft_core.train.OFTTrainer(block_size=…)` per distinct size;
  layers whose block size would be 1 — a 1×1 rotation, the identity — are left out and counted). No bias / norm
  deltas (the node never trains them).
- ours on executor-made weights: the same, with the model, latents and conditioning made under
  `torch.inference_mode()` as ComfyUI's loader and VAE Encode make them in the executor (every weight an inference
  tensor, which autograd cannot save). The trainer makes them usable through zero-copy aliases
  (`oft_core.train.frozen_for_training`); the extra peak memory against normal weights is reported next to the size
  of the largest layer (the goal's bound) and of the whole model (what a copy would cost).

Measured in each subprocess: step time = median interval between consecutive steps (ours: the per-step cancel check;
core: its per-step loss callback), the first step excluded (optimizer state, lazy init); peak memory = growth of the
process's peak RSS during the training call: VmHWM is reset to the current RSS (`echo 5 > /proc/self/clear_refs`)
just before the call, and (VmHWM after − VmRSS at reset) is reported. On CPU this covers activations, autograd
buffers, materialised rotated weights, parameters, gradients and optimizer state, i.e. everything a GPU would hold
beyond the loaded model. Ratios ours/core come from the same run; the machine's load is printed with them.

Part 2, no ComfyUI needed: the activation-side step vs a weight-centric step (rotated W' = M·W materialised, what
core does) on a stack of Linear layers; time, and bytes autograd saves for backward (saved-tensor hook).

Results (text, appended) go to bench_train.results.txt next to this script, or --results.
"""

from __future__ import annotations

# ruff: noqa: I001  (`_common` must come first: it puts the repo root on sys.path for `oft_core`)

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import HERE, REPO, machine

import torch
import torch.nn.functional as F
from torch import nn

from oft_core.rotation import _apply_rows  # (the merge path's block product: the weight-centric baseline)
from oft_core.train import OFTTrainer, run_training

# SD1.x-family UNets built through ComfyUI's own SD15 model class (comfy.supported_models.SD15).
_SD15 = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "num_heads": 8, "use_linear_in_transformer": False,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
CONFIGS = {
    # the tests' tiny UNet (1.07 M parameters)
    "quick": dict(_SD15, model_channels=32, channel_mult=[1, 2], num_res_blocks=[1, 1], transformer_depth=[1, 1],
                  transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1], context_dim=48),
    # 128 channels, 2 levels of 2 res blocks with attention (~12 M parameters)
    "default": dict(_SD15, model_channels=128, channel_mult=[1, 2], num_res_blocks=[2, 2],
                    transformer_depth=[1, 1, 1, 1], transformer_depth_middle=1,
                    transformer_depth_output=[1, 1, 1, 1, 1, 1], context_dim=256),
}
LATENT = {"quick": 16, "default": 32}


# ------------------------------------------------------------------------------------------------ worker (subprocess)
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> int:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); returns that RSS in KiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def _import_comfy(root: Path):
    sys.path.insert(0, str(root))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management picks a device
    import comfy.model_management  # noqa: F401
    import comfy.model_patcher  # noqa: F401
    import comfy.supported_models  # noqa: F401


def _import_pack():
    spec = importlib.util.spec_from_file_location("comfyui_oft", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_oft"] = module
    spec.loader.exec_module(module)
    from comfyui_oft.nodes import train_node

    return train_node


def _build(config: str, executor: bool = False):
    """Model, latents and conditioning; `executor`: made under torch.inference_mode() as ComfyUI's loader and VAE
    Encode make them inside the executor (every weight and buffer an inference tensor)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    with torch.inference_mode() if executor else contextlib.nullcontext():
        cfg = comfy.supported_models.SD15(dict(CONFIGS[config]))
        cfg.set_inference_dtype(torch.float32, None)
        model = cfg.get_model({}, "", device=torch.device("cpu"))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.diffusion_model.parameters():  # ComfyUI's ops skip init: fill with seeded values
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        model.eval().requires_grad_(False)
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                                   offload_device=mm.unet_offload_device())
        size = LATENT[config]
        g = torch.Generator().manual_seed(1)
        latents = {"samples": torch.randn(2, 4, size, size, generator=g)}
        positive = [[torch.randn(1, 8, CONFIGS[config]["context_dim"], generator=g), {}]]
    return patcher, latents, positive


def _core_layout(dm: nn.Module, rank: int):
    """Every layer core's OFT adapts, with its (block_size, block_num) = factorization(out_dim, rank)."""
    from comfy.weight_adapter.base import factorization

    out = []
    for name, m in dm.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and getattr(m, "weight", None) is not None and m.weight.ndim >= 2:
            bs, bn = factorization(int(m.weight.shape[0]), rank)
            out.append((name, m, bs, bn))
    return out


class _Group:
    """Several OFTTrainers (one per block size) used as one by the node's train()."""

    def __init__(self, trainers):
        self.trainers = trainers

    def parameters(self):
        return [p for t in self.trainers for p in t.parameters()]

    def num_params(self):
        return sum(t.num_params() for t in self.trainers)

    @contextlib.contextmanager
    def attach(self):
        with contextlib.ExitStack() as stack:
            for t in self.trainers:
                stack.enter_context(t.attach())
            yield self


def worker(args) -> dict:
    import comfy.model_management as mm

    torch.set_num_threads(args.threads)
    patcher, latents, positive = _build(args.config, executor=args.worker == "ours-executor")
    dm = patcher.model.diffusion_model
    inference_tensors = sum(1 for t in dm.state_dict(keep_vars=True).values() if t.is_inference())
    layout = _core_layout(dm, args.rank)
    stamps: list[float] = []
    kw = dict(steps=args.steps, lr=args.lr, dtype=args.dtype, checkpointing=not args.no_checkpointing)
    if args.worker in ("ours", "ours-executor"):
        tn = _import_pack()
        by_size: dict[int, list] = {}
        skipped = 0
        for name, m, bs, _bn in layout:
            if bs < 2:
                skipped += 1
            else:
                by_size.setdefault(bs, []).append((name, m))
        group = _Group([OFTTrainer(t, block_size=bs, alpha=1e-3, weight_fn=tn._weight_fn, device="cpu")
                        for bs, t in sorted(by_size.items())])
        tn.build_trainer = lambda *a, **k: group
        mm.throw_exception_if_processing_interrupted = lambda: stamps.append(time.perf_counter())
        base_rss = _reset_peak()
        with torch.inference_mode():  # as ComfyUI runs nodes
            _, losses, _ = tn.train(patcher, latents, positive, steps=kw["steps"], learning_rate=kw["lr"],
                                    batch_size=2, optimizer="AdamW", seed=0, num_blocks=1, alpha=1e-3,
                                    targets="all-linear+conv", training_dtype=kw["dtype"],
                                    gradient_checkpointing_on=kw["checkpointing"])
        stamps.append(time.perf_counter())
        params, layers = group.num_params(), sum(len(t.layers) for t in group.trainers)
        extra = {"layers_skipped_block_size_1": skipped}
    else:
        from comfy_extras.nodes_train import TrainLoraNode

        node = TrainLoraNode()
        import comfy_extras.nodes_train as nt

        orig = nt.TrainSampler.__init__

        def init(self, *a, loss_callback=None, **k):
            def cb(loss):
                stamps.append(time.perf_counter())
                loss_callback(loss)

            orig(self, *a, loss_callback=cb, **k)

        nt.TrainSampler.__init__ = init
        base_rss = _reset_peak()
        with torch.inference_mode():
            _, lora_sd, loss_map, _ = node.train(
                patcher, latents, positive, batch_size=2, steps=kw["steps"], grad_accumulation_steps=1,
                learning_rate=kw["lr"], rank=args.rank, optimizer="AdamW", loss_function="MSE", seed=0,
                training_dtype=kw["dtype"], lora_dtype="fp32", algorithm="OFT",
                gradient_checkpointing=kw["checkpointing"], existing_lora="[None]")
        losses = loss_map["loss"]
        params = sum(v.numel() for v in lora_sd.values())
        layers = sum(1 for k in lora_sd if k.endswith("oft_blocks"))
        extra = {"oft_params": sum(v.numel() for k, v in lora_sd.items() if k.endswith("oft_blocks")),
                 "bias_norm_delta_params": sum(v.numel() for k, v in lora_sd.items() if not k.endswith("oft_blocks"))}
    peak_kib = _status_kib("VmHWM") - base_rss
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    weights = [t for t in dm.state_dict(keep_vars=True).values()]
    extra.update(model_MiB=sum(t.numel() * t.element_size() for t in weights) / 2**20,
                 largest_layer_MiB=max(sum(t.numel() * t.element_size() for t in m.parameters(recurse=False))
                                       for m in dm.modules()) / 2**20,
                 inference_tensors=inference_tensors)
    return {"trainer": args.worker, "step_s": statistics.median(steps[1:] or steps), "steps_timed": len(steps[1:]),
            "peak_rss_growth_MiB": peak_kib / 1024, "layers": layers, "trainable_params": params,
            "loss_first": float(losses[0]), "loss_last": float(losses[-1]),
            "model_params": sum(p.numel() for p in dm.parameters()), **extra}


def run_workers(args, comfy_root: Path) -> dict:
    out = {}
    for who in ("ours", "ours-executor", "core"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", who, "--config", args.config,
               "--steps", str(args.steps), "--rank", str(args.rank), "--lr", str(args.lr), "--dtype", args.dtype,
               "--threads", str(args.threads), "--comfyui", str(comfy_root)]
        if args.no_checkpointing:
            cmd.append("--no-checkpointing")
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if run.returncode != 0:
            raise RuntimeError(f"{who} worker failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
        out[who] = json.loads(run.stdout.strip().splitlines()[-1])
    return out


# ------------------------------------------------------------------------------------------------ part 2 (synthetic)
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


def synthetic(dim, layers, tokens, num_blocks, repeat) -> list[str]:
    torch.manual_seed(0)
    model = Stack(dim, layers).requires_grad_(False)
    x = torch.randn(tokens, dim)
    target = torch.randn(tokens, dim)
    trainer = OFTTrainer(list(model.layers.named_children()), num_blocks=num_blocks, alpha=0)
    measure(model, x, target, trainer, "input", 1)  # warm-up
    t_in, m_in = measure(model, x, target, trainer, "input", repeat)
    t_w, m_w = measure(model, x, target, trainer, "weight", repeat)
    return [
        f"  synthetic: {layers} × Linear({dim}, {dim}), {tokens} tokens, num_blocks {num_blocks}",
        f"    input-centric : step {t_in * 1e3:8.1f} ms, saved for backward {m_in / 2**20:8.2f} MiB",
        f"    weight-centric: step {t_w * 1e3:8.1f} ms, saved for backward {m_w / 2**20:8.2f} MiB",
        f"    ratios input/weight-centric: time {t_in / t_w:.2f}, saved memory {m_in / max(m_w, 1):.2f}",
    ]


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny UNet, 3 steps, small synthetic part (smoke run)")
    ap.add_argument("--config", choices=sorted(CONFIGS), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=None, help="training steps per trainer (default 6; quick 3)")
    ap.add_argument("--rank", type=int, default=8, help="core's rank (= its block size, see above); default 8")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="training dtype of both (autocast)")
    ap.add_argument("--no-checkpointing", action="store_true", help="both without gradient checkpointing")
    ap.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    ap.add_argument("--results", default=None, help="results file (default: bench_train.results.txt here)")
    ap.add_argument("--comfyui", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=["ours", "ours-executor", "core"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.config = args.config or ("quick" if args.quick else "default")
    args.steps = args.steps or (3 if args.quick else 6)
    if args.worker:
        _import_comfy(Path(args.comfyui))
        print(json.dumps(worker(args)))  # noqa: T201  (read by the parent process)
        return 0

    torch.set_num_threads(args.threads)
    before = machine()
    lines = [f"{before['time_utc']} bench_train{' --quick' if args.quick else ''}: torch {before['torch']}, "
             f"threads {args.threads}, nproc {before['nproc']}"]
    root = Path(os.environ.get("COMFYUI_PATH") or Path.home() / ".cache" / "comfyui-oft" / "ComfyUI")
    if (root / "comfy_extras" / "nodes_train.py").is_file():
        r = run_workers(args, root)
        o, c, e = r["ours"], r["core"], r["ours-executor"]
        lines += [
            f"  ComfyUI {root}: SD1.x-family UNet '{args.config}' ({o['model_params'] / 1e6:.2f} M params), "
            f"2 latents {LATENT[args.config]}×{LATENT[args.config]}, batch 2, {args.steps} steps, AdamW lr "
            f"{args.lr:g}, {args.dtype}, gradient checkpointing {'off' if args.no_checkpointing else 'on'}, core "
            f"rank {args.rank} = per-layer block sizes of factorization(out_dim, {args.rank}) for both",
            f"    ours (OFTTrainer): {o['layers']} layers ({o['layers_skipped_block_size_1']} with block size 1 left "
            f"out), {o['trainable_params']} params; step {o['step_s'] * 1e3:8.1f} ms (median of "
            f"{o['steps_timed']}), peak RSS growth {o['peak_rss_growth_MiB']:8.1f} MiB",
            f"    core (TrainLoraNode OFT): {c['layers']} layers, {c['oft_params']} OFT params + "
            f"{c['bias_norm_delta_params']} bias/norm-delta params; step {c['step_s'] * 1e3:8.1f} ms (median of "
            f"{c['steps_timed']}), peak RSS growth {c['peak_rss_growth_MiB']:8.1f} MiB",
            f"    ratios ours/core: step time {o['step_s'] / c['step_s']:.2f} (goal ≤ 1), peak memory "
            f"{o['peak_rss_growth_MiB'] / max(c['peak_rss_growth_MiB'], 1e-9):.2f} (goal ≤ 0.5)",
            f"    ours on executor-made weights ({e['inference_tensors']} inference tensors, trained through "
            f"frozen_for_training): step {e['step_s'] * 1e3:8.1f} ms, peak RSS growth "
            f"{e['peak_rss_growth_MiB']:8.1f} MiB; minus normal weights' {o['peak_rss_growth_MiB']:.1f} MiB = "
            f"{e['peak_rss_growth_MiB'] - o['peak_rss_growth_MiB']:+.1f} MiB (goal ≤ largest layer "
            f"{e['largest_layer_MiB']:.2f} MiB; a second copy of the model would be {e['model_MiB']:.1f} MiB)",
        ]
    else:
        lines.append(f"  ComfyUI not found at {root} (set COMFYUI_PATH): core comparison skipped")
    if args.quick:
        lines += synthetic(256, 1, 64, 4, 2)
    else:
        lines += synthetic(1024, 4, 256, 4, 5)
    after = machine()
    lines.append(f"  machine: load {before['loadavg_1_5_15']} before, {after['loadavg_1_5_15']} after; "
                 f"affinity cpus {after['affinity_cpus']}, {after['cpu']}, python {after['python']}")
    text = "\n".join(lines)
    print(text)  # noqa: T201  (a benchmark script's output)
    path = Path(args.results) if args.results else HERE / "bench_train.results.txt"
    with open(path, "a", encoding="utf-8") as f:
        f.write(text + "\n")
    print(f"wrote {path}")  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
