"""OFTTrainer: train an OFT adapter on a ComfyUI MODEL (schema and ComfyUI glue; the trainer is oft_core.train).

What it does differently from core's `TrainLoraNode(algorithm="OFT")` (comfy_extras/nodes_train.py):

- input-centric OFT (OFTv2): the rotation is applied to activations, no rotated weight is materialised per step;
  the base weights are read, never written (`oft_core.train.OFTTrainer.attach` restores every patched forward);
- each family's own objective: MSE in the model's output space (ε for SD1.x/SDXL, v for v-prediction models,
  the flow velocity for FLUX / SD3). ComfyUI's `calculate_denoised` is affine in the raw output,
  D = a(σ)·x + b(σ)·out, so MSE(out, target) = mean(((D − x₀)/b(σ))²): b is read from the model's own
  `model_sampling` (core's trainer compares D with x₀ unweighted for every family);
- each family's noise level sampling: uniform discrete timesteps for discrete-schedule models (SD1.x/SDXL),
  logit-normal t for flow models (SD3 / FLUX rectified-flow training, Esser et al. 2024) mapped through the model's
  own shifted schedule (`percent_to_sigma`), EDM log-normal σ for continuous-σ models;
- kohya constraint alpha (‖Q‖_F ≤ alpha·out_dim), packed fp32 generators, no bias / norm deltas;
- the kohya file names layers as sd-scripts does for the family (`kohya_naming`): diffusers module names for
  SD1.x/SD2.x (sd-scripts cannot load LDM names there), LDM names for SDXL, BFL names for FLUX;
- the UI progress bar, a loss text on the node, and Cancel honoured at every step with the base model untouched;
- bad inputs (empty latents, conditioning count, block counts) rejected before any work.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math

import comfy.model_management
import comfy.model_sampling
import comfy.ops
import comfy.supported_models
import comfy.utils
import torch
from comfy_api.latest import io, ui

from ..oft_core import OFTError
from ..oft_core.formats import lycoris, write_adapter
from ..oft_core.train import (
    KOHYA_LOSS,
    LOSSES,
    OPTIMIZERS,
    PRESETS,
    SCHEDULES,
    checkpoint_blocks,
    detect_family,
    export_names,
    frozen_bases,
    frozen_for_training,
    gradient_checkpointing,
    inplace_safe,
    is_linear,
    lr_factor,
    residual_loss,
    run_training,
    select_targets,
    training_metadata,
)
from ..oft_core.train import (
    OFTTrainer as CoreTrainer,
)
from . import families
from .op_nodes import next_free_path
from .patch import apply_oft, base_version, model_kind
from .rope_grad import ensure_rope_backward
from .types import TRAINING_TARGETS, OFTAdapterType

log = logging.getLogger(__name__)

CATEGORY = "training/oft"
TARGETS = TRAINING_TARGETS
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------------------------ objective
def _logit_normal(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.sigmoid(torch.randn(n, generator=gen, device=gen.device)).clamp(1e-4, 1 - 1e-4)


def sigma_sampler(ms, device):
    """A function (n, generator) -> n noise levels (float32, on the generator's device), the way the model family
    trains (see module docstring). Everything that needs a host read (schedule bounds) is read here, once, so that
    drawing inside a training step never waits for the device."""
    device = torch.device(device)
    if isinstance(ms, comfy.model_sampling.ModelSamplingFlux):
        # percent_to_sigma(1 − u) = flux_time_shift(shift, 1, u) = ms.sigma(u), vectorised
        return lambda n, gen: ms.sigma(_logit_normal(n, gen)).float()
    if isinstance(ms, comfy.model_sampling.ModelSamplingDiscreteFlow):
        mult = float(ms.multiplier)  # percent_to_sigma(1 − u) = time_snr_shift(shift, u) = ms.sigma(u·multiplier)
        return lambda n, gen: ms.sigma(_logit_normal(n, gen) * mult).float()
    if isinstance(ms, comfy.model_sampling.CONST):  # another flow schedule: its own percent_to_sigma, per value
        def draw(n, gen):
            u = _logit_normal(n, gen).cpu()
            return torch.tensor([float(ms.percent_to_sigma(1.0 - float(v))) for v in u], dtype=torch.float32,
                                device=gen.device)
        return draw
    if isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete):
        table = ms.sigmas.detach().float()
        return lambda n, gen: table.to(gen.device)[torch.randint(0, len(table), (n,), generator=gen,
                                                                 device=gen.device)]
    lo, hi = float(ms.sigma_min), float(ms.sigma_max)
    # EDM (Karras et al. 2022) P_mean −1.2, P_std 1.2
    return lambda n, gen: torch.exp(torch.randn(n, generator=gen, device=gen.device) * 1.2 - 1.2).clamp(lo, hi)


def sample_sigmas(ms, n: int, gen: torch.Generator) -> torch.Tensor:
    """Noise levels the way the model family trains (see module docstring); float32, shape (n,), on gen's device."""
    return sigma_sampler(ms, gen.device)(n, gen)


def output_scale(ms, sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """b(σ) of D = a(σ)·x + b(σ)·out, broadcastable to `like` (read from the model's own calculate_denoised)."""
    ones = torch.ones_like(like)
    zeros = torch.zeros_like(like)
    return ms.calculate_denoised(sigma, ones, zeros)


def _fused_attention(func, *args, **kwargs):
    """ComfyUI's `optimized_attention_override` hook: run any attention call through `attention_pytorch`
    (torch.nn.functional.scaled_dot_product_attention), whose backward does not keep the score matrix."""
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch(*args, **kwargs)


def family_loss(base_model, x0, noise, sigma, conds, transformer_options, loss_function="MSE") -> torch.Tensor:
    """The family's training loss for clean latents `x0` (already `process_latent_in`): `loss_function` (MSE, L1,
    Huber, SmoothL1) of the residual (D − x₀)/b(σ) = out − target in the model's own output space."""
    ms = base_model.model_sampling
    xt = ms.noise_scaling(sigma, noise, x0)
    denoised = base_model.apply_model(xt, sigma, transformer_options=transformer_options, **conds)
    b = output_scale(ms, sigma, x0)
    return residual_loss(loss_function, (denoised.float() - x0.float()) / b)


# ------------------------------------------------------------------------------------------------ conditioning
def prepare_conds(base_model, positive, latents: torch.Tensor, device) -> list[dict]:
    """Per image: the model's own extra_conds (as ComfyUI's samplers build them), processed for batch size 1."""
    n = latents.shape[0]
    entries = list(positive) * n if len(positive) == 1 else list(positive)
    out = []
    for i, (cross_attn, extra) in enumerate(entries):
        params = dict(extra)
        params.update(device=device, noise=latents[i:i + 1], latent_image=latents[i:i + 1])
        if cross_attn is not None:
            params["cross_attn"] = cross_attn
        try:
            model_conds = base_model.extra_conds(**params)
        except KeyError as e:
            raise OFTError(f"conditioning {i + 1} lacks {e} that this {type(base_model).__name__} model needs "
                           "(use the text encoder node made for this model)") from e
        processed = {}
        for name, c in model_conds.items():
            c = c.process_cond(batch_size=1, area=None, device=device)
            if isinstance(c.cond, torch.Tensor):
                c = c._copy_with(c.cond.detach().clone().to(device))  # not an inference tensor
            processed[name] = c
        out.append(processed)
    return out


def batch_conds(per_image: list[dict], idx: list[int]) -> dict:
    first = per_image[idx[0]]
    conds = {}
    for name, c in first.items():
        others = [per_image[j][name] for j in idx[1:]]
        if not all(c.can_concat(o) for o in others):
            raise OFTError(f"conditioning '{name}' of the images cannot be batched together (different shapes): "
                           "use batch size 1")
        conds[name] = c.concat(others)
    return conds


# ------------------------------------------------------------------------------------------------ validation
def _is_conditioning(v) -> bool:
    """A CONDITIONING is a list of [tensor | None, dict] pairs (a list of them is what an input list gives)."""
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(
        isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[1], dict) for e in v)


def as_latent_list(latents) -> list:
    """One LATENT (dict) or a list of them (several resolutions) -> a list of LATENT dicts."""
    return list(latents) if isinstance(latents, (list, tuple)) else [latents]


def as_conditioning_list(positive) -> list:
    """One CONDITIONING or a list of them (one per LATENT batch) -> a list of CONDITIONINGs."""
    if isinstance(positive, (list, tuple)) and len(positive) > 0 and all(_is_conditioning(p) for p in positive):
        return list(positive)
    return [positive]


def validate(model, latents, positive, steps, batch_size, grad_accumulation, learning_rate=1e-4,
             constraint=0.0) -> list[tuple[torch.Tensor, list]]:
    """Checks that need no work. `latents`: one LATENT or a list of LATENT batches (any sizes); `positive`: one
    CONDITIONING (one entry for every image, or one per image in order over all batches) or one CONDITIONING per
    LATENT batch (each with one entry, or one per image of its batch). Returns, per image, its latent (C, H, W …)
    and its conditioning entry. Raises OFTError with the numbers."""
    batches = as_latent_list(latents)
    conds = as_conditioning_list(positive)
    images = _latent_images(batches)
    entries = _conditioning_entries(conds, images, len(batches))
    if steps < 1:
        raise OFTError(f"steps: expected ≥ 1, found {steps}")
    for name, v in (("learning_rate", learning_rate), ("constraint", constraint)):
        # NaN passes ComfyUI's min/max check at queue time (every comparison with NaN is false)
        if not math.isfinite(v):
            raise OFTError(f"{name}: expected a finite number, found {v}")
    if batch_size < 1 or grad_accumulation < 1:
        raise OFTError(f"batch size and gradient accumulation: expected ≥ 1, found {batch_size} and "
                       f"{grad_accumulation}")
    return [(x, e) for (x, _), e in zip(images, entries)]


def _latent_images(batches: list) -> list[tuple[torch.Tensor, int]]:
    """(latent, batch index) of every image of the LATENT batches, checked: non-empty, finite, one channel count."""
    if not batches:
        raise OFTError("training latents: expected a LATENT batch of at least one image (N, C, H, W), found nothing")
    images = []
    for k, lat in enumerate(batches):
        which = "training latents" if len(batches) == 1 else f"training latents (batch {k + 1} of {len(batches)})"
        samples = lat.get("samples") if isinstance(lat, dict) else None
        if not isinstance(samples, torch.Tensor) or samples.ndim < 4 or samples.shape[0] == 0:
            found = "nothing" if samples is None else tuple(getattr(samples, "shape", ()))
            raise OFTError(f"{which}: expected a LATENT batch of at least one image (N, C, H, W), found {found}")
        if not torch.isfinite(samples).all():
            raise OFTError(f"{which} contain NaN or Inf values")
        if images and samples.shape[1] != images[0][0].shape[0]:
            raise OFTError(f"{which}: expected {images[0][0].shape[0]} latent channels like the first batch, found "
                           f"{samples.shape[1]} (latents of one model only)")
        images += [(samples[i], k) for i in range(samples.shape[0])]
    return images


def _conditioning_entries(conds: list, images: list[tuple[torch.Tensor, int]], n_batches: int) -> list:
    """One conditioning entry per image, in image order: one CONDITIONING for all images (one entry, or one per
    image) or one per LATENT batch (one entry, or one per image of its batch)."""
    for p in conds:
        if not isinstance(p, (list, tuple)) or len(p) == 0:
            raise OFTError("conditioning: expected at least one CONDITIONING entry, found none")
    n = len(images)
    if len(conds) == 1:
        p = conds[0]
        if len(p) not in (1, n):
            raise OFTError(f"conditioning count: expected 1 (for all images) or {n} (one per image), found {len(p)}")
        return list(p) * n if len(p) == 1 else list(p)
    if len(conds) != n_batches:
        raise OFTError(f"conditioning: expected one CONDITIONING for all {n_batches} latent batches or one per "
                       f"batch, found {len(conds)}")
    entries = []
    for k, p in enumerate(conds):
        nk = sum(1 for _, b in images if b == k)
        if len(p) not in (1, nk):
            raise OFTError(f"conditioning {k + 1} (for latent batch {k + 1}): expected 1 entry or {nk} (one per "
                           f"image), found {len(p)}")
        entries += list(p) * nk if len(p) == 1 else list(p)
    return entries


def buckets_of(images: list[tuple[torch.Tensor, list]]) -> list[tuple[torch.Tensor, list]]:
    """Images grouped by latent size (first appearance order): [(latents (n, C, H, W), conditioning entries)]."""
    groups: dict[tuple, list] = {}
    for x, entry in images:
        groups.setdefault(tuple(x.shape), []).append((x, entry))
    return [(torch.stack([x for x, _ in g]), [e for _, e in g]) for g in groups.values()]


def micro_batch_plan(sizes: list[int], batch_size: int, count: int, gen: torch.Generator) -> list[tuple[int, list]]:
    """`count` micro-batches (bucket, image indices in it), each of `batch_size` images of ONE size (sd-scripts'
    bucketing): epochs over all images; in each, every bucket's images in a seeded random order cut into batches
    (the last one topped up from a fresh order of the same bucket), the batches of all buckets in a seeded random
    order. Drawn on the host before training (the same seed gives the same plan on every device)."""
    plan: list[tuple[int, list]] = []
    while len(plan) < count:
        epoch = []
        for k, n in enumerate(sizes):
            order = torch.randperm(n, generator=gen).tolist()
            while len(order) % batch_size:
                order += torch.randperm(n, generator=gen).tolist()[:batch_size - len(order) % batch_size]
            epoch += [(k, order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
        plan += [epoch[i] for i in torch.randperm(len(epoch), generator=gen).tolist()]
    return plan[:count]


def _casts_weight(module) -> bool:
    """Whether the layer makes its weight per forward (ComfyUI cast ops: fp8 / manual-cast / offloaded / patched
    layers; a GGUF layer's own dequantisation): then that weight is a fresh copy, worth making again in backward."""
    return callable(getattr(type(module), "cast_bias_weight", None)) or _comfy_cast(module)


def _comfy_cast(module) -> bool:
    """Whether ComfyUI's `cast_bias_weight` (then the layer's `convert_weight`) makes the layer's weight: cast ops
    (fp8 / manual-cast / offloaded / patched layers) and layers that convert their stored weight (scaled fp8 ops;
    newer ComfyUI's per-layer quantized Linear, whose QuantizedTensor is dequantised there)."""
    return bool(getattr(module, "comfy_cast_weights", False) or getattr(module, "weight_function", None) or
                getattr(module, "bias_function", None) or callable(getattr(module, "convert_weight", None)))


def _weight_fn(module, x):
    """The base weight as the layer's own forward would use it, never written: a layer that dequantises its own
    weights (city96's ComfyUI-GGUF `GGMLLayer.cast_bias_weight`: quantized GGML tensors, and the LoRA patches it keeps
    on them) through its own method; ComfyUI's cast ops (fp8 weights from UNETLoader weight_dtype fp8_*, offloaded
    or patched layers) through `comfy.ops.cast_bias_weight`, then the layer's `convert_weight` where it has one
    (a "scaled fp8" checkpoint's layers compute with the stored fp8 weight times their `scale_weight`: ComfyUI's
    ModelPatcher converts the same way before it patches). Either way a fresh tensor per forward (QOFT: the
    quantized base is read, the adapter trains in fp32), made directly in the autocast dtype when autocast is on
    (no fp32 copy of a bf16 / fp8 weight on the way)."""
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    if callable(getattr(type(module), "cast_bias_weight", None)):
        return module.cast_bias_weight(x, dtype=dtype)
    if _comfy_cast(module):
        w, b = comfy.ops.cast_bias_weight(module, x, dtype=dtype)
        convert = getattr(module, "convert_weight", None)
        return (w if convert is None else convert(w)), b
    w, b = module.weight, module.bias
    if torch.is_autocast_enabled(x.device.type) or (w.dtype == x.dtype and w.device == x.device):
        return w, b
    return w.to(x), None if b is None else b.to(x)


def build_trainer(model, targets: str, num_blocks: int, alpha: float, neumann_terms: int) -> CoreTrainer:
    dm = model.model.diffusion_model
    family = detect_family(dm)
    if targets not in PRESETS[family]:
        raise OFTError(f"target preset {targets!r} is not available for this {model_kind(model)} model "
                       f"({family}): choose one of {', '.join(PRESETS[family])}")
    try:
        selected, splits = select_targets(dm, targets, family), None
        if family == "generic":  # SD3, Wan, Qwen-Image, ...: names and fused splits from ComfyUI's key map
            lay = families.layout(model, selected)
            selected, splits = lay.keep(selected), lay.splits
            if lay.left_out:  # (the node's report lists them too: `_left_out`)
                log.info("OFTTrainer: %d selected layers of the %s model have no diffusers (LyCORIS) name and are "
                         "not trained: %s", len(lay.left_out), model_kind(model), ", ".join(lay.left_out[:5]))
            if not selected:
                raise OFTError(f"none of the {len(lay.left_out)} selected layers has a name in the family's "
                               "LyCORIS convention")
        trainer = CoreTrainer(selected, num_blocks=num_blocks, alpha=alpha,
                              neumann_terms=neumann_terms, weight_fn=_weight_fn,
                              device=comfy.model_management.get_torch_device(), root=dm, splits=splits,
                              recompute_weight=_casts_weight)
        if family == "generic":  # saved as LyCORIS only: a layout it cannot hold is refused before any step
            try:
                lycoris.check(families.export(model, trainer, {}))
            except OFTError as e:
                raise OFTError(f"num_blocks {num_blocks}: sd-scripts has no OFT network for these models, so the "
                               "trained adapter can only be saved as LyCORIS, which needs every layer to have at "
                               "least as many blocks as their size: raise num_blocks (kohya and PEFT are not "
                               f"options here). LyCORIS's refusal: {e}") from None
        return trainer
    except OFTError as e:
        raise OFTError(f"{model_kind(model)} model, targets {targets!r}: {e}") from None


def resume_from(model, trainer: CoreTrainer, adapter) -> int:
    """Load `adapter` into `trainer` (OFTError naming the first mismatch) and return its trained steps (ss_steps)."""
    dm = model.model.diffusion_model
    # sd-scripts' naming for the family first (diffusers for SD1.x/SD2.x), then the module paths themselves (native);
    # compared as kohya keys ("." -> "_"), as `OFTTrainer.load_adapter` does
    theirs = {name.replace(".", "_") for (_c, name) in adapter.layers}
    candidates = [export_names(dm, kohya_naming(model)), None]
    under = next((c for c in candidates if theirs <= {(c or {}).get(tl.path, tl.path).replace(".", "_")
                                                      for tl in trainer.layers}), candidates[0])
    try:
        trainer.load_adapter(adapter, names=under)
    except OFTError as e:
        raise OFTError(f"{model_kind(model)} model: {e}") from None
    raw = str(adapter.metadata.get("ss_steps", "")).strip()
    if raw.isdigit() and len(raw) <= 9:
        return int(raw)
    log.warning("OFTTrainer resume: the adapter's ss_steps %r is not a step count; counting its steps as 0", raw)
    return 0


# ------------------------------------------------------------------------------------------------ training
def train(model, latents, positive, *, steps: int, learning_rate: float, batch_size: int = 1,
          grad_accumulation: int = 1, optimizer: str = "AdamW", seed: int = 0, num_blocks: int = 4,
          alpha: float = 1e-3, neumann_terms: int = 0, targets: str = "attention", training_dtype: str = "bf16",
          gradient_checkpointing_on: bool = True, node_id=None, loss_function: str = "MSE",
          lr_schedule: str = "constant", warmup_steps: int = 0, resume=None, save_every: int = 0,
          checkpoint_prefix: str = "loras/oft_checkpoint", saved: list | None = None):
    """Train and return (trainer, losses, metadata). The input model is never modified (its module is restored).

    `latents` / `positive`: see `validate` (several LATENT batches = several resolutions, one size per micro-batch).
    `resume`: an OFTAdapter to continue (same layers, blocks, constraint; its ss_steps are carried on).
    `save_every` > 0: a kohya checkpoint (LyCORIS for families sd-scripts has no OFT network for) every that many
    steps under the output folder (`checkpoint_prefix`, numbered, never overwriting); their paths are appended to
    `saved`.
    """
    images = validate(model, latents, positive, steps, batch_size, grad_accumulation, learning_rate, alpha)
    check_options(training_dtype, optimizer, loss_function, lr_schedule, steps, warmup_steps, save_every)
    trainer = build_trainer(model, targets, num_blocks, alpha, neumann_terms)  # block-count errors: before any work
    prior = resume_from(model, trainer, resume) if resume is not None else 0
    buckets = buckets_of(images)
    settings = dict(learning_rate=learning_rate, optimizer=optimizer, seed=seed, batch_size=batch_size,
                    grad_accumulation=grad_accumulation, training_dtype=training_dtype, targets=targets,
                    num_blocks=num_blocks, alpha=alpha, neumann_terms=neumann_terms, loss_function=loss_function,
                    lr_schedule=lr_schedule, warmup_steps=warmup_steps)

    def metadata(done: int) -> dict:
        return run_metadata(model, buckets, len(images), prior, done, steps, resumed=resume is not None, **settings)

    def checkpoint(done: int) -> None:  # `done` steps of this run
        path = save_checkpoint(model, trainer, metadata(done), checkpoint_prefix, prior + done)
        if saved is not None:
            saved.append(path)

    on_step = _step_reporter(steps, node_id, save_every, checkpoint)
    # Loaded in the caller's mode (the executor's inference mode), as a sampler would load it: the weights stay what
    # the rest of the graph expects (`frozen_for_training` lends autograd aliases of inference tensors). Loaded in
    # normal mode, ComfyUI 0.8 re-wraps quantized weights as normal tensors around inference data, and every later
    # load of that model inside the executor failed ("Cannot set version_counter for inference tensor").
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    with torch.inference_mode(False), torch.enable_grad():
        compute_loss = _loss_of(model, buckets, steps * grad_accumulation, grad_accumulation, batch_size, seed,
                                DTYPES[training_dtype], loss_function)
        with _training_patches(model, trainer, gradient_checkpointing_on):
            losses = run_training(trainer.parameters(), compute_loss, steps=steps, lr=learning_rate,
                                  grad_accum=grad_accumulation, optimizer=optimizer, before_step=_before_step,
                                  on_step=on_step, schedule=lr_schedule, warmup_steps=warmup_steps,
                                  loss_scaling=training_dtype == "fp16")
    return trainer, losses, metadata(steps)


def _before_step(step: int) -> None:
    # Looked up on the module each time (tests and ComfyUI may replace it); raises on Cancel.
    comfy.model_management.throw_exception_if_processing_interrupted()


def _step_reporter(steps: int, node_id, save_every: int, checkpoint):
    """`on_step(step, loss)` for `run_training`: the progress bar and text, a log line every tenth of the run, and
    `checkpoint(steps done)` every `save_every` steps. `loss` is the host number run_training read: nothing else
    is read from the device here."""
    pbar = comfy.utils.ProgressBar(steps, node_id=node_id)

    def on_step(step, loss):
        pbar.update_absolute(step + 1, steps)
        _progress_text(node_id, f"step {step + 1}/{steps}  loss {loss:.5f}")
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            log.info("OFTTrainer step %d/%d loss %.5f", step + 1, steps, loss)
        if save_every and (step + 1) % save_every == 0:
            checkpoint(step + 1)

    return on_step


def _loss_of(model, buckets, micro_steps: int, grad_accumulation: int, batch_size: int, seed: int, dtype,
             loss_function: str):
    """`compute_loss(step, micro)` for `run_training` on the loaded model; call outside inference mode.

    Everything random that needs the host is drawn here (the micro-batch plan); noise and noise levels are drawn
    on the device from a generator there: a step reads nothing back but its loss."""
    device = comfy.model_management.get_torch_device()
    base = model.model
    data = _device_data(base, buckets, device)
    transformer_options = dict(model.model_options.get("transformer_options", {}))
    # Training keeps every attention's activations for backward: use torch's fused attention (flash on CPU,
    # memory-efficient on GPU; O(tokens) saved instead of the full score matrix) unless the user set their own.
    transformer_options.setdefault("optimized_attention_override", _fused_attention)
    plan = micro_batch_plan([len(e) for _, e in data], batch_size, micro_steps,
                            torch.Generator().manual_seed(int(seed)))
    index = torch.tensor([idx for _, idx in plan], dtype=torch.long).to(device)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    draw_sigmas = sigma_sampler(base.model_sampling, device)

    def compute_loss(step, micro):
        i = step * grad_accumulation + micro
        k, idx = plan[i]
        x0_all, per_image = data[k]
        x0 = x0_all.index_select(0, index[i])
        noise = torch.randn(x0.shape, generator=gen, device=device, dtype=torch.float32)
        sigma = draw_sigmas(len(idx), gen)
        conds = batch_conds(per_image, idx)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return family_loss(base, x0, noise, sigma, conds, transformer_options, loss_function)

    return compute_loss


def _device_data(base, buckets, device) -> list:
    """Per bucket: its clean latents on the device (the model's latent format), per-image conditioning."""
    data = []
    for x, entries in buckets:
        x0 = base.process_latent_in(x.detach().clone().to(device=device, dtype=torch.float32))
        data.append((x0, prepare_conds(base, entries, x0, device)))
    return data


@contextlib.contextmanager
def _training_patches(model, trainer: CoreTrainer, checkpointing: bool):
    """The model made trainable for the duration, everything restored on exit (errors and Cancel included).

    After loading: the weights now in the modules (inference tensors when a loader or a KSampler made them under
    the executor's inference mode) become zero-copy normal aliases until the end of training. QOFT: untrained layers
    whose weights are made per forward (fp8 / GGUF / manual cast) make them again in backward instead of keeping
    them (`frozen_bases`); the trained ones do the same (`recompute_weight`)."""
    ensure_rope_backward()  # ComfyUI >= 0.8 with comfy-kitchen: RoPE ops without a backward (nodes/rope_grad.py)
    base = model.model
    blocks = checkpoint_blocks(base.diffusion_model)
    ckpt = gradient_checkpointing(blocks) if checkpointing else inplace_safe(blocks)
    trained = {id(tl.module) for tl in trainer.layers}
    cast_layers = [m for m in base.diffusion_model.modules() if id(m) not in trained and _casts_weight(m)]
    with frozen_for_training(base), trainer.attach(), frozen_bases(cast_layers, _weight_fn), ckpt, _objects_frozen():
        yield


@contextlib.contextmanager
def _objects_frozen():
    """Python's cyclic collector told to leave the objects that exist before training alone for its duration
    (`gc.freeze`; `gc.unfreeze` on exit, errors and Cancel included): every step makes thousands of objects
    (autograd contexts, the block recomputations' graphs), so full collections run during training, and each one
    walks every object of the ComfyUI process (its modules, models, caches). Frozen, they walk only what the training
    made. Garbage made during training is still collected as before; only a cycle among objects older than the
    training that becomes garbage during it waits for the end, when the frozen objects become collectable again.
    Left as it is when something else has frozen objects
    (`gc.get_freeze_count()`), whose freeze an unfreeze would undo."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def check_options(training_dtype: str, optimizer: str, loss_function: str, lr_schedule: str, steps: int,
                  warmup_steps: int, save_every: int) -> None:
    """The choices and counts `validate` does not see, refused before any work."""
    if training_dtype not in DTYPES:
        raise OFTError(f"training dtype: expected one of {', '.join(DTYPES)}, found {training_dtype!r}")
    if optimizer not in OPTIMIZERS:
        raise OFTError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, found {optimizer!r}")
    if loss_function not in LOSSES:
        raise OFTError(f"loss function: expected one of {', '.join(LOSSES)}, found {loss_function!r}")
    lr_factor(lr_schedule, 0, steps, warmup_steps)  # a bad schedule or warm-up: refused before any work
    if save_every < 0:
        raise OFTError(f"save_every: expected 0 (off) or a step count ≥ 1, found {save_every}")


def run_metadata(model, buckets, n: int, prior: int, done: int, steps: int, *, resumed: bool, learning_rate: float,
                 optimizer: str, seed: int, batch_size: int, grad_accumulation: int, training_dtype: str,
                 targets: str, num_blocks: int, alpha: float, neumann_terms: int, loss_function: str,
                 lr_schedule: str, warmup_steps: int) -> dict:
    """kohya `ss_*` metadata (and the pack's own) of a run after `done` of its `steps`, `prior` steps before it."""
    sizes = {"x".join(str(d) for d in x.shape[2:]): int(x.shape[0]) for x, _ in buckets}
    extra = {"ss_base_model_version": base_version(model), "ss_steps": str(prior + done),
             "ss_max_train_steps": str(prior + steps), "ss_lr_scheduler": lr_schedule,
             "ss_lr_warmup_steps": str(warmup_steps), "ss_loss_type": KOHYA_LOSS[loss_function],
             "ss_enable_bucket": str(len(buckets) > 1),
             "comfyui_oft.train": f"targets={targets} num_blocks={num_blocks} alpha={alpha:g} "
                                  f"neumann_terms={neumann_terms} loss={loss_function} "
                                  f"lr_schedule={lr_schedule} warmup_steps={warmup_steps}",
             "comfyui_oft.latent_sizes": json.dumps(sizes)}
    if resumed:
        extra["comfyui_oft.resumed_from_steps"] = str(prior)
    return training_metadata(steps=prior + done, lr=learning_rate, optimizer=optimizer, seed=seed,
                             batch_size=batch_size, grad_accum=grad_accumulation, num_images=n,
                             dtype=training_dtype, extra=extra)


def save_checkpoint(model, trainer: CoreTrainer, meta: dict, prefix: str, total_steps: int) -> str:
    """A kohya file of the adapter as trained so far under the output folder: `<prefix>_<counter>_step<N>.safetensors`
    (ComfyUI's counter, moved past any existing name: never overwrites); LyCORIS for the families sd-scripts has no
    OFT network for (the adapter refuses kohya). Returns its path."""
    adapter = export_adapter(model, trainer, meta)
    fmt = "lycoris" if "kohya" in adapter.refused_formats else "kohya"
    path = next_free_path(prefix, f"step{total_steps:06}.safetensors")
    written = write_adapter(adapter, path, fmt, overwrite=False,
                            metadata={"comfyui_oft.saved_by": "OFTTrainer checkpoint"})
    log.info("OFTTrainer: checkpoint at step %d: %s", total_steps, written)
    return written


def kohya_naming(model) -> str:
    """How sd-scripts names this model's layers in a kohya file: "diffusers" for SD1.x/SD2.x (`networks.oft` keys
    such as oft_unet_down_blocks_0_attentions_0_…, from its diffusers-style original_unet), "native" otherwise
    (SDXL: LDM names as ComfyUI has them; FLUX: BFL names). Decided from ComfyUI's model config class."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    sd12 = (comfy.supported_models.SD15, comfy.supported_models.SD20)  # incl. their subclasses (unCLIP, ip2p, …)
    return "diffusers" if isinstance(config, sd12) else "native"


def export_adapter(model, trainer: CoreTrainer, meta: dict):
    """The trained adapter named the way sd-scripts names this model's layers (see `kohya_naming`); for families
    sd-scripts has no OFT network for, as LyCORIS with the family's names (`families.export`)."""
    if detect_family(model.model.diffusion_model) == "generic":
        return families.export(model, trainer, meta)
    return trainer.to_adapter(meta, names=export_names(model.model.diffusion_model, kohya_naming(model)))


def _progress_text(node_id, text: str) -> None:
    if node_id is None:
        return
    try:
        from server import PromptServer

        if PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, node_id)
    except Exception:  # no server (library use, tests): the progress bar and the log still report
        pass


# ------------------------------------------------------------------------------------------------ node
def _types_looked_up() -> bool:
    """Whether this ComfyUI's V3 schema finalisation looks input types up in a dict (see `queue_checked`)."""
    try:
        from comfy_api.latest import _io
    except ImportError:
        return False
    return hasattr(_io, "DYNAMIC_INPUT_LOOKUP")


_TYPES_LOOKED_UP = _types_looked_up()


class _ListTypedCombo(io.Combo.Input):
    """A Combo whose V1 type is its list of options (see `queue_checked`)."""

    def get_io_type(self):
        return list(self.options)


def queue_checked(combo: io.Combo.Input) -> io.Combo.Input:
    """`combo`, checked by ComfyUI itself when a prompt is queued.

    ComfyUI 0.3.64 checks a V1 list-typed input against its options at queue time ("Value not in list", one
    message naming the input) but never a V3 Combo (its type is "COMBO"): `targets='bf16'` would reach the node.
    A node-level `validate_inputs` cannot stand in for it cleanly: ComfyUI repeats each message it returns once per
    input the hook names, and skips its own min/max/combo checks for those inputs. So the combo's V1 type is made
    its list of options (`get_io_type()`; the frontend shows a V1 list type as the same dropdown) and ComfyUI's own
    check applies. Not through `widget_type`: that is also sent as the input's "widgetType", and frontend 1.27.10
    then builds no widget at all for the input (every later widget value of a saved workflow shifts).

    Newer ComfyUI (0.8) checks V3 Combos at queue time itself, and its schema finalisation looks each input's type
    up in a dict (`comfy_api.latest._io.DYNAMIC_INPUT_LOOKUP`): a list type there is unhashable and the node could
    not run at all. Where that lookup exists the combo is left a plain V3 Combo (feature detection, not a version).
    """
    if not _TYPES_LOOKED_UP:
        combo.__class__ = _ListTypedCombo
    return combo


def _run_inputs() -> list:
    """The data and the optimizer."""
    return [
        io.Model.Input("model", tooltip="The diffusion model to train on (never modified; the output is a "
                       "patched clone)."),
        io.Latent.Input("latents", tooltip="The training images as latents (VAE Encode), one per image."),
        io.Conditioning.Input("positive", tooltip="The captions' conditioning: one for all images, or one "
                              "per image in the same order."),
        io.Int.Input("steps", default=100, min=1, max=100000, tooltip="Optimizer steps."),
        io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-6,
                       tooltip="Learning rate of the OFT generators (OFT tolerates larger rates than LoRA; "
                       "1e-4 … 1e-3 is usual)."),
        io.Int.Input("batch_size", default=1, min=1, max=256,
                     tooltip="Images per micro-batch (drawn at random, seeded)."),
        io.Int.Input("grad_accumulation", default=1, min=1, max=1024,
                     tooltip="Micro-batches whose gradients are summed before each optimizer step."),
        queue_checked(io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="AdamW",
                       tooltip="Optimizer (AdamW without weight decay: decay would pull the rotation "
                       "towards identity).")),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                     tooltip="Seed of image order, noise and noise levels: the same seed and inputs give "
                     "the same adapter."),
    ]


