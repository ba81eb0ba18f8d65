"""OFT training step: our OFTTrainer node vs core's TrainLoraNode(algorithm="OFT"), same model, same data, same run;
and QOFT: our trainer on an fp8 base vs the same model in bf16.

    python benchmarks/bench_train.py                 # SD1.x UNet race, FLUX-shaped race, QOFT memory (long on a CPU)
    python benchmarks/bench_train.py --only sd       # one part: sd | flux | qoft (repeatable)
    python benchmarks/bench_train.py --quick         # the tiny UNet, 3 steps (what tests run; seconds)

Models: an SD1.x-family UNet (128 channels, 32×32 latents, batch 2, fp32) and a FLUX-shaped model with real widths
(hidden 3072, 24 heads, mlp 12288, 2 double + 2 single blocks, 0.99 G parameters, random weights, built through
ComfyUI's own `comfy.supported_models.Flux`), one 64×64×16 latent = 1024 image tokens + 16 text tokens, bf16 weights
and bf16 training.

Part 1, ComfyUI (only when found: COMFYUI_PATH, else ~/.cache/comfyui-oft/ComfyUI). Each trainer runs in a FRESH
subprocess (same model built from the same seed, same latents and conditioning, same batch size, steps, learning
rate, optimizer, training dtype, gradient checkpointing, and the same attention kernel: ComfyUI started with
--use-pytorch-cross-attention in both, i.e. torch's scaled_dot_product_attention, which is also what our trainer
picks; the kernel name is printed):

- core: `comfy_extras.nodes_train.TrainLoraNode().train(..., algorithm="OFT", rank=R)` (newer ComfyUI: the V3
  `TrainLoraNode.execute` with each input in a list). Core's OFT adapts every
  Linear / Conv2d of the diffusion model (every layer with a `weight_function`, weight ndim ≥ 2) with
  `block_size, block_num = factorization(out_dim, R)`: so core's "rank" is a BLOCK SIZE (R when R | out and
  R² ≤ out, else the divisor pair of out closest to it), and it also trains a bias delta for every bias and a weight
  delta for every norm.
- ours: the node's `train()` (nodes/train_node.py: objective, noise levels, autocast, checkpointing, cancel checks,
  progress) with the trainer built on exactly core's layers and per-layer blocks: every Linear / Conv2d, block size
  from the same `factorization(out_dim, R)` (one `oft_core.train.OFTTrainer(block_size=…)` per distinct size;
  layers whose block size would be 1 — a 1×1 rotation, the identity — are left out and counted). No bias / norm
  deltas (the node never trains them). On FLUX our fused q|k|v and linear1 layers are NOT split (core rotates the
  whole output in blocks; for the same work ours does too).
- ours on executor-made weights (SD part): the same, with the model, latents and conditioning made under
  `torch.inference_mode()` as ComfyUI's loader and VAE Encode make them in the executor (every weight an inference
  tensor, which autograd cannot save). The trainer makes them usable through zero-copy aliases
  (`oft_core.train.frozen_for_training`); the extra peak memory against normal weights is reported next to the size
  of the largest layer (the goal's bound) and of the whole model (what a copy would cost), in live tensors at the
  peak (traced runs of both: a copy of the weights made anywhere in the training call is counted there, +95 MiB
  when `frozen_for_training` was made to clone them) and, for information, in peak RSS growth (cold runs, whose
  RSS moves by ±20 MiB from one fresh process to the next).

Measured in each subprocess: step time = median interval between consecutive steps (ours: the per-step cancel check;
core: its per-step loss callback), the first step excluded (optimizer state, lazy init); peak memory = growth of the
process's peak RSS during the training call: VmHWM is reset to the current RSS (`echo 5 > /proc/self/clear_refs`)
just before the call, and (VmHWM after − VmRSS at reset) is reported. On CPU this covers activations, autograd
buffers, materialised rotated weights, parameters, gradients and optimizer state, i.e. everything a GPU would hold
beyond the loaded model. Ratios ours/core come from the same run; the machine's load is printed with them.

Memory breakdown (SD part; QOFT part): RSS growth mixes the tensors a step needs with allocator and process effects,
so each side also runs (in its own fresh subprocess each time):
- traced (`_memtrace.LiveTensors`, a TorchDispatchMode): live tensor bytes at the peak, the CPU stand-in for a GPU's
  `max_memory_allocated` — by phase (made in forward and still alive: checkpointed block inputs, skip connections;
  made while autograd ran: the recomputed block's activations and the gradients; optimizer state) and by where ours
  made them (rotation outputs, rotation blocks, frozen base products);
- the floor: our trainer with ONE trained layer, the model's input layer (`FLOOR_LAYER`): the gradient still flows
  back through every block, so this is the checkpointed model's own forward + recomputation + backward, which any
  adapter method pays; ours − floor is what the method adds;
- after a one-step warm-up in the same process (library code paged in, thread pools, oneDNN primitives: one-time
  costs that land in whichever measurement comes first in a process), freed memory handed back (`malloc_trim`),
  then the peak reset: the RSS a second training in the same ComfyUI process would add. RSS above the live tensors
  is mostly glibc keeping freed blocks (its mmap threshold grows up to 32 MiB as tensors are freed, so later
  activations come from the heap and stay resident), and it pulls the RSS ratio towards 1. Each side also runs
  warm with glibc's per-thread cache of small freed chunks off (`GLIBC_TUNABLES=glibc.malloc.tcache_count=0`, which
  only a process's start can set): a cached chunk counts as in use, so the freed activations on either side of it
  cannot merge and a later large allocation extends the heap; without the cache, what stays is mostly the tensors.
Step time against the floor: both races also run the floor untraced (`ours-floor`) and print its step as a fraction
of core's, and what ours adds above it. `--rounds N` repeats each race's step-time runs (ours, core, floor: fresh
processes back to back, the order reversed each round) and prints every round's ratios and their median: on a shared
VM the same code's step drifts by ±15 % within minutes, so one pair of runs is one sample.
The FLUX part also prints each side's multiply-adds per step from the shapes (`flux_step_macs`): the floor of the
step-time ratio at equal throughput.

Part QOFT (`--only qoft`): our trainer on a FLUX-shaped model (`--qoft-blocks`, default 6 double + 12 single blocks:
the race's 2 + 2 hold so few weights that one block's training working set is 40 % of them) loaded as ComfyUI's
UNETLoader does with weight_dtype fp8_e4m3fn vs default bf16 (`set_inference_dtype(dtype, unet_manual_cast(...))`),
bf16 training, checkpointing on; peak memory here INCLUDES the model's weights (peak RSS − RSS before the model was
built), since halving the weights is the point, and is also carried to FLUX.1-dev's depth (an extrapolation, printed
as one). Goal: fp8 ≤ 0.6 × bf16.

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

from oft_core.rotation import apply_rows  # (the merge path's differentiable block product: weight-centric baseline)
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
# FLUX-shaped: FLUX.1's real widths, 2 double + 2 single blocks (comfy.supported_models.Flux's unet_config keys)
FLUX = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
        "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 2, "depth_single_blocks": 2,
        "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "guidance_embed": True, "patch_size": 2}
FLUX_LATENT, FLUX_TEXT_TOKENS = 64, 16  # (64 / patch 2)² = 1024 image tokens
# the model's input layer (the floor run trains only it: the backward still runs through every block)
FLOOR_LAYER = {"quick": "input_blocks.0.0", "default": "input_blocks.0.0", "flux": "img_in"}


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


def _now() -> tuple[float, float]:
    """(wall clock, this thread's CPU time). With one torch thread the whole step runs on the calling thread (the CPU
    autograd engine runs backward there too), so its CPU time is the step's time without the other processes of a
    shared machine; the wall clock is kept beside it."""
    return time.perf_counter(), time.thread_time()


def _warm_up_and_reset(run, stamps: list) -> int:
    """One training step first (library code paged in, thread pools, oneDNN kernels: what the first side of a
    process would pay and a second would not), its memory handed back to the OS (`malloc_trim`), then the peak
    reset; returns the RSS the measured run starts from (KiB)."""
    import ctypes
    import gc

    run(1)
    stamps.clear()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _reset_peak()


def _import_comfy(root: Path):
    sys.path.insert(0, str(root))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management picks a device
    # The same attention kernel on both sides: torch's SDPA (core would otherwise pick sub-quadratic attention on a
    # CPU; our trainer routes attention through attention_pytorch anyway).
    comfy.cli_args.args.use_pytorch_cross_attention = True
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


def _build(config: str, base_dtype: str = "fp32", executor: bool = False, flux_blocks: tuple[int, int] = (2, 2)):
    """(patcher, latents, positive, batch size) for a config, the model made the way ComfyUI's loaders make it;
    `executor`: made under torch.inference_mode() as ComfyUI's loader and VAE Encode make them inside the executor
    (every weight and buffer an inference tensor); `flux_blocks`: the FLUX-shaped model's (double, single) blocks."""
    with torch.inference_mode() if executor else contextlib.nullcontext():
        return _build_now(config, base_dtype, flux_blocks)


