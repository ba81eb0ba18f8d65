"""Adapter layer names -> weights of a base model state dict.

Adapter readers strip their own prefix (`oft_unet_`, `lycoris_`, `lora_te1_`, `base_model.model.`, ...) and hand us a
module path, either dotted (PEFT) or with every "." replaced by "_" (kohya, LyCORIS). The "_" form cannot be turned
back into dots by string rules (`transformer_blocks_0` vs `transformer.blocks.0`), so the map is built the other way
round: every base weight gets all the names an adapter may use for it, in both spellings, and a lookup is one dict
access.

| base keys (`architecture`)               | adapter names accepted                 | example                          |
|------------------------------------------|----------------------------------------|----------------------------------|
| SD UNet, LDM (`sd_unet_ldm`), under      | LDM (kohya SDXL), identity             | `input_blocks.4.1.proj_in`       |
| `model.diffusion_model.` (checkpoint),   | diffusers (kohya/LyCORIS SD1/2, PEFT), | `down_blocks.1.attentions.0.X`   |
| `diffusion_model.` (ComfyUI) or nothing  | converted with L (table below)         | -> `input_blocks.4.1.X`          |
| SD UNet, diffusers (`sd_unet_diffusers`) | diffusers, identity (no LDM names)     | `down_blocks.0.attentions.0.X`   |
| FLUX.1, BFL (`flux`), same prefixes      | BFL (kohya), identity                  | `double_blocks.0.img_attn.qkv`   |
|                                          | diffusers (LyCORIS/PEFT): a row slice  | `transformer_blocks.0.attn.to_k` |
|                                          | `(0, start, length)` of a fused weight | -> `img_attn.qkv`, (0, h, h)     |
| HunyuanVideo (`flux`: FLUX's blocks)     | as FLUX.1, and the text token refiner  | `context_embedder.token_refiner` |
|                                          | (`txt_in`) in diffusers' names         | `.refiner_blocks.0.attn.to_k` -> |
|                                          |                                        | `txt_in.individual_token_refiner`|
|                                          |                                        | `.blocks.0.self_attn.qkv` slice  |
| FLUX.1, diffusers (`flux_diffusers`)     | diffusers, identity                    |                                  |
| Wan 2.x, original names (`wan`)          | original (musubi-tuner), identity;     | `blocks.0.self_attn.q`           |
|                                          | diffusers (SimpleTuner LyCORIS, PEFT)  | `blocks.0.attn1.to_q` (1:1)      |
| CLIP-L/H (`text_encoder` if no model):   | HF CLIP names, component te or te1     | `text_model.encoder.layers.0.X`  |
| `cond_stage_model.transformer.` (SD1),   |                                        |                                  |
| `conditioner.embedders.0.transformer.`   |                                        |                                  |
| (SDXL), `clip_l.transformer.`,           |                                        |                                  |
| `clip_h.transformer.` (ComfyUI), or bare |                                        |                                  |
| `text_model.X` (a lone CLIP file)        |                                        |                                  |
| CLIP-G: `clip_g.transformer.`,           | HF CLIP names, component te2 (SDXL     | same                             |
| `conditioner.embedders.1.model.`         | checkpoints use open_clip names there: |                                  |
|                                          | those stay unmatched, never guessed)   |                                  |

Diffusers -> LDM UNet names (L = layers_per_block: a down level has L resnets, an up level L+1; LDM numbers the
blocks consecutively, the down-sampler being one extra block after every down level but the last):

| diffusers                                        | LDM                                                          |
|--------------------------------------------------|--------------------------------------------------------------|
| `conv_in`, `conv_norm_out`, `conv_out`           | `input_blocks.0.0`, `out.0`, `out.2`                         |
| `time_embedding.linear_1/2`                      | `time_embed.0/2`                                             |
| `add_embedding.linear_1/2` (SDXL)                | `label_emb.0.0/2`                                            |
| `down_blocks.x.resnets.j` / `.attentions.j`      | `input_blocks.{x(L+1)+j+1}.0` / `.1`                         |
| `down_blocks.x.downsamplers.0.conv`              | `input_blocks.{x(L+1)+L+1}.0.op`                             |
| `mid_block.resnets.0` / `.attentions.0` / `.resnets.1` | `middle_block.0` / `.1` / `.2`                         |
| `up_blocks.x.resnets.i` / `.attentions.i`        | `output_blocks.{x(L+1)+i}.0` / `.1`                          |
| `up_blocks.x.upsamplers.0.conv`                  | `output_blocks.{x(L+1)+L}.1.conv` (`.2.conv` after attention)|
| resnet `norm1`, `conv1`, `time_emb_proj`,        | `in_layers.0`, `in_layers.2`, `emb_layers.1`,                |
| `norm2`, `conv2`, `conv_shortcut`                | `out_layers.0`, `out_layers.3`, `skip_connection`            |
| attention `norm`, `proj_in`, `proj_out`, `transformer_blocks.*` | unchanged                                     |

Only `.weight` tensors are targets. A name that two different weights share (in either spelling) resolves to
nothing and is listed by `KeyMap.ambiguous()`: a silent guess would rotate the wrong weight.

Every other family (SD3.5, Qwen-Image, Wan, HiDream, Chroma, Lumina, HunyuanVideo, AuraFlow, PixArt, ...) is named by
the host's own LoRA key map, handed in as `build_key_map(shapes, external=...)`: a plain dict {adapter key: base key
or (base key, offset) or (base key, offset, function)}, which the ComfyUI nodes take from
`comfy.lora.model_lora_keys_unet` / `model_lora_keys_clip` (this module never imports ComfyUI). Each adapter key's
prefix says its component (`_EXTERNAL_PREFIXES`); the rest is a name in the dotted or underscored spelling as above,
with the map's fused-weight offsets (SD3's `transformer_blocks.N.attn.to_q` is a row slice of ComfyUI's
`joint_blocks.N.x_block.attn.qkv`). The pack's own tables win where both name a layer (they are exact for kohya's
names). An external entry with a `function` is kept only when the function is a pure row permutation (FLUX's and
SD3's `norm_out.linear`, whose scale/shift halves diffusers stores swapped): its `Target.perm` says how the adapter's
rows sit in the base weight, and the patch rotates in the adapter's row order (exact for either rotated side).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from .spec import _COMPONENTS

log = logging.getLogger(__name__)

_UNET_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

# Base-key prefix -> the adapter components whose (HF CLIP) names live below it. First match wins.
_TE_PREFIXES = (
    ("cond_stage_model.transformer.", ("te", "te1")),  # SD1.x checkpoint
    ("conditioner.embedders.0.transformer.", ("te", "te1")),  # SDXL checkpoint, CLIP-L
    ("conditioner.embedders.1.model.", ("te2",)),  # SDXL checkpoint, CLIP-G in open_clip names (rarely HF names)
    ("clip_l.transformer.", ("te", "te1")),  # ComfyUI CLIP state dicts
    ("clip_h.transformer.", ("te", "te1")),
    ("clip_g.transformer.", ("te2",)),
)
# A ComfyUI CLIP state dict holds each encoder under `<its name>.transformer.`
_HOST_ENCODER = re.compile(r"[A-Za-z0-9_]+\.transformer\.")

# Adapter-key prefixes of a host key map (ComfyUI's model_lora_keys_unet / model_lora_keys_clip) -> the component
# they name; None: not an adapter name (ComfyUI's generic `text_encoders.<CLIP key>`). Keys with no listed prefix are
# the model's own module paths (`transformer_blocks.0.attn.to_q` for Qwen-Image, diffusers UNet paths): "unet".
_EXTERNAL_PREFIXES = (
    ("lycoris_", "unet"), ("lora_unet_", "unet"), ("lora_transformer_", "unet"), ("transformer.", "unet"),
    ("base_model.model.", "unet"), ("diffusion_model.", "unet"), ("unet.", "unet"),
    ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te"), ("text_encoder_2.", "te2"),
    ("text_encoder.", "te"), ("text_encoders.", None), ("lora_te3_", None), ("lora_prior_", None),
)

_RESNET = {  # LDM ResBlock child -> diffusers ResnetBlock2D child
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}
_UNET_TOP = {  # LDM -> diffusers names outside the numbered blocks
    "input_blocks.0.0": ("conv_in",), "out.0": ("conv_norm_out",), "out.2": ("conv_out",),
    "time_embed.0": ("time_embedding.linear_1",), "time_embed.2": ("time_embedding.linear_2",),
    # SDXL's label_emb is `add_embedding` in diffusers SDXL and `class_embedding` in class-conditioned UNets.
    "label_emb.0.0": ("add_embedding.linear_1", "class_embedding.linear_1"),
    "label_emb.0.2": ("add_embedding.linear_2", "class_embedding.linear_2"),
}
_FLUX_DOUBLE = {  # BFL double-block child -> diffusers `transformer_blocks.N` child (whole tensors)
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
}
_FLUX_SINGLE = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
_FLUX_TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    # Not `final_layer.adaLN_modulation.1` <- `norm_out.linear`: diffusers stores its two halves swapped (a row
    # permutation, not a slice), so an output-side rotation trained on one cannot be applied to the other.
    # HunyuanVideo's text token refiner (ComfyUI's `txt_in`, a module there, not FLUX's Linear), as diffusers'
    # HunyuanVideoTokenRefiner (`context_embedder`) names it: its blocks below in `_HUNYUAN_REFINER_BLOCK`
    "txt_in.input_embedder": "context_embedder.proj_in",
    "txt_in.t_embedder.in_layer": "context_embedder.time_text_embed.timestep_embedder.linear_1",
    "txt_in.t_embedder.out_layer": "context_embedder.time_text_embed.timestep_embedder.linear_2",
    "txt_in.c_embedder.in_layer": "context_embedder.time_text_embed.text_embedder.linear_1",
    "txt_in.c_embedder.out_layer": "context_embedder.time_text_embed.text_embedder.linear_2",
}
# HunyuanVideo refiner block child (ComfyUI's `txt_in.individual_token_refiner.blocks.N`) -> diffusers'
# `context_embedder.token_refiner.refiner_blocks.N` child, whole tensors; the fused `self_attn.qkv` is sliced into
# `attn.to_q` / `to_k` / `to_v` like FLUX's. `norm_out.linear` keeps the halves' order (gate_msa, gate_mlp on both
# sides), unlike the final layer's.
_HUNYUAN_REFINER_BLOCK = {
    "self_attn.proj": "attn.to_out.0", "mlp.0": "ff.net.0.proj", "mlp.2": "ff.net.2",
    "adaLN_modulation.1": "norm_out.linear",
}
_HUNYUAN_REFINER = re.compile(r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.(.+)")

# Wan 2.x: ComfyUI (and musubi-tuner / diffusion-pipe) use the original Wan names, diffusers' WanTransformer3DModel
# (SimpleTuner's LyCORIS, PEFT) renames them one to one (diffusers scripts/convert_wan_to_diffusers.py; no fused or
# permuted weight). ComfyUI 0.3.64 has no map for the diffusers names, so the pack carries this one.
_WAN_BLOCK = {  # original block child -> diffusers `blocks.N` child (weights with OFT-able shapes only)
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}
_WAN_TOP = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "head.head": "proj_out",
}
_WAN_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")

_INPUT = re.compile(r"input_blocks\.(\d+)\.([01])\.(.+)")
_MIDDLE = re.compile(r"middle_block\.([012])\.(.+)")
_OUTPUT = re.compile(r"output_blocks\.(\d+)\.([012])\.(.+)")
_FLUX_BLOCK = re.compile(r"(double|single)_blocks\.(\d+)\.(.+)")


@dataclass(frozen=True)
class Target:
    key: str  # full base key of the WEIGHT tensor
    offset: tuple[int, int, int] | None = None  # (dim, start, length) slice of a fused weight; None = whole tensor
    # rows of the adapter's module in the base weight's order: base row i = adapter row perm[i] (e.g. FLUX / SD3
    # `norm_out.linear`, whose scale and shift halves diffusers stores swapped); None = same order
    perm: tuple[int, ...] | None = None


def bias_key(weight_key: str) -> str:
    """The base key of a layer's bias, from its weight's (`<module>.weight` -> `<module>.bias`)."""
    return weight_key[: -len("weight")] + "bias" if weight_key.endswith("weight") else weight_key + ".bias"


_SHARED = object()  # marks a name claimed by two different targets


class KeyMap:
    """Name -> `Target` tables per component, in both spellings. Build with `build_key_map`."""

    def __init__(self, architecture: str, layers_per_block: int | None, names: dict[str, dict[str, object]],
                 external: int = 0):
        self.architecture = architecture
        self.layers_per_block = layers_per_block  # LDM UNet only: the L used for diffusers names (None: not known)
        self.external = external  # how many names came from a host key map (build_key_map(external=...))
        self._dotted: dict[str, dict[str, object]] = {}
        self._underscored: dict[str, dict[str, object]] = {}
        self._ambiguous: set[str] = set()
        for component, table in names.items():
            under: dict[str, object] = {}
            for name, target in table.items():
                flat = name.replace(".", "_")
                if target is _SHARED or under.get(flat, target) != target:
                    under[flat] = _SHARED
                    self._ambiguous.add(flat)
                else:
                    under[flat] = target
            self._dotted[component], self._underscored[component] = table, under

    def lookup(self, path: str, component: str = "unet") -> Target | None:
        # A path with a dot is dotted and must match exactly; one without is (or may be) underscored, and
        # underscoring every base name covers both readings.
        table = (self._dotted if "." in path else self._underscored).get(component, {})
        target = table.get(path)
        if target is _SHARED:
            # reported once, in the match report (match.py), not per lookup
            log.debug("%s name %r fits more than one weight of the base model; not applied", component, path)
            return None
        return target

    def ambiguous(self) -> set[str]:
        """Underscored names that two different base weights share (never resolved)."""
        return set(self._ambiguous)

    def __repr__(self) -> str:
        sizes = {c: len(t) for c, t in self._dotted.items() if t}
        return (f"KeyMap({self.architecture}, layers_per_block={self.layers_per_block}, names={sizes}, "
                f"external={self.external})")


def _external_names(external: Mapping[str, object],
                   shapes: Mapping[str, Sequence[int]]) -> list[tuple[str, str, Target]]:
    """(component, name, Target) of every usable entry of a host key map (see the module docstring).

    Entries whose base key is not a `.weight` of `shapes`, whose offset is malformed or lies outside the weight, or
    that carry a `function`, are left out.
    """
    out = []
    for adapter_key, value in external.items():
        named = _external_name(adapter_key)
        target = _external_target(value, shapes) if named is not None else None
        if target is not None:
            out.append((*named, target))
    return out


def _external_name(adapter_key) -> tuple[str, str] | None:
    """(component, layer name) of a host key-map key by its prefix (none: the UNet); None when it names nothing."""
    if not isinstance(adapter_key, str):
        return None
    component, name = "unet", adapter_key
    for prefix, comp in _EXTERNAL_PREFIXES:
        if adapter_key.startswith(prefix):
            component, name = comp, adapter_key[len(prefix):]
            break
    if component is None or not name:
        return None
    return component, name


def _external_target(value, shapes: Mapping[str, Sequence[int]]) -> Target | None:
    """The Target a host key-map value names: a base key, or (key, offset[, function]); None when unusable."""
    if isinstance(value, str):
        return _checked_target(value, None, shapes)
    if not (isinstance(value, (tuple, list)) and value and isinstance(value[0], str)):
        return None
    key = value[0]
    off = value[1] if len(value) > 1 else None
    if len(value) > 2 and value[2] is not None:
        shape = shapes.get(key)
        perm = None if shape is None or off is not None else _row_permutation(value[2], tuple(shape))
        if perm is None:
            return None  # a transform that is not a pure row permutation: nothing a rotation can act through
        if perm != tuple(range(len(perm))) and key.endswith(".weight"):
            return Target(key, None, perm)
    if off is None:
        return _checked_target(key, None, shapes)
    if not (isinstance(off, (tuple, list)) and len(off) == 3 and all(isinstance(x, int) for x in off)):
        return None
    return _checked_target(key, tuple(int(x) for x in off), shapes)


def _checked_target(key: str, offset: tuple[int, int, int] | None,
                    shapes: Mapping[str, Sequence[int]]) -> Target | None:
    """Target(key, offset) when `key` is a `.weight` of `shapes` and the offset lies inside it (an offset covering
    the whole weight is dropped: the same target as the unsliced name); else None."""
    shape = shapes.get(key)
    if shape is None or not key.endswith(".weight"):
        return None
    if offset is not None:
        dim, start, length = offset
        if not (0 <= dim < len(shape) and start >= 0 and length > 0 and start + length <= shape[dim]):
            return None
        if (start, length) == (0, shape[dim]):
            offset = None  # the whole weight: the same target as the unsliced name
    return Target(key, offset)


def _row_permutation(function, shape: tuple) -> tuple[int, ...] | None:
    """The row permutation `function` applies to a weight of `shape` (probed on row indices), or None when it is
    anything else (or fails). ComfyUI's map uses such functions for weights whose halves diffusers stores swapped."""
    import torch

    if not shape:
        return None
    rows = shape[0]
    probe = torch.arange(rows, dtype=torch.float64).reshape((rows,) + (1,) * (len(shape) - 1))
    try:
        out = function(probe.clone())
    except Exception:  # not a function of the rows alone: not a permutation we can use
        return None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(probe.shape):
        return None
    perm = out.reshape(rows)
    if not torch.equal(perm, perm.round()) or sorted(perm.long().tolist()) != list(range(rows)):
        return None
    return tuple(int(i) for i in perm.long().tolist())