def _adapter_inputs() -> list:
    """The adapter's structure and how it is trained."""
    return [
        io.Int.Input("num_blocks", default=4, min=1, max=4096,
                     tooltip="Rotation blocks per layer (kohya's 'dim'): each output split is cut into this "
                     "many b×b blocks; it must divide every adapted layer's width. More blocks = smaller, "
                     "cheaper, more local rotations. Families saved as LyCORIS (SD3, Wan, Qwen-Image, "
                     "HiDream) need at least as many blocks as their size (checked before training)."),
        io.Float.Input("constraint", default=1e-3, min=0.0, max=100.0, step=1e-4,
                       tooltip="kohya alpha: ‖Q‖_F is clamped at alpha × output width (0 = no constraint). "
                       "Saved as the file's alpha."),
        io.Boolean.Input("cayley_neumann", default=False,
                         tooltip="Train with the Cayley–Neumann series (OFTv2, no linear solve) instead of "
                         "the exact Cayley transform. Saved as the nearest exact Cayley rotation."),
        io.Int.Input("neumann_terms", default=5, min=2, max=20,
                     tooltip="Terms of the Cayley–Neumann series (when it is on)."),
        queue_checked(io.Combo.Input("targets", options=TARGETS, default="attention",
                       tooltip="Which layers to adapt; each is the sd-scripts option of the same name, so "
                       "the saved file means the same there. attention: attention projections (FLUX: double-"
                       "block qkv / proj). all-linear: every linear of the transformer blocks (FLUX: of "
                       "every block, modulation included). attention+conv / all-linear+conv (SD only): also "
                       "the ResBlock / down / up convolutions and time embedding projections. "
                       "attention+single (FLUX only, beyond sd-scripts, which ignores the extra layers): "
                       "also single-block linear1 / linear2. Other families (SD3, Wan, Qwen-Image, ...): "
                       "attention = linears of attention modules, all-linear = every linear of the "
                       "transformer blocks; saved as LyCORIS with the family's names.")),
        queue_checked(io.Combo.Input("training_dtype", options=list(DTYPES), default="bf16",
                       tooltip="Compute precision of the forward/backward (autocast); the generators are "
                       "always fp32. fp16 (for GPUs without bf16) scales the loss dynamically so that small "
                       "gradients do not vanish, as fp16 trainers do.")),
        io.Boolean.Input("gradient_checkpointing", default=True,
                         tooltip="Recompute each block in the backward pass: much less memory, ~30% slower."),
    ]