def _build_now(config: str, base_dtype: str, flux_blocks: tuple[int, int] = (2, 2)):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[base_dtype]
    device = mm.get_torch_device()
    if config == "flux":
        cfg = comfy.supported_models.Flux(dict(FLUX, depth=flux_blocks[0], depth_single_blocks=flux_blocks[1]))
    else:
        cfg = comfy.supported_models.SD15(dict(CONFIGS[config]))
    # as comfy.sd.load_diffusion_model_state_dict: the weight dtype and ComfyUI's manual-cast compute dtype
    cfg.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, device, cfg.supported_inference_dtypes))
    model = cfg.get_model({}, "", device=torch.device("cpu"))
    sys.path.insert(0, str(REPO / "tests"))
    from comfy_models import fill_deterministic  # the tests' seeded fill: ComfyUI's ops skip init

    fill_deterministic(model.diffusion_model, seed=0)
    model.eval().requires_grad_(False)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=mm.unet_offload_device())
    g = torch.Generator().manual_seed(1)
    if config == "flux":
        latents = {"samples": torch.randn(1, 16, FLUX_LATENT, FLUX_LATENT, generator=g)}
        positive = [[torch.randn(1, FLUX_TEXT_TOKENS, FLUX["context_in_dim"], generator=g),
                     {"pooled_output": torch.randn(1, FLUX["vec_in_dim"], generator=g), "guidance": 3.5}]]
        return patcher, latents, positive, 1
    size = LATENT[config]
    latents = {"samples": torch.randn(2, 4, size, size, generator=g)}
    positive = [[torch.randn(1, 8, CONFIGS[config]["context_dim"], generator=g), {}]]
    return patcher, latents, positive, 2


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

    @property
    def layers(self):
        return [tl for t in self.trainers for tl in t.layers]

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
    import comfy.ldm.modules.attention

    torch.set_num_threads(args.threads)
    tracer = None
    if args.trace:
        from _memtrace import LiveTensors

        tracer = LiveTensors(detail_bytes=args.trace_detail_MiB * 2**20 if args.trace_detail_MiB else 1 << 62)

        def opt_phase(on):
            def hook(*_a):
                tracer.phase_override = "optimizer" if on else None
            return hook
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
        register_optimizer_step_pre_hook(opt_phase(True))
        register_optimizer_step_post_hook(opt_phase(False))
    rss_before_model = _status_kib("VmRSS")
    patcher, latents, positive, batch = _build(args.config, args.base_dtype, executor=args.worker == "ours-executor",
                                               flux_blocks=tuple(args.flux_blocks))
    dm = patcher.model.diffusion_model
    inference_tensors = sum(1 for t in dm.state_dict(keep_vars=True).values() if t.is_inference())
    layout = _core_layout(dm, args.rank)
    stamps: list[tuple[float, float]] = []
    kw = dict(steps=args.steps, lr=args.lr, dtype=args.dtype, checkpointing=not args.no_checkpointing)
    if args.worker in ("ours", "ours-executor", "ours-floor"):
        tn = _import_pack()
        # the node's own copy of oft_core (the pack is imported as a package): the trainer built here, the node's
        # checkpointing and patches, and the functions the tracer tags are then one module, as in ComfyUI
        import comfyui_oft.oft_core.train as ot
        by_size: dict[int, list] = {}
        skipped = 0
        for name, m, bs, _bn in layout:
            if bs < 2:
                skipped += 1
            else:
                # "all." keeps FLUX's fused layers in one split, as core rotates them (same blocks, same work)
                by_size.setdefault(bs, []).append((f"all.{name}" if args.config == "flux" else name, m))
        if args.worker == "ours-floor":
            # one trained layer, the model's input layer: the gradient still flows back through every block (the
            # backward of the whole checkpointed model), but nothing of the method is left to speak of
            first = FLOOR_LAYER[args.config]
            by_size = {bs: [(n, m)] for n, m, bs, _bn in layout if n == first}
        groups = []
        # the model the node's trainer is built on (`root`: its family picks what each layer keeps for backward);
        # the FLUX-shaped race keeps the whole-width layers core rotates, under names that are no FLUX block's
        root = dm if args.config != "flux" else None

        def new_group(*_a, **_k):  # a fresh (untrained) trainer for every train() call
            groups.append(_Group([ot.OFTTrainer(t, block_size=bs, alpha=1e-3, weight_fn=tn._weight_fn, device="cpu",
                                             recompute_weight=tn._casts_weight, root=root)
                                  for bs, t in sorted(by_size.items())]))
            return groups[-1]
        tn.build_trainer = new_group
        node_before_step = tn._before_step

        def stamped(step):  # the node's own once-per-step hook (newer ComfyUI's interrupt check runs in every op)
            stamps.append(_now())
            node_before_step(step)
        tn._before_step = stamped
        if tracer is not None:

            for fn, tag in ((ot.rotate_output, "oft: rotation"), (ot.frozen_base, "oft: base (frozen)"),
                            (ot.rotate_from_input, "oft: rotation from input"),
                            (ot.rotate_through_weight, "oft: rotation through the weight")):
                def tagged(*a, __f=fn, __tag=tag, **k):
                    with tracer.tagged(__tag):
                        return __f(*a, **k)
                setattr(ot, fn.__name__, tagged)
            blocks = ot.OFTTrainer.blocks

            def tagged_blocks(self, tl):
                with tracer.tagged("oft: rotation blocks"):
                    return blocks(self, tl)
            ot.OFTTrainer.blocks = tagged_blocks
        def run(steps):
            with torch.inference_mode():  # as ComfyUI runs nodes
                return tn.train(patcher, latents, positive, steps=steps, learning_rate=kw["lr"], batch_size=batch,
                                optimizer="AdamW", seed=0, num_blocks=1, alpha=1e-3, targets="all-linear+conv",
                                training_dtype=kw["dtype"], gradient_checkpointing_on=kw["checkpointing"])[1]

        base_rss = _warm_up_and_reset(run, stamps) if args.warmup else _reset_peak()
        with tracer or contextlib.nullcontext():
            losses = run(kw["steps"])
        stamps.append(_now())
        group = groups[-1]
        params, layers = group.num_params(), sum(len(t.layers) for t in group.trainers)
        extra = {"layers_skipped_block_size_1": skipped}
    else:
        from comfy_extras.nodes_train import TrainLoraNode

        node = TrainLoraNode()
        import comfy_extras.nodes_train as nt

        orig = nt.TrainSampler.__init__

        def init(self, *a, loss_callback=None, **k):
            def cb(loss):
                stamps.append(_now())
                loss_callback(loss)

            orig(self, *a, loss_callback=cb, **k)

        nt.TrainSampler.__init__ = init
        if tracer is not None:
            from comfy.weight_adapter.oft import OFTDiff

            orig_call = OFTDiff.__call__

            def tagged_call(self, w):
                with tracer.tagged("core: R·W"):
                    return orig_call(self, w)
            OFTDiff.__call__ = tagged_call
        def run(steps):
            inputs = dict(model=patcher, latents=latents, positive=positive, batch_size=batch, steps=steps,
                          grad_accumulation_steps=1, learning_rate=kw["lr"], rank=args.rank, optimizer="AdamW",
                          loss_function="MSE", seed=0, training_dtype=kw["dtype"], lora_dtype="fp32",
                          algorithm="OFT", gradient_checkpointing=kw["checkpointing"], existing_lora="[None]")
            with torch.inference_mode():
                if hasattr(node, "train"):  # ComfyUI 0.3.x: a V1 node
                    return node.train(**inputs)
                # newer ComfyUI: a V3 node taking every input as a list (is_input_list), returning a NodeOutput
                inputs["bucket_mode"] = False
                return TrainLoraNode.execute(**{k: [v] for k, v in inputs.items()}).result

        base_rss = _warm_up_and_reset(run, stamps) if args.warmup else _reset_peak()
        with tracer or contextlib.nullcontext():
            _, lora_sd, loss_map, _ = run(kw["steps"])
        losses = loss_map["loss"]
        params = sum(v.numel() for v in lora_sd.values())
        layers = sum(1 for k in lora_sd if k.endswith("oft_blocks"))
        extra = {"oft_params": sum(v.numel() for k, v in lora_sd.items() if k.endswith("oft_blocks")),
                 "bias_norm_delta_params": sum(v.numel() for k, v in lora_sd.items() if not k.endswith("oft_blocks"))}
    hwm = _status_kib("VmHWM")
    stored = sum(t.numel() * t.element_size() for t in dm.state_dict(keep_vars=True).values()) / 2**20
    # (model_MiB is the stored size, as the QOFT lines print it; the RSS the model took is not reported)
    extra.update(model_MiB_stored=stored, model_MiB=stored,
                 largest_layer_MiB=max(sum(t.numel() * t.element_size() for t in m.parameters(recurse=False))
                                       for m in dm.modules()) / 2**20,
                 inference_tensors=inference_tensors)
    peak_kib = hwm - base_rss
    steps = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    cpu_steps = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
    return {"trainer": args.worker, "step_s": statistics.median(steps[1:] or steps),
            "step_cpu_s": statistics.median(cpu_steps[1:] or cpu_steps), "steps_timed": len(steps[1:] or steps),
            "peak_rss_growth_MiB": peak_kib / 1024, "peak_incl_model_MiB": (hwm - rss_before_model) / 1024,
            "layers": layers, "trainable_params": params,
            "loss_first": float(losses[0]), "loss_last": float(losses[-1]),
            "attention": comfy.ldm.modules.attention.optimized_attention.__name__,
            "model_params": sum(p.numel() for p in dm.parameters()), **extra,
            **({"live": tracer.summary()} if tracer is not None else {})}


