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

import logging
import math

import comfy.model_management
import comfy.model_sampling
import comfy.ops
import comfy.supported_models
import comfy.utils
import torch
from comfy_api.latest import io

from ..oft_core import OFTError
from ..oft_core.train import (
    OPTIMIZERS,
    PRESETS,
    checkpoint_blocks,
    detect_family,
    export_names,
    frozen_for_training,
    gradient_checkpointing,
    inplace_safe,
    run_training,
    select_targets,
    training_metadata,
)
from ..oft_core.train import (
    OFTTrainer as CoreTrainer,
)
from . import families
from .patch import apply_oft, model_kind

log = logging.getLogger(__name__)

CATEGORY = "training/oft"
OFTAdapterType = io.Custom("OFT_ADAPTER")
TARGETS = ["attention", "all-linear", "attention+conv", "all-linear+conv", "attention+single"]  # see PRESETS
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------------------------ objective
def sample_sigmas(ms, n: int, gen: torch.Generator) -> torch.Tensor:
    """Noise levels the way the model family trains (see module docstring); float32, shape (n,)."""
    if isinstance(ms, (comfy.model_sampling.CONST, comfy.model_sampling.ModelSamplingFlux,
                       comfy.model_sampling.ModelSamplingDiscreteFlow)):
        u = torch.sigmoid(torch.randn(n, generator=gen)).clamp(1e-4, 1 - 1e-4)
        return torch.tensor([float(ms.percent_to_sigma(1.0 - float(v))) for v in u], dtype=torch.float32)
    if isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete):
        t = torch.randint(0, len(ms.sigmas), (n,), generator=gen)
        return ms.sigmas.detach().cpu().float()[t]
    s = torch.exp(torch.randn(n, generator=gen) * 1.2 - 1.2)  # EDM (Karras et al. 2022) P_mean −1.2, P_std 1.2
    return s.clamp(float(ms.sigma_min), float(ms.sigma_max))


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


