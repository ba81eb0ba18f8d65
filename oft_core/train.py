"""Input-centric (activation-side) OFT training, pure torch (never imports ComfyUI).

Following OFTv2 (Qiu et al. 2025, "Orthogonal Finetuning Made Scalable"): the rotation is applied to the layer's
activations, never to a materialised copy of its weight, so a training step costs one extra block-diagonal product
per adapted layer instead of a rotated weight (O(d²·b) → O(tokens·d·b)) and no weight-sized tensor is kept for backward.
Where a layer's product has more rows than its weight has inputs (SD1.x's 320-wide layers at 2048 tokens) the
weight is the cheaper side: those layers rotate M·W per forward as a temporary, never kept (`rotate_through_weight`).

The math is not re-defined here. Each adapted layer is an `OFTLayer` built by `spec.make_layer` in kohya
`networks.oft` convention (side "out", R = Cayley(Q) or a Cayley–Neumann series, Rᵀ applied per block, constraint
‖Q‖_F ≤ alpha·split), and every forward takes the values of `rotation.rotation_blocks(layer, blocks=<live Q>)`
(one autograd node per layer, or per checkpointed block for all its layers: `_TrainedBlocks`) and applies the
blocks to the base layer's output with `rotate_output` (the values of `rotation.rotate_features` on
y − bias, as one autograd Function that keeps only y for backward; 16-bit Linear outputs compute the small change
(M − I)·z in their own dtype, as the bypass hook does at inference, and with Cayley blocks make the base product in
the same Function, `_base_rotate_output`). The trained adapter is therefore exactly what `rotate_weight` merges.

Parameters: one fp32 tensor per split holding the strict upper triangle of each block (packed, as PEFT stores it);
Q = U − Uᵀ. Zero at step 0, so the adapted model starts as the base model bit for bit (`rotate_output` with
identity blocks is a product with I: exact — and the forward is not patched at all before `attach`).

Base weights are never written: the patched forward reads them (through `weight_fn`, so a host such as ComfyUI can
cast / offload them), the context manager `OFTTrainer.attach()` restores every patched `forward` on exit, exceptions
included.

Public API:

- `select_targets(root, preset, family=None)` -> `_Targets` [(path, module)] (+ `.root`): presets per model family
  (`PRESETS`), each the sd-scripts option of the same name (`_SD_SCRIPTS_OPTIONS`; beyond it: `_EXTRA_PRESETS`).
- `OFTTrainer(targets, num_blocks=… | block_size=…, alpha=…, neumann_terms=0, root=None)`; `.parameters()`,
  `.attach()` (safe on its own on FLUX: guards the root's in-place blocks),
  `.to_adapter(metadata, names=None)` -> `OFTAdapter` (kohya names; FLUX fused layers as splits);
  `.load_adapter(adapter, names=None)` starts from a trained adapter (resume; refuses the first mismatch);
  `export_names(root, "native" | "diffusers")` gives `names` (diffusers for SD1.x/SD2.x, as sd-scripts names them).
  Export and resume are module functions of `train_io` (`_trained_adapter`, `_resume_trainer`) that take the trainer.
- `gradient_checkpointing(modules)`: a context manager wrapping block forwards in `torch.utils.checkpoint`.
- `frozen_for_training(root)`: weights a host made under `torch.inference_mode()` usable by autograd, zero-copy.
- `frozen_bases(modules, weight_fn)`, `frozen_base(...)`: quantized / cast base weights made per forward and again in
  backward, never kept (QOFT on fp8 / GGUF bases).
- `rotate_output(layer, y, bias, blocks)` keeps a trained layer's base output y for backward; `rotate_from_input(layer,
  module, x, weight_fn, blocks)` keeps its input x and makes y again in backward (bit for bit), for the layers
  `keeps_input` picks from shapes (pointwise layers with out ≥ in, any layer with out ≥ 8 × in) in fp32;
  `rotate_through_weight(layer, module, x, weight_fn, blocks)` keeps x too but rotates the weight (M·W, made per
  forward and again in backward, never kept) where the product has at least as many rows as the weight has inputs
  (`rotates_weight`: SD1.x's 320-wide layers at 2048 tokens), which costs less than rotating the output there;
  `rotate_through_weight(..., keep_output=True)` keeps the layer's output instead (Cayley blocks, `keeps_output`: the
  layers of SD UNets), the rotation's gradient (Σ g zᵀ)·M from it, z = out − bias.
- `run_training(params, compute_loss, steps=…, lr=…)`: AdamW (or Adam / SGD), gradient accumulation, per-step callback,
  learning-rate schedule (`lr_factor`: constant / cosine / linear with warm-up), dynamic loss scaling for fp16
  (`loss_scaling`); one read from the device per step (the loss). `residual_loss` (MSE / L1 / Huber / SmoothL1 of
  prediction − target).
The toy model and the end-to-end demo are in `oft_core.demo`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .bypass import (
    _ACCELERATOR_PIECE_ELEMENTS,
    _add_block_product,
    _add_block_product_rows,
    _group_factor,
    _piece_rows,
)
from .errors import OFTError, _mismatch
from .formats._triangle import skew_from_upper, upper_grad
from .formats.kohya import _PREFIX as KOHYA_PREFIX
from .names import _ldm_to_diffusers_names
from .rotation import (
    _apply_last,
    _cayley_grad,
    _conv_out_hw,
    _split_batches,
    _split_key,
    apply_rows,
    rotation_blocks,
)
from .spec import Constraint, OFTAdapter, OFTLayer, _neumann_coefficients, make_layer
from .train_io import _resume_trainer, _trained_adapter

log = logging.getLogger(__name__)

# Each sd / flux preset adapts exactly the layers of the sd-scripts option it is named after (networks/oft.py,
# networks/oft_flux.py at 48d368fa; README "Training presets" has the table), so a trained file means the same
# thing in sd-scripts and here. A preset that adapts more than any sd-scripts option is listed in EXTRA_PRESETS with
# the layers sd-scripts ignores when it loads such a file.
PRESETS = {
    "sd": ("attention", "all-linear", "attention+conv", "all-linear+conv"),
    "flux": ("attention", "all-linear", "attention+single"),
    "generic": ("attention", "all-linear", "all-linear+conv"),
}
_SD_SCRIPTS_OPTIONS = {  # preset -> the sd-scripts network_args that adapt the same layers
    ("sd", "attention"): "networks.oft (default)",
    ("sd", "all-linear"): "networks.oft enable_all_linear=True",
    ("sd", "attention+conv"): "networks.oft enable_conv=True",
    ("sd", "all-linear+conv"): "networks.oft enable_all_linear=True enable_conv=True",
    ("flux", "attention"): "networks.oft_flux (default)",
    ("flux", "all-linear"): "networks.oft_flux enable_all_linear=True",
}
_EXTRA_PRESETS = {  # (family, preset) -> what sd-scripts does with the layers beyond its options
    ("flux", "attention+single"): "single_blocks.N.linear1 / linear2 are beyond sd-scripts' attention option: "
                                  "networks.oft_flux loads them only in all-linear mode (a key containing '_mlp') and "
                                  "otherwise ignores them without a word; ComfyUI and this pack apply them",
}
OPTIMIZERS = ("AdamW", "Adam", "SGD")

# Module classes that hold a UNet's transformer layers (kohya "Transformer2DModel"), its attention (kohya
# "CrossAttention") and its convolution blocks (kohya ResnetBlock2D / Downsample2D / Upsample2D), in ComfyUI LDM,
# diffusers and sd-scripts spelling. sd-scripts adapts every Linear and 1×1 Conv2d under a target module, and with
# enable_conv also every Conv2d and Linear (the ResBlock's time_emb_proj / emb_layers.1) of the conv blocks.
_TRANSFORMER_CLASSES = ("SpatialTransformer", "SpatialVideoTransformer", "Transformer2DModel")
_ATTENTION_CLASSES = ("CrossAttention", "Attention", "MemoryEfficientCrossAttention", "SelfAttention")
_CONV_BLOCK_CLASSES = ("ResBlock", "Downsample", "Upsample", "ResnetBlock2D", "Downsample2D", "Upsample2D")
_FLUX_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.\d+\.")
# sd-scripts oft_flux: attention = Linear layers of SelfAttention modules (double blocks only; single blocks have no
# SelfAttention module), all-linear = every Linear of DoubleStreamBlock / SingleStreamBlock, modulation included.
_FLUX_ATTENTION = re.compile(r"^double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)$")
_FLUX_SINGLE_LINEAR = re.compile(r"^single_blocks\.\d+\.linear[12]$")
_FLUX_QKV = re.compile(r"^double_blocks\.\d+\.(img|txt)_attn\.qkv$")
_FLUX_LINEAR1 = re.compile(r"^single_blocks\.\d+\.linear1$")


# ------------------------------------------------------------------------------------------------ targets
def detect_family(root: nn.Module) -> str:
    """"flux" (BFL double/single blocks), "sd" (a UNet: LDM or diffusers names) or "generic"."""
    names = [n for n, _ in root.named_modules()]
    if any(_FLUX_BLOCK.match(n + ".") for n in names):
        return "flux"
    if any(n.startswith(("input_blocks", "down_blocks", "middle_block", "mid_block")) for n in names):
        return "sd"
    return "generic"


def is_linear(m: nn.Module) -> bool:
    """A torch Linear, or a host's own Linear op that is no nn.Linear subclass (ComfyUI 0.8's per-layer quantized
    Linear, whose weight is a quantized tensor subclass): int `in_features` / `out_features`, a 2-D `weight` of
    shape (out, in) and a `bias` that is None or (out,). The trainer runs either as x·Wᵀ + b with the weight its
    `weight_fn` gives (a host dequantises there)."""
    if isinstance(m, nn.Linear):
        return True
    if isinstance(m, (nn.Conv2d, nn.Embedding)) or not isinstance(getattr(m, "in_features", None), int) or \
            not isinstance(getattr(m, "out_features", None), int):
        return False
    w, b = getattr(m, "weight", None), getattr(m, "bias", False)
    return isinstance(w, torch.Tensor) and tuple(w.shape) == (m.out_features, m.in_features) and (
        b is None or (isinstance(b, torch.Tensor) and tuple(b.shape) == (m.out_features,)))


def _is_conv(m: nn.Module, kernel_1x1: bool | None = None) -> bool:
    if not isinstance(m, nn.Conv2d):
        return False
    if kernel_1x1 is None:
        return True
    return (tuple(m.kernel_size) == (1, 1)) == kernel_1x1


class _Targets(list):
    """`select_targets`' result: a list of (path, module) that also remembers the model `root` and its `family`, so
    that `OFTTrainer.attach()` can guard the blocks of that model that write their inputs in place (FLUX)."""

    def __init__(self, items, root: nn.Module | None = None, family: str | None = None):
        super().__init__(items)
        self.root, self.family = root, family


def select_targets(root: nn.Module, preset: str, family: str | None = None) -> _Targets:
    """The (path, module) pairs a preset adapts, in module order; paths are relative to `root`.

    - sd (sd-scripts networks.oft): attention = Linear layers of attention modules (to_q/k/v/out; kohya
      "CrossAttention"); all-linear (enable_all_linear) = Linear and 1×1 Conv2d of transformer modules (kohya
      "Transformer2DModel"); attention+conv / all-linear+conv (enable_conv) = also every Conv2d and Linear of
      ResBlock / Downsample / Upsample (kohya ResnetBlock2D / Downsample2D / Upsample2D, time_emb_proj included).
    - flux (sd-scripts networks.oft_flux): attention = double-block img/txt_attn.qkv and .proj (kohya
      "SelfAttention"); all-linear (enable_all_linear) = every Linear of double / single blocks, modulation included;
      attention+single = attention plus single-block linear1 (q|k|v|mlp) and linear2, beyond sd-scripts
      (`_EXTRA_PRESETS` says what it ignores).
    - generic (any other diffusion model: SD3, Wan, Qwen-Image, HiDream, Lumina, ...; chosen by module type and
      place, never by family-specific names): attention = Linear under a module whose class name contains
      "Attention"; all-linear = every Linear inside the model's transformer blocks (the elements of the
      nn.ModuleLists directly under `root`, `_block_lists`), or every Linear when it has none; all-linear+conv =
      every Linear and Conv2d.
    """
    family = family or detect_family(root)
    if family not in PRESETS:
        raise OFTError(_mismatch("model family", " | ".join(PRESETS), repr(family)))
    if preset not in PRESETS[family]:
        raise OFTError(_mismatch(f"target preset for a {family} model", " | ".join(PRESETS[family]), repr(preset)))
    out: list[tuple[str, nn.Module]] = []
    lists = tuple(f"{name}." for name in _block_lists(root)) if family == "generic" else ()

    def walk(module: nn.Module, path: str, ancestors: tuple[str, ...]):
        for child_name, child in module.named_children():
            child_path = f"{path}.{child_name}" if path else child_name
            if family == "generic" and preset == "all-linear" and lists:
                if is_linear(child) and child_path.startswith(lists):
                    out.append((child_path, child))
            elif _selected(family, preset, child_path, child, ancestors):
                out.append((child_path, child))
            walk(child, child_path, ancestors + (type(child).__name__,))

    walk(root, "", ())
    if not out:
        raise OFTError(f"target preset {preset!r} selects no Linear/Conv2d layer in this {family} model "
                       f"({type(root).__name__})")
    return _Targets(out, root, family)


def _block_lists(root: nn.Module) -> list[str]:
    """Names of the nn.ModuleLists directly under `root` that hold its repeated blocks (SD3 `joint_blocks`, Wan
    `blocks`, Qwen-Image `transformer_blocks`, HiDream `double_stream_blocks`, Lumina `layers` / refiners, ...)."""
    return [name for name, child in root.named_children()
            if isinstance(child, nn.ModuleList) and len(child) and any(True for _ in child.parameters())]


def _selected(family: str, preset: str, path: str, m: nn.Module, ancestors: tuple[str, ...]) -> bool:
    """Whether `preset` adapts module `m` at `path` (`ancestors`: the class names of the modules above it)."""
    if family == "flux":
        return _selected_flux(preset, path, m)
    if family == "sd":
        return _selected_sd(preset, m, ancestors)
    if preset == "attention":  # generic
        return is_linear(m) and any("Attention" in a for a in ancestors)
    return is_linear(m) or (preset == "all-linear+conv" and _is_conv(m))


def _selected_flux(preset: str, path: str, m: nn.Module) -> bool:
    if not is_linear(m) or not _FLUX_BLOCK.match(path):
        return False
    if preset == "attention":
        return bool(_FLUX_ATTENTION.match(path))
    if preset == "attention+single":
        return bool(_FLUX_ATTENTION.match(path) or _FLUX_SINGLE_LINEAR.match(path))
    return True  # all-linear: every Linear of a double / single block, as sd-scripts' enable_all_linear


def _selected_sd(preset: str, m: nn.Module, ancestors: tuple[str, ...]) -> bool:
    in_conv_block = any(a in _CONV_BLOCK_CLASSES for a in ancestors)
    if preset.endswith("+conv") and in_conv_block and (is_linear(m) or _is_conv(m)):
        return True
    if preset.startswith("attention"):
        return any(a in _ATTENTION_CLASSES for a in ancestors) and is_linear(m)
    return any(a in _TRANSFORMER_CLASSES for a in ancestors) and (is_linear(m) or _is_conv(m, kernel_1x1=True))


def _split_sizes(path: str, module: nn.Module) -> tuple[int, ...]:
    """Output splits of a layer: FLUX fused q|k|v (3 equal) and single-block linear1 (q|k|v|mlp), else one split.

    sd-scripts `networks/oft_flux.py` rotates each split separately (a rotation must not mix q with k).
    """
    out = int(module.weight.shape[0])
    if _FLUX_QKV.match(path) and out % 3 == 0:
        return (out // 3,) * 3
    if _FLUX_LINEAR1.match(path):
        hidden = int(module.weight.shape[1])
        if out > 3 * hidden:
            return (hidden, hidden, hidden, out - 3 * hidden)
    return (out,)


# ------------------------------------------------------------------------------------------------ trainer
@dataclass(eq=False)
class _TrainedLayer:
    path: str  # module path relative to the trainer's root (kohya name = prefix + path with "_")
    module: nn.Module
    layer: OFTLayer  # the validated description (zero generators; the live ones are `params`)
    params: list[nn.Parameter]  # per split: (num_blocks, b(b−1)/2) packed strict upper triangles, fp32

    def generators(self) -> list[torch.Tensor]:
        """The live skew generators Q = U − Uᵀ per split (with gradients)."""
        return [skew_from_upper(p, b) for p, b in zip(self.params, self.layer.block_sizes)]


class _TrainedBlocks(torch.autograd.Function):
    """The blocks of one or several trained layers from their packed parameters, as ONE autograd node that keeps the
    parameters and the blocks: the values of `rotation_blocks(layer, blocks=generators, sync_free=True)` per layer,
    the gradient in closed form through the Cayley map (`rotation._cayley_grad` with R = the blocks as made), the
    constraint (`rotation._constrain_grad`'s arithmetic, on the generators made again from the parameters) and the
    packing (`_triangle.upper_grad`), no autograd graph built and walked in backward (measured, one thread, a node of
    ten SD1.x-sized layers with blocks of 8: backward 4.3–4.5 ms with autograd through the constraint and the
    packing, 2.7–3.3 ms in closed form).

    The splits of one block size and Cayley method are one batch (`rotation._split_batches`; one for a node whose
    layers share both, as an SD1.x block's do): forward, one
    concatenation of their parameters, one `skew_from_upper`, one constraint pass per kind with the per-split numbers
    side by side, one Cayley call; backward, one concatenation of the incoming gradients, one `_cayley_grad`, one
    constraint gradient, one `upper_grad`, split back per parameter. Only the reductions stay per split (the clamp's
    ‖q‖_F in forward, ⟨G, q⟩ in backward: the same op on the same numbers as `_constrain`), so the
    blocks are each layer's `rotation_blocks` bit for bit and the gradients those of the per-split closed forms bit
    for bit (tests/test_train_unit_blocks.py). Measured, per split before → batched (one thread, thread CPU time,
    61 interleaved rounds, medians; blocks of 8, kohya clamp): a node of 12 SD1.x-sized layers (width 320, 760
    blocks) forward 1.42 → 0.96 ms, forward + backward 4.49 → 2.45 ms; the SD1.x race's 12-layer node (width 128,
    304 blocks) 1.05 → 0.63 ms and 3.63 → 1.71 ms; one layer alone 0.38 → 0.34 and 0.80 → 0.74 ms. In the SD1.x
    race step (58 forwards, 29 backwards; wall time in 3 interleaved 4-step runs each, medians) forward 65.8 → 51.1
    ms, backward 56.6 → 33.6 ms a step (~1.6 % of the step); in the FLUX-shaped race (18 forwards of up to 11520
    blocks: arithmetic, not op count) forward unchanged within the noise, backward 42–51 → 37–43 ms a step. What is
    left in forward is mostly the Cayley map itself (the elimination of blocks of 8: ~60 % of the node's forward).

    Inside a gradient checkpoint every tensor an autograd node keeps passes through the checkpoint's Python hooks, in
    forward and again in the recomputation: this node keeps two per batch (the parameters concatenated, the Cayley
    maps) and one per constraint kind (the clamp's per-split norms, COFT's per-block norms), not two per split. One
    node for all the trained layers of a checkpointed block (`_unit_blocks`) pays its fixed costs once per block.
    Cayley parameterization only (the Cayley–Neumann series is differentiated by autograd as before)."""

    @staticmethod
    def forward(ctx, layers, *params):
        batches = _node_batches(layers, tuple((p.shape[0], p.dtype, p.device) for p in params))
        blocks, kept = [None] * len(params), []
        for batch in batches:
            ps = [params[k] for k in batch.positions]
            p = torch.cat(ps) if len(ps) > 1 else ps[0]
            q, norms = batch.constrain(skew_from_upper(p, batch.b).to(torch.float32))
            r = batch.rotations(q)
            for k, blk in zip(batch.positions, batch.blocks(r)):
                blocks[k] = blk
            kept += [p, r, *norms]
        ctx.batches = batches
        ctx.save_for_backward(*kept)
        return tuple(blocks)

    @staticmethod
    def backward(ctx, *grads):
        kept = iter(ctx.saved_tensors)
        got = [None] * len(grads)
        for batch in ctx.batches:
            p, r = next(kept), next(kept)
            norms = [next(kept) for _ in batch.kinds]
            wanted = [ctx.needs_input_grad[1 + k] for k in batch.positions]
            if not any(wanted):
                continue
            with torch.autocast(p.device.type, enabled=False):
                # every output has a gradient here: autograd passes zeros for one that got none (materialize_grads)
                gs = [grads[k].transpose(-1, -2) if t else grads[k] for k, t in zip(batch.positions, batch.transposed)]
                g = _cayley_grad(r, torch.cat(gs) if len(gs) > 1 else gs[0])
                q = skew_from_upper(p, batch.b).to(torch.float32)  # the forward's generators before the constraint
                gp = upper_grad(batch.constrain_grad(q, g, norms), batch.b).to(p.dtype)
            for k, w, gk in zip(batch.positions, wanted, gp.split(batch.counts)):
                if w:
                    got[k] = gk
        return (None, *got)


@functools.lru_cache(maxsize=64)
def _node_batches(layers: tuple[OFTLayer, ...], params: tuple[tuple[int, torch.dtype, torch.device], ...]):
    """`_TrainedBlocks`' batches (`rotation._split_batches`) for its layers and (blocks, dtype, device) of each
    split's parameter, cached: a node is made 58 times per SD1.x step from a few layouts, and building the keys costs
    ~50 µs in Python (layers compare by identity: OFTLayer is eq=False)."""
    splits = [(layer, i) for layer in layers for i in range(len(layer.block_sizes))]
    return _split_batches(tuple(_split_key(layer, i, *p) for (layer, i), p in zip(splits, params, strict=True)))


# The trainers attached now (`OFTTrainer.attach`), and the blocks made at the start of the checkpointed block that is
# running (`_unit_blocks`), a stack of {id(trained layer): blocks}. One training runs at a time (ComfyUI's executor).
# Module-level, not thread-local: on CUDA the checkpoint's recomputation runs in the autograd engine's device thread,
# which must see the trainers attached by the thread that called backward (it waits meanwhile).
_ATTACHED: list[OFTTrainer] = []
_UNIT: list[dict[int, list[torch.Tensor]]] = []


@contextlib.contextmanager
def _unit_blocks(module: nn.Module):
    """While a checkpointed block runs (in forward and again in its recomputation): the rotation blocks of every
    attached trainer's layers inside it, made at its start as one `_TrainedBlocks` node per trainer; each layer takes
    its own (`OFTTrainer.blocks`). Both runs make the same node at the same point, so the checkpoint finds the same
    tensors saved; a layer run twice in the block makes its second blocks alone."""
    made: dict[int, list[torch.Tensor]] = {}
    if torch.is_grad_enabled():
        for trainer in _ATTACHED:
            made.update(trainer._blocks_under(module))
    _UNIT.append(made)
    try:
        yield
    finally:
        _UNIT.pop()


def _default_weight_fn(module: nn.Module, x: torch.Tensor):
    w, b = module.weight, module.bias
    if torch.is_autocast_enabled(x.device.type) or w.dtype == x.dtype:
        return w, b
    return w.to(x.dtype), None if b is None else b.to(x.dtype)


def _trained_layers(trainer: OFTTrainer, targets, device) -> list[_TrainedLayer]:
    """One `_TrainedLayer` per target under the trainer's settings; OFTError naming the first three layers that
    cannot be trained."""
    layers, problems = [], []
    for path, module in targets:
        try:
            layers.append(_trained_layer(trainer, path, module, device))
        except OFTError as e:
            problems.append(str(e))
    if problems:
        more = f" (and {len(problems) - 3} more layers)" if len(problems) > 3 else ""
        raise OFTError("; ".join(problems[:3]) + more)
    return layers


def _trained_layer(trainer: OFTTrainer, path: str, module: nn.Module, device) -> _TrainedLayer:
    """A target's validated kohya-convention description (zero generators) and its zero packed parameters."""
    splits = _checked_splits(path, module, trainer.splits.get(path))
    counts = _block_counts(path, splits, trainer.num_blocks, trainer.block_size)
    sizes = [s // n for s, n in zip(splits, counts)]
    if min(sizes) < 2:
        raise OFTError(_mismatch("block size (width / num_blocks)", "≥ 2", min(sizes)), layer=path)
    terms = trainer.neumann_terms
    param = "neumann" if terms else "cayley"
    coeffs = _neumann_coefficients(terms, last_term_halved=True) if terms else ()
    constraint = Constraint("norm_clamp", trainer.alpha) if trainer.alpha > 0 else Constraint()
    # The description's zero generators are one expanded zero (no memory): the live ones are `params`, and a
    # materialised (n, b, b) zero per layer would stay alive through training (1.6 MiB on the SD1.x race).
    zero = torch.zeros(())
    layer = make_layer(path="", name=path, side="out", blocks=[zero.expand(n, b, b) for n, b in zip(counts, sizes)],
                       transpose=True, parameterization=param, neumann_coeffs=coeffs, constraint=constraint,
                       source="kohya_flux" if len(splits) > 1 else "kohya",
                       key=KOHYA_PREFIX + path.replace(".", "_"))
    dev = device if device is not None else module.weight.device
    with torch.inference_mode(False):  # hosts (ComfyUI) run nodes under inference mode: params must be normal
        params = [nn.Parameter(torch.zeros(n, b * (b - 1) // 2, dtype=torch.float32, device=dev))
                  for n, b in zip(counts, sizes)]
    return _TrainedLayer(path, module, layer, params)


def _check_settings(targets, num_blocks, block_size, alpha, neumann_terms) -> None:
    """`OFTTrainer`'s settings, refused with the value found before any layer is built."""
    if (num_blocks is None) == (block_size is None):
        raise OFTError("give exactly one of num_blocks or block_size")
    if num_blocks is not None and num_blocks < 1:
        raise OFTError(_mismatch("num_blocks", "≥ 1", num_blocks))
    if block_size is not None and block_size < 2:
        raise OFTError(_mismatch("block_size", "≥ 2 (a 1×1 skew block is always zero)", block_size))
    if not math.isfinite(alpha) or alpha < 0:
        raise OFTError(_mismatch("constraint alpha", "a finite number ≥ 0 (0 = no constraint)", alpha))
    if neumann_terms < 0:
        raise OFTError(_mismatch("Cayley–Neumann terms", "0 (exact Cayley) or ≥ 2", neumann_terms))
    if not targets:
        raise OFTError("no target layers to train")


def _checked_splits(path: str, module: nn.Module, given: Sequence[int] | None) -> tuple[int, ...]:
    """The output split widths of a target (`given` by the host, else `_split_sizes`), checked against the layer."""
    if not (is_linear(module) or isinstance(module, nn.Conv2d)):
        raise OFTError(f"{type(module).__name__} is not a Linear or Conv2d", layer=path)
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise OFTError(_mismatch("Conv2d groups", 1, module.groups), layer=path)
    splits = given or _split_sizes(path, module)
    if sum(splits) != module.weight.shape[0] or min(splits) < 1:
        raise OFTError(_mismatch("output splits adding up to the output features", module.weight.shape[0],
                                splits), layer=path)
    return splits


def _block_counts(path: str, splits: Sequence[int], num_blocks: int | None, block_size: int | None) -> list[int]:
    """Blocks per split: `num_blocks` each, or split / `block_size`; kohya oft_flux stores one count per layer."""
    counts = []
    for s in splits:
        if num_blocks is not None:
            if s % num_blocks:
                what = "output features" if len(splits) == 1 else f"split widths {splits}"
                raise OFTError(_mismatch(f"num_blocks dividing the {what}", f"a divisor of {s}", num_blocks),
                               layer=path)
            counts.append(num_blocks)
        else:
            if s % block_size:
                raise OFTError(_mismatch(f"block_size dividing the output width {s}", f"a divisor of {s}",
                                        block_size), layer=path)
            counts.append(s // block_size)
    if len(set(counts)) > 1:
        raise OFTError(f"block_size {block_size} gives split block counts {counts} for splits {splits}; "
                       "kohya oft_flux stores one block count for every split of a fused layer: use num_blocks",
                       layer=path)
    return counts


# Which trained layers keep their input x for backward instead of their base output y (and make y again there:
# one more product per layer in backward). Measured on the SD1.x race (BENCHMARKS.md "What the training peaks consist
# of"): a pointwise layer (Linear, 1×1 Conv2d) whose output is no smaller than its input keeps x, because x is no
# larger than y and is often kept anyway — a conv's own backward keeps its input, SDPA keeps the attention output
# that reaches to_out as a view, to_q / to_k / to_v read one norm output (one tensor saved by several nodes is stored
# once) — and the GEGLU projection's y is 8× its x. Any layer whose output is at least _KEEP_INPUT_RATIO × its input
# per element keeps x too (a UNet's 3×3 input conv, 4 → 320 channels). Other 3×3 convs keep y: making them again
# would cost 9× a pointwise product per output for no memory (a conv keeps x anyway, ours then keeps only y).
_KEEP_INPUT_RATIO = 8


def keeps_input(module: nn.Module) -> bool:
    """The default `OFTTrainer(keep_input=…)` policy, from the layer's shape alone: a Linear or 1×1 Conv2d with
    out ≥ in (features / channels × stride²), or any Linear / Conv2d with out ≥ `_KEEP_INPUT_RATIO` × in."""
    w = getattr(module, "weight", None)
    if w is None or w.ndim < 2:
        return False
    out, inp = int(w.shape[0]), int(w.shape[1])
    conv = isinstance(module, nn.Conv2d)
    if conv:
        inp *= math.prod(module.stride)
    pointwise = not conv or tuple(module.kernel_size) == (1, 1)
    return out >= _KEEP_INPUT_RATIO * inp or (pointwise and out >= inp)


class OFTTrainer:
    """Trainable kohya-convention OFT generators for `targets` [(path, Linear | Conv2d)], applied on activations.

    Exactly one of `num_blocks` (blocks per split, kohya's "dim") or `block_size` is given; every split of every
    layer must be divisible, else `OFTError` naming the layer. `alpha` is kohya's constraint ‖Q‖_F ≤ alpha·split
    (0 = unconstrained). `neumann_terms` > 0 trains with the Cayley–Neumann series of that many terms (OFTv2; no
    linear solve) instead of the exact Cayley transform.
    `weight_fn(module, x) -> (weight, bias)` returns the base weight to use (default: the module's own, cast to x's
    dtype outside autocast); a host may cast / un-offload there. It must not write the weight.
    `splits`: path -> output split widths of a fused layer (each split its own rotation, as FLUX's q|k|v), for
    layers `_split_sizes` does not know (a host's key map gives them, e.g. SD3's fused qkv).
    `recompute_weight(module)` True: that layer's base product runs through `frozen_base` (the weight `weight_fn`
    made is not kept for backward but made again there: QOFT, quantized / cast bases).
    `keep_input(module)` True: that layer keeps its input for backward instead of its base output and makes the base
    product again there (`rotate_from_input`; the weight too, as `recompute_weight`); default `keeps_input`, from
    the layer's shape. Only for outputs rotated in fp32 pieces (32-bit Linear outputs, Conv2d): 16-bit Linear outputs
    keep y (with Cayley blocks through `_base_rotate_output`, which makes the base product too). The values and
    gradients are the same bit for bit whichever layer keeps what; only memory and time differ.
    `through_weight(module, rows)` True: such a layer (one that keeps its input) rotates its weight instead of its
    output, M·W made per forward and again in backward, never kept (`rotate_through_weight`; the same values to one
    GEMM's rounding); default `rotates_weight`: when the product has at least as many rows as the weight has inputs.
    `keep_output(module, rows)` True: with Cayley blocks (orthogonal), that layer rotates its weight and keeps its
    OUTPUT for backward instead of its input or its base output (`rotate_through_weight(..., keep_output=True)`: the
    rotation's gradient from a pass over the output, no gᵀx GEMM, no base product made again, no rotation pass over
    the output); it decides before `keep_input` and `through_weight`, for Linear outputs in fp32 and Conv2d outputs.
    Default `keeps_output(root)`: layers of ComfyUI's SD UNet inside checkpointed blocks, where it costs less.
    """

    def __init__(self, targets: Sequence[tuple[str, nn.Module]], *, num_blocks: int | None = None,
                 block_size: int | None = None, alpha: float = 1e-3, neumann_terms: int = 0,
                 weight_fn: Callable | None = None, device: torch.device | str | None = None,
                 root: nn.Module | None = None, splits: Mapping[str, Sequence[int]] | None = None,
                 recompute_weight: Callable[[nn.Module], bool] | bool = False,
                 keep_input: Callable[[nn.Module], bool] | bool | None = None,
                 through_weight: Callable[[nn.Module, int], bool] | bool | None = None,
                 keep_output: Callable[[nn.Module, int], bool] | bool | None = None):
        _check_settings(targets, num_blocks, block_size, alpha, neumann_terms)
        # kohya files store alpha in fp32: train with exactly the value that will be saved
        self.num_blocks, self.block_size = num_blocks, block_size
        self.alpha = float(torch.tensor(float(alpha), dtype=torch.float32))
        self.neumann_terms = int(neumann_terms)
        self.weight_fn = weight_fn or _default_weight_fn
        self.splits = {k: tuple(int(x) for x in v) for k, v in (splits or {}).items()}
        self.recompute_weight = recompute_weight if callable(recompute_weight) else (lambda m: bool(recompute_weight))
        self.keep_input = keeps_input if keep_input is None else (
            keep_input if callable(keep_input) else (lambda m: bool(keep_input)))
        self.through_weight = rotates_weight if through_weight is None else (
            through_weight if callable(through_weight) else (lambda m, rows: bool(through_weight)))
        self.layers: list[_TrainedLayer] = _trained_layers(self, targets, device)
        self._attached = False
        self._under: dict[int, tuple[nn.Module, list[_TrainedLayer]]] = {}  # `_blocks_under`'s layers per block
        # the model the targets live in (from `select_targets`, or given): attach() guards its in-place blocks
        self.root = root if root is not None else getattr(targets, "root", None)
        self.family = detect_family(self.root) if self.root is not None else None
        self.keep_output = keeps_output(self.root) if keep_output is None else (
            keep_output if callable(keep_output) else (lambda m, rows: bool(keep_output)))

    # -------------------------------------------------------------------------------------------- parameters
    def parameters(self) -> list[nn.Parameter]:
        return [p for tl in self.layers for p in tl.params]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{tl.layer.key}.{i}": p.detach().clone() for tl in self.layers for i, p in enumerate(tl.params)}

    # -------------------------------------------------------------------------------------------- forward patch
    def blocks(self, tl: _TrainedLayer) -> list[torch.Tensor]:
        """M's blocks for layer `tl` from the live parameters (fp32, with gradients), through the one definition
        (`rotation_blocks`); with gradients and the Cayley map, as one autograd node (`_TrainedBlocks`), made for
        all of a checkpointed block's layers at its start when `gradient_checkpointing` runs it (`_unit_blocks`)."""
        made = _UNIT[-1].pop(id(tl), None) if _UNIT else None
        if made is not None:
            return made
        dev = tl.params[0].device.type
        with torch.autocast(dev, enabled=False):  # the Cayley solve / series stays fp32 under mixed precision
            if self._node_blocks(tl):
                return list(_TrainedBlocks.apply((tl.layer,), *tl.params))
            return rotation_blocks(tl.layer, blocks=tl.generators(), sync_free=True)

    @staticmethod
    def _node_blocks(tl: _TrainedLayer) -> bool:
        """Whether `tl`'s blocks are made by a `_TrainedBlocks` node (Cayley, with gradients)."""
        return (tl.layer.parameterization == "cayley" and torch.is_grad_enabled()
                and any(p.requires_grad for p in tl.params))

    def _blocks_under(self, module: nn.Module) -> dict[int, list[torch.Tensor]]:
        """{id(trained layer): blocks} for this trainer's layers inside `module`, as one `_TrainedBlocks` node
        (none for fewer than two layers: a single layer's own node is the same work)."""
        key = id(module)
        under = self._under.get(key)
        if under is None or under[0] is not module:
            inside = {id(m) for m in module.modules()}
            under = self._under[key] = (module, [tl for tl in self.layers if id(tl.module) in inside])
        layers = [tl for tl in under[1] if self._node_blocks(tl)]
        if len(layers) < 2:
            return {}
        with torch.autocast(layers[0].params[0].device.type, enabled=False):
            flat = _TrainedBlocks.apply(tuple(tl.layer for tl in layers), *[p for tl in layers for p in tl.params])
        made, k = {}, 0
        for tl in layers:
            made[id(tl)] = list(flat[k:k + len(tl.params)])
            k += len(tl.params)
        return made

    def _forward_of(self, tl: _TrainedLayer):
        module, weight_fn = tl.module, self.weight_fn
        conv = isinstance(module, nn.Conv2d)

        recompute = self.recompute_weight(module)
        keep = self.keep_input(module)
        cayley = tl.layer.parameterization == "cayley"
        orthogonal = cayley and tl.layer.kind != "butterfly"  # (W x = Mᵀ z: what keeping the output relies on)

        def forward(x, *args, **kwargs):
            if args or kwargs:
                raise TypeError(f"{tl.path}: OFT training forward takes one input, got extra arguments")
            blocks = self.blocks(tl)  # built once per forward of this layer
            padding = None
            if conv:
                x, padding = _conv_input(module, x)
            # The same products as below with x kept for backward instead of y (y made again there), for outputs
            # that `rotate_output` rotates in fp32 pieces (`_RotateOutput`): 32-bit ones and Conv2d channels. 16-bit
            # Linear outputs (FLUX / bf16 training) keep y: no extra product on that path. An inference tensor (a
            # host's conditioning made under inference mode) cannot be saved for backward: that layer keeps y.
            # Before those: orthogonal blocks let a layer rotate its weight and keep its output (`keep_output`).
            if orthogonal and (conv or _output_dtype(x).itemsize >= 4) and \
                    self.keep_output(module, _product_rows(module, x, padding)):
                return rotate_through_weight(tl.layer, module, x, weight_fn, blocks, padding=padding,
                                             keep_output=True)
            if keep and (conv or _output_dtype(x).itemsize >= 4) and not x.is_inference():
                if self.through_weight(module, _product_rows(module, x, padding)):
                    return rotate_through_weight(tl.layer, module, x, weight_fn, blocks, padding=padding)
                return rotate_from_input(tl.layer, module, x, weight_fn, blocks, padding=padding)
            # 16-bit Linear outputs (FLUX): the base product and the rotation as one Function, the bias folded into
            # the GEMM as M⁻¹·bias (no bias pass over the output); M⁻¹ = Mᵀ needs orthogonal blocks (Cayley).
            if not conv and cayley and _output_dtype(x) in (torch.float16, torch.bfloat16):
                return _base_rotate_output(tl.layer, module, x, weight_fn, blocks, keep_weight=not recompute)
            if recompute:  # the same products as below, the base weight made again in backward instead of kept
                y, bias = frozen_base(module, x, weight_fn, padding)
            else:
                weight, bias = weight_fn(module, x)
                y = _base_product(module, x, weight, bias, padding)
            # With a bias, the base layer adds it inside the GEMM / conv kernel (addmm, conv bias), so the bypass
            # M·(Wx) + b differs from the base output in the last bit even at M = I (measured: Linear 256→64,
            # every biased Conv2d). The delta form y + (M − I)(y − b) = M·Wx + b, with y the base layer's own
            # output, keeps step 0 bit-exact at the same cost (one GEMM / conv) and the same rotation code.
            return rotate_output(tl.layer, y, bias, blocks, dim=1 if conv else -1)
        return forward

    @contextlib.contextmanager
    def attach(self):
        """Patch every target module's forward for the duration of the block; restored exactly on exit.

        Safe on its own for FLUX: ComfyUI's FLUX blocks add to their inputs in place after normalising them, which
        breaks autograd as soon as a gradient flows through a block input ("modified by an inplace operation"), so
        the blocks of a FLUX root are run through `inplace_safe` while attached (`gradient_checkpointing` /
        `inplace_safe` entered afterwards see that and do not wrap twice). FLUX targets whose model is unknown
        (built by hand, no `root`) are refused rather than left to fail in backward.
        """
        if self._attached:
            raise OFTError("this OFT trainer is already attached")
        guard = contextlib.nullcontext()
        if self.family == "flux":
            guard = inplace_safe(checkpoint_blocks(self.root))
        elif self.root is None and any(_FLUX_BLOCK.match(tl.path) for tl in self.layers):
            raise OFTError("these targets are FLUX double/single-block layers but the trainer does not know their "
                           "model: FLUX blocks write their inputs in place, which breaks training unless attach() "
                           "guards them. Build the targets with select_targets(model, preset) or pass "
                           "OFTTrainer(..., root=model)")
        try:
            with _forward_patches() as replace, guard:
                for tl in self.layers:
                    replace(tl.module, self._forward_of(tl))
                self._attached = True
                _ATTACHED.append(self)
                yield self
        finally:
            self._attached = False
            if self in _ATTACHED:
                _ATTACHED.remove(self)

    # -------------------------------------------------------------------------------------------- export
    def stored_generators(self, tl: _TrainedLayer) -> list[torch.Tensor]:
        """Detached Q per split as the adapter stores it (before the constraint, which the layer keeps)."""
        with torch.no_grad():
            return [q.detach().float().cpu().clone() for q in tl.generators()]

    def to_adapter(self, metadata: dict | None = None, names: Mapping[str, str | tuple[str, ...]] | None = None, *,
                   prefix: str = KOHYA_PREFIX, fmt: str | None = None) -> OFTAdapter:
        """The trained adapter as an `OFTAdapter` in kohya convention (writable with `formats.write_adapter(...,
        "kohya")`: `networks.oft_flux` when any layer has splits, else `networks.oft`).

        `names` renames layers on export: trained module path -> module path in the file (`oft_unet_` + it with
        "_"). None keeps the trained paths, which is what sd-scripts expects for SDXL (LDM names) and FLUX (BFL
        names); SD1.x/SD2.x need diffusers names (`export_names(root, "diffusers")`). A layer missing from `names`
        raises OFTError naming it (a file with mixed naming conventions loads nowhere completely).

        Cayley–Neumann training: kohya stores Cayley generators only, so each block's trained matrix N is exported as
        Cayley(Q') with Q' the skew part of the inverse Cayley of N (exact when N is orthogonal; the truncation error
        of the series is the difference, reported in `info["neumann_export_error"]`).

        A name may be a tuple with one name per split: the fused layer is exported as that many one-split layers
        (SD3's fused qkv as diffusers' to_q / to_k / to_v; each split is its own rotation, so this is exact).
        `prefix` starts every file key (kohya's `oft_unet_`; `lycoris_` / `lora_unet_` for a LyCORIS export) and
        `fmt` is the adapter's format id (default: kohya / kohya_flux).
        """
        return _trained_adapter(self, metadata, names, prefix=prefix, fmt=fmt)

    # -------------------------------------------------------------------------------------------- resume
    def load_adapter(self, adapter: OFTAdapter, names: Mapping[str, str] | None = None) -> None:
        """Start from a trained adapter (resume / continue): its generators become the live parameters.

        The adapter must describe exactly this trainer's work: the same layers (`names` maps trained paths to the
        adapter's layer names, as in `to_adapter`), each with the same splits and blocks, kohya convention (rows
        rotated, Rᵀ applied, Cayley, no rescale) and the same constraint (`alpha`, 0 = none). Otherwise OFTError
        naming the first mismatch, and no parameter is changed. Exact for a file this trainer wrote: kohya stores
        the strict upper triangle U of Q = U − Uᵀ, which is the parameter itself.
        """
        _resume_trainer(self, adapter, names)

def export_names(root: nn.Module, naming: str) -> dict[str, str] | None:
    """The `names` argument of `OFTTrainer.to_adapter` for targets selected under `root` (a UNet / DiT module).

    naming "native": None, the module paths as they are (LDM for ComfyUI's SD UNets, BFL for FLUX).
    naming "diffusers": LDM UNet path -> diffusers path (`names._ldm_to_diffusers_names`, built from the whole UNet's
    keys so that layers_per_block is known), as sd-scripts `networks.oft` names SD1.x/SD2.x layers.
    """
    if naming == "native":
        return None
    if naming != "diffusers":
        raise OFTError(_mismatch("export naming", "native | diffusers", repr(naming)))
    try:
        return _ldm_to_diffusers_names({k: tuple(v.shape) for k, v in root.state_dict().items()})
    except ValueError as e:
        raise OFTError(f"cannot name the layers after diffusers modules: {e}") from None


# ------------------------------------------------------------------------------------------------ rotated outputs
_CHUNK_ELEMENTS = 1 << 18  # rows per piece of the rotation on a CPU: about this many elements (1 MiB in fp32)


def _chunk_elements(device: torch.device) -> int:
    """On an accelerator the pieces only bound the temporaries: no cache to fit, far fewer kernel launches (1 MiB
    pieces of a FLUX.1 linear1 output at 4096 tokens would be ~340 pieces of ~8 launches each, per pass)."""
    return _CHUNK_ELEMENTS if device.type == "cpu" else _ACCELERATOR_PIECE_ELEMENTS


def _row_chunks(lead: tuple[int, ...], rows: int):
    """Index tuples cutting a tensor of leading shape `lead` (its last axis not included) into pieces of at most
    about `rows` rows (whole trailing rows, never an empty piece)."""
    if not lead:
        yield ()
        return
    inner = math.prod(lead[1:])
    if inner <= rows:
        step = max(1, rows // max(inner, 1))
        for i in range(0, lead[0], step):
            yield (slice(i, i + step),)
    else:
        for i in range(lead[0]):
            for rest in _row_chunks(lead[1:], rows):
                yield (slice(i, i + 1),) + rest


def _rotate_rows(rows: torch.Tensor, blocks, sizes, *, transpose: bool = False) -> torch.Tensor:
    """(N, C) ↦ each row v ↦ B v per block (`transpose`: Bᵀ v), one bmm per split."""
    parts, start = [], 0
    for r, (n, b) in zip(blocks, sizes):
        cols = rows[:, start:start + n * b].reshape(-1, n, b).transpose(0, 1)  # (n, N, b)
        parts.append(torch.bmm(cols, r if transpose else r.transpose(-1, -2)).transpose(0, 1).reshape(-1, n * b))
        start += n * b
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _channels_first(y: torch.Tensor, dim: int) -> bool:
    """A (batch, channels, …) output rotated on its channels, laid out as made (a Conv2d's): each block's channels
    are then a (b, H·W) matrix in place and the product is a plain batched matmul with no transposed copy."""
    return dim == 1 and y.ndim >= 3 and y.is_contiguous()


def _channel_blocks(t: torch.Tensor, start: int, n: int, b: int) -> torch.Tensor:
    """The (batch, n, b, H·W) view of channels start … start + n·b of a contiguous (batch, C, …) tensor."""
    return t.view(t.shape[0], t.shape[1], -1)[:, start:start + n * b].unflatten(1, (n, b))


def _no_autocast(fn):
    """Run `fn` with autocast off on its first argument's device: the products keep the dtype chosen here."""
    @functools.wraps(fn)
    def run(y, *args, **kwargs):
        with torch.autocast(y.device.type, enabled=False):
            return fn(y, *args, **kwargs)
    return run


@_no_autocast
def _rotated_channels(y: torch.Tensor, b: torch.Tensor | None, sizes, blocks) -> torch.Tensor:
    """`_rotated` for `_channels_first` outputs: out = y + D·y − D·b per block and batch element (D = M − I: the
    product in the work dtype of `_RotateOutputHalf`, y's own for 16 bits, fp32 otherwise); measured on SD1.x-sized
    conv outputs (2 × 128 × 32², blocks of 8, fp32, one thread) 5× faster than the row pieces of `_rotated`."""
    out = torch.empty_like(y)
    start = 0
    for r, (n, bs) in zip(blocks, sizes):
        d32 = r - torch.eye(bs, dtype=r.dtype, device=r.device)
        d = d32.to(y.dtype)
        yv, ov = _channel_blocks(y, start, n, bs), _channel_blocks(out, start, n, bs)
        for i in range(y.shape[0]):  # y + D·y, the sum rounded once
            torch.baddbmm(yv[i], d, yv[i], out=ov[i])
        if b is not None:  # D·b per block, in fp32
            ov.sub_((d32 @ b[start:start + n * bs].to(d32.dtype).view(n, bs, 1)).to(y.dtype))
        start += n * bs
    return out


@_no_autocast
def _rotated_channels_backward(y, b, sizes, blocks, grad, want_y: bool, want_r: Sequence[bool], *,
                               into_y: bool = False):
    """`_rotated_backward` for `_channels_first` outputs: ∂B = Σ g zᵀ per block over batch and positions (each
    batch element's sum in the work dtype, the total in fp32), then ∂y = g + Dᵀg (over y itself for `into_y`)."""
    g = grad.contiguous()
    grads_r = [torch.zeros_like(r) if w else None for r, w in zip(blocks, want_r)]
    start = 0
    for r, gr, (n, bs) in zip(blocks, grads_r, sizes):
        if gr is not None:
            yv, gv = _channel_blocks(y, start, n, bs), _channel_blocks(g, start, n, bs)
            bias = None if b is None else b[start:start + n * bs].view(n, bs, 1)
            for i in range(y.shape[0]):  # one batch element at a time: z's temporary is one element's
                z = yv[i] if bias is None else yv[i] - bias
                gr.add_(torch.matmul(gv[i], z.transpose(-1, -2)))
        start += n * bs
    if not want_y:
        return None, grads_r
    grad_y = y if into_y else torch.empty_like(y)
    start = 0
    for r, (n, bs) in zip(blocks, sizes):
        d = (r - torch.eye(bs, dtype=r.dtype, device=r.device)).to(y.dtype)
        gv, ov = _channel_blocks(g, start, n, bs), _channel_blocks(grad_y, start, n, bs)
        dt = d.transpose(-1, -2)
        for i in range(y.shape[0]):
            torch.baddbmm(gv[i], dt, gv[i], out=ov[i])
        start += n * bs
    return grad_y, grads_r


# fp32 Linear outputs of at least this many elements are rotated in the delta form (`_rotated_rows`), smaller ones
# by M·z through transposed row copies: the delta form saves passes over the output but builds D = M − I (3 kernels)
# and takes more Python per call. Measured new / old per call, blocks of 8, one thread: 32 × 320 with a bias
# 1.52 / 1.22 (forward / backward), 128 × 320 1.00 / 1.07, 128 × 1280 0.77 / 0.96, 256 × 1280 0.58 / 0.83,
# 2048 × 320 0.38 / 0.52; in the SD race step (bench_train.py's default UNet, 128 / 256 wide: 16 context rows, 2
# time-embedding rows) its 108 small calls a step took 7 ms more in the delta form, its 33 large ones 9 ms less.
_DELTA_MIN_ELEMENTS = 1 << 17


def _rows_delta(y: torch.Tensor, dim: int) -> bool:
    """An fp32 output rotated on its last axis, laid out as made (a Linear's), of at least `_DELTA_MIN_ELEMENTS`
    elements (its shape decides: the same path in forward, recomputation and backward): `_rotated_rows` takes it."""
    return y.dtype == torch.float32 and dim == y.ndim - 1 and y.is_contiguous() and y.numel() >= _DELTA_MIN_ELEMENTS


def _merged_splits(sizes, blocks):
    """(sizes, blocks) of a fused layer's splits as one split when that changes no product: every split has blocks
    of the same size and the same `_group_factor` as all of them together, so the grouped matrices of the merged
    split are those of the splits, in order, and each piece runs one batched product over the whole width instead of
    one per split. FLUX's q|k|v (3 × 3072) and linear1 (3 × 3072 + 12288) in blocks of 8: measured (one thread,
    1024 rows) the backward 44–48 → ~30 ms and 144–147 → ~97 ms, as one split of 9216 / 21504 costs (per split, each
    piece read 3072 features of rows 43 KB apart, and the Python per piece ran 3–4 times). Otherwise the same."""
    if len(sizes) < 2:
        return sizes, blocks
    b = sizes[0][1]
    total = sum(n for n, _ in sizes)
    g = _group_factor(total, b)
    if any(bs != b or _group_factor(n, bs) != g for n, bs in sizes):
        return sizes, blocks
    return ((total, b),), [torch.cat([r.detach() for r in blocks])]


def _product_deltas(r: torch.Tensor, transpose: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`_group_blocks` of D = B − I (Dᵀ for `transpose`) for one split's (n, b, b) blocks, contiguous, in `dtype`
    (default the blocks'): the right factor of `_add_block_product`. Made straight in the grouped layout (the blocks
    copied onto the diagonal of zeros, then 1 taken off its diagonal, in the blocks' fp32: the values of
    `_group_blocks((B − I).to(dtype))` bit for bit) in 3 kernels instead of 2 + g; this runs in every forward and
    backward of every layer: n = 40 blocks of 8, 55 → 23 µs, one thread."""
    r = r.detach()
    n, b = r.shape[0], r.shape[-1]
    g = _group_factor(n, b)
    out = torch.zeros(n // g, g, b, g, b, dtype=r.dtype, device=r.device)
    src = r.view(n // g, g, b, b)
    out.diagonal(0, 1, 3).copy_((src.transpose(-1, -2) if transpose else src).permute(0, 2, 3, 1))
    out = out.view(n // g, g * b, g * b)
    out.diagonal(0, -2, -1).sub_(1)
    return out if dtype is None else out.to(dtype)


@_no_autocast
def _rotated_rows(y: torch.Tensor, b: torch.Tensor | None, sizes, blocks) -> torch.Tensor:
    """`_rotated` for `_rows_delta` outputs: out = y + D·(y − b), D = M − I in fp32, per split in the bypass hook's
    row pieces (`bypass._add_block_product_rows`: out ← y − D·b (without a bias: y), then out += D·y in place, one
    batched product over strided views, blocks grouped to `_GROUP_WIDTH`), instead of z = y − b, M·z through
    transposed copies, − z, + y (4–5 passes over the piece). Measured old → new, blocks of 8, one thread, SD1.x
    feed-forward outputs with a bias: 2048 × 320 5.8 → 1.7 ms, 512 × 640 1.3 → 0.8 ms, 2048 × 128 1.0 → 0.6 ms
    (the cache flushed before each call, as in a step: 3.3 → 1.9, 2.0 → 1.4, 1.5 → 1.1 ms).
    Identity blocks: D = 0 exactly, out = y − 0·b + 0·y = y bit for bit. Rounding: |out − exact| ≤ (2k + 4)·u·(|y|
    + |D||y| + |D||b|) for blocks of k (tests/test_train_rotate_output.py holds it to fp64)."""
    width = y.shape[-1]
    y2 = y.view(-1, width)
    out = torch.empty(y2.shape, dtype=y.dtype, device=y.device)
    start = 0
    for r, (n, bs) in zip(blocks, sizes):
        if n * bs == width:  # one split (no slicing: small layers run this many times a step)
            _add_block_product_rows(y2, _product_deltas(r, True), b, out)
            break
        cols = slice(start, start + n * bs)
        start += n * bs
        _add_block_product_rows(y2[:, cols], _product_deltas(r, True), None if b is None else b[cols], out[:, cols])
    return out.view(y.shape)


def _rotated(y: torch.Tensor, b: torch.Tensor | None, dim: int, sizes, blocks) -> torch.Tensor:
    """`_RotateOutput`'s forward: y + (M·z − z), z = y − b (b None: M·y), in pieces; `b` already in y's dtype.
    Conv outputs laid out as made: `_rotated_channels`; large fp32 Linear outputs: `_rotated_rows` (delta form)."""
    if _channels_first(y, dim):
        return _rotated_channels(y, b, sizes, blocks)
    if _rows_delta(y, dim):
        return _rotated_rows(y, b, sizes, blocks)
    moved = y.movedim(dim, -1)
    width = moved.shape[-1]
    out = torch.empty_like(y)
    out_m = out.movedim(dim, -1)
    for idx in _row_chunks(tuple(moved.shape[:-1]), max(1, _chunk_elements(y.device) // width)):
        yc = moved[idx]
        zc = yc if b is None else yc - b
        rot = _rotate_rows(zc.reshape(-1, width).to(torch.float32), blocks, sizes).to(y.dtype)
        rot = rot.reshape(zc.shape)
        if b is None:
            out_m[idx].copy_(rot)
        else:
            torch.sub(rot, zc, out=out_m[idx])  # (M z − z) + y == y + (M z − z), bit for bit
            out_m[idx].add_(yc)
    return out


def _add_block_grads(gr: torch.Tensor, g2: torch.Tensor, z2: torch.Tensor, n: int, bs: int) -> None:
    """gr[k] += Σ_rows g_k z_kᵀ for the n blocks of bs columns of (rows, n·bs) `g2` and `z2` (row-strided views).
    Blocks narrower than 16 are taken in pairs: one (2·bs × 2·bs) product per pair, its two diagonal blocks kept
    (twice the multiply-adds, but a batched product of 8 × 8 outputs over thousands of rows runs far below the
    rate of a 16 × 16 one: measured in `_rotated_rows_backward`, one thread, blocks of 8, rows × width 2048 × 128
    0.83 → 0.30 ms, 2048 × 320 1.37 → 0.70 ms, 512 × 1280 1.97 → 0.88 ms, and closer to fp64)."""
    rows = g2.shape[0]
    if bs >= 16 or n % 2:
        gr.baddbmm_(g2.view(rows, n, bs).permute(1, 2, 0), z2.view(rows, n, bs).transpose(0, 1))
        return
    w = 2 * bs
    pairs = torch.bmm(g2.view(rows, n // 2, w).permute(1, 2, 0), z2.view(rows, n // 2, w).transpose(0, 1))
    gr += pairs.view(n // 2, 2, bs, 2, bs).diagonal(0, 1, 3).permute(0, 3, 1, 2).reshape(n, bs, bs)


@_no_autocast
def _rotated_rows_backward(y, b, sizes, blocks, grad, want_y: bool, want_r: Sequence[bool], *, into_y: bool = False):
    """`_rotated_backward` for `_rows_delta` outputs, per split in row pieces of `bypass._piece_rows`: ∂y = g + Dᵀg
    (`_add_block_product`, D = M − I: g copied, the product added in place) instead of Mᵀg through transposed copies
    and a copy back (∂y and ∂B with a bias, one thread: 2048 × 320 5.4 → 3.0 ms, 2048 × 128 1.25 → 1.05 ms,
    512 × 640 1.75 → 1.57 ms; the cache flushed before each call: 4.8 → 4.0, 1.8 → 1.7, 3.1 → 2.5 ms); ∂B = Σ g zᵀ
    per block (z = y − b, one pass into a piece-sized scratch); each piece's ∂B before its ∂y (`into_y` writes ∂y
    over y). Not taken: Σ g yᵀ − (Σ g)·bᵀ, which skips the z pass (∂B of 2048 × 128: 0.60 → 0.49 ms) but loses
    precision with the bias's size (|b| ≈ 10·|z|: 9·10⁻⁶ relative against fp64 instead of 5·10⁻⁷); the ∂B product
    grouped like ∂y's (4× the FLOPs): no steady gain (cache flushed: 2048 × 128 0.88 → 0.83 ms, 512 × 256
    0.40 → 0.66 ms)."""
    width = y.shape[-1]
    y2, g2 = y.view(-1, width), grad.contiguous().view(-1, width)
    grad_y = (y2 if into_y else torch.empty(y2.shape, dtype=y.dtype, device=y.device)) if want_y else None
    grads_r = [torch.zeros_like(r) if w else None for r, w in zip(blocks, want_r)]
    start = 0
    for r, gr, (n, bs) in zip(blocks, grads_r, sizes):
        whole = n * bs == width  # one split: no column slicing
        cols = slice(start, start + n * bs)
        start += n * bs
        ys, gs = (y2, g2) if whole else (y2[:, cols], g2[:, cols])
        dst = grad_y if whole or grad_y is None else grad_y[:, cols]
        bias = b if whole or b is None else b[cols]
        d = _product_deltas(r, False) if want_y else None
        step = _piece_rows(ys, bs if d is None else d.shape[-1])
        zs = None
        for i in range(0, y2.shape[0], step):
            one = step >= y2.shape[0]
            gc = gs if one else gs[i:i + step]
            rows = gc.shape[0]
            if gr is not None:
                zc = ys if one else ys[i:i + step]
                if bias is not None:
                    if zs is None:
                        zs = torch.empty((min(step, y2.shape[0]), n * bs), dtype=y.dtype, device=y.device)
                    zc = torch.sub(zc, bias, out=zs if one else zs[:rows])
                _add_block_grads(gr, gc, zc, n, bs)
            if d is not None:
                _add_block_product(gc, d, None, dst if one else dst[i:i + step])
    return (None if grad_y is None else grad_y.view(y.shape)), grads_r


def _rotated_backward(y: torch.Tensor, b: torch.Tensor | None, dim: int, sizes, blocks, grad: torch.Tensor,
                      want_y: bool, want_r: Sequence[bool], *, into_y: bool = False):
    """`_RotateOutput`'s backward: (∂y = Mᵀg or None, [∂B_i = Σ g_i z_iᵀ or None per split]), in pieces.
    `into_y`: ∂y is written over y, each piece after it was read (y must be the caller's own tensor)."""
    if _channels_first(y, dim):
        return _rotated_channels_backward(y, b, sizes, blocks, grad, want_y, want_r, into_y=into_y)
    if _rows_delta(y, dim):
        return _rotated_rows_backward(y, b, sizes, blocks, grad, want_y, want_r, into_y=into_y)
    moved = y.movedim(dim, -1)
    width = moved.shape[-1]
    g_m = grad.movedim(dim, -1)
    grad_y = (y if into_y else torch.empty_like(y)) if want_y else None
    grads_r = [torch.zeros_like(r) if w else None for r, w in zip(blocks, want_r)]
    for idx in _row_chunks(tuple(moved.shape[:-1]), max(1, _chunk_elements(y.device) // width)):
        gc = g_m[idx].reshape(-1, width).to(torch.float32)
        if any(want_r):
            yc = moved[idx]
            zc = (yc if b is None else yc - b).reshape(-1, width).to(torch.float32)
            start = 0
            for gr, (n, bs) in zip(grads_r, sizes):
                if gr is not None:
                    gcols = gc[:, start:start + n * bs].reshape(-1, n, bs).transpose(0, 1)
                    zcols = zc[:, start:start + n * bs].reshape(-1, n, bs).transpose(0, 1)
                    gr.baddbmm_(gcols.transpose(1, 2), zcols)  # Σ g zᵀ per block
                start += n * bs
            del zc
        if want_y:
            gy = _rotate_rows(gc, blocks, sizes, transpose=True).to(y.dtype)
            grad_y.movedim(dim, -1)[idx].copy_(gy.reshape(g_m[idx].shape))
    return grad_y, grads_r


class _RotateOutput(torch.autograd.Function):
    """out = y + (M·z − z) with z = y − bias (without a bias: out = M·y), M = blockdiag(blocks) on axis `dim`, the
    rotation in fp32 and `out` in y's dtype: the values of `y + (rotate_features(z) − z)`.

    Autograd on that expression keeps z for backward next to the output (y itself is not kept, but z is a full
    activation-sized copy) and makes several activation-sized temporaries at once, in forward (y, z, the bmm
    result, its reshaped copy, M z − z) and in backward (g, Mᵀg, its reshaped copy, Mᵀg − g, their sum). Here the
    layer keeps only y (z = y − bias is recomputed in backward by the same subtraction: the same values), the work
    is done in pieces of about `_CHUNK_ELEMENTS` rows, so the only activation-sized tensors are y, out (and in
    backward g and ∂y), and the backward computes ∂out/∂y = M exactly as Mᵀg (the same derivative as
    (I + M − I)ᵀ g, one rounding instead of three) and ∂/∂B_i = Σ g_i z_iᵀ per block. Conv outputs laid out as made
    take `_rotated_channels*`, and fp32 Linear outputs of `_DELTA_MIN_ELEMENTS` or more `_rotated_rows*`: the same
    expression in the delta form y + D·z (D = M − I), ∂y = g + Dᵀg, each a rounding or two apart from the above."""

    @staticmethod
    def forward(ctx, y, bias, dim, sizes, *blocks):
        b = None if bias is None else bias.to(y.dtype)
        out = _rotated(y, b, dim, sizes, blocks)
        ctx.save_for_backward(y, *blocks)
        ctx.dim, ctx.sizes, ctx.bias = dim, sizes, b  # (a frozen vector, maybe an inference tensor: not "saved")
        return out

    @staticmethod
    def backward(ctx, grad):
        y, *blocks = ctx.saved_tensors
        want_r = [ctx.needs_input_grad[4 + i] for i in range(len(blocks))]
        grad_y, grads_r = _rotated_backward(y, ctx.bias, ctx.dim, ctx.sizes, blocks, grad, ctx.needs_input_grad[0],
                                            want_r)
        return (grad_y, None, None, None, *grads_r)


def _half_rotated(y2: torch.Tensor, sizes, blocks, minus: torch.Tensor | None = None) -> torch.Tensor:
    """out = y + D·y (D = M − I) for a 16-bit (rows, features) `y2`, per split in the bypass hook's row pieces: its
    batched product through strided views (`bypass._add_block_product`, blocks grouped by `_product_deltas`, no
    transposed copy), the sum rounded once in y's dtype; `minus` (features,) in y's dtype: subtracted from each piece
    after."""
    out = torch.empty(y2.shape, dtype=y2.dtype, device=y2.device)
    sizes, blocks = _merged_splits(sizes, blocks)
    start = 0
    for r, (n, bs) in zip(blocks, sizes):
        cols = slice(start, start + n * bs)
        start += n * bs
        dt = _product_deltas(r, True, y2.dtype)
        step = _piece_rows(y2, dt.shape[-1])
        for i in range(0, y2.shape[0], step):
            _add_block_product(y2[i:i + step, cols], dt, None, out[i:i + step, cols])
            if minus is not None:
                out[i:i + step, cols].sub_(minus[cols])
    return out


def _half_rotated_backward(y2: torch.Tensor, g2: torch.Tensor, sizes, blocks, want_y: bool, want_r: Sequence[bool],
                           shift: torch.Tensor | None = None):
    """The backward of `_half_rotated` as the rotation of z = y − `shift` (a (features,) vector in y's dtype, or
    None: z = y): (∂y = g + g·D in the same pieces, or None; [∂B = Σ g zᵀ per block, fp32, or None per split]).

    Per piece, g's rows are copied once to the grouped (groups, rows, g·b) layout of `_product_deltas` and both
    products read that copy: ∂y's as a contiguous 16-bit baddbmm (g + g·D, the sum rounded once) copied back to ∂y's
    rows, and ∂B's as one (groups, g·b, rows)·(groups, rows, g·b) product against the same layout of z (y's rows
    copied, the shift subtracted on the copy, in cache), whose diagonal b × b blocks are the blocks' Σ g zᵀ of the
    piece (in y's dtype; the pieces summed in fp32). The values of the per-block form bit for bit (each entry is the
    same sum over the piece's rows). Measured against it (one thread, 1024 rows, blocks of 8): 9216 features
    47.8 → 37.8 ms, 21504: 112.8 → 95.6 ms: g copied once instead of twice (the strided baddbmm copies its operands
    to contiguous internally), and 288 products of 32 × 32 instead of 1152 of 8 × 8 per piece."""
    split_sizes = sizes
    if all(want_r) or not any(want_r):
        sizes, blocks = _merged_splits(sizes, blocks)
    grads_r = [torch.zeros_like(r) if w else None for r, w in zip(blocks, want_r)]
    grad_y = torch.empty(g2.shape, dtype=y2.dtype, device=y2.device) if want_y else None
    start = 0
    for r, gr, (n, bs) in zip(blocks, grads_r, sizes):
        cols = slice(start, start + n * bs)
        start += n * bs
        if gr is None and not want_y:
            continue
        d = _product_deltas(r, False, y2.dtype)  # g + g·D with D = M − I as it is: the row form of Mᵀg
        groups, width = d.shape[0], d.shape[-1]
        per = width // bs  # blocks per group
        # pieces sized on the split's own width (a split of a fused output that cannot merge: kohya's linear1 in
        # blocks of 3072/n and 12288/n, 1024 rows: 144–147 → 122–126 ms; ∂y the same bits, ∂B other piece sums)
        step = _piece_rows(y2[:, cols], width)
        rows_max = min(step, y2.shape[0])
        # one row (a modulation layer's vector): the grouped layout is the row itself (views, no copies), and ∂B is
        # made per block (n products of b × 1 · 1 × b, not groups of g·b × g·b: no diagonal to take)
        one_row = rows_max == 1
        # the pieces' work tensors, made once (new ones per piece: ~20 % slower on a CPU)
        gts = None if one_row else torch.empty((groups, rows_max, width), dtype=y2.dtype, device=y2.device)
        dys = torch.empty_like(gts) if want_y and not one_row else None
        if gr is not None:
            zts = torch.empty((groups, rows_max, width), dtype=y2.dtype, device=y2.device)
            blockwise = per == 1 or one_row
            prod = torch.empty((n, bs, bs) if blockwise else (groups, width, width), dtype=y2.dtype, device=y2.device)
            diag = prod if blockwise else torch.empty((n, bs, bs), dtype=y2.dtype, device=y2.device)
            tile = None if shift is None else shift[cols].view(groups, 1, width)
            if tile is not None and not one_row:
                tile = tile.expand(groups, rows_max, width).contiguous()
        for i in range(0, y2.shape[0], step):
            gc = g2[i:i + step, cols]
            rows = gc.shape[0]
            if one_row:
                gt = gc.view(groups, 1, width)
            else:
                gt = gts[:, :rows].copy_(gc.view(rows, groups, width).transpose(0, 1))
            if want_y:
                dst = grad_y[i:i + step, cols]
                if one_row:
                    torch.baddbmm(gt, gt, d, out=dst.view(groups, 1, width))
                else:
                    dst.view(rows, groups, width).transpose(0, 1).copy_(torch.baddbmm(gt, gt, d, out=dys[:, :rows]))
            if gr is not None:  # Σ g zᵀ of the piece: the diagonal blocks of the grouped product
                yc = y2[i:i + step, cols]
                if one_row:
                    zt = yc.view(groups, 1, width) if tile is None else torch.sub(yc.view(groups, 1, width), tile,
                                                                                 out=zts)
                    torch.bmm(gt.view(n, bs, 1), zt.view(n, 1, bs), out=prod)
                else:
                    zt = zts[:, :rows].copy_(yc.view(rows, groups, width).transpose(0, 1))
                    if tile is not None:
                        zt.sub_(tile[:, :rows])
                    torch.bmm(gt.transpose(1, 2), zt, out=prod)
                    if not blockwise:
                        diag.view(groups, per, bs, bs).copy_(
                            prod.view(groups, per, bs, per, bs).diagonal(0, 1, 3).permute(0, 3, 1, 2))
                gr.add_(diag.view(n, bs, bs))  # a piece's sum in y's dtype; total fp32
    if len(split_sizes) != len(sizes):  # merged: each split's blocks are its rows of the merged gradient
        grads_r = list(torch.split(grads_r[0], [n for n, _ in split_sizes])) if want_r[0] else [None] * len(want_r)
    return grad_y, grads_r


class _RotateOutputHalf(torch.autograd.Function):
    """`_RotateOutput` for 16-bit activations rotated on their last axis (Linear outputs): the same expression
    y + (M − I)(y − bias), with the change D·y (D = M − I) computed in y's dtype, as the bypass hook does at
    inference: the product of the small change runs at the layer's own 16-bit matmul rate, its error ~2⁻⁸ (bf16) /
    2⁻¹¹ (fp16) of that change, far below the output's own rounding.

    Forward out ← y + D·y in row pieces (`_half_rotated`), then out −= D·bias (a per-feature vector, fp32, n·b²
    work, once); backward ∂y = g + g·D the same way, and ∂B = Σ g zᵀ per block with z = y − bias
    (`_half_rotated_backward`). Keeps y and the blocks, like `_RotateOutput`. Trained Cayley Linears take
    `_BaseRotateHalf` instead, which folds the bias into the base product."""

    @staticmethod
    def forward(ctx, y, bias, sizes, *blocks):
        c = None
        if bias is not None:  # D·bias per block, in fp32 (elementwise: autocast leaves it alone), then y's dtype
            parts, start = [], 0
            for r, (n, bs) in zip(blocks, sizes):
                d = r.detach() - torch.eye(bs, dtype=r.dtype, device=r.device)
                parts.append((d * bias[start:start + n * bs].to(d.dtype).view(n, 1, bs)).sum(-1).view(n * bs))
                start += n * bs
            c = torch.cat(parts).to(y.dtype)
        out = _half_rotated(y.reshape(-1, y.shape[-1]), sizes, blocks, c)
        ctx.save_for_backward(y, *blocks)
        ctx.sizes, ctx.bias = sizes, bias
        return out.view(y.shape)

    @staticmethod
    def backward(ctx, grad):
        y, *blocks = ctx.saved_tensors
        want_r = [ctx.needs_input_grad[3 + i] for i in range(len(blocks))]
        shift = None if ctx.bias is None else ctx.bias.to(y.dtype)
        grad_y, grads_r = _half_rotated_backward(y.reshape(-1, y.shape[-1]), grad.reshape(-1, y.shape[-1]),
                                                 ctx.sizes, blocks, ctx.needs_input_grad[0], want_r, shift)
        return (None if grad_y is None else grad_y.view(grad.shape), None, None, *grads_r)


def rotate_output(layer: OFTLayer, y: torch.Tensor, bias: torch.Tensor | None, blocks: list[torch.Tensor], *,
                  dim: int = -1) -> torch.Tensor:
    """A trained layer's output: M·(y − bias) + bias in the delta form y + (M − I)(y − bias) (`_RotateOutput`;
    bias None: M·y), for a kohya-convention (block-diagonal, output side) `layer` whose base output is `y`.
    16-bit outputs rotated on their last axis take `_RotateOutputHalf` (the change in y's dtype)."""
    sizes = tuple(zip(layer.num_blocks, layer.block_sizes))
    bias = None if bias is None else bias.detach()
    dim = dim % y.ndim
    if y.dtype in (torch.float16, torch.bfloat16) and dim == y.ndim - 1:
        return _RotateOutputHalf.apply(y, bias, sizes, *blocks)
    return _RotateOutput.apply(y, bias, dim, sizes, *blocks)


# ------------------------------------------------------------------------------------------------ frozen weights
def _normal_alias(t: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) tensor over the same memory as `t`: no copy. Call outside inference mode."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), t.size(),
                                                                t.stride())


@contextlib.contextmanager
def frozen_for_training(root: nn.Module):
    """Make every parameter and buffer of `root` usable as a frozen input of autograd for the duration, without
    copying; everything is put back exactly (the same tensor objects) on exit, errors and Cancel included.

    Hosts create weights under `torch.inference_mode()` (ComfyUI's executor runs every node there, so the weights
    `CheckpointLoaderSimple` / `UNETLoader` / a KSampler's load leave in the modules are inference tensors), and
    autograd refuses to save an inference tensor for backward ("Inference tensors cannot be saved for backward"),
    in every layer a gradient passes through, trained or not (Linear, Conv, group_norm, layer_norm, ...). Core's
    TrainLoraNode escapes this by casting each weight per forward into a fresh tensor, which autograd then keeps
    until the backward: a second copy of the model's weights while training. Here each inference tensor is swapped
    for a normal tensor that aliases its storage (`Tensor.set_`, zero-copy; works on any device), so the extra
    memory is nothing. The weights are only read (the trainer never writes them, `gradient_checkpointing` checks its
    layers do not write their inputs), so bypassing inference mode's version counter is safe.

    Also: parameters are frozen (`requires_grad` False) for the duration, so that autograd never computes a
    weight-sized gradient for a base weight; tensor subclasses (e.g. quantized weights that a host dequantizes per
    forward into fresh tensors) are left as they are. Yields the number of tensors swapped.
    """
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    unfrozen: list[torch.Tensor] = []
    try:
        with torch.inference_mode(False):
            for module in root.modules():
                for store in (module._parameters, module._buffers):
                    _freeze_store(store, swapped, unfrozen)
        yield len(swapped)
    finally:
        for store, name, t in reversed(swapped):
            store[name] = t
        for t in unfrozen:
            t.requires_grad_(True)


def _freeze_store(store: dict, swapped: list, unfrozen: list) -> None:
    """One module's parameters or buffers: plain inference tensors swapped for normal aliases (recorded in
    `swapped` as (store, name, original)), trainable parameters frozen (recorded in `unfrozen`)."""
    for name, t in list(store.items()):
        if t is None:
            continue
        if t.is_inference() and type(t) in (torch.Tensor, nn.Parameter) and t.layout == torch.strided:
            alias = _normal_alias(t)
            if isinstance(t, nn.Parameter):
                alias = nn.Parameter(alias, requires_grad=False)
            swapped.append((store, name, t))
            store[name] = alias
        elif isinstance(t, nn.Parameter) and t.requires_grad:
            t.requires_grad_(False)
            unfrozen.append(t)


# ------------------------------------------------------------------------------------------------ frozen bases (QOFT)
def _base_product(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  padding) -> torch.Tensor:
    """y = Linear / Conv2d(x) with the given weight and bias (`padding`: the Conv2d padding to use)."""
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x, weight, bias, module.stride, padding, module.dilation, module.groups)
    return F.linear(x, weight, bias)


@dataclass(eq=False)
class _BaseProduct:
    """How a frozen Linear / Conv2d made its output y = base(x) in forward, to make it again in backward: the
    module, the host's `weight_fn`, the Conv2d padding, and the autocast state of the forward. The one definition of
    the base product of a trained or frozen layer (`OFTTrainer._forward_of`, `_FrozenBase`, `_RotateFromInput`):
    made again with the same kernel on the same inputs, it gives the same values bit for bit."""
    module: nn.Module
    weight_fn: Callable
    padding: object
    autocast: tuple[bool, torch.dtype]

    @classmethod
    def of(cls, module: nn.Module, weight_fn: Callable, padding, x: torch.Tensor) -> _BaseProduct:
        dev = x.device.type
        return cls(module, weight_fn, padding, (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)))

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _base_product(self.module, x, weight, bias, self.padding)

    def again(self, x: torch.Tensor):
        """(weight, bias, y) as the forward made them, under the forward's autocast (in backward)."""
        enabled, dtype = self.autocast
        with torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            weight, bias = self.weight_fn(self.module, x)
            return weight, bias, self(x, weight, bias)

    def weight_again(self, x_dtype: torch.dtype, x_device: torch.device) -> torch.Tensor:
        """The forward's weight made again (in backward) for an input of that dtype and device."""
        probe = torch.empty(0, dtype=x_dtype, device=x_device)
        enabled, dtype = self.autocast
        with torch.autocast(x_device.type, dtype=dtype, enabled=enabled):
            return self.weight_fn(self.module, probe)[0]

    def input_grad(self, x_shape, x_dtype: torch.dtype, grad_y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """∂x from ∂y (the base is frozen: its weight gets no gradient)."""
        m = self.module
        weight = weight.detach().to(grad_y.dtype)
        if isinstance(m, nn.Conv2d):
            gx = torch.nn.grad.conv2d_input(x_shape, weight, grad_y, m.stride, self.padding, m.dilation, m.groups)
        else:
            gx = grad_y.matmul(weight)
        return gx.to(x_dtype)

    def grads(self, x: torch.Tensor, grad_y: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(`input_grad`, `weight_grad`) of a product run with `weight`, the same values bit for bit; a Conv2d's
        from one `convolution_backward` call instead of two (`torch.nn.grad`'s input gradient runs on a stand-in
        input of stride 0: measured, one thread, a 1×1 conv 128 → 128 at 2 × 32 × 32: 1.60 → 0.90 ms for both)."""
        m = self.module
        if not isinstance(m, nn.Conv2d):
            return (self.input_grad(x.shape, x.dtype, grad_y, weight),
                    self.weight_grad(x, grad_y, weight.shape))
        pair = torch.nn.modules.utils._pair
        gx, gw, _ = torch.ops.aten.convolution_backward(
            grad_y, x.detach().to(grad_y.dtype), weight.detach().to(grad_y.dtype), None, pair(m.stride),
            pair(self.padding), pair(m.dilation), False, [0], m.groups, (True, True, False))
        return gx.to(x.dtype), gw.reshape(weight.shape[0], -1)

    def weight_grad(self, x: torch.Tensor, grad_y: torch.Tensor, weight_shape) -> torch.Tensor:
        """∂W = gᵀx as the product's weight would get it, flattened to (out, in · kernel), in ∂y's dtype (the base
        weight itself stays frozen: this feeds the rotation's gradient of `_RotateThroughWeight`)."""
        m = self.module
        x = x.detach().to(grad_y.dtype)
        if isinstance(m, nn.Conv2d):
            gw = torch.nn.grad.conv2d_weight(x, weight_shape, grad_y, m.stride, self.padding, m.dilation, m.groups)
        else:
            gw = grad_y.reshape(-1, grad_y.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]))
        return gw.reshape(weight_shape[0], -1)


class _FrozenBase(torch.autograd.Function):
    """y = Linear / Conv2d(x) with a frozen base weight that `weight_fn(module, x)` makes (a dequantised or cast
    copy of a quantized / fp8 / offloaded weight). Autograd would keep that copy until the backward of every layer
    (a block's worth of dequantised weights alive at once with checkpointing, the whole model's without); here only
    the module is kept and the backward asks `weight_fn` again, as QLoRA does (bitsandbytes' MatMul4Bit keeps the
    4-bit weight, not its dequantised copy). Only the input gets a gradient (the base is frozen)."""

    @staticmethod
    def forward(ctx, x, module, weight_fn, padding):
        base = _BaseProduct.of(module, weight_fn, padding, x)
        weight, bias = weight_fn(module, x)
        y = base(x, weight, bias)
        ctx.base, ctx.x_shape, ctx.x_dtype, ctx.x_device = base, x.shape, x.dtype, x.device
        out_bias = y.new_empty(0) if bias is None else bias.detach()
        ctx.mark_non_differentiable(out_bias)
        return y, out_bias

    @staticmethod
    def backward(ctx, grad_y, _grad_bias):
        if grad_y is None or not ctx.needs_input_grad[0]:
            return None, None, None, None
        weight = ctx.base.weight_again(ctx.x_dtype, ctx.x_device)
        return ctx.base.input_grad(ctx.x_shape, ctx.x_dtype, grad_y, weight), None, None, None


def frozen_base(module: nn.Module, x: torch.Tensor, weight_fn: Callable, padding=None):
    """(y, bias) of a frozen Linear / Conv2d (`_FrozenBase`); bias None when the layer has none. `padding`: the
    Conv2d padding to use (default the module's; 0 after an explicit non-zero-mode pad)."""
    if padding is None and isinstance(module, nn.Conv2d):
        padding = module.padding
    y, bias = _FrozenBase.apply(x, module, weight_fn, padding)
    return y, (None if bias.numel() == 0 else bias)


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of a base product of x: the autocast dtype when autocast is on, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _unrotated_bias(layer: OFTLayer, bias: torch.Tensor, blocks) -> torch.Tensor:
    """M⁻¹·bias as Mᵀ·bias = bias·M (the blocks orthogonal: Cayley; `rotation._apply_last`), in fp32, returned in the
    bias's dtype. Identity blocks give the bias bit for bit (each entry is 1·b plus exact zeros)."""
    with torch.autocast(bias.device.type, enabled=False):
        b32 = bias.detach().to(torch.float32).view(1, -1)
        return _apply_last(layer, [r.detach() for r in blocks], b32, right=True).view(-1).to(bias.dtype)


class _BaseRotateHalf(torch.autograd.Function):
    """A trained 16-bit Linear's base product and output rotation as one Function: ŷ = W·x + M⁻¹·bias, the bias
    added inside the GEMM (free), then out = ŷ + D·ŷ (D = M − I) in `_half_rotated`'s row pieces, so that
    out = M·(W·x) + bias with no pass over the output for the bias (`frozen_base` then `_RotateOutputHalf` subtract
    D·bias from every piece). Measured (one thread, 1024 tokens, blocks of 8, the rotation alone: a 64-wide input)
    forward old → new: 3072 features 11.7 → 7.4 ms, 9216: 34.1 → 26.7, 12288: 41.5 → 31.9, FLUX.1 linear1's 21504:
    84.4 → 68.1; backward unchanged (137 ms at 21504). M⁻¹ = Mᵀ: the blocks must be orthogonal (the Cayley
    parameterization, fp32 rounding; `OFTTrainer._forward_of` sends Cayley–Neumann layers, whose truncated series is
    not, the old way; there a large series would also make M⁻¹·bias large, and ŷ's 16-bit rounding with it).
    Identity blocks give the base output bit for bit (M⁻¹·bias is the bias exactly, D·ŷ exact zeros).

    Keeps ŷ and the blocks, like `_RotateOutputHalf` keeps y: never x, and the weight only if `keep_weight` (where a
    plain Linear's autograd node would keep it); else it is asked of `weight_fn` again in backward, as `_FrozenBase`
    does. Backward: ∂ŷ = g + g·D in pieces, ∂x from ∂ŷ with the base product's own kernel (`_BaseProduct.input_grad`;
    the same values as the old path's, bit for bit), and ∂B = Σ g zᵀ per block with z = W·x = ŷ − M⁻¹·bias, made on
    each piece's grouped copy of ŷ (`_half_rotated_backward`, in cache). z must be made: Σ g ŷᵀ − (Σ g) ⊗
    M⁻¹·bias (no z at all) loses the 16-bit piece products at the bias's scale — measured against fp64, 20–40× the
    old path's error at |bias| = 10 |z| — and was no faster. The gradient is that of out = M·z + bias with the bias
    fixed: M⁻¹·bias is internal to the Function.

    Not done: rotating ŷ in place and keeping `out` instead (z = Mᵀ(out − bias), one activation-sized tensor fewer
    in forward and held for backward; 5–13 ms less per forward at 9216 features, up to 20 at 21504, one thread).
    A host that writes into a Linear's output in place would then change what backward reads, and ComfyUI does: FLUX's
    `layers.apply_mod` with `modulation_dims` (HunyuanVideo's blocks, built from FLUX's, pass them) scales the
    attention projection's and the MLP's outputs with `*=` / `+=`. Autograd would stop that training with a version
    error, and no fallback can make z again without x, which is not kept."""

    @staticmethod
    def forward(ctx, x, base, keep_weight, layer, *blocks):
        sizes = tuple(zip(layer.num_blocks, layer.block_sizes))
        weight, bias = base.weight_fn(base.module, x)
        shifted = None if bias is None else _unrotated_bias(layer, bias, blocks)
        y = base(x, weight, shifted)
        out = _half_rotated(y.reshape(-1, y.shape[-1]), sizes, blocks)  # ŷ + D·ŷ (16 bits: the sum rounded once)
        kept = (weight,) if keep_weight else ()
        ctx.save_for_backward(y, *blocks, *kept)
        ctx.base, ctx.sizes, ctx.keep_weight, ctx.n_blocks = base, sizes, keep_weight, len(blocks)
        ctx.x_shape, ctx.x_dtype, ctx.x_device = x.shape, x.dtype, x.device
        # M⁻¹·bias as the GEMM added it (in ŷ's dtype): a per-feature vector made from the detached blocks, like
        # `_RotateOutputHalf`'s bias not "saved"
        ctx.shifted = None if shifted is None else shifted.to(y.dtype)
        return out.view(y.shape)

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        y, blocks = saved[0], saved[1:1 + ctx.n_blocks]
        want_x = ctx.needs_input_grad[0]
        want_r = [ctx.needs_input_grad[4 + i] for i in range(len(blocks))]
        # z = W·x = ŷ − M⁻¹·bias, made on each piece's grouped copy of ŷ
        grad_y, grads_r = _half_rotated_backward(y.reshape(-1, y.shape[-1]), grad.reshape(-1, y.shape[-1]),
                                                 ctx.sizes, blocks, want_x, want_r, ctx.shifted)
        gx = None
        if want_x:
            base = ctx.base
            weight = saved[-1] if ctx.keep_weight else base.weight_again(ctx.x_dtype, ctx.x_device)
            gx = base.input_grad(ctx.x_shape, ctx.x_dtype, grad_y.view(grad.shape), weight)
        return (gx, None, None, None, *grads_r)


def _base_rotate_output(layer: OFTLayer, module: nn.Linear, x: torch.Tensor, weight_fn: Callable, blocks, *,
                        keep_weight: bool = False) -> torch.Tensor:
    """A trained 16-bit Linear's output from its input, base product and rotation in one (`_BaseRotateHalf`): the
    values of `rotate_output(layer, *frozen_base(module, x, weight_fn), blocks)` to 16-bit rounding, keeping the same
    (ŷ and the blocks; `keep_weight`: the weight too, as a plain Linear's autograd node keeps it). Orthogonal
    (Cayley) blocks only."""
    return _BaseRotateHalf.apply(x, _BaseProduct.of(module, weight_fn, None, x), keep_weight, layer, *blocks)


class _RotateFromInput(torch.autograd.Function):
    """A trained layer's rotated output from its input: y = base(x) (`_BaseProduct`), then out = y + (M·z − z) as
    `_RotateOutput`, keeping x (and the blocks) for backward instead of y, and making y again there with the same
    kernel on the same inputs (bit for bit the forward's y; the weight is asked of `weight_fn` again, never kept).

    For a layer whose output is much wider than its input (a GEGLU feed-forward projection: y is 8 × x) this keeps
    1/8 of the memory, for one whose input is kept anyway (shared by several layers, or kept by another node) all of
    y, at the cost of one more base product in backward (`keeps_input` chooses). The gradients are those of
    the plain path (base product, then `_RotateOutput`): the same ∂y and ∂B_i from the same y, and ∂x from ∂y with
    the same kernel as autograd's (`_BaseProduct.input_grad`)."""

    @staticmethod
    def forward(ctx, x, base, dim, sizes, *blocks):
        weight, bias = base.weight_fn(base.module, x)
        y = base(x, weight, bias)
        b = None if bias is None else bias.detach().to(y.dtype)
        out = _rotated(y, b, dim, sizes, blocks)
        ctx.save_for_backward(x, *blocks)
        ctx.base, ctx.dim, ctx.sizes = base, dim, sizes
        return out

    @staticmethod
    def backward(ctx, grad):
        x, *blocks = ctx.saved_tensors
        base = ctx.base
        want_x = ctx.needs_input_grad[0]
        want_r = [ctx.needs_input_grad[4 + i] for i in range(len(blocks))]
        weight, bias, y = base.again(x)
        b = None if bias is None else bias.detach().to(y.dtype)
        # ∂y over the made-again y (read piece by piece before it is overwritten): one output-sized tensor, not two
        grad_y, grads_r = _rotated_backward(y, b, ctx.dim, ctx.sizes, blocks, grad, want_x, want_r, into_y=True)
        del y, bias, b
        gx = base.input_grad(x.shape, x.dtype, grad_y, weight) if want_x else None
        return (gx, None, None, None, *grads_r)


def rotate_from_input(layer: OFTLayer, module: nn.Module, x: torch.Tensor, weight_fn: Callable, blocks, *,
                      padding=None) -> torch.Tensor:
    """The trained layer's output from its input x, the base product made again in backward (`_RotateFromInput`):
    the values of `rotate_output(layer, *frozen_base(module, x, weight_fn, padding), blocks)`."""
    conv = isinstance(module, nn.Conv2d)
    if padding is None and conv:
        padding = module.padding
    sizes = tuple(zip(layer.num_blocks, layer.block_sizes))
    base = _BaseProduct.of(module, weight_fn, padding, x)
    return _RotateFromInput.apply(x, base, 1 if conv else x.ndim - 1, sizes, *blocks)


def _rotated_weight(layer: OFTLayer, blocks, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """M·W: the weight's output rows rotated per block (`rotation.apply_rows`, fp32), in the weight's shape and dtype,
    or in `dtype` (the product's) for a weight stored in fewer than 16 bits (an fp8 weight used as it is under
    autocast: M·W rounded back to fp8 would lose most of the rotation). Identity blocks give W bit for bit (each row
    is 1·w plus exact zeros)."""
    w = weight.detach().reshape(weight.shape[0], -1).to(torch.float32)
    out = weight.dtype if weight.dtype.itemsize >= 2 else dtype
    return apply_rows(layer, [r.detach() for r in blocks], w).reshape(weight.shape).to(out)


class _RotateThroughWeight(torch.autograd.Function):
    """A trained layer's rotated output through its rotated weight: out = base(x; M·W, bias) = M·(W x) + bias, the
    values of `_RotateFromInput` (to the rounding of one GEMM instead of a GEMM and a rotation pass), keeping x and
    the blocks for backward like it; M·W is a temporary made again in backward, never kept.

    Where the product has more rows than the weight has inputs (SD1.x's 320-wide layers at 32×32 latents: 2048 rows,
    320 inputs) rotating the weight (out · in · b multiply-adds) is cheaper than rotating the output (rows · out · b,
    and an activation-sized pass over memory), and backward makes no activation-sized temporary: ∂x = (M·W)ᵀ g with
    the base product's own kernel (`_BaseProduct.input_grad`), ∂B_k = Σ g_k z_kᵀ = (gᵀx)_k · W_kᵀ per block (z = W x,
    (gᵀx) = ∂W from `_BaseProduct.weight_grad`: one GEMM, as `_RotateFromInput` pays to make y again)."""

    @staticmethod
    def forward(ctx, x, base, layer, *blocks):
        weight, bias = base.weight_fn(base.module, x)
        out = base(x, _rotated_weight(layer, blocks, weight, _output_dtype(x)), bias)
        ctx.save_for_backward(x, *blocks)
        ctx.base, ctx.layer = base, layer
        return out

    @staticmethod
    def backward(ctx, grad):
        x, *blocks = ctx.saved_tensors
        base, layer = ctx.base, ctx.layer
        weight = base.weight_again(x.dtype, x.device)
        gx = gw = None
        want = ctx.needs_input_grad[3:]
        if ctx.needs_input_grad[0]:
            rotated = _rotated_weight(layer, blocks, weight, grad.dtype)
            if any(want):  # both from one product's backward
                gx, gw = base.grads(x, grad, rotated)
            else:
                gx = base.input_grad(x.shape, x.dtype, grad, rotated)
        grads = [None] * len(blocks)
        if any(want):
            gw = (base.weight_grad(x, grad, weight.shape) if gw is None else gw).to(torch.float32)
            w = weight.detach().reshape(weight.shape[0], -1).to(torch.float32)
            start = 0
            for i, (n, b) in enumerate(zip(layer.num_blocks, layer.block_sizes)):
                rows = slice(start, start + n * b)
                start += n * b
                if want[i]:  # (gᵀx)_k · W_kᵀ per block
                    grads[i] = torch.bmm(gw[rows].view(n, b, -1), w[rows].view(n, b, -1).transpose(1, 2))
        return (gx, None, None, *grads)


class _RotateKeepOutput(torch.autograd.Function):
    """`_RotateThroughWeight`'s output, out = base(x; M·W, bias), keeping the OUTPUT (and the blocks) for backward
    instead of x, for orthogonal blocks (Cayley): z = out − bias = M·(W x), so W x = Mᵀ z and
    ∂B_k = Σ g_k (W x)_kᵀ = (Σ g_k z_kᵀ)·M_k — one pass over g and out per block (`_rotated_backward`'s ∂B, the
    rows or channels pieces of `_RotateOutput`) and a b × b product per block, instead of the gᵀx GEMM
    (rows · out · in multiply-adds). ∂x = (M·W)ᵀ g with the base product's own kernel, M·W made again (never kept).

    What it keeps is the output, which the next layer often keeps anyway (attention's q / k / v, a GEGLU's
    projection, which `chunk` views), where x is often kept by nobody else; a 3×3 convolution that would keep its
    output for `_RotateOutput` keeps the same bytes and skips three of its four passes over them. A host that writes
    the output in place afterwards would change what is kept: backward then stops (autograd's "modified by an
    inplace operation", or, when a checkpoint's recomputation kept it, this node's version check: OFTError), never
    computes a wrong gradient; the policy (`keeps_output`) takes this path only where no such write is known."""

    @staticmethod
    def forward(ctx, x, base, layer, dim, *blocks):
        weight, bias = base.weight_fn(base.module, x)
        out = base(x, _rotated_weight(layer, blocks, weight, _output_dtype(x)), bias)
        ctx.save_for_backward(out, *blocks)
        ctx.version = out._version  # (a write after this is caught in backward, also under checkpointing)
        ctx.base, ctx.layer, ctx.dim = base, layer, dim
        ctx.x_shape, ctx.x_dtype, ctx.x_device = x.shape, x.dtype, x.device
        ctx.bias = None if bias is None else bias.detach()  # (a frozen vector, maybe an inference tensor: not "saved")
        return out

    @staticmethod
    def backward(ctx, grad):
        out, *blocks = ctx.saved_tensors
        base, layer = ctx.base, ctx.layer
        if out._version != ctx.version:  # (without checkpointing autograd itself refuses first)
            raise OFTError(f"OFT training: the output of layer {layer.key} was written in place after it was made "
                           "(by the model's code or a patch), and this layer keeps its output to train: its "
                           "gradient would be wrong. Train with gradient checkpointing off (then no layer keeps its "
                           "output), or build the trainer with OFTTrainer(keep_output=False)")
        want = ctx.needs_input_grad[4:]
        grads = [None] * len(blocks)
        if any(want):
            sizes = tuple(zip(layer.num_blocks, layer.block_sizes))
            b = None if ctx.bias is None else ctx.bias.to(out.dtype)
            _, sums = _rotated_backward(out, b, ctx.dim, sizes, blocks, grad, False, want)
            grads = [None if s is None else torch.bmm(s, r.detach().to(s.dtype)) for s, r in zip(sums, blocks)]
        gx = None
        if ctx.needs_input_grad[0]:
            weight = base.weight_again(ctx.x_dtype, ctx.x_device)
            gx = base.input_grad(ctx.x_shape, ctx.x_dtype, grad, _rotated_weight(layer, blocks, weight, grad.dtype))
        return (gx, None, None, None, *grads)


def rotate_through_weight(layer: OFTLayer, module: nn.Module, x: torch.Tensor, weight_fn: Callable, blocks, *,
                          padding=None, keep_output: bool = False) -> torch.Tensor:
    """The trained layer's output from its input x through the rotated weight M·W (`_RotateThroughWeight`): the
    values of `rotate_from_input` to one GEMM's rounding; keeps x and the blocks, makes M·W again in backward.
    `keep_output` (orthogonal blocks only: Cayley): the same output, keeping it instead of x (`_RotateKeepOutput`)."""
    conv = isinstance(module, nn.Conv2d)
    if padding is None and conv:
        padding = module.padding
    base = _BaseProduct.of(module, weight_fn, padding, x)
    if keep_output:
        return _RotateKeepOutput.apply(x, base, layer, 1 if conv else x.ndim - 1, *blocks)
    return _RotateThroughWeight.apply(x, base, layer, *blocks)


def _conv_input(module: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int] | int]:
    """(x, padding) for the products of `module` (F.conv2d, and their gradients through `convolution_backward`,
    which takes only symmetric integer padding): a non-zero padding mode, or a "same" padding that pads unevenly
    (an even kernel), is applied to x here (`F.pad`, as the module's own forward does) and the product pads 0;
    "same" that pads evenly and "valid" become their integer padding."""
    pads = module._reversed_padding_repeated_twice  # (left, right) per dim, last dim first
    if module.padding_mode != "zeros":
        return F.pad(x, pads, mode=module.padding_mode), 0
    if not isinstance(module.padding, str):
        return x, module.padding
    if all(pads[i] == pads[i + 1] for i in range(0, len(pads), 2)):
        return x, tuple(int(p) for p in pads[::2][::-1])
    return F.pad(x, pads), 0


def _product_rows(module: nn.Module, x: torch.Tensor, padding) -> int:
    """How many output rows (Linear: tokens; Conv2d: batch · output positions) the layer's product has for x, with
    the Conv2d `padding` the product uses."""
    if not isinstance(module, nn.Conv2d):
        return x.numel() // max(1, x.shape[-1])
    h, w = x.shape[-2:]
    batch = x.numel() // max(1, x.shape[-3] * h * w)
    if isinstance(padding, str):  # "same" keeps the positions (stride 1); "valid" pads nothing
        if padding == "same":
            return batch * h * w
        padding = 0
    out_h, out_w = _conv_out_hw((h, w), module.kernel_size, module.stride, padding, module.dilation)
    return batch * max(0, out_h) * max(0, out_w)


# A layer that keeps its input (`keeps_input`) and makes y again (`rotate_from_input`) pays one more base product in
# backward; keeping its output instead costs M·W three times (forward, recomputation, backward) and saves that GEMM
# and three passes over the output. Measured (one thread, fp32, blocks of 8, frozen layers): 512 → 512 at 128 rows
# 5.1 → 4.0 ms forward + backward, 512 → 4096 at 128 rows 36.7 → 28.6 ms; at 2 rows (a time embedding) 1.3 → 1.5.
_KEEP_OUTPUT_MIN_ROWS = 64


def keeps_output(root: nn.Module | None) -> Callable[[nn.Module, int], bool]:
    """The default `OFTTrainer(keep_output=…)` policy for `root`'s layers, `policy(module, rows)`: in ComfyUI's SD
    UNet (`openaimodel.UNetModel`: SD1.x, SD2.x, SDXL), whose own code writes no layer's output in place, and only
    while a block `gradient_checkpointing` runs is running it (a write the host adds after a block, ControlNet's
    `h += ctrl` on a Downsample's output, then meets the recomputation's fresh output, never the one kept), a layer
    keeps its output where that costs less than what it keeps otherwise: where M·W is no larger than the output
    (`rotates_weight`: rows ≥ the weight's inputs), or for a layer that keeps its input, from
    `_KEEP_OUTPUT_MIN_ROWS` rows. Elsewhere (FLUX scales some outputs in place; SVD's video blocks add to a
    feed-forward's output: a UNetModel with video blocks, SpatialVideoTransformer / VideoResBlock; an unknown model
    may) never. A write the policy did not foresee stops backward with OFTError (`_RotateKeepOutput` checks the
    output's version), never a wrong gradient."""
    cls = type(root)
    ok = (root is not None and cls.__name__ == "UNetModel" and cls.__module__.endswith(".openaimodel")
          and not any("Video" in type(m).__name__ for m in root.modules()))

    def policy(module: nn.Module, rows: int) -> bool:
        return ok and bool(_UNIT) and (rotates_weight(module, rows) or (
            keeps_input(module) and rows >= _KEEP_OUTPUT_MIN_ROWS))
    return policy


def rotates_weight(module: nn.Module, rows: int) -> bool:
    """The default `OFTTrainer(through_weight=…)` policy, for a layer that keeps its input and whose product has
    `rows` output rows: rotate the weight when rows ≥ the weight's inputs (in / groups · kernel area), i.e. when
    M·W (out · in · b multiply-adds) costs no more than rotating the output (rows · out · b, over activation memory)."""
    w = getattr(module, "weight", None)
    if w is None or w.ndim < 2:
        return False
    return rows >= math.prod(w.shape[1:])


@contextlib.contextmanager
def frozen_bases(modules: Iterable[nn.Module], weight_fn: Callable):
    """Run each (untrained) Linear / Conv2d in `modules` through `frozen_base` while gradients are on: their
    dequantised / cast weights are made again in backward instead of kept (QOFT); a Conv2d's padding as
    `_conv_input` makes it. Calls with other arguments or under no_grad go to the layer's own forward. Restored on
    exit."""
    with _forward_patches() as replace:
        for m in modules:
            if not (is_linear(m) or isinstance(m, nn.Conv2d)):
                continue

            def fwd(*args, __m=m, __orig=m.forward, **kwargs):
                if len(args) != 1 or kwargs or not torch.is_grad_enabled():
                    return __orig(*args, **kwargs)
                if isinstance(__m, nn.Conv2d):
                    x, padding = _conv_input(__m, args[0])
                    return frozen_base(__m, x, weight_fn, padding)[0]
                return frozen_base(__m, args[0], weight_fn)[0]

            replace(m, fwd)
        yield


# ------------------------------------------------------------------------------------------------ checkpointing
def checkpoint_blocks(root: nn.Module) -> list[nn.Module]:
    """The modules worth checkpointing: every element of every ModuleList directly under `root` (UNet
    input/output blocks, FLUX double/single blocks) and every Sequential with parameters directly under `root` (UNet
    middle block, time embedding, output head), falling back to `root`'s children."""
    blocks = [m for child in root.children() if isinstance(child, nn.ModuleList) for m in child]
    if blocks:
        return blocks + [m for m in root.children()
                         if isinstance(m, nn.Sequential) and any(True for _ in m.parameters())]
    return [m for m in root.children() if any(True for _ in m.parameters())]


def _called_layers(m: nn.Sequential) -> list[nn.Module]:
    """The elements of a Sequential (recursively): the modules whose `forward` runs whoever drives the Sequential."""
    return [c for child in m for c in (_called_layers(child) if isinstance(child, nn.Sequential) else [child])]


def _identity(t):
    return t


def _outer_saved_tensors_hooks():
    """The (pack, unpack) saved-tensor hooks in force here, or None (what torch.utils.checkpoint itself reads)."""
    top = torch._C._autograd._top_saved_tensors_default_hooks
    try:
        return top(False)
    except TypeError:  # a torch from before its `ignore_is_tracing` argument
        return top()


def _on_own_copies(fn, args, kwargs):
    """`fn(*args, **kwargs)` on copies of the floating-point tensor arguments, with every tensor autograd saves from
    those copies' storage copied when it is saved.

    Blocks that update an input in place (ComfyUI's FLUX: `x += …` in single blocks, `txt += …` and, from ComfyUI
    0.8, `img += …` twice in double blocks, each after a norm saved the input) would otherwise change what the
    checkpoint keeps for the recomputation, or what autograd saved for backward ("modified by an inplace
    operation"). Copying the inputs alone is not enough under checkpointing: the recomputation keeps the tensors it
    saves by reference, so a norm's input that the block updates again before backward reads it is read modified,
    and the gradients are silently wrong (measured: 5× off on a toy block; 1e-4 relative on the tiny FLUX). The
    saved-tensor hook copies such tensors at the moment they are saved, then hands them to the hook around it (the
    checkpoint's, which drops them in the first forward and keeps them in the recomputation): a few block-input
    sized copies per block.
    """

    def copy(v):
        return v.clone() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    args = [copy(a) for a in args]
    kwargs = {k: copy(v) for k, v in kwargs.items()}
    owned = {v.untyped_storage().data_ptr() for v in list(args) + list(kwargs.values())
             if isinstance(v, torch.Tensor) and v.is_floating_point()}
    outer = _outer_saved_tensors_hooks()  # the checkpoint's, when inside one
    outer_pack, outer_unpack = outer if outer is not None else (_identity, _identity)

    def pack(t):
        return outer_pack(t.clone() if t.untyped_storage().data_ptr() in owned else t)

    with torch.autograd.graph.saved_tensors_hooks(pack, outer_unpack):
        return fn(*args, **kwargs)


def _cloning(fn):
    """`fn` on its own copies of its floating-point tensor arguments (`_on_own_copies`), for a checkpointed block."""

    def run(*args, **kwargs):
        return _on_own_copies(fn, args, kwargs)

    return run


def _checked(fn, name: str):
    """`fn`, raising OFTError if it wrote into one of its tensor arguments (which the checkpoint keeps for the
    recomputation: the gradients would be computed from the modified values)."""

    def run(*args, **kwargs):
        inputs = [v for v in list(args) + list(kwargs.values())
                  if isinstance(v, torch.Tensor) and not v.is_inference()]  # (no version counter)
        versions = [v._version for v in inputs]
        out = fn(*args, **kwargs)
        if any(v._version != n for v, n in zip(inputs, versions)):
            raise OFTError(f"gradient checkpointing: layer {name} ({type(getattr(fn, '__self__', fn)).__name__}) "
                           "modifies its input in place; train with gradient checkpointing off")
        return out

    return run


@contextlib.contextmanager
def _forward_patches():
    """Yield `replace(module, fn)`, which swaps a module's forward; every module is restored on exit, errors
    included (an instance attribute removed again, a previous one put back)."""
    saved = []

    def replace(m: nn.Module, fn) -> None:
        saved.append((m, "forward" in m.__dict__, m.__dict__.get("forward")))
        m.forward = fn

    try:
        yield replace
    finally:
        for m, had, old in reversed(saved):
            if had:
                m.forward = old
            else:
                del m.forward


def _with_unit_blocks(module: nn.Module, fn):
    """`fn` with the rotation blocks of the attached trainers' layers inside `module` made at its start
    (`_unit_blocks`)."""

    def run(*args, **kwargs):
        with _unit_blocks(module):
            return fn(*args, **kwargs)

    return run


@contextlib.contextmanager
def gradient_checkpointing(modules: Iterable[nn.Module]):
    """Run each module's forward under `torch.utils.checkpoint` (non-reentrant, kwargs allowed); restored on exit.

    A block's inputs are copied inside the checkpoint (`_cloning`: blocks may update them in place). An
    `nn.Sequential` is checkpointed layer by layer instead, because its own forward may never run: ComfyUI's UNet
    drives each TimestepEmbedSequential (input / middle / output block) through `forward_timestep_embed(block, …)`,
    which iterates the block and calls its layers, so a checkpoint around the block's `forward` would never be
    entered (measured: SD1.x peak memory the same with checkpointing on and off). Those layers (ResBlock,
    SpatialTransformer, Down/Upsample) are checkpointed without copies — the copy changes the backward graph and with
    it the rounding of the gradients — and checked not to write into their inputs (`_checked`, OFTError if they do).
    """
    with _forward_patches() as replace:
        for block in modules:
            layers = _called_layers(block) if isinstance(block, nn.Sequential) else [block]
            for m in layers:
                fn = _unguarded(m.forward)
                run = _with_unit_blocks(m, _cloning(fn) if m is block else _checked(fn, type(m).__name__))

                def fwd(*args, __run=run, **kwargs):
                    return torch.utils.checkpoint.checkpoint(__run, *args, use_reentrant=False, **kwargs)

                replace(m, fwd)
        yield


@contextlib.contextmanager
def inplace_safe(modules: Iterable[nn.Module]):
    """Make blocks that update their inputs in place trainable without checkpointing; restored on exit.

    ComfyUI's FLUX blocks normalise their input and then add to it in place (`x += …` after `pre_norm(x)`,
    `txt += …` after `txt_norm2(txt)`), so autograd finds a saved tensor modified ("modified by an inplace
    operation") as soon as gradients flow through a block input — core's trainer fails there without checkpointing.
    Each block here runs on copies of its floating-point inputs, and a saved-tensor hook copies only the tensors
    that live in those inputs' storage when autograd saves them: a few block-input-sized copies per block.
    `nn.Sequential` blocks are left as they are (their forward may never run, see `gradient_checkpointing`; the
    layers of ComfyUI's UNet blocks do not write into their inputs).
    """
    with _forward_patches() as replace:
        for m in modules:
            if isinstance(m, nn.Sequential) or hasattr(m.forward, "_oft_unguarded"):
                continue  # a Sequential's forward may never run; a guarded block is guarded once

            def fwd(*args, __orig=m.forward, **kwargs):
                return _on_own_copies(__orig, args, kwargs)

            fwd._oft_unguarded = m.forward
            replace(m, fwd)
        yield


def _unguarded(fn):
    """The forward under an `inplace_safe` wrapper (checkpointing runs that one: its copies make it safe anyway, and
    a saved-tensor hook inside a checkpoint would bypass the checkpoint's own)."""
    return getattr(fn, "_oft_unguarded", fn)


# ------------------------------------------------------------------------------------------------ loop
def _make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW (default weight decay 0: decaying Q pulls the rotation to identity), Adam or SGD."""
    if not (lr > 0 and math.isfinite(lr)):
        raise OFTError(_mismatch("learning rate", "a finite number > 0", lr))
    params = list(params)
    # The fused kernels keep the step counters on the parameters' device: the default (for-loop / foreach) ones read
    # each parameter's step back to the host every step (`.item()`, a device wait per parameter on a GPU).
    fused = {"fused": True} if params and all(p.device.type in _FUSED_DEVICES for p in params) else {}
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **fused)
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr, **fused)
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, **fused)
    raise OFTError(_mismatch("optimizer", " | ".join(OPTIMIZERS), repr(name)))


_FUSED_DEVICES = ("cpu", "cuda", "mps", "xpu")  # where torch 2.14's fused Adam(W) / SGD kernels exist


LOSSES = ("MSE", "L1", "Huber", "SmoothL1")  # core TrainLoraNode's names
KOHYA_LOSS = {"MSE": "l2", "L1": "l1", "Huber": "huber", "SmoothL1": "smooth_l1"}  # sd-scripts' ss_loss_type
SCHEDULES = ("constant", "cosine", "linear")


def residual_loss(name: str, residual: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """The loss of a residual r = prediction − target (mean over every element), core's four choices:
    MSE mean(r²), L1 mean(|r|), Huber (torch.nn.HuberLoss, delta) and SmoothL1 (torch.nn.SmoothL1Loss, beta = delta;
    Huber / delta). With delta 1 (core's default) Huber and SmoothL1 are the same function."""
    if name == "MSE":
        return (residual ** 2).mean()
    if name == "L1":
        return residual.abs().mean()
    if name == "Huber":
        return F.huber_loss(residual, torch.zeros_like(residual), delta=delta)
    if name == "SmoothL1":
        return F.smooth_l1_loss(residual, torch.zeros_like(residual), beta=delta)
    raise OFTError(_mismatch("loss function", " | ".join(LOSSES), repr(name)))


def lr_factor(schedule: str, step: int, steps: int, warmup: int = 0) -> float:
    """The learning-rate multiplier of optimizer step `step` (0-based) of `steps`.

    Warm-up: the first `warmup` steps rise linearly, (step + 1) / (warmup + 1) (never 0: no step is wasted).
    Then, with p = (step − warmup) / (steps − warmup) going from 0 at the first step after warm-up towards 1:
    constant 1; linear 1 − p; cosine ½(1 + cos πp) (as transformers' get_cosine_schedule_with_warmup).
    """
    if schedule not in SCHEDULES:
        raise OFTError(_mismatch("learning-rate schedule", " | ".join(SCHEDULES), repr(schedule)))
    if warmup < 0:
        raise OFTError(_mismatch("warm-up steps", "≥ 0", warmup))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    p = (step - warmup) / max(1, steps - warmup)
    if schedule == "linear":
        return 1.0 - p
    return 0.5 * (1.0 + math.cos(math.pi * p))


def run_training(params: Sequence[nn.Parameter], compute_loss: Callable[[int, int], torch.Tensor], *, steps: int,
                 lr: float, grad_accum: int = 1, optimizer: str = "AdamW",
                 on_step: Callable[[int, float], None] | None = None,
                 before_step: Callable[[int], None] | None = None, schedule: str = "constant",
                 warmup_steps: int = 0, loss_scaling: bool = False) -> list[float]:
    """`steps` optimizer steps; each accumulates `grad_accum` micro-batches `compute_loss(step, micro)` (a scalar).

    Returns the mean loss of every step. `before_step(step)` runs first in each step (cancel checks: raise there),
    `on_step(step, loss)` after the update (progress, checkpoints). The learning rate of step s is
    lr × `lr_factor(schedule, s, steps, warmup_steps)` (a host number: setting it reads nothing from the device).
    Deterministic given deterministic `compute_loss`.

    `loss_scaling` (for fp16 autocast, whose gradients underflow below 6·10⁻⁸ where bf16's do not): dynamic loss
    scaling as mixed-precision trainers do it (`torch.amp.GradScaler`, as sd-scripts' fp16 runs through accelerate):
    the loss multiplied by the scale before backward, the gradients divided by it inside the fused optimizer step,
    a step whose gradients overflowed skipped and the scale halved, doubled after 2000 clean steps. With the fused
    optimizers the scale and the overflow flag stay on the device: no read beyond the loss.
    """
    if steps < 1:
        raise OFTError(_mismatch("steps", "≥ 1", steps))
    if grad_accum < 1:
        raise OFTError(_mismatch("gradient accumulation", "≥ 1", grad_accum))
    lr_factor(schedule, 0, steps, warmup_steps)  # bad schedule / warm-up: refused before any work
    params = list(params)
    opt = _make_optimizer(optimizer, params, lr)
    scaler = None
    if loss_scaling and params:
        device = params[0].device.type
        if device in _FUSED_DEVICES:  # (where torch's unscale-and-check kernel and the fused optimizers exist)
            scaler = torch.amp.GradScaler(device)
        else:
            log.warning("OFT training: no loss scaling on %s (torch has none there): fp16 gradients too small for "
                        "fp16 may vanish; bf16 or fp32 avoid that", device)
    losses = []
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(schedule, step, steps, warmup_steps)
        opt.zero_grad(set_to_none=True)
        total = None
        for micro in range(grad_accum):
            loss = compute_loss(step, micro)
            (loss / grad_accum if scaler is None else scaler.scale(loss / grad_accum)).backward()
            total = loss.detach() if total is None else total + loss.detach()
        # The step's one read from the device: the loss, checked before the update so a NaN never reaches the
        # generators (a non-finite micro-batch loss makes the sum non-finite too).
        mean = float(total) / grad_accum
        if not math.isfinite(mean):
            raise OFTError(f"the loss became {mean} at step {step + 1}: lower the learning rate or use "
                           "fp32 / bf16 training")
        if scaler is None:
            opt.step()
        else:  # (an overflowed step is skipped inside the fused step, on the device)
            scaler.step(opt)
            scaler.update()
        losses.append(mean)
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


def training_metadata(*, steps: int, lr: float, optimizer: str, seed: int, batch_size: int, grad_accum: int,
                      num_images: int | None = None, dtype: str = "fp32", extra: dict | None = None) -> dict[str, str]:
    """kohya-style `ss_*` metadata of a training run (the writer adds ss_network_module / dim / alpha)."""
    meta = {
        "ss_steps": str(steps), "ss_max_train_steps": str(steps), "ss_learning_rate": repr(float(lr)),
        "ss_unet_lr": repr(float(lr)), "ss_optimizer": optimizer, "ss_seed": str(seed),
        "ss_batch_size_per_device": str(batch_size), "ss_gradient_accumulation_steps": str(grad_accum),
        "ss_mixed_precision": dtype, "ss_training_comment": "comfyui-oft OFTTrainer (input-centric OFT, OFTv2)",
    }
    if num_images is not None:
        meta["ss_num_train_images"] = str(num_images)
    meta.update({str(k): str(v) for k, v in (extra or {}).items()})
    return meta