def build_key_map(shapes: Mapping[str, Sequence[int]], external: Mapping[str, object] | None = None) -> KeyMap:
    """Every name an adapter may use for each `.weight` of `shapes` (base key -> shape; no tensors needed).

    `external`: a host key map (ComfyUI's `model_lora_keys_unet` / `model_lora_keys_clip`), adding the names of
    families the pack's own tables do not know; the pack's tables win where both name the same thing.
    """
    weights = {k[: -len(".weight")]: (k, tuple(s)) for k, s in shapes.items() if k.endswith(".weight")}
    names: dict[str, dict[str, object]] = {c: {} for c in _COMPONENTS}
    unet = _split_weights(weights, any(k.startswith(_UNET_PREFIXES) for k in shapes), names)
    rels = [rel for rel, _, _ in unet]
    architecture = _architecture(rels, any(names[c] for c in ("te", "te1", "te2")))
    layers = _ldm_layers_per_block(rels) if architecture == "sd_unet_ldm" else None
    if architecture == "sd_unet_ldm" and layers is None:
        log.warning("cannot tell the UNet's layers_per_block from its keys; diffusers-named adapter layers will "
                    "not match this LDM base")
    for rel, key, shape in unet:
        _add(names, "unet", rel, Target(key))
        for alias, target in _unet_aliases(architecture, layers, rel, key, shape):
            _add(names, "unet", alias, target)
    added = _add_external(names, external, shapes) if external else 0
    keymap = KeyMap(architecture, layers, names, added)
    log.debug("%r from %d base weights; %d ambiguous names", keymap, len(weights), len(keymap.ambiguous()))
    return keymap