def run_workers(args, comfy_root: Path, config: str, steps: int, dtype: str, base_dtype: str,
                who=("ours", "core"), flux_blocks: tuple[int, int] = (2, 2)) -> dict:
    """One fresh subprocess per name: "kind[@base dtype][#flag…]" (flags: trace, warmup, tcache0 — the worker's
    glibc started with its per-thread cache off, `TCACHE_OFF`); `flux_blocks`: the FLUX-shaped model's (double,
    single) blocks."""
    out = {}
    for name in who:
        spec, *flags = name.split("#")
        worker_kind, base = (spec, base_dtype) if "@" not in spec else spec.split("@")
        n = min(steps, 3) if "trace" in flags else steps  # (the tracer slows every op: its peak is that of 3 steps)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker_kind, "--config", config,
               "--steps", str(n), "--rank", str(args.rank), "--lr", str(args.lr), "--dtype", dtype,
               "--base-dtype", base, "--threads", str(args.threads), "--comfyui", str(comfy_root),
               "--flux-blocks", *map(str, flux_blocks)]
        cmd += [f"--{f}" for f in flags if f != "tcache0"]
        if "trace" in flags:
            cmd += ["--trace-detail-MiB", "8"]
        if args.no_checkpointing:
            cmd.append("--no-checkpointing")
        env = dict(os.environ, GLIBC_TUNABLES=TCACHE_OFF) if "tcache0" in flags else None
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=7200, env=env)
        if run.returncode != 0:
            raise RuntimeError(f"{name} worker failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
        out[name] = json.loads(run.stdout.strip().splitlines()[-1])
    return out


def executor_lines(r: dict) -> str:
    """Ours on weights made under the executor's inference mode against ours on normal weights: live tensors at the
    peak (traced runs: a copy of any weight would be counted there), and peak RSS growth (cold runs: ±20 MiB from
    one fresh process to the next, so the RSS difference is printed but is not the measure)."""
    o, e = r["ours"], r["ours-executor"]
    lt, le = r["ours#trace"]["live"]["peak_MiB"], r["ours-executor#trace"]["live"]["peak_MiB"]
    return (f"    ours on executor-made weights ({e['inference_tensors']} inference tensors, trained through "
            f"frozen_for_training): step {e['step_s'] * 1e3:8.1f} ms; live tensors at the peak {le:.1f} MiB, minus "
            f"normal weights' {lt:.1f} MiB = {le - lt:+.1f} MiB (goal ≤ largest layer {e['largest_layer_MiB']:.2f} "
            f"MiB; a second copy of the model would be {e['model_MiB_stored']:.1f} MiB); peak RSS growth "
            f"{e['peak_rss_growth_MiB']:.1f} MiB against {o['peak_rss_growth_MiB']:.1f} "
            f"({e['peak_rss_growth_MiB'] - o['peak_rss_growth_MiB']:+.1f}: cold runs, noise of ±20 MiB)")


def race_lines(title: str, r: dict, load_before, load_after) -> list[str]:
    o, c = r["ours"], r["core"]
    t, m = o["step_s"] / c["step_s"], o["peak_rss_growth_MiB"] / max(c["peak_rss_growth_MiB"], 1e-9)
    t_cpu = o["step_cpu_s"] / c["step_cpu_s"]
    return [
        f"  {title}",
        f"    attention kernel: ours {o['attention']}, core {c['attention']}",
        f"    ours (OFTTrainer): {o['layers']} layers ({o['layers_skipped_block_size_1']} with block size 1 left "
        f"out), {o['trainable_params']} trained params; step {o['step_s'] * 1e3:8.1f} ms (median of "
        f"{o['steps_timed']}), peak RSS growth {o['peak_rss_growth_MiB']:8.1f} MiB; loss {o['loss_first']:.4f} -> "
        f"{o['loss_last']:.4f}",
        f"    core (TrainLoraNode OFT): {c['layers']} layers, {c['trainable_params']} trained params ("
        f"{c['oft_params']} OFT + {c['bias_norm_delta_params']} bias/norm-delta); step {c['step_s'] * 1e3:8.1f} ms "
        f"(median of {c['steps_timed']}), peak RSS growth {c['peak_rss_growth_MiB']:8.1f} MiB; loss "
        f"{c['loss_first']:.4f} -> {c['loss_last']:.4f}",
        f"    ratios ours/core: step time {t:.2f} wall clock, {t_cpu:.2f} thread CPU time ({o['step_cpu_s'] * 1e3:.1f} "
        f"vs {c['step_cpu_s'] * 1e3:.1f} ms; goal ≤ 0.5), peak memory {m:.2f} (goal ≤ 0.5); machine load "
        f"{load_before} before, {load_after} after",
    ]


RACE_SIDES = ("ours", "core", "ours-floor")
# glibc's per-thread cache of freed small chunks (≤ 1 KiB: tensor and autograd metadata) switched off, read by the
# loader at process start: the cached chunks count as in use, so the freed activations on either side of one cannot
# merge, and a later large allocation extends the heap instead (the SD1.x breakdown prints the RSS both ways).
TCACHE_OFF = "glibc.malloc.tcache_count=0"


def race_rounds(args, comfy_root: Path, config: str, steps: int, dtype: str, base_dtype: str,
                first: dict) -> list[dict]:
    """The race's step-time runs in `args.rounds` rounds: the first is `first` (the runs already made), each later one
    ours, core and the floor in fresh processes back to back, in the reverse order of the round before."""
    rounds = [{k: first[k] for k in RACE_SIDES}]
    order = RACE_SIDES
    for _ in range(1, max(1, args.rounds)):
        order = order[::-1]
        rounds.append(run_workers(args, comfy_root, config, steps, dtype, base_dtype, who=order))
    return rounds


def floor_lines(rounds: list[dict]) -> list[str]:
    """The floor's step against core's (what any adapter pays) and, over several rounds, every round's ratios."""
    first = rounds[0]
    o, c, f = (first[k]["step_s"] for k in RACE_SIDES)
    lines = [f"    floor (ours with only the model's input layer trained: the checkpointed model's own forward + "
             f"recomputation + backward, which any adapter pays): step {f * 1e3:8.1f} ms = {f / c:.2f} of core's; "
             f"ours adds {(o - f) * 1e3:.0f} ms above it, core {(c - f) * 1e3:.0f} ms"]
    if len(rounds) > 1:
        t = [r["ours"]["step_s"] / r["core"]["step_s"] for r in rounds]
        fl = [r["ours-floor"]["step_s"] / r["core"]["step_s"] for r in rounds]

        def listed(values, fmt=".2f"):
            return ", ".join(format(v, fmt) for v in values)

        lines.append(f"    step-time ratios in {len(rounds)} rounds (fresh processes back to back, the order reversed "
                     f"each round): ours/core {listed(t)} (median {statistics.median(t):.2f}; goal ≤ 0.5), floor/core "
                     f"{listed(fl)} (median {statistics.median(fl):.2f}); ours "
                     f"{listed(r['ours']['step_s'] for r in rounds)} s, core "
                     f"{listed(r['core']['step_s'] for r in rounds)} s")
    return lines


def breakdown_lines(r: dict, sides=("ours", "core"), floor: str | None = "ours-floor", label=None) -> list[str]:
    """What the peaks consist of: live tensor bytes (traced runs, `_memtrace`), the floor, RSS after a warm-up."""
    label = label or {}
    lines = ["    memory breakdown — live tensor bytes at the peak (separate traced runs of 3 steps; what a GPU's "
             "max_memory_allocated counts: no allocator, no library code), 'kept' = made in forward and alive at the "
             "peak (checkpointed block inputs / skip connections), 'recomputed+bwd' = made while autograd ran "
             "(the recomputed block's activations, gradients):"]
    base = r[f"{floor}#trace"]["live"]["peak_MiB"] if floor else None

    def describe(name: str, what: str) -> str:
        live = r[f"{name}#trace"]["live"]
        ph = live["by_phase"]
        tags = ", ".join(f"{k} {v:.1f}" for k, v in sorted(live["by_tag"].items()) if k != "-")
        over = f" = floor {live['peak_MiB'] - base:+.1f}" if base is not None and name != floor else ""
        made = f"; made in {tags}" if tags else ""
        return (f"      {what}: peak {live['peak_MiB']:7.1f} MiB{over} (kept {ph.get('forward', 0):.1f}, "
                f"recomputed+bwd {ph.get('backward', 0):.1f}, optimizer {ph.get('optimizer', 0):.1f}{made})")

    if floor:
        lines.append(describe(floor, "floor (only the model's input layer trained: the checkpointed model's own "
                                     "forward + recomputation + backward to its input, which any adapter pays)"))
    for side in sides:
        lines.append(describe(side, label.get(side, side)))
    if len(sides) == 2:
        a, b = (r[f"{s}#trace"]["live"]["peak_MiB"] for s in sides)
        lines.append(f"      live-tensor ratio {sides[0]}/{sides[1]} {a / b:.2f}" +
                     (f"; the floor alone would be {base / b:.2f}" if base is not None else ""))
    warm = [s for s in list(sides) + ([floor] if floor else []) if f"{s}#warmup" in r]
    if warm:
        rss = {s: r[f"{s}#warmup"]["peak_rss_growth_MiB"] for s in warm}
        ratio = f"; ratio {warm[0]}/{warm[1]} {rss[warm[0]] / rss[warm[1]]:.2f}" if len(warm) >= 2 else ""
        lines.append("    peak RSS growth after a one-step warm-up in the same process (library code paged in, thread "
                     "pools, oneDNN: one-time costs the first side of a process pays, taken out; freed memory handed "
                     "back with malloc_trim before the reset): "
                     + ", ".join(f"{s} {v:.1f} MiB" for s, v in rss.items()) + ratio)
        above = {s: rss[s] - r[f"{s}#trace"]["live"]["peak_MiB"] for s in warm if f"{s}#trace" in r}
        lines.append("      RSS above the live tensors (glibc keeping freed blocks: its mmap threshold grows up to "
                     "32 MiB as tensors are freed, so later activations come from the heap and stay in RSS): "
                     + ", ".join(f"{s} {v:.1f} MiB" for s, v in above.items()))
    off = [s for s in warm if f"{s}#warmup#tcache0" in r]  # (warm runs with the cache off)
    if off:
        rss0 = {s: r[f"{s}#warmup#tcache0"]["peak_rss_growth_MiB"] for s in off}
        ratio = f"; ratio {off[0]}/{off[1]} {rss0[off[0]] / rss0[off[1]]:.2f}" if len(off) >= 2 else ""
        lines.append("      the same with glibc's per-thread cache of small freed chunks off (GLIBC_TUNABLES="
                     f"{TCACHE_OFF}, for the whole process; cached chunks count as in use, so freed activations "
                     "beside one cannot merge): " + ", ".join(f"{s} {v:.1f} MiB" for s, v in rss0.items()) + ratio
                     + "; step " + ", ".join(f"{s} {r[f'{s}#warmup#tcache0']['step_s']:.2f} s" for s in off)
                     + " (with the cache: " + ", ".join(f"{s} {r[f'{s}#warmup']['step_s']:.2f} s" for s in off)
                     + ")")
    return lines


def qoft_depth_line(b16: dict, f8: dict, blocks: tuple[int, int], dev: tuple[int, int] = (19, 38)) -> str:
    """The QOFT ratio carried to FLUX.1-dev's depth: the stored weights scaled by the Linear parameter count, the
    training growth kept as measured (gradient checkpointing: the working set is one block's, whatever the depth).
    An extrapolation, printed as one."""
    def count(b):
        return sum(i * o + o for _n, _t, i, o in flux_linears(b))
    k = count(dev) / count(blocks)
    f = (f8["model_MiB"] * k + f8["peak_rss_growth_MiB"]) / (b16["model_MiB"] * k + b16["peak_rss_growth_MiB"])
    return (f"    at FLUX.1-dev's depth ({dev[0]} double + {dev[1]} single blocks; extrapolated, not measured: the "
            f"weights × {k:.2f}, this run's training growth kept, as checkpointing holds one block's working set): "
            f"ratio ≈ {f:.2f}")


def qoft_breakdown_lines(r: dict) -> list[str]:
    """QOFT: the same ratio on live tensor bytes (the stored weights + the training's live peak), what the fp8 side
    holds beyond the bf16 one (its per-layer bf16 weight copy), the floor, and RSS above the tensors."""
    b16, f8, fl = (r[k]["live"] for k in ("ours@bf16#trace", "ours@fp8#trace", "ours-floor@bf16#trace"))
    mb, mf = r["ours@bf16"]["model_MiB_stored"], r["ours@fp8"]["model_MiB_stored"]
    cast = sum(n for _p, op, tag, n in f8["largest"] if tag == "oft: base (frozen)" and op.startswith("_to_copy"))
    ratio = (mf + f8["peak_MiB"]) / (mb + b16["peak_MiB"])
    floor = (mf + fl["peak_MiB"] + cast) / (mb + fl["peak_MiB"])
    return [
        "    memory breakdown — live tensor bytes (traced runs of ≤ 3 steps; a GPU's max_memory_allocated): training "
        f"peak bf16 base {b16['peak_MiB']:.1f} MiB, fp8 base {f8['peak_MiB']:.1f} MiB (of which {cast:.1f} MiB the "
        "bf16 copy of the weight being cast in backward: one layer at a time, never kept); floor (only img_in trained: "
        f"the checkpointed model's own forward + recomputation + backward, any method) {fl['peak_MiB']:.1f} MiB",
        f"      stored weights + live peak: fp8 {mf:.1f} + {f8['peak_MiB']:.1f} vs bf16 {mb:.1f} + "
        f"{b16['peak_MiB']:.1f} → ratio {ratio:.2f} (goal ≤ 0.6); at the floor it would be {floor:.2f}",
        f"      RSS growth above the live tensors (glibc keeping freed blocks, library code and thread pools paged in "
        f"during the run; about the same on both sides, which pulls the RSS ratio towards 1): bf16 "
        f"{r['ours@bf16']['peak_rss_growth_MiB'] - b16['peak_MiB']:.1f} MiB, fp8 "
        f"{r['ours@fp8']['peak_rss_growth_MiB'] - f8['peak_MiB']:.1f} MiB",
    ]


def flux_linears(blocks: tuple[int, int] | None = None) -> list[tuple[str, int, int, int]]:
    """(name, tokens, in, out) of every Linear of the FLUX-shaped model (ComfyUI's flux layers, `FLUX` widths; batch
    1, `FLUX_LATENT`² / 4 image tokens, `FLUX_TEXT_TOKENS` text tokens, the modulation layers on one vector);
    `blocks`: (double, single) blocks instead of `FLUX`'s."""
    h, mlp = FLUX["hidden_size"], int(FLUX["hidden_size"] * FLUX["mlp_ratio"])
    img, txt = (FLUX_LATENT // FLUX["patch_size"]) ** 2, FLUX_TEXT_TOKENS
    out = [("img_in", img, FLUX["in_channels"] * 4, h), ("txt_in", txt, FLUX["context_in_dim"], h),
           ("time_in", 1, 256, h), ("time_in.out", 1, h, h), ("vector_in", 1, FLUX["vec_in_dim"], h),
           ("vector_in.out", 1, h, h), ("guidance_in", 1, 256, h), ("guidance_in.out", 1, h, h),
           ("final_layer.adaLN", 1, h, 2 * h), ("final_layer.linear", img, h, FLUX["out_channels"] * 4)]
    double, single = blocks or (FLUX["depth"], FLUX["depth_single_blocks"])
    for i in range(double):
        for s, n in (("img", img), ("txt", txt)):
            p = f"double_blocks.{i}.{s}"
            out += [(f"{p}_mod", 1, h, 6 * h), (f"{p}_attn.qkv", n, h, 3 * h), (f"{p}_attn.proj", n, h, h),
                    (f"{p}_mlp.0", n, h, mlp), (f"{p}_mlp.2", n, mlp, h)]
    for i in range(single):
        p, n = f"single_blocks.{i}", img + txt
        out += [(f"{p}.modulation", 1, h, 3 * h), (f"{p}.linear1", n, h, 3 * h + mlp), (f"{p}.linear2", n, h + mlp, h)]
    return out


def flux_step_macs(block: int = 8) -> dict:
    """Multiply-adds of one training step with gradient checkpointing, per side, from the shapes alone (GMAC).

    Both: forward, the checkpoint's recomputation and the backward to the activations (dX) of every Linear, and the
    joint attention (forward 2T²h, recomputed 2T²h, flash backward ≈ 5T²h: dQ, dK, dV, dP and P again).
    Core (weight-centric): W' = R·W made in forward and again in the recomputation (out·in·b each), dW' = gᵀx for
    every layer (a full weight gradient: tokens·in·out), dR from dW' (out·in·b).
    Ours (input-centric): the rotation of the output in forward, recomputation and backward (∂y and ∂R): 4 ×
    tokens·out·b; no weight-sized product at all.
    """
    lin = flux_linears()
    t = (FLUX_LATENT // FLUX["patch_size"]) ** 2 + FLUX_TEXT_TOKENS
    blocks = FLUX["depth"] + FLUX["depth_single_blocks"]
    base = sum(n * i * o for _, n, i, o in lin)
    attn = blocks * 9 * t * t * FLUX["hidden_size"]
    shared = 3 * base + attn  # forward + recomputation + dX, attention
    core_extra = sum(n * i * o for _, n, i, o in lin) + 3 * sum(i * o * block for _, _n, i, o in lin)
    ours_extra = 4 * sum(n * o * block for _, n, _i, o in lin)
    g = 1e-9
    return {"shared": shared * g, "linear_fwd": base * g, "attention": attn * g, "core_extra": core_extra * g,
            "ours_extra": ours_extra * g, "core": (shared + core_extra) * g, "ours": (shared + ours_extra) * g}


def flops_lines() -> list[str]:
    m = flux_step_macs()
    return [f"  FLUX-shaped step by multiply-adds (shapes only, checkpointing on, block size 8): both "
            f"{m['shared']:.0f} GMAC (3 × {m['linear_fwd']:.0f} linear forward/recompute/dX + {m['attention']:.0f} "
            f"attention); core + {m['core_extra']:.0f} (dW' = gᵀx for every layer, R·W twice, dR); ours + "
            f"{m['ours_extra']:.1f} (rotations of outputs) → ours/core {m['ours'] / m['core']:.2f} at equal "
            f"throughput (the base forward, recomputation and dX, which both sides must do, are "
            f"{m['shared'] / m['core']:.2f} of core's multiply-adds; core's measured step is slower than its count: "
            f"it rotates each weight in fp32)"]


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
            w = apply_rows(tl.layer, trainer.blocks(tl), weight.float().reshape(weight.shape[0], -1))
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
    ap.add_argument("--only", action="append", choices=["sd", "flux", "qoft", "synthetic", "flops"], default=None,
                    help="run only these parts (repeatable); default: all")
    ap.add_argument("--config", choices=sorted(CONFIGS) + ["flux"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=None, help="SD training steps per trainer (default 6; quick 3)")
    ap.add_argument("--flux-steps", type=int, default=3, help="FLUX-shaped race steps per trainer (default 3)")
    ap.add_argument("--rounds", type=int, default=1, help="step-time rounds of each race (ours, core, floor: fresh "
                    "processes back to back, the order reversed each round; default 1)")
    ap.add_argument("--qoft-steps", type=int, default=2, help="QOFT memory run steps (default 2)")
    ap.add_argument("--qoft-blocks", type=int, nargs=2, default=(6, 12), metavar=("DOUBLE", "SINGLE"),
                    help="the QOFT part's FLUX-shaped model: double and single blocks (default 6 12: 3.8 G params, "
                    "9 GB of RAM for the bf16 run; the race model is 2 + 2). Checkpointing holds one block's working "
                    "set whatever the depth, so the fp8/bf16 ratio falls with depth towards the weights' 0.5")
    ap.add_argument("--rank", type=int, default=8, help="core's rank (= its block size, see above); default 8")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="SD training dtype of both (autocast)")
    ap.add_argument("--base-dtype", choices=["fp32", "bf16", "fp8"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-checkpointing", action="store_true", help="both without gradient checkpointing")
    ap.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    ap.add_argument("--results", default=None, help="results file (default: bench_train.results.txt here)")
    ap.add_argument("--comfyui", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=["ours", "ours-executor", "ours-floor", "core"], default=None,
                    help=argparse.SUPPRESS)
    ap.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--flux-blocks", type=int, nargs=2, default=(2, 2), help=argparse.SUPPRESS)
    ap.add_argument("--warmup", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--trace-detail-MiB", type=float, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.config = args.config or ("quick" if args.quick else "default")
    args.steps = args.steps or (3 if args.quick else 6)
    if args.worker:
        args.base_dtype = args.base_dtype or ("bf16" if args.config == "flux" else "fp32")
        _import_comfy(Path(args.comfyui))
        print(json.dumps(worker(args)))  # noqa: T201  (read by the parent process)
        return 0

    parts = set(args.only or (["sd", "synthetic"] if args.quick else ["sd", "flux", "qoft", "synthetic"]))
    torch.set_num_threads(args.threads)
    before = machine()
    lines = [f"{before['time_utc']} bench_train{' --quick' if args.quick else ''} ({', '.join(sorted(parts))}): "
             f"torch {before['torch']}, threads {args.threads}, nproc {before['nproc']}"]
    root = Path(os.environ.get("COMFYUI_PATH") or Path.home() / ".cache" / "comfyui-oft" / "ComfyUI")
    found = (root / "comfy_extras" / "nodes_train.py").is_file()
    if not found and parts & {"sd", "flux", "qoft"}:
        lines.append(f"  ComfyUI not found at {root} (set COMFYUI_PATH): core comparison and QOFT skipped")
    if found and "sd" in parts:
        load0 = machine()["loadavg_1_5_15"]
        r = run_workers(args, root, args.config, args.steps, args.dtype, "fp32",
                        # (--quick leaves out the executor-weights run and the warm-ups: one process each, ~3 s of
                        # ComfyUI import apiece; tests/test_train_node.py covers executor-made weights on its own)
                        who=("ours", "core", "ours-floor", "ours#trace", "core#trace", "ours-floor#trace")
                        + (() if args.quick else ("ours-executor", "ours-executor#trace", "ours#warmup",
                                                  "core#warmup", "ours-floor#warmup",
                                                  "ours#warmup#tcache0", "core#warmup#tcache0",
                                                  "ours-floor#warmup#tcache0")))
        executor_line = [] if args.quick else [executor_lines(r)]
        lines += race_lines(
            f"SD1.x-family UNet '{args.config}' ({r['ours']['model_params'] / 1e6:.2f} M params), 2 latents "
            f"{LATENT[args.config]}×{LATENT[args.config]}, batch 2, {args.steps} steps, AdamW lr {args.lr:g}, "
            f"{args.dtype}, gradient checkpointing {'off' if args.no_checkpointing else 'on'}, core rank {args.rank} = "
            f"per-layer block sizes of factorization(out_dim, {args.rank}) for both", r, load0,
            machine()["loadavg_1_5_15"]) + floor_lines(
                race_rounds(args, root, args.config, args.steps, args.dtype, "fp32", r)) + executor_line + \
            breakdown_lines(r)
    if found and "flux" in parts:
        load0 = machine()["loadavg_1_5_15"]
        r = run_workers(args, root, "flux", args.flux_steps, "bf16", "bf16", who=RACE_SIDES)
        lines += race_lines(
            f"FLUX-shaped (hidden 3072, 24 heads, 2 double + 2 single blocks, {r['ours']['model_params'] / 1e9:.2f} G "
            f"params, random weights, comfy.supported_models.Flux), 1 latent 64×64×16 = 1024 image tokens + "
            f"{FLUX_TEXT_TOKENS} text tokens, batch 1, {args.flux_steps} steps, AdamW lr {args.lr:g}, bf16 weights and "
            f"training, gradient checkpointing {'off' if args.no_checkpointing else 'on'}, core rank {args.rank} = "
            f"per-layer block sizes of factorization(out_dim, {args.rank}) for both", r, load0,
            machine()["loadavg_1_5_15"]) + floor_lines(
                race_rounds(args, root, "flux", args.flux_steps, "bf16", "bf16", r))
    if found and "qoft" in parts:
        load0 = machine()["loadavg_1_5_15"]
        blocks = tuple(args.qoft_blocks)
        r = run_workers(args, root, "flux", args.qoft_steps, "bf16", "bf16",
                        who=("ours@bf16", "ours@fp8", "ours@bf16#trace", "ours@fp8#trace", "ours-floor@bf16#trace"),
                        flux_blocks=blocks)
        b16, f8 = r["ours@bf16"], r["ours@fp8"]
        lines += [
            f"  QOFT: our trainer on the FLUX-shaped model with {blocks[0]} double + {blocks[1]} single blocks "
            f"({b16['model_params'] / 1e9:.2f} G params), base weights bf16 vs fp8_e4m3fn (ComfyUI manual cast), "
            f"bf16 training, {args.qoft_steps} steps, checkpointing {'off' if args.no_checkpointing else 'on'}",
            f"    bf16 base: model {b16['model_MiB']:8.1f} MiB, peak incl. model {b16['peak_incl_model_MiB']:8.1f} MiB "
            f"(training growth {b16['peak_rss_growth_MiB']:8.1f}); step {b16['step_s'] * 1e3:8.1f} ms",
            f"    fp8  base: model {f8['model_MiB']:8.1f} MiB, peak incl. model {f8['peak_incl_model_MiB']:8.1f} MiB "
            f"(training growth {f8['peak_rss_growth_MiB']:8.1f}); step {f8['step_s'] * 1e3:8.1f} ms",
            f"    ratio fp8/bf16 peak memory {f8['peak_incl_model_MiB'] / b16['peak_incl_model_MiB']:.2f} "
            f"(goal ≤ 0.6); machine load {load0} before, {machine()['loadavg_1_5_15']} after",
            qoft_depth_line(b16, f8, blocks),
        ] + qoft_breakdown_lines(r)
    if "flops" in parts or "flux" in parts:
        lines += flops_lines()
    if "synthetic" in parts:
        lines += synthetic(256, 1, 64, 4, 2) if args.quick else synthetic(1024, 4, 256, 4, 5)
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