def _later_inputs() -> list:
    """Inputs added after the first release: at the end, with defaults, so older workflows keep their widget
    slots. New inputs go here, last."""
    return [
        queue_checked(io.Combo.Input("loss_function", options=list(LOSSES), default="MSE", optional=True,
                       tooltip="Loss of the model's prediction against the family's own target (ε, v or "
                       "flow velocity): MSE (default), L1, Huber or SmoothL1 (both with delta 1, as core's "
                       "trainer). Saved as ss_loss_type.")),
        queue_checked(io.Combo.Input("lr_schedule", options=list(SCHEDULES), default="constant",
                       optional=True, tooltip="Learning rate over the steps after warm-up: constant; cosine "
                       "(half a cosine down to 0); linear (straight down to 0). Saved as ss_lr_scheduler.")),
        io.Int.Input("warmup_steps", default=0, min=0, max=100000, optional=True,
                     tooltip="Steps over which the learning rate rises linearly to its value before the "
                     "schedule starts (0 = none). Saved as ss_lr_warmup_steps."),
        OFTAdapterType.Input("resume_from", optional=True,
                             tooltip="Continue training this adapter (e.g. from Load OFT Adapter): it must "
                             "have the same layers (targets), num_blocks and constraint, else the run stops "
                             "naming the first difference. Its ss_steps are carried on in the new file."),
        io.Int.Input("save_every", default=0, min=0, max=100000, optional=True,
                     tooltip="Save a kohya checkpoint (with ss_* metadata; LyCORIS for model families sd-scripts "
                     "has no OFT network for, e.g. SD3, Wan) every this many steps into the output folder "
                     "(0 = off); numbered, never overwriting; listed in the report."),
        io.String.Input("checkpoint_prefix", default="loras/oft_checkpoint", optional=True,
                        tooltip="Path under the output folder for the checkpoints; a counter and the step "
                        "are appended (…_00001_step000100.safetensors)."),
    ]


class OFTTrainerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OFTTrainer",
            display_name="Train OFT",
            category=CATEGORY,
            is_experimental=True,
            description="Train an OFT (Orthogonal Fine-Tuning) adapter on latents with their conditioning, "
            "input-centric (OFTv2: rotations applied to activations, base weights never changed), with the "
            "model family's own objective. Latents of several sizes (a list of LATENT batches) train together, "
            "each micro-batch from one size. Works on fp8 and GGUF bases (weights dequantised per forward, never "
            "written; the adapter trains in fp32). Can resume an adapter and save checkpoints while training. "
            "Outputs the adapted model, the adapter (save it with the pack's save node), the loss history for "
            "Plot Loss Graph and a text report.",
            inputs=_run_inputs() + _adapter_inputs() + _later_inputs(),
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the trained adapter applied."),
                OFTAdapterType.Output(display_name="oft_adapter", tooltip="The trained adapter (kohya convention)."),
                io.LossMap.Output(display_name="loss", tooltip="Loss per step, for Plot Loss Graph."),
                io.String.Output(display_name="report", tooltip="What was trained: layers, parameters, loss, "
                                 "the base's storage, selected layers the family's file names cannot hold (not "
                                 "trained), resumed steps and the checkpoint files written (also shown on the "
                                 "node)."),
            ],
            hidden=[io.Hidden.unique_id],
            # Every input arrives as a list: `latents` may be several LATENT batches (several resolutions, e.g. from
            # Rebatch Latents or OFT Latent List), `positive` one CONDITIONING per batch. Widgets are lists of one.
            is_input_list=True,
        )

    @classmethod
    def execute(cls, model, latents, positive, steps, learning_rate, batch_size, grad_accumulation, optimizer,
                seed, num_blocks, constraint, cayley_neumann, neumann_terms, targets, training_dtype,
                gradient_checkpointing, loss_function="MSE", lr_schedule="constant", warmup_steps=0,
                resume_from=None, save_every=0, checkpoint_prefix="loras/oft_checkpoint") -> io.NodeOutput:
        node_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        # is_input_list: widget values come as lists of one (direct calls pass plain values; both are accepted)
        model, resume = _one_model(model), _resume_input(resume_from)
        steps, learning_rate, batch_size, grad_accumulation, optimizer, seed, num_blocks, constraint, \
            cayley_neumann, neumann_terms, targets, training_dtype, gradient_checkpointing, loss_function, \
            lr_schedule, warmup_steps, save_every, checkpoint_prefix = (
                _one(v) for v in (steps, learning_rate, batch_size, grad_accumulation, optimizer, seed, num_blocks,
                                  constraint, cayley_neumann, neumann_terms, targets, training_dtype,
                                  gradient_checkpointing, loss_function, lr_schedule, warmup_steps, save_every,
                                  checkpoint_prefix))
        saved: list[str] = []
        trainer, losses, meta = train(
            model, latents, positive, steps=steps, learning_rate=learning_rate, batch_size=batch_size,
            grad_accumulation=grad_accumulation, optimizer=optimizer, seed=seed, num_blocks=num_blocks,
            alpha=constraint, neumann_terms=neumann_terms if cayley_neumann else 0, targets=targets,
            training_dtype=training_dtype, gradient_checkpointing_on=gradient_checkpointing, node_id=node_id,
            loss_function=loss_function, lr_schedule=lr_schedule, warmup_steps=warmup_steps,
            resume=resume, save_every=save_every, checkpoint_prefix=checkpoint_prefix, saved=saved)
        adapter = export_adapter(model, trainer, meta)
        new_model, _, text = apply_oft(model, None, adapter, 1.0)
        report = _report(model, adapter, trainer.num_params(), losses, meta, resume, saved, text, steps=steps,
                         loss_function=loss_function, learning_rate=learning_rate, lr_schedule=lr_schedule,
                         warmup_steps=warmup_steps, left_out=_left_out(model, targets))
        log.info("OFTTrainer: %s", report)
        return io.NodeOutput(new_model, adapter, {"loss": losses}, report, ui=ui.PreviewText(report))