def _add(names: dict[str, dict[str, object]], component: str, name: str, target: Target) -> None:
    """`name` -> `target` in the component's table; a name two different weights claim becomes `_SHARED`."""
    table = names[component]
    table[name] = target if table.get(name, target) == target else _SHARED


def _split_weights(weights: Mapping[str, tuple], prefixed: bool,
                   names: dict[str, dict[str, object]]) -> list[tuple[str, str, tuple]]:
    """Text-encoder weights added to `names` under their own paths; returns the UNet / DiT ones as (module path
    below the UNet/DiT prefix, key, shape). `prefixed`: the file has UNet prefixes (else a bare UNet / DiT file)."""
    unet: list[tuple[str, str, tuple]] = []
    hosts = False
    for module, (key, shape) in weights.items():
        te = next(((module[len(p):], cs) for p, cs in _TE_PREFIXES if module.startswith(p)), None)
        if te is None and module.startswith("text_model."):  # a bare HF CLIPTextModel file (SD1 te / SDXL te1)
            te = (module, ("te", "te1"))
        if te is not None:
            for component in te[1]:
                _add(names, component, te[0], Target(key))
            continue
        host = _HOST_ENCODER.match(module) if not prefixed else None
        if host is not None:
            # a ComfyUI CLIP's other encoders (`t5xxl.transformer.`, `llama.transformer.`, `qwen25_7b.transformer.`):
            # "te" names them by their whole path, as OneTrainer's COMFY output does (`text_encoders.` + the path),
            # and every text-encoder component by their HF path, as its positional names do (FLUX's T5 is its
            # `lora_te2_` / `text_encoder_2.`, Chroma's its `lora_te1_`, SD3's `lora_te3_`, Qwen's `lora_te_`): no
            # CLIP path (`text_model.…`) is one of theirs; two encoders with one path make it ambiguous, never applied
            _add(names, "te", module, Target(key))
            for component in ("te", "te1", "te2"):
                _add(names, component, module[host.end():], Target(key))
            hosts = True
        rel = next((module[len(p):] for p in _UNET_PREFIXES if module.startswith(p)), None)
        if rel is None and not prefixed:  # a bare UNet / DiT file: everything else is the model
            rel = module
        if rel is not None:
            unet.append((rel, key, shape))
    if hosts and not any(m.startswith("clip_g.transformer.") for m in weights):
        # CLIP-L beside another encoder and no CLIP-G (HunyuanVideo: Llama, CLIP-L): OneTrainer numbers it second
        # (`lora_te2_` / `text_encoder_2.`), where the pack's own second CLIP is CLIP-G, absent here
        for module, (key, _shape) in weights.items():
            if module.startswith("clip_l.transformer."):
                _add(names, "te2", module[len("clip_l.transformer."):], Target(key))
    return unet


