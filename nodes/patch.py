"""The one seam into ComfyUI: OFT layers become weight patches of a cloned ModelPatcher / CLIP.

Everything the pack does to a model goes through `apply_oft`: clone, match the adapter's layers onto the model's own
state-dict keys (`oft_core.match_adapter`), then `add_patches` with one `OFTWeightAdapter` per matched weight.
ComfyUI's `comfy.lora.calculate_weight` hands any `WeightAdapterBase` instance its (already narrowed) weight, in
both of its paths:

- full load (`ModelPatcher.patch_weight_to_device`): a float32 copy of the weight, rounded back afterwards;
- low VRAM (`LowVramPatch`, run by `comfy.ops.cast_bias_weight` on every forward of an offloaded layer): the weight
  cast to the layer's compute dtype (fp16 / bf16 stay fp16 / bf16).

The rotation itself is `oft_core.rotate_weight_` (in place, fp32 math whatever the weight's dtype); this file holds
no OFT math.

Per-layer strengths (OFT Block Strength) travel with the adapter as its typed field `adapter.layer_strengths`, a map
{(component, name): multiplier} (`oft_core.blocks`); `apply_oft` multiplies each layer's strength by it, so every
matched weight still gets exactly one strength, applied once (layers at multiplier 0 were already dropped).
"""

from __future__ import annotations

import logging
import os
from collections import Counter

import comfy.weight_adapter
import torch

from ..oft_core import (
    OFTAdapter,
    OFTError,
    build_key_map,
    match_adapter,
    rotate_weight,
    rotate_weight_,
    rotation_blocks,
)
from ..oft_core.blocks import layer_multiplier
from ..oft_core.choices import STRENGTH_MODES
from ..oft_core.errors import check_strength
from ..oft_core.match import MatchReport
from ..oft_core.names import bias_key
from ..oft_core.rotation import adapted_bias, cayley_may_fail
from ..oft_core.spec import TE_COMPONENTS  # (the other node modules import it from here)

log = logging.getLogger(__name__)

UNET_PREFIX = "diffusion_model."
_MAX_CACHED_ROTATIONS = 4  # per layer: a few strengths (e.g. a strength sweep) without growing without bound


class OFTWeightAdapter(comfy.weight_adapter.WeightAdapterBase):
    """One OFT layer as a ComfyUI weight patch (the value of an `add_patches` entry).

    `strength` is ComfyUI's `strength_patch` (the strength given to `add_patches`) and is used exactly once, with the
    strength `mode` of oft_core ("kohya": R_s = I + s(R − I); "orthogonal"). Vanilla ComfyUI's OFT multiplies by it
    twice (its effect is s²); sd-scripts and LyCORIS apply their multiplier once, as here.
    """

    name = "oft"

    def __init__(self, layer, mode: str = "kohya", source: str = "", perm=None):
        self.layer = layer  # an OFTLayer already resolved for its weight (match_adapter did it)
        self.mode = mode
        self.source = source
        # Target.perm: base row i is the adapter's row perm[i] (diffusers' swapped scale/shift halves); the rotation
        # is applied in the adapter's row order
        self.perm = None if perm is None else torch.tensor(perm, dtype=torch.long)
        self.loaded_keys = {layer.key}
        self.weights = list(layer.blocks)
        # (strength, mode, device) -> rotation blocks. ComfyUI's low-VRAM path calls calculate_weight on every
        # forward of an offloaded layer; the blocks (a batched linear solve) depend only on this key, so they are
        # built once and the forward only does the block matmul.
        # They are kept from the second patch at a key on: a weight patched once (a full load) neither pays for R
        # when solving against W is cheaper (large blocks) nor keeps R's memory.
        self._rotations: dict[tuple, list[torch.Tensor]] = {}
        self._patched: set[tuple] = set()

    def _key(self, strength: float, device) -> tuple:
        return float(strength), self.mode, str(torch.device(device))

    def rotation(self, strength: float, device) -> list[torch.Tensor]:
        """`rotation_blocks(layer, strength, mode)` on `device`, cached per (strength, mode, device)."""
        key = self._key(strength, device)
        blocks = self._rotations.get(key)
        if blocks is None:
            blocks = [b.to(device) for b in rotation_blocks(self.layer, float(strength), self.mode)]
            while len(self._rotations) >= _MAX_CACHED_ROTATIONS:
                self._rotations.pop(next(iter(self._rotations)), None)
            self._rotations[key] = blocks
        return blocks

    def calculate_weight(
        self,
        weight,
        key,
        strength,
        strength_model,
        offset,
        function,
        intermediate_dtype=torch.float32,
        original_weight=None,
    ):
        # `weight` is already narrowed to `offset` by comfy.lora.calculate_weight (a view of the fused weight) and
        # already multiplied by strength_model. Exceptions propagate: returning the unpatched weight would make a
        # failure look like a weak adapter (what core's weight_adapter/oft.py does).
        if strength == 0:
            return weight
        if self.perm is not None:
            perm = self.perm.to(weight.device)
            w32 = weight.to(torch.float32)[torch.argsort(perm)]  # the adapter's row order
            rotated = rotate_weight(self.layer, w32, float(strength), self.mode, out_dtype=torch.float32)
            fn = function if function is not None else (lambda d: d)
            weight.copy_((w32 + fn(rotated - w32))[perm])
            return weight
        key = self._key(strength, weight.device)
        blocks = self.rotation(strength, weight.device) if key in self._patched else None
        self._patched.add(key)
        if _is_identity(function, weight):
            # The usual case (ComfyUI passes an identity lambda): rotate in place, chunk by chunk in fp32, rounded
            # once to the weight's dtype (fp16/bf16 in the low-VRAM path). A narrowed slice of a fused q/k/v weight
            # updates its parent.
            return rotate_weight_(self.layer, weight, float(strength), self.mode, blocks=blocks)
        # ComfyUI's convention: `function` maps the change a patch makes (LoRA: function(diff)).
        w32 = weight.to(torch.float32)
        rotated = rotate_weight(self.layer, w32, float(strength), self.mode, out_dtype=torch.float32, blocks=blocks)
        weight.copy_(w32 + function(rotated - w32))
        return weight