def _one_model(model):
    models = model if isinstance(model, list) else [model]
    if len(models) != 1:
        raise OFTError(f"model: expected one MODEL, found a list of {len(models)}")
    return models[0]


def _resume_input(resume_from):
    """The adapter to resume (None: a fresh run)."""
    resume = [r for r in (resume_from if isinstance(resume_from, list) else [resume_from]) if r is not None]
    if len(resume) > 1:
        raise OFTError(f"resume_from: expected one adapter, found a list of {len(resume)}")
    return resume[0] if resume else None


def _report(model, adapter, num_params: int, losses: list[float], meta: dict, resume, saved: list[str],
            applied: str, *, steps: int, loss_function: str, learning_rate: float, lr_schedule: str,
            warmup_steps: int, left_out: list[str] = ()) -> str:
    """The node's text report: what was trained, from what, the layers the preset selected but the family's file
    convention cannot name (not trained), the checkpoints written and the patch report."""
    lines = [f"trained {len(adapter)} layers, {num_params} parameters, {steps} steps "
             f"(ss_steps {meta['ss_steps']}), loss {losses[0]:.5f} -> {losses[-1]:.5f}; {loss_function} loss, "
             f"lr {learning_rate:g} {lr_schedule}"
             + (f" after {warmup_steps} warm-up steps" if warmup_steps else "")]
    if left_out:
        lines.append(f"{len(left_out)} selected layers not trained (no name for them in this family's LyCORIS "
                     f"convention, ComfyUI's key map): " + ", ".join(left_out[:8])
                     + (f" and {len(left_out) - 8} more" if len(left_out) > 8 else ""))
    lines.append(f"base weights: {_weight_kinds(model.model.diffusion_model)} (read, never written)")
    sizes = json.loads(meta["comfyui_oft.latent_sizes"])
    lines.append("latent sizes: " + ", ".join(f"{k} ({v} images)" for k, v in sizes.items()))
    if resume is not None:
        prior = meta["comfyui_oft.resumed_from_steps"]
        lines.append(f"resumed from {resume.path or 'an adapter'} at step {prior}")
    if saved:
        lines.append(f"{len(saved)} checkpoints:")
        lines += [f"  {p}" for p in saved]
    lines.append(applied)
    return "\n".join(lines)