def _unet_aliases(architecture: str, layers, rel: str, key: str, shape: tuple):
    """The other names (diffusers) of the UNet / DiT weight `key` at module path `rel`, with their targets."""
    if architecture == "sd_unet_ldm" and layers is not None:
        return [(alias, Target(key)) for alias in _ldm_to_diffusers(rel, layers)]
    if architecture == "flux":
        return [(alias, Target(key, offset)) for alias, offset in _flux_to_diffusers(rel, shape)]
    if architecture == "wan":
        alias = _wan_to_diffusers(rel)
        return [] if alias is None else [(alias, Target(key))]
    return []


def _add_external(names: dict[str, dict[str, object]], external: Mapping[str, object],
                  shapes: Mapping[str, Sequence[int]]) -> int:
    """The host key map's names the pack's tables lack, added; returns how many. The pack's own names win."""
    own = {c: set(t) for c, t in names.items()}
    disagree = []
    added = 0
    for component, name, target in _external_names(external, shapes):
        if component not in names:
            continue
        if name in own[component]:
            if names[component][name] != target:
                disagree.append(name)
            continue
        _add(names, component, name, target)
        added += 1
    if disagree:
        log.debug("the host key map names %d layers differently from the pack's own tables (kept the pack's): "
                  "%s", len(disagree), disagree[:5])
    return added