def family_loss(base_model, x0, noise, sigma, conds, transformer_options) -> torch.Tensor:
    """The family's training loss for clean latents `x0` (already `process_latent_in`)."""
    ms = base_model.model_sampling
    xt = ms.noise_scaling(sigma, noise, x0)
    denoised = base_model.apply_model(xt, sigma, transformer_options=transformer_options, **conds)
    b = output_scale(ms, sigma, x0)
    return (((denoised.float() - x0.float()) / b) ** 2).mean()


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
def validate(model, latents, positive, steps, batch_size, grad_accumulation, learning_rate=1e-4,
             constraint=0.0) -> torch.Tensor:
    """Checks that need no work; returns the latent samples. Raises OFTError / ValueError with the numbers."""
    samples = latents.get("samples") if isinstance(latents, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim < 4 or samples.shape[0] == 0:
        found = "nothing" if samples is None else tuple(getattr(samples, "shape", ()))
        raise OFTError(f"training latents: expected a LATENT batch of at least one image (N, C, H, W), found {found}")
    if not torch.isfinite(samples).all():
        raise OFTError("training latents contain NaN or Inf values")
    if not isinstance(positive, (list, tuple)) or len(positive) == 0:
        raise OFTError("conditioning: expected at least one CONDITIONING entry, found none")
    n = samples.shape[0]
    if len(positive) not in (1, n):
        raise OFTError(f"conditioning count: expected 1 (for all images) or {n} (one per image), found {len(positive)}")
    if steps < 1:
        raise OFTError(f"steps: expected ≥ 1, found {steps}")
    for name, v in (("learning_rate", learning_rate), ("constraint", constraint)):
        # NaN passes ComfyUI's min/max check at queue time (every comparison with NaN is false)
        if not math.isfinite(v):
            raise OFTError(f"{name}: expected a finite number, found {v}")
    if batch_size < 1 or grad_accumulation < 1:
        raise OFTError(f"batch size and gradient accumulation: expected ≥ 1, found {batch_size} and "
                       f"{grad_accumulation}")
    return samples


def _weight_fn(module, x):
    """The base weight as ComfyUI's ops would use it (cast / un-offloaded / weight functions), never written."""
    if getattr(module, "comfy_cast_weights", False) or getattr(module, "weight_function", None) or \
            getattr(module, "bias_function", None):
        return comfy.ops.cast_bias_weight(module, x)
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
            if not selected:
                raise OFTError(f"none of the {len(lay.left_out)} selected layers has a name in the family's "
                               "LyCORIS convention")
        return CoreTrainer(selected, num_blocks=num_blocks, alpha=alpha,
                           neumann_terms=neumann_terms, weight_fn=_weight_fn,
                           device=comfy.model_management.get_torch_device(), root=dm, splits=splits)
    except OFTError as e:
        raise OFTError(f"{model_kind(model)} model, targets {targets!r}: {e}") from None


# ------------------------------------------------------------------------------------------------ training
def train(model, latents, positive, *, steps: int, learning_rate: float, batch_size: int = 1,
          grad_accumulation: int = 1, optimizer: str = "AdamW", seed: int = 0, num_blocks: int = 4,
          alpha: float = 1e-3, neumann_terms: int = 0, targets: str = "attention", training_dtype: str = "bf16",
          gradient_checkpointing_on: bool = True, node_id=None):
    """Train and return (trainer, losses, metadata). The input model is never modified (its module is restored)."""
    samples = validate(model, latents, positive, steps, batch_size, grad_accumulation, learning_rate, alpha)
    if training_dtype not in DTYPES:
        raise OFTError(f"training dtype: expected one of {', '.join(DTYPES)}, found {training_dtype!r}")
    if optimizer not in OPTIMIZERS:
        raise OFTError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, found {optimizer!r}")
    trainer = build_trainer(model, targets, num_blocks, alpha, neumann_terms)  # block-count errors: before any work

    device = comfy.model_management.get_torch_device()
    dtype = DTYPES[training_dtype]
    base = model.model
    n = samples.shape[0]
    pbar = comfy.utils.ProgressBar(steps, node_id=node_id)
    losses: list[float] = []

    def before_step(step):
        # Looked up on the module each time (tests and ComfyUI may replace it); raises on Cancel.
        comfy.model_management.throw_exception_if_processing_interrupted()

    def on_step(step, loss):
        pbar.update_absolute(step + 1, steps)
        _progress_text(node_id, f"step {step + 1}/{steps}  loss {loss:.5f}")
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            log.info("OFTTrainer step %d/%d loss %.5f", step + 1, steps, loss)

    with torch.inference_mode(False), torch.enable_grad():
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        x0_all = base.process_latent_in(samples.detach().clone().to(device=device, dtype=torch.float32))
        per_image = prepare_conds(base, positive, x0_all, device)
        transformer_options = dict(model.model_options.get("transformer_options", {}))
        # Training keeps every attention's activations for backward: use torch's fused attention (flash on CPU,
        # memory-efficient on GPU; O(tokens) saved instead of the full score matrix) unless the user set their own.
        transformer_options.setdefault("optimized_attention_override", _fused_attention)
        gen = torch.Generator().manual_seed(int(seed))

        def compute_loss(step, micro):
            reps = math.ceil(batch_size / n)
            idx = torch.cat([torch.randperm(n, generator=gen) for _ in range(reps)])[:batch_size].tolist()
            x0 = x0_all[idx]
            noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(device)
            sigma = sample_sigmas(base.model_sampling, len(idx), gen).to(device)
            conds = batch_conds(per_image, idx)
            autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
            with autocast:
                return family_loss(base, x0, noise, sigma, conds, transformer_options)

        blocks = checkpoint_blocks(base.diffusion_model)
        ckpt = gradient_checkpointing(blocks) if gradient_checkpointing_on else inplace_safe(blocks)
        # After loading: the weights now in the modules (inference tensors when a loader or a KSampler made them
        # under the executor's inference mode) become zero-copy normal aliases until the end of training.
        with frozen_for_training(base), trainer.attach(), ckpt:
            losses = run_training(trainer.parameters(), compute_loss, steps=steps, lr=learning_rate,
                                  grad_accum=grad_accumulation, optimizer=optimizer, before_step=before_step,
                                  on_step=on_step)
    meta = training_metadata(steps=steps, lr=learning_rate, optimizer=optimizer, seed=seed, batch_size=batch_size,
                             grad_accum=grad_accumulation, num_images=n, dtype=training_dtype,
                             extra={"ss_base_model_version": _base_version(model),
                                    "comfyui_oft.train": f"targets={targets} num_blocks={num_blocks} alpha={alpha:g} "
                                                         f"neumann_terms={neumann_terms}"})
    return trainer, losses, meta


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


def _base_version(model) -> str:
    kind = model_kind(model).lower()
    return {"sd15": "sd_v1", "sd20": "sd_v2", "sdxl": "sdxl_base_v1-0", "flux": "flux1"}.get(kind, kind)


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
    """
    combo.__class__ = _ListTypedCombo
    return combo


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
            "model family's own objective. Outputs the adapted model, the adapter (save it with the pack's save "
            "node) and the loss history for Plot Loss Graph.",
            inputs=[
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
                io.Int.Input("num_blocks", default=4, min=1, max=4096,
                             tooltip="Rotation blocks per layer (kohya's 'dim'): each output split is cut into this "
                             "many b×b blocks; it must divide every adapted layer's width. More blocks = smaller, "
                             "cheaper, more local rotations."),
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
                               "always fp32.")),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute each block in the backward pass: much less memory, ~30% slower."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the trained adapter applied."),
                OFTAdapterType.Output(display_name="oft_adapter", tooltip="The trained adapter (kohya convention)."),
                io.LossMap.Output(display_name="loss", tooltip="Loss per step, for Plot Loss Graph."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, latents, positive, steps, learning_rate, batch_size, grad_accumulation, optimizer,
                seed, num_blocks, constraint, cayley_neumann, neumann_terms, targets, training_dtype,
                gradient_checkpointing) -> io.NodeOutput:
        node_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        trainer, losses, meta = train(
            model, latents, positive, steps=steps, learning_rate=learning_rate, batch_size=batch_size,
            grad_accumulation=grad_accumulation, optimizer=optimizer, seed=seed, num_blocks=num_blocks,
            alpha=constraint, neumann_terms=neumann_terms if cayley_neumann else 0, targets=targets,
            training_dtype=training_dtype, gradient_checkpointing_on=gradient_checkpointing, node_id=node_id)
        adapter = export_adapter(model, trainer, meta)
        new_model, _, text = apply_oft(model, None, adapter, 1.0)
        log.info("OFTTrainer: %d layers, %d parameters, loss %.5f -> %.5f; %s", len(adapter), trainer.num_params(),
                 losses[0], losses[-1], text)
        return io.NodeOutput(new_model, adapter, {"loss": losses})


NODES = [OFTTrainerNode]