class OFTBiasAdapter(comfy.weight_adapter.WeightAdapterBase):
    """A layer's trained bias (PEFT `bias` "oft_only" / "boft_only") as a ComfyUI patch of the base bias: at
    strength s, b + s·(trained − b) (`oft_core.rotation.adapted_bias`), applied once; ComfyUI narrows `weight` to a
    fused bias's slice (`offset`) and keeps the view's changes."""

    name = "oft_bias"

    def __init__(self, layer, perm=None):
        self.layer = layer
        self.perm = perm
        self.loaded_keys = {layer.key}
        self.weights = [layer.bias]

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        new = adapted_bias(self.layer, weight, float(strength), self.perm)
        if _is_identity(function, weight):
            weight.copy_(new)
        else:  # ComfyUI's convention: `function` maps the change a patch makes
            weight.copy_(weight + function(new - weight))
        return weight


def bias_patches(report: MatchReport, strength_of) -> dict[float, dict]:
    """{effective strength: {bias key (with a fused slice's offset): OFTBiasAdapter}} of the matched layers that
    train a bias; `strength_of(layer)` is the strength its weight patch gets."""
    groups: dict[float, dict] = {}
    for m in report.matched:
        if m.layer.bias is not None:
            key = bias_key(m.target.key)
            key = key if m.target.offset is None else (key, tuple(m.target.offset))
            groups.setdefault(float(strength_of(m.layer)), {})[key] = OFTBiasAdapter(m.layer, m.target.perm)
    return groups


def _is_identity(function, weight) -> bool:
    """Whether a patch's `function` returns its input unchanged (tried on an empty slice of the weight's dtype)."""
    if function is None:
        return True
    probe = weight.new_empty(0)
    try:
        return function(probe) is probe
    except Exception:  # a transform that cannot take an empty tensor is not the identity: use the exact path
        return False