def _architecture(rels: list[str], has_te: bool) -> str:
    heads = {rel.split(".", 1)[0] for rel in rels}
    if heads & {"double_blocks", "single_blocks"}:
        return "flux"
    if heads & {"input_blocks", "middle_block", "output_blocks"}:
        return "sd_unet_ldm"
    if heads & {"down_blocks", "mid_block", "up_blocks"}:
        return "sd_unet_diffusers"
    if "single_transformer_blocks" in heads:
        return "flux_diffusers"
    if "blocks" in heads and any(rel.endswith(".self_attn.q") for rel in rels) and "head.head" in rels:
        return "wan"
    return "text_encoder" if has_te else "unknown"


def _ldm_layers_per_block(rels: list[str]) -> int | None:
    """L from the LDM block numbering, or None when the keys do not tell it.

    Where L+1 divides the numbers: a down-sampler sits at input n with n % (L+1) == 0, an up-sampler at output n
    with (n+1) % (L+1) == 0, and no input resnet/attention sits on a down-sampler's number. The SD1/SD2/SDXL value 2
    is taken whenever the keys allow it (only L = 2 allows it in a full state dict, and a partial one, e.g. attention
    weights only, usually shows nothing else); any other L needs the whole first level in sight: blocks 1..L, then
    the down-sampler at L+1. Anything less would be a guess, and a wrong L silently maps layers onto wrong weights.
    """
    down, up, blocks = set(), set(), set()
    for rel in rels:
        if m := _INPUT.fullmatch(rel):
            n = int(m[1])
            if m[2] == "0" and m[3] == "op":
                down.add(n)
            elif n:
                blocks.add(n)
        elif (m := _OUTPUT.fullmatch(rel)) and m[2] != "0" and m[3] == "conv":
            up.add(int(m[1]))

    def fits(L: int) -> bool:
        return (all(n % (L + 1) == 0 for n in down) and all((n + 1) % (L + 1) == 0 for n in up)
                and all(n % (L + 1) for n in blocks))

    if fits(2):
        return 2
    L = min(down, default=0) - 1
    return L if L >= 1 and blocks.issuperset(range(1, L + 1)) and fits(L) else None


