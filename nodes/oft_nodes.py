"""The loading nodes: OFTLoader, OFTLoadAdapter, OFTApply, OFTInspect (schema and glue; the seam is patch.py).

Node IDs are permanent: workflows store them. Never rename one.
"""

from __future__ import annotations

import os

from comfy_api.latest import io, ui

from ..oft_core import OFTError, build_key_map, match_adapter
from ..oft_core.summary import describe, format_text
from . import files
from .patch import (
    APPLY_MODES,
    TE_COMPONENTS,
    UNET_PREFIX,
    apply_oft,
    block_strength_text,
    comfy_key_map,
    model_kind,
    model_shapes,
)
from .types import STRENGTH_MODES, OFTAdapterType

CATEGORY = "loaders/oft"
MODES = STRENGTH_MODES

_MODE_TOOLTIP = (
    "How strength scales the rotation. kohya: R_s = I + s(R − I), what sd-scripts and LyCORIS do with their "
    "multiplier (strength 1 gives exactly the trained result). orthogonal: the rotation of s × the generator, a true "
    "rotation at every strength (−1 = the inverse rotation). Strength 0 turns the adapter off in both modes."
)
_STRENGTH_TOOLTIP = "Adapter strength: 1 = as trained, 0 = off, negative = the opposite direction."


def _strength_input():
    return io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01, tooltip=_STRENGTH_TOOLTIP)


def _mode_input():
    return io.Combo.Input("strength_mode", options=MODES, default="kohya", tooltip=_MODE_TOOLTIP)


_APPLY_MODE_TOOLTIP = (
    "merge: the rotated weights are computed when the model loads (fastest sampling). bypass: no weight is "
    "touched; each adapted layer's output (kohya, LyCORIS) or input (PEFT) is rotated during sampling: instant to "
    "apply, exact on fp8 / GGUF models (no re-rounding of rotated weights), a small cost per step. With a LoRA on "
    "the same model, bypass always gives OFT applied after the LoRA."
)


def _apply_mode_input():
    # last input on purpose: workflows saved before it existed keep their widget values in their slots
    return io.Combo.Input("apply_mode", options=list(APPLY_MODES), default="merge", optional=True,
                          tooltip=_APPLY_MODE_TOOLTIP)


def _file_input():
    return io.Combo.Input(
        "adapter_name",
        options=files.adapter_files(),
        tooltip="An OFT adapter (.safetensors: kohya sd-scripts, LyCORIS diag-oft / BOFT, OneTrainer OFT v2, or "
        "PEFT adapter_model.safetensors next to its adapter_config.json) from the 'oft' or 'loras' model folders. Only "
        "OFT files are listed (LoRAs in the same folders are left out).",
    )


def _check_file(adapter_name) -> bool | str:
    """`validate_inputs` of the file loaders: a missing or non-OFT file refuses the prompt when it is queued."""
    if adapter_name is None:  # linked from another node: checked when the node runs
        return True
    problem = files.check_name(adapter_name)
    return True if problem is None else problem


def _model_clip_inputs():
    return [
        io.Model.Input("model", tooltip="The diffusion model to adapt (it is cloned, never changed)."),
        io.Clip.Input("clip", optional=True,
                      tooltip="The CLIP to adapt when the adapter has text-encoder layers (optional)."),
    ]


def _model_clip_outputs():
    return [
        io.Model.Output(tooltip="The model with the OFT adapter applied."),
        io.Clip.Output(tooltip="The CLIP with the adapter's text-encoder layers applied (the input CLIP unchanged "
                       "when it has none)."),
    ]


class OFTLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OFTLoader",
            display_name="Load OFT",
            category=CATEGORY,
            description="Apply an OFT (Orthogonal Fine-Tuning) adapter to a model and, when the file has "
            "text-encoder layers, to its CLIP. Reports how many adapter layers were applied.",
            inputs=[
                *_model_clip_inputs(),
                _file_input(),
                _strength_input(),
                _mode_input(),
                _apply_mode_input(),
            ],
            outputs=_model_clip_outputs(),
        )

    @classmethod
    def validate_inputs(cls, adapter_name=None) -> bool | str:
        return _check_file(adapter_name)

    @classmethod
    def execute(cls, model, adapter_name, strength, strength_mode, clip=None, apply_mode="merge") -> io.NodeOutput:
        adapter = files.load_by_name(adapter_name)
        model, clip, text = apply_oft(model, clip, adapter, strength, strength_mode, apply_mode)
        return io.NodeOutput(model, clip, ui=ui.PreviewText(text))


class OFTLoadAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OFTLoadAdapter",
            display_name="Load OFT Adapter (file only)",
            category=CATEGORY,
            description="Read an OFT adapter file without applying it, for OFT Apply / OFT Inspect.",
            inputs=[_file_input()],
            outputs=[OFTAdapterType.Output(display_name="oft_adapter", tooltip="The validated adapter.")],
        )

    @classmethod
    def validate_inputs(cls, adapter_name=None) -> bool | str:
        return _check_file(adapter_name)

    @classmethod
    def execute(cls, adapter_name) -> io.NodeOutput:
        adapter = files.load_by_name(adapter_name)
        return io.NodeOutput(adapter, ui=ui.PreviewText(f"{os.path.basename(adapter.path)}: {len(adapter)} layers "
                                                        f"({adapter.format})"))


class OFTApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OFTApply",
            display_name="Apply OFT",
            category=CATEGORY,
            description="Apply a loaded OFT adapter to a model and, for text-encoder layers, to its CLIP.",
            inputs=[
                *_model_clip_inputs(),
                OFTAdapterType.Input("oft_adapter", tooltip="An adapter from Load OFT Adapter."),
                _strength_input(),
                _mode_input(),
                _apply_mode_input(),
            ],
            outputs=_model_clip_outputs(),
        )

    @classmethod
    def execute(cls, model, oft_adapter, strength, strength_mode, clip=None, apply_mode="merge") -> io.NodeOutput:
        model, clip, text = apply_oft(model, clip, oft_adapter, strength, strength_mode, apply_mode)
        return io.NodeOutput(model, clip, ui=ui.PreviewText(text))


def inspect_text(adapter, model=None) -> str:
    """The adapter summary (oft_core.summary), plus how it matches `model` when one is given."""
    text = format_text(describe(adapter), more_hint="")
    extra = block_strength_text(adapter)
    if extra:
        text += "\n" + extra[2:]
    if model is None:
        return text
    kind = model_kind(model)
    unet_layers = [layer for layer in adapter if layer.component not in TE_COMPONENTS]
    if not unet_layers:
        return text + f"\non this {kind} model: the adapter has only text-encoder layers (they patch the CLIP)"
    try:
        shapes = model_shapes(model, UNET_PREFIX)  # the loader's own key map (patch.match_model), ComfyUI's included
        report = match_adapter(adapter, shapes, build_key_map(shapes, comfy_key_map(model)), components=("unet",),
                               base_name=f"the loaded {kind} model")
    except OFTError as e:
        return text + f"\non this {kind} model: does not fit: {e.detail}"
    line = f"on this {kind} model: {len(report.matched)} of {report.total} diffusion-model layers match"
    if report.unmatched:
        shown = ", ".join(report.unmatched[:8]) + (" …" if len(report.unmatched) > 8 else "")
        line += f"; not found: {len(report.unmatched)} ({shown})"
    fused = sum(1 for m in report.matched if m.target.offset is not None)
    if fused:
        line += f"; {fused} land on slices of fused weights"
    return text + "\n" + line


class OFTInspect(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OFTInspect",
            display_name="Inspect OFT",
            category=CATEGORY,
            description="Describe an OFT adapter: format, layers, block layout, constraint and which layers hit it; "
            "with a model connected, how many of its layers match that model.",
            inputs=[
                OFTAdapterType.Input("oft_adapter", tooltip="An adapter from Load OFT Adapter."),
                io.Model.Input("model", optional=True,
                               tooltip="Optional: a model to check the adapter's layer names and shapes against."),
            ],
            outputs=[io.String.Output(display_name="summary", tooltip="The summary as text.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, oft_adapter, model=None) -> io.NodeOutput:
        text = inspect_text(oft_adapter, model)
        return io.NodeOutput(text, ui=ui.PreviewText(text))


NODES = [OFTLoader, OFTLoadAdapter, OFTApply, OFTInspect]
