"""OFT as a ComfyUI hook (HOOKS): strength scheduled over the sampling steps by core's keyframe nodes.

Core's Create Hook LoRA cannot carry OFT: it loads files through `comfy.lora.load_lora`, which maps no kohya
`oft_unet_` key (0 patches, silently) and applies LyCORIS OFT strength twice (a keyframe of 0.5 gives 0.25).
`OFTWeightHook` is a core `WeightHook` with `need_weight_init = False` whose patches are this pack's own
`OFTWeightAdapter`s (nodes/patch.py), matched onto the model or CLIP the hook is registered on (the file needs no
model at hook creation). ComfyUI multiplies each patch's strength by the hook's current keyframe strength and hands it
to `OFTWeightAdapter.calculate_weight`, which applies it once: every keyframe gives exactly the merge at that
strength. Works with core's Set Hook Keyframes, Combine Hooks, Set CLIP Hooks and the Cond Set Props nodes.
"""

from __future__ import annotations

import os

import comfy.hooks
import comfy.lora
from comfy_api.latest import io

from ..oft_core import OFTAdapter, OFTError, build_key_map, match_adapter
from ..oft_core.blocks import layer_multiplier
from ..oft_core.errors import check_strength
from . import files
from .oft_nodes import MODES, _check_file, _file_input, _mode_input
from .patch import (
    TE_COMPONENTS,
    UNET_PREFIX,
    OFTWeightAdapter,
    bias_patches,
    check_rotations,
    comfy_key_map,
    model_kind,
    model_shapes,
)

CATEGORY = "loaders/oft"


class OFTWeightHook(comfy.hooks.WeightHook):
    """A WeightHook carrying an OFT adapter; its patches are built for each model / CLIP it is registered on."""

    def __init__(self, adapter: OFTAdapter | None = None, mode: str = "kohya", strength_model: float = 1.0,
                 strength_clip: float = 1.0):
        super().__init__(strength_model=strength_model, strength_clip=strength_clip)
        self.need_weight_init = False  # our own adapters below, never comfy.lora.load_lora
        self.adapter = adapter
        self.mode = mode

    def clone(self):
        c = super().clone()
        c.adapter = self.adapter
        c.mode = self.mode
        return c

    def oft_patches(self, patcher, clip: bool) -> dict[float, dict]:
        """{strength multiplier: {key or (key, offset): OFTWeightAdapter / OFTBiasAdapter}} for `patcher` (a model
        or a CLIP's)."""
        adapter = self.adapter
        if clip:
            comps, prefix, what = TE_COMPONENTS, "", "the CLIP"
        else:
            comps, prefix, what = ("unet",), UNET_PREFIX, f"the {model_kind(patcher)} model"
        layers = [layer for layer in adapter if layer.component in comps]
        if not layers:
            return {}
        shapes = model_shapes(patcher, prefix)
        # ComfyUI's own key map beside the pack's tables, as the loader matches (every family, fused slices, rows
        # stored permuted); a CLIP's patcher holds the text model itself
        host = comfy.lora.model_lora_keys_clip(patcher.model, {}) if clip else comfy_key_map(patcher)
        report = match_adapter(adapter, shapes, build_key_map(shapes, host), components=comps, base_name=what)
        if not report.matched:
            raise OFTError(f"OFT hook: none of its {len(layers)} layers matches {what} it is registered on",
                           path=adapter.path)
        groups: dict[float, dict] = {}
        for m in report.matched:
            key = m.target.key if m.target.offset is None else (m.target.key, tuple(m.target.offset))
            groups.setdefault(layer_multiplier(adapter, m.layer), {})[key] = OFTWeightAdapter(
                m.layer, self.mode, adapter.format, m.target.perm)
        # trained biases (PEFT bias "oft_only" / "boft_only") at the same strengths as their layers' weights
        for multiplier, patches in bias_patches(report, lambda layer: layer_multiplier(adapter, layer)).items():
            groups.setdefault(multiplier, {}).update(patches)
        return groups

    def add_hook_patches(self, model, model_options, target_dict, registered):
        if not self.should_register(model, model_options, target_dict, registered):
            return False
        clip = target_dict.get("target", None) == comfy.hooks.EnumWeightTarget.Clip
        strength = self._strength_clip if clip else self._strength_model
        for multiplier, patches in self.oft_patches(model, clip).items():
            model.add_hook_patches(hook=self, patches=patches, strength_patch=strength * multiplier)
        registered.add(self)
        return True


def create_oft_hook(adapter: OFTAdapter, strength_model: float, strength_clip: float, mode: str = "kohya",
                    prev_hooks: comfy.hooks.HookGroup | None = None) -> comfy.hooks.HookGroup:
    """`prev_hooks` (cloned) plus one OFTWeightHook: what Create Hook LoRA does, for an OFT adapter."""
    if mode not in MODES:
        raise OFTError(f"strength mode: expected {' or '.join(MODES)}, found {mode!r}", path=adapter.path)
    # NaN passes ComfyUI's min/max check: the one strength check of oft_core, before any hook exists
    strength_model = check_strength(strength_model, "strength_model", path=adapter.path or None)
    strength_clip = check_strength(strength_clip, "strength_clip", path=adapter.path or None)
    group = prev_hooks.clone() if prev_hooks is not None else comfy.hooks.HookGroup()
    if strength_model == 0 and strength_clip == 0:
        return group
    check_rotations(adapter, list(adapter), lambda layer: strength_clip if layer.component in TE_COMPONENTS
                    else strength_model, mode)
    group.add(OFTWeightHook(adapter, mode, strength_model, strength_clip))
    return group


class OFTHook(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OFTHook",
            display_name="Create Hook OFT",
            category=CATEGORY,
            description="An OFT adapter as HOOKS, for core's hook nodes: schedule its strength over the sampling "
            "steps (Set Hook Keyframes), apply it to some conditionings only (Cond Set Props), or to the CLIP (Set "
            "CLIP Hooks). Every keyframe strength gives exactly the adapter merged at that strength.",
            inputs=[
                _file_input(),
                io.Float.Input("strength_model", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Strength on the diffusion model (keyframes multiply it): 1 = as trained, "
                               "0 = off."),
                io.Float.Input("strength_clip", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Strength on the CLIP for adapters with text-encoder layers (used by Set "
                               "CLIP Hooks)."),
                _mode_input(),
                io.Hooks.Input("prev_hooks", optional=True, tooltip="Hooks to add this one to (optional)."),
            ],
            outputs=[io.Hooks.Output(tooltip="The hooks, this OFT adapter added.")],
            is_experimental=True,
        )

    @classmethod
    def validate_inputs(cls, adapter_name=None) -> bool | str:
        return _check_file(adapter_name)

    @classmethod
    def execute(cls, adapter_name, strength_model, strength_clip, strength_mode, prev_hooks=None) -> io.NodeOutput:
        adapter = files.load_by_name(adapter_name)
        hooks = create_oft_hook(adapter, strength_model, strength_clip, strength_mode, prev_hooks)
        return io.NodeOutput(hooks)


def describe(hooks: comfy.hooks.HookGroup) -> str:
    """One line per OFT hook in a group (for messages and tests)."""
    return "\n".join(f"{os.path.basename(h.adapter.path) or h.adapter.format}: model {h._strength_model:g}, clip "
                     f"{h._strength_clip:g}, {h.mode}" for h in hooks.hooks if isinstance(h, OFTWeightHook))


NODES = [OFTHook]