# ------------------------------------------------------------------------------------------------ key mapping
def model_shapes(patcher, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Shapes of a ModelPatcher's state dict (no copies: state_dict() returns references)."""
    return {k: tuple(v.shape) for k, v in patcher.model.state_dict().items() if k.startswith(prefix)}


def comfy_key_map(model_or_clip) -> dict:
    """ComfyUI's own LoRA key map of a MODEL (`model_lora_keys_unet`) or a CLIP (`model_lora_keys_clip`).

    It names the layers of every family ComfyUI loads (SD3's diffusers names as row slices of its fused qkv,
    Qwen-Image, HiDream, HunyuanVideo, ...); `oft_core.build_key_map` adds its names beside the pack's own tables.
    A fresh dict is passed: the functions' default `key_map={}` is shared between calls.
    """
    import comfy.lora

    clip_model = getattr(model_or_clip, "cond_stage_model", None)
    if clip_model is not None:
        return comfy.lora.model_lora_keys_clip(clip_model, {})
    return comfy.lora.model_lora_keys_unet(model_or_clip.model, {})


def model_kind(model) -> str:
    """A short name of the loaded model's family, for messages ("SD15", "Flux", ...)."""
    inner = getattr(model, "model", None)
    config = getattr(inner, "model_config", None)
    return type(config).__name__ if config is not None else type(inner).__name__


def base_version(model) -> str:
    """`ss_base_model_version` of the loaded model's family: sd-scripts' names (musubi-tuner's for HunyuanVideo),
    else the family's own name lowercased."""
    kind = model_kind(model).lower()
    return {"sd15": "sd_v1", "sd20": "sd_v2", "sdxl": "sdxl_base_v1-0", "flux": "flux1", "fluxschnell": "flux1",
            "fluxinpaint": "flux1", "hunyuanvideo": "hunyuan_video"}.get(kind, kind)


# Families whose files carry the same layer names and (at full size) shapes: a file of one matches the others' layers
FLUX_NAMED = ("flux1", "chroma", "hunyuan_video", "flux2")


def family_warning(model, adapter: OFTAdapter, report: MatchReport | None) -> str:
    """A warning when a FLUX-named adapter says it was trained on another of those families than the loaded model's
    ("" otherwise): their layers match by name and shape, so it applies, but it was not made for this model."""
    said = str(adapter.metadata.get("ss_base_model_version", "")).lower()
    here = base_version(model)
    if report is None or not report.matched or said not in FLUX_NAMED or here not in FLUX_NAMED or said == here:
        return ""
    return (f"WARNING: this adapter was trained on {said} (its ss_base_model_version) and this is a "
            f"{model_kind(model)} model: applied where the layers match, but it was not made for this model")


def guess_target(adapter: OFTAdapter) -> str:
    """What model an adapter looks made for, from its layer names (for the "nothing matched" message)."""
    names = [layer.name.replace("_", ".") for layer in adapter]
    comps = Counter(layer.component for layer in adapter)

    def share(*needles):
        return sum(any(n in name for n in needles) for name in names)

    guesses = [
        (share("double.blocks", "single.blocks"), "FLUX (BFL layer names: double_blocks / single_blocks)"),
        (share("single.transformer.blocks", "transformer.blocks.") and share("single.transformer.blocks"),
         "FLUX (diffusers layer names: transformer_blocks / single_transformer_blocks)"),
        (share("down.blocks", "up.blocks", "mid.block"), "a UNet with diffusers names (SD1.x / SD2.x)"),
        (share("input.blocks", "output.blocks", "middle.block"), "a UNet with LDM names (SDXL or SD1.x/2.x)"),
        (share("joint.blocks"), "SD3 (joint_blocks)"),
        (share("attn.add.q.proj", "ff.context") and not share("single.transformer.blocks", "img.mlp"),
         "SD3 (diffusers layer names: transformer_blocks.N.attn.add_q_proj / ff_context)"),
        (share("img.mlp", "txt.mlp") and share("transformer.blocks"), "Qwen-Image (transformer_blocks.N.img_mlp)"),
        # before Wan: CLIP's layers are called self_attn.q_proj too
        (share("text.model.", "encoder.layers.", "encoder.block."),
         "a text encoder (CLIP text_model.encoder.layers / T5 encoder.block), named as if it were the diffusion "
         "model's: connect the model's CLIP to OFTLoader or rename its layers"),
        (share("self.attn.q", "attn1.to.q", "ffn.net"), "Wan 2.x (blocks.N.self_attn / attn1)"),
        (share("double.stream.blocks", "single.stream.blocks"), "HiDream (double_stream_blocks)"),
        (share("img.attn.qkv", "img.attn.proj") and share("txt.attn.qkv"), "HunyuanVideo (img_attn_qkv)"),
        (share("layers.") and share("attention.qkv", "feed.forward"), "Lumina 2 (layers.N.attention)"),
    ]
    best = max(guesses, key=lambda g: g[0])
    what = best[1] if best[0] else "an unknown model"
    if comps and set(comps) <= set(TE_COMPONENTS):
        what = "a text encoder only"
    return what


def match_model(adapter: OFTAdapter, model, clip=None) -> tuple[MatchReport | None, MatchReport | None]:
    """Match the adapter's UNet / transformer layers onto `model` and its text-encoder layers onto `clip`.

    Returns (unet report or None when the adapter has no such layer, text-encoder report or None).
    Raises OFTError when a matched layer does not fit its weight (another model of the same family).
    """
    unet_layers = [layer for layer in adapter if layer.component not in TE_COMPONENTS]
    te_layers = [layer for layer in adapter if layer.component in TE_COMPONENTS]
    unet_report = te_report = None
    if unet_layers:
        shapes = model_shapes(model, UNET_PREFIX)
        keymap = build_key_map(shapes, comfy_key_map(model))
        unet_report = match_adapter(adapter, shapes, keymap, components=("unet",),
                                    base_name=f"the loaded {model_kind(model)} model")
    if te_layers and clip is not None:
        shapes = model_shapes(clip.patcher)
        keymap = build_key_map(shapes, comfy_key_map(clip))
        te_report = match_adapter(adapter, shapes, keymap, components=TE_COMPONENTS,
                                  base_name="the loaded CLIP")
    return unet_report, te_report


def _add_patches(patcher, report: MatchReport, adapter: OFTAdapter, strength: float, mode: str) -> list:
    """`add_patches` once per distinct effective strength (strength × the layer's multiplier): ComfyUI stores the
    strength per patch entry, so each weight gets exactly its own strength, applied once by calculate_weight."""
    groups: dict[float, dict] = {}
    for m in report.matched:
        key = m.target.key if m.target.offset is None else (m.target.key, tuple(m.target.offset))
        effective = float(strength) * layer_multiplier(adapter, m.layer)
        groups.setdefault(effective, {})[key] = OFTWeightAdapter(m.layer, mode, adapter.format, m.target.perm)
    accepted = []
    for effective, patches in groups.items():
        accepted += patcher.add_patches(patches, effective)
    return accepted


def _add_bias_patches(patcher, report: MatchReport, adapter: OFTAdapter, strength: float) -> None:
    """The trained biases of the matched layers, in both apply modes (a bias is a vector: bypass rewrites no weight,
    and a bias patch is as exact as the forward's own addition), each at its layer's effective strength."""
    groups = bias_patches(report, lambda layer: float(strength) * layer_multiplier(adapter, layer))
    want = sum(len(patches) for patches in groups.values())
    accepted = [k for effective, patches in groups.items() for k in patcher.add_patches(patches, effective)]
    if len(accepted) != want:  # match_adapter checked every bias key against the model: a bug here if not
        raise OFTError(f"ComfyUI accepted {len(accepted)} of {want} trained biases", path=adapter.path)


def report_text(adapter: OFTAdapter, unet_report, te_report, clip_given: bool, strength: float, mode: str) -> str:
    total = len(adapter)
    applied = sum(len(r.matched) for r in (unet_report, te_report) if r is not None)
    unmatched = [u for r in (unet_report, te_report) if r is not None for u in r.unmatched]
    te_count = sum(1 for layer in adapter if layer.component in TE_COMPONENTS)
    name = os.path.basename(adapter.path) or adapter.format
    line = f"OFT {name}: {applied} of {total} adapter layers applied (strength {strength:g}, mode {mode})"
    if unmatched:
        shown = ", ".join(unmatched[:8]) + (" …" if len(unmatched) > 8 else "")
        line += f"; not found in the model: {len(unmatched)} ({shown})"
    if te_count and not clip_given:
        line += f"; {te_count} text-encoder layers skipped: no CLIP connected"
    return line + ignored_text(adapter) + block_strength_text(adapter)


def ignored_text(adapter: OFTAdapter) -> str:
    """"; N tensors in the file are not OFT and were not applied (KEY, …)" for what the reader left out of the
    adapter (another LyCORIS algorithm's modules in a mixed file, keys of no OFT layer): said, never dropped in
    silence."""
    ignored = adapter.info.get("ignored_keys") or []
    if not ignored:
        return ""
    n = len(ignored)
    return (f"; {n} tensor{'s' if n > 1 else ''} in the file {'are' if n > 1 else 'is'} not OFT and "
            f"{'were' if n > 1 else 'was'} not applied ({ignored[0]}{', …' if n > 1 else ''})")


def block_strength_text(adapter: OFTAdapter) -> str:
    """"; block strength SPEC (N layers off, M scaled)" when an OFT Block Strength node set per-layer strengths."""
    spec = adapter.block_spec
    if spec is None:
        return ""
    off = adapter.layers_off
    scaled = sum(1 for v in adapter.layer_strengths.values() if v != 1)
    return f"; block strength {spec or '(empty)'}: {off} layers off, {scaled} scaled"


APPLY_MODES = ("merge", "bypass")


# ComfyUI's own OFT weight patches: what core Load LoRA makes of a LyCORIS OFT / BOFT file (strength s², see
# COMFYUI_NOTES). Our OFTWeightAdapter is also named "oft", so the check is by class, not by name.
_CORE_OFT = (comfy.weight_adapter.OFTAdapter, comfy.weight_adapter.BOFTAdapter)


def core_oft_warning(patcher, report: MatchReport | None) -> str:
    """A warning when weights this adapter matched already carry ComfyUI's own OFT patch ("" when none do).

    Loading one LyCORIS OFT file through core Load LoRA and through this pack rotates those weights twice (R·R·W).
    Both may be meant (two different adapters), so this warns and still applies.
    """
    if report is None:
        return ""
    patches = getattr(patcher, "patches", {})
    hit = [m.target.key for m in report.matched
           if any(isinstance(p[1], _CORE_OFT) for p in patches.get(m.target.key, ()))]
    if not hit:
        return ""
    hit = sorted(set(hit))
    return (f"WARNING: {len(hit)} of these weights already carry ComfyUI's own OFT patch (a Load LoRA node loaded an "
            f"OFT file), e.g. {hit[0]}: they are rotated twice. If it is the same file, load it through one node only")


def apply_oft(model, clip, adapter: OFTAdapter, strength: float, mode: str = "kohya", apply_mode: str = "merge"):
    """Patch clones of `model` (and `clip` when the adapter has text-encoder layers) with `adapter`.

    `apply_mode` "merge": weight patches (the rotated weight computed when ComfyUI loads the model); "bypass": the
    activations rotated in the forward, no weight touched (nodes/bypass.py). Same strength, modes and per-layer
    strengths in both.
    Returns (model, clip, report text). `clip` is returned as given (same object) when the adapter has no
    text-encoder layer or no CLIP was given. The inputs are never modified; on any error nothing is patched.
    Raises OFTError when no layer of the adapter matches the model, or one does not fit its weight.
    """
    strength = _checked_request(adapter, strength, mode, apply_mode)
    if len(adapter) == 0 and adapter.block_spec is not None:
        # every layer switched off by a block-strength spec: a valid request whose answer is the unchanged model
        name = os.path.basename(adapter.path) or adapter.format
        text = f"OFT {name}: no layer applied" + block_strength_text(adapter)
        log.info("%s", text)
        return model.clone(), clip, text
    unet_report, te_report = match_model(adapter, model, clip)
    if not any(r is not None and r.matched for r in (unet_report, te_report)):
        raise _nothing_matched(adapter, model, clip)
    check_rotations(adapter, [m.layer for r in (unet_report, te_report) if r is not None for m in r.matched],
                    lambda layer: strength, mode)
    text = report_text(adapter, unet_report, te_report, clip is not None, strength, mode)
    if apply_mode == "bypass":
        text = text.replace(f", mode {mode})", f", mode {mode}, bypass)", 1)
    for warning in (core_oft_warning(model, unet_report),
                    core_oft_warning(clip.patcher if clip is not None else None, te_report),
                    family_warning(model, adapter, unet_report)):
        if warning:
            log.warning("OFT %s: %s", os.path.basename(adapter.path) or adapter.format, warning)
            text += "\n" + warning
    new_model = model.clone()
    if unet_report is not None and unet_report.matched:
        _patch(new_model, unet_report, adapter, strength, mode, apply_mode)
    new_clip = clip
    if te_report is not None and te_report.matched:
        new_clip = clip.clone()
        _patch(new_clip, te_report, adapter, strength, mode, apply_mode)
    log.info("%s", text)
    return new_model, new_clip, text


def _checked_request(adapter: OFTAdapter, strength: float, mode: str, apply_mode: str) -> float:
    """The strength (and every layer's strength × block multiplier), the strength mode and the apply mode checked
    before any work; returns the strength as a float."""
    if mode not in STRENGTH_MODES:
        raise OFTError(f"strength mode: expected {' or '.join(STRENGTH_MODES)}, found {mode!r}", path=adapter.path)
    # NaN passes ComfyUI's min/max check (every comparison with NaN is false): the one strength check of oft_core
    strength = check_strength(strength, path=adapter.path or None)
    for (_component, name), m in adapter.layer_strengths.items():
        check_strength(strength * m, f"strength {strength:g} × block multiplier {m:g} of layer {name!r}",
                       path=adapter.path or None)
    if apply_mode not in APPLY_MODES:
        raise OFTError(f"apply mode: expected {' or '.join(APPLY_MODES)}, found {apply_mode!r}", path=adapter.path)
    return strength


def check_rotations(adapter: OFTAdapter, layers, strength_of, mode: str) -> None:
    """The rotations a strength can break, built once now so that the error comes from the node, before any patch
    or hook exists (ComfyUI builds the patched weights later, while sampling): Cayley–Neumann series (they can
    overflow float32 at a strength) and stored matrices (no orthogonal power for a half turn or a non-rotation).
    The Cayley map is a rotation at every strength: not built here, except where float32 cannot build it (a damaged
    file's huge unconstrained generators, `cayley_may_fail`). `strength_of(layer)`: the node's strength for it
    (times the layer's block multiplier, applied here)."""
    for layer in layers:
        s = float(strength_of(layer)) * layer_multiplier(adapter, layer)
        if s == 0 or (layer.parameterization == "cayley" and not cayley_may_fail(layer, s, mode)):
            continue
        try:
            rotation_blocks(layer, s, mode)
        except OFTError as e:
            raise OFTError(e.detail, path=adapter.path or None, layer=e.layer) from e


def _nothing_matched(adapter: OFTAdapter, model, clip) -> OFTError:
    """The error when no layer of the adapter matches the model (or its CLIP): what is missing, what it is for."""
    te_only = all(layer.component in TE_COMPONENTS for layer in adapter)
    if te_only and clip is None:
        return OFTError("this adapter only has text-encoder layers and no CLIP is connected: connect the CLIP",
                        path=adapter.path)
    return OFTError(
        f"none of its {len(adapter)} layers matches the loaded {model_kind(model)} model"
        f"{'' if clip is None else ' or its CLIP'}: it looks made for {guess_target(adapter)}"
        f" (first layers: {', '.join(layer.key for layer in list(adapter)[:3])})",
        path=adapter.path,
    )


def _patch(patcher, report: MatchReport, adapter: OFTAdapter, strength: float, mode: str, apply_mode: str) -> None:
    if apply_mode == "bypass":
        from .bypass import add_bypass

        try:
            target = getattr(patcher, "patcher", patcher)  # a CLIP: its ModelPatcher
            add_bypass(target, report.matched, lambda layer: float(strength) * layer_multiplier(adapter, layer), mode)
        except OFTError as e:
            raise OFTError(e.detail, path=adapter.path, layer=e.layer) from e
    else:
        accepted = _add_patches(patcher, report, adapter, strength, mode)
        _check_accepted(accepted, report, adapter)
    _add_bias_patches(patcher, report, adapter, strength)


def _check_accepted(accepted, report: MatchReport, adapter: OFTAdapter) -> None:
    # add_patches silently skips keys absent from the model; the map was built from the same keys, so a difference
    # is a bug here, not a user error. Fail loudly rather than report layers as applied that are not.
    if len(accepted) != len(report.matched):
        raise OFTError(f"ComfyUI accepted {len(accepted)} of {len(report.matched)} matched weights", path=adapter.path)