def _ldm_to_diffusers(rel: str, L: int) -> tuple[str, ...]:
    """Diffusers names of the LDM module `rel` (no `.weight`), for layers_per_block L; () if it has none."""
    if rel in _UNET_TOP:
        return _UNET_TOP[rel]
    if m := _INPUT.fullmatch(rel):
        n, part, rest = int(m[1]), m[2], m[3]
        if n == 0:
            return ()
        x, j = divmod(n - 1, L + 1)
        if j == L:  # the down-sampler slot
            return (f"down_blocks.{x}.downsamplers.0.conv",) if (part, rest) == ("0", "op") else ()
        return _block_child(f"down_blocks.{x}", j, part, rest)
    if m := _MIDDLE.fullmatch(rel):
        k, rest = int(m[1]), m[2]
        return _block_child("mid_block", k // 2, "0", rest) if k != 1 else _block_child("mid_block", 0, "1", rest)
    if m := _OUTPUT.fullmatch(rel):
        n, part, rest = int(m[1]), m[2], m[3]
        x, i = divmod(n, L + 1)
        if part != "0" and rest == "conv":  # the up-sampler: `.1.conv`, or `.2.conv` after an attention
            return (f"up_blocks.{x}.upsamplers.0.conv",) if i == L else ()
        return _block_child(f"up_blocks.{x}", i, part, rest) if part != "2" else ()
    return ()


def _block_child(block: str, index: int, part: str, rest: str) -> tuple[str, ...]:
    if part == "0":
        return (f"{block}.resnets.{index}.{_RESNET[rest]}",) if rest in _RESNET else ()
    return (f"{block}.attentions.{index}.{rest}",)


def _flux_to_diffusers(rel: str, shape: tuple) -> list[tuple[str, tuple[int, int, int] | None]]:
    """Diffusers names (with their row slice) of the BFL FLUX weight `rel`, sizes taken from its shape."""
    if rel in _FLUX_TOP:
        return [(_FLUX_TOP[rel], None)]
    # Fused projections are Linear(h, ...): the input width is the hidden size h.
    h = shape[1] if len(shape) == 2 else 0
    if m := _HUNYUAN_REFINER.fullmatch(rel):
        block, child = f"context_embedder.token_refiner.refiner_blocks.{m[1]}", m[2]
        if child == "self_attn.qkv":
            if not h or shape[0] != 3 * h:
                return []
            return [(f"{block}.attn.{p}", (0, i * h, h)) for i, p in enumerate(("to_q", "to_k", "to_v"))]
        return [(f"{block}.{_HUNYUAN_REFINER_BLOCK[child]}", None)] if child in _HUNYUAN_REFINER_BLOCK else []
    m = _FLUX_BLOCK.fullmatch(rel)
    if not m:
        return []
    kind, n, child = m[1], m[2], m[3]
    if kind == "double":
        block = f"transformer_blocks.{n}"
        if child in ("img_attn.qkv", "txt_attn.qkv"):
            if not h or shape[0] != 3 * h:
                return []
            parts = ("to_q", "to_k", "to_v") if child[0] == "i" else ("add_q_proj", "add_k_proj", "add_v_proj")
            return [(f"{block}.attn.{p}", (0, i * h, h)) for i, p in enumerate(parts)]
        return [(f"{block}.{_FLUX_DOUBLE[child]}", None)] if child in _FLUX_DOUBLE else []
    block = f"single_transformer_blocks.{n}"
    if child == "linear1":  # rows: q | k | v | mlp-in
        if not h or shape[0] <= 3 * h:
            return []
        qkv = [(f"{block}.attn.{p}", (0, i * h, h)) for i, p in enumerate(("to_q", "to_k", "to_v"))]
        return qkv + [(f"{block}.proj_mlp", (0, 3 * h, shape[0] - 3 * h))]
    return [(f"{block}.{_FLUX_SINGLE[child]}", None)] if child in _FLUX_SINGLE else []


def _wan_to_diffusers(rel: str) -> str | None:
    """The diffusers WanTransformer3DModel name of the original Wan weight `rel`, or None."""
    if rel in _WAN_TOP:
        return _WAN_TOP[rel]
    m = _WAN_BLOCK_RE.fullmatch(rel)
    if m and m[2] in _WAN_BLOCK:
        return f"blocks.{m[1]}.{_WAN_BLOCK[m[2]]}"
    return None


# ------------------------------------------------------------------------------------------------ reverse map
def _ldm_to_diffusers_names(shapes: Mapping[str, Sequence[int]] | Sequence[str]) -> dict[str, str]:
    """LDM UNet module path -> its diffusers module path, for every module of `shapes` that has one.

    `shapes` is what `build_key_map` takes (base key -> shape, or just the keys; prefixes `model.diffusion_model.` /
    `diffusion_model.` or none; `.weight` / `.bias` keys). The result is keyed and valued by module paths without
    prefix or tensor suffix (`input_blocks.1.1.proj_in` -> `down_blocks.0.attentions.0.proj_in`).

    Built from the same tables and the same layers_per_block rule as the forward map (`_ldm_to_diffusers`), so
    `build_key_map(shapes).lookup(_ldm_to_diffusers_names(shapes)[m])` is always module m's weight. Where the forward
    map accepts two diffusers spellings (`label_emb` = `add_embedding` / `class_embedding`) the first (SDXL's) is taken.
    Used to write kohya SD1.x/SD2.x files, which sd-scripts `networks.oft` names after diffusers modules.

    Raises ValueError when `shapes` is not an LDM UNet, or its layers_per_block cannot be told from its keys (a
    wrong guess would name layers after the wrong modules).
    """
    keys = list(shapes)
    prefixed = any(k.startswith(_UNET_PREFIXES) for k in keys)
    rels = []
    for k in keys:
        rel = next((k[len(p):] for p in _UNET_PREFIXES if k.startswith(p)), None if prefixed else k)
        if rel is not None:
            rels.append(rel.rsplit(".", 1)[0] if rel.endswith((".weight", ".bias")) else rel)
    rels = list(dict.fromkeys(rels))
    if _architecture(rels, False) != "sd_unet_ldm":
        raise ValueError(f"not an LDM UNet (input_blocks / middle_block / output_blocks): first keys {keys[:3]}")
    L = _ldm_layers_per_block(rels)
    if L is None:
        raise ValueError("cannot tell the UNet's layers_per_block from its keys; give the whole UNet state dict")
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for rel in rels:
        aliases = _ldm_to_diffusers(rel, L)
        if not aliases:
            continue
        name = aliases[0]
        if seen.setdefault(name, rel) != rel:  # cannot happen with the tables above; a table edit could cause it
            raise ValueError(f"diffusers name {name!r} would name both {seen[name]!r} and {rel!r}")
        out[rel] = name
    return out