def _left_out(model, targets: str) -> list[str]:
    """The layers `targets` selects on a generic-family model that its LyCORIS names cannot hold (`build_trainer`
    leaves them out); none for the kohya families."""
    dm = model.model.diffusion_model
    family = detect_family(dm)
    if family != "generic":
        return []
    return families.layout(model, select_targets(dm, targets, family)).left_out


def _weight_kinds(root) -> str:
    """What the base's Linear / Conv2d weights are stored as, e.g. "float8_e4m3fn" or "GGUF Q8_0, F32"."""
    kinds = {}
    for m in root.modules():
        w = getattr(m, "weight", None)
        if (is_linear(m) or isinstance(m, torch.nn.Conv2d)) and isinstance(w, torch.Tensor):
            qtype = getattr(w, "tensor_type", None)  # city96's GGMLTensor
            if qtype is not None:
                kind = f"GGUF {getattr(qtype, 'name', qtype)}"
            elif isinstance(getattr(w, "_qdata", None), torch.Tensor):  # newer ComfyUI's QuantizedTensor
                kind = f"{str(w._qdata.dtype).replace('torch.', '')} quantized ({getattr(m, 'quant_format', '?')})"
            else:
                kind = str(w.dtype).replace("torch.", "") + (" scaled" if hasattr(m, "scale_weight") else "")
            kinds[kind] = kinds.get(kind, 0) + 1
    return ", ".join(f"{k} ({n} layers)" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])) or "none"


def _one(v):
    """A widget value as is_input_list passes it (a list of one) or as a direct call passes it."""
    return v[0] if isinstance(v, list) and len(v) >= 1 else v


class OFTLatentList(io.ComfyNode):
    """Several LATENT batches (e.g. images of different sizes, each VAE-encoded) as one list for Train OFT."""

    @classmethod
    def define_schema(cls):
        more = [io.Latent.Input(f"latents_{i}", optional=True,
                                tooltip="Another batch of training latents (any size; optional).")
                for i in range(2, LATENT_LIST_SIZE + 1)]
        return io.Schema(
            node_id="OFTLatentList",
            display_name="OFT Latent List (several resolutions)",
            category=CATEGORY,
            description="Collect LATENT batches of different sizes into one list for Train OFT, which trains on all "
            "of them with every micro-batch taken from one size (bucketing). Connect each size's VAE Encode here.",
            inputs=[io.Latent.Input("latents_1", tooltip="A batch of training latents (one size).")] + more,
            outputs=[io.Latent.Output(display_name="latents", is_output_list=True,
                                      tooltip="The batches as a list, in input order (connect to Train OFT's "
                                      "latents).")],
        )

    @classmethod
    def execute(cls, latents_1, **more) -> io.NodeOutput:
        batches = [latents_1] + [more[k] for k in sorted(more, key=lambda k: int(k.rsplit("_", 1)[1]))
                                 if more[k] is not None]
        return io.NodeOutput(batches)


LATENT_LIST_SIZE = 6
NODES = [OFTTrainerNode, OFTLatentList]
