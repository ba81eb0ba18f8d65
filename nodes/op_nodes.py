"""Nodes that make a new adapter from others: OFTBlockStrength, OFTBlend, OFTMerge, and OFTSave (writes one).

Schema and glue only: the operations are `oft_core.combine` / `oft_core.blocks` / `oft_core.formats`, the seam into a
model is `patch.apply_oft`. Their refusals are `OFTError`s and reach the UI as node errors with their reason.
Node IDs are permanent: workflows store them. Never rename one.

Per-block strength is carried, not materialized: OFT Block Strength drops the layers it switches off (their weights
stay bit for bit wherever the adapter goes) and sets the adapter's typed per-layer multipliers
(`OFTAdapter.layer_strengths`, `oft_core.blocks.with_block_strength`) that `apply_oft` multiplies into each layer's
strength. A multiplier cannot in general be folded into a file's generators: kohya strength
R_s = I + s(R − I) is not the rotation of any generator. OFT Save therefore writes multipliers 0 and 1 exactly and,
for other values, either refuses or (when asked) scales generators in the orthogonal sense, R(m·Q), which is exactly
what `strength_mode` orthogonal gives (`oft_core.blocks.scale_layers`).
"""

from __future__ import annotations

import json
import logging
import os

import folder_paths
from comfy_api.latest import io, ui

from ..oft_core import OFTAdapter, OFTError
from ..oft_core.blocks import (
    layer_block,
    parse_block_spec,
    refuse_layer_strengths,
    scale_layers,
    with_block_strength,
)
from ..oft_core.choices import FORMATS, MERGE_MODES
from ..oft_core.combine import blend, merge, provenance
from ..oft_core.formats import format_family, load_adapter, write_adapter
from ..oft_core.publish import check_output_name
from ..oft_core.summary import tool_notes
from .patch import block_strength_text
from .types import OFTAdapterType

log = logging.getLogger(__name__)

CATEGORY = "loaders/oft/operations"
MERGE_SLOTS = 4
FRACTIONAL_POLICIES = ["refuse", "orthogonal"]

_ADAPTER_TOOLTIP = "An adapter from Load OFT Adapter (or another OFT operation node)."
_SPEC_TOOLTIP = (
    "Per-block multipliers, comma separated, the LAST matching item wins: 'default=1, input=0.5, middle=0, "
    "output:3-5=0' (SD UNet blocks IN00–IN11, M00, OUT00–OUT11), 'double:0-9=0.8, single=0' (FLUX), 'te=0' "
    "(text encoders), 'unet=…' (the whole UNet / transformer). A layer's strength becomes strength × multiplier; 0 "
    "switches its layers off (their weights stay exactly as they are)."
)


def _ranges(indices) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    out, run = [], []
    for i in sorted(indices):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def adapter_groups(adapter: OFTAdapter) -> str:
    """The block-strength groups `adapter`'s layers are in, as a spec writes them: "double 0-1, single 0-1, te"."""
    groups: dict[str, set] = {}
    outside = 0
    for layer in adapter:
        block = layer_block(layer.component, layer.name)
        if block is None:
            outside += 1
            continue
        groups.setdefault(block[0], set())
        if block[1] is not None:
            groups[block[0]].add(block[1])
    parts = [f"{g} {_ranges(ix)}" if ix else g for g, ix in groups.items()]
    if outside:
        parts.append(f"unet ({outside} layers in no numbered block)")
    return ", ".join(parts) or "no layer"


def unmatched_items(adapter: OFTAdapter, spec: str) -> list[str]:
    """The items of `spec` (other than default) that select no layer of `adapter`, as written in the spec."""
    parsed = parse_block_spec(spec)
    blocks = [(layer.component, layer_block(layer.component, layer.name)) for layer in adapter]
    out = []
    for rule in parsed.rules:
        if not any(rule.covers(component, block) for component, block in blocks):
            where = "" if rule.lo is None else f":{rule.lo}" if rule.lo == rule.hi else f":{rule.lo}-{rule.hi}"
            out.append(f"{rule.group}{where}={rule.value:g}")
    return out


class OFTBlockStrength(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OFTBlockStrength",
            display_name="OFT Block Strength",
            category=CATEGORY,
            description="Set a strength multiplier per block of the model (like LoRA block weights). The result "
            "goes to Apply OFT (each layer gets strength × its multiplier) or to OFT Save.",
            inputs=[
                OFTAdapterType.Input("oft_adapter", tooltip=_ADAPTER_TOOLTIP),
                io.String.Input("block_spec", default="default=1", multiline=False, tooltip=_SPEC_TOOLTIP),
            ],
            outputs=[OFTAdapterType.Output(display_name="oft_adapter",
                                           tooltip="The adapter with its per-block strengths attached.")],
        )

    @classmethod
    def validate_inputs(cls, block_spec) -> bool | str:
        if block_spec is None:  # linked from another node: checked when the node runs
            return True
        try:
            parse_block_spec(block_spec)
        except OFTError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, oft_adapter, block_spec) -> io.NodeOutput:
        out = with_block_strength(oft_adapter, block_spec)
        text = f"{len(out)} of {len(oft_adapter)} layers kept" + block_strength_text(out)
        unmatched = unmatched_items(oft_adapter, block_spec)
        if unmatched:
            verb = "matches" if len(unmatched) == 1 else "match"
            warning = (f"WARNING: {', '.join(unmatched)} {verb} no layer of this adapter; its layers are in: "
                       f"{adapter_groups(oft_adapter)}")
            log.warning("OFT Block Strength: %s", warning[len("WARNING: "):])
            text += "\n" + warning
        return io.NodeOutput(out, ui=ui.PreviewText(text))


# ------------------------------------------------------------------------------------------------ blend / merge
class OFTBlend(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OFTBlend",
            display_name="OFT Blend",
            category=CATEGORY,
            description="Interpolate two OFT adapters with the same layers and block layout: each layer's generator "
            "is (1 − ratio)·A + ratio·B (constraints applied first), so every ratio gives a true rotation.",
            inputs=[
                OFTAdapterType.Input("adapter_a", tooltip="The adapter at ratio 0."),
                OFTAdapterType.Input("adapter_b", tooltip="The adapter at ratio 1 (same layers and block sizes as A)."),
                io.Float.Input("ratio", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="0 = adapter A exactly, 1 = adapter B exactly, in between: interpolated."),
            ],
            outputs=[OFTAdapterType.Output(display_name="oft_adapter", tooltip="The blended adapter.")],
        )

    @classmethod
    def execute(cls, adapter_a, adapter_b, ratio) -> io.NodeOutput:
        for a in (adapter_a, adapter_b):
            refuse_layer_strengths(a, "blend")
        out = blend(adapter_a, adapter_b, ratio)  # its made_from records the ratio and both inputs
        return io.NodeOutput(out, ui=ui.PreviewText(f"blend of {len(out)} layers at ratio {ratio:g}"))


def _merge_inputs():
    inputs = [io.Combo.Input("mode", options=list(MERGE_MODES), default="compose",
                             tooltip="compose: the rotations applied one after another (adapter 1 first); weight w "
                             "means the rotation to the power w. Layers in only one adapter pass through. "
                             "average: the weighted mean of the generators (every adapter must have the same "
                             "layers and block layout).")]
    for i in range(1, MERGE_SLOTS + 1):
        inputs.append(OFTAdapterType.Input(f"adapter_{i}", optional=i > 1,
                                           tooltip=_ADAPTER_TOOLTIP + (" Optional." if i > 1 else "")))
        inputs.append(io.Float.Input(f"weight_{i}", default=1.0, min=-10.0, max=10.0, step=0.01,
                                     tooltip=f"Weight of adapter {i} (ignored when it is not connected). compose: the "
                                     "power of its rotation (0 = left out, −1 = its inverse); average: its share."))
    return inputs


class OFTMerge(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OFTMerge",
            display_name="OFT Merge",
            category=CATEGORY,
            description="Merge up to four OFT adapters into one, by composing their rotations or averaging them.",
            inputs=_merge_inputs(),
            outputs=[OFTAdapterType.Output(display_name="oft_adapter", tooltip="The merged adapter.")],
        )

    @classmethod
    def execute(cls, mode, adapter_1, weight_1, weight_2=1.0, weight_3=1.0, weight_4=1.0, adapter_2=None,
                adapter_3=None, adapter_4=None) -> io.NodeOutput:
        slots = [(adapter_1, weight_1), (adapter_2, weight_2), (adapter_3, weight_3), (adapter_4, weight_4)]
        items = [(a, float(w)) for a, w in slots if a is not None]
        for a, _ in items:
            refuse_layer_strengths(a, "merge")
        out = merge(items, mode)  # its made_from records the mode and each input with its weight
        text = f"{mode} of {len(items)} adapters (weights {', '.join(f'{w:g}' for _, w in items)}): {len(out)} layers"
        return io.NodeOutput(out, ui=ui.PreviewText(text))


# ------------------------------------------------------------------------------------------------ save
_FRACTIONAL_HINT = ("Set fractional_block_strength to 'orthogonal' to store R(m·Q) (exact for strength_mode "
                    "orthogonal), use only 0 and 1, or bake the model instead (Apply OFT → CheckpointSave)")


def next_free_path(filename_prefix: str, suffix: str) -> str:
    """`<output>/<subfolder>/<name>_<counter:05>_<suffix>` with ComfyUI's counter (one past the highest taken), then
    moved on past any name that exists: never an existing file or directory."""
    check_output_name(filename_prefix, "filename_prefix")
    out_dir = folder_paths.get_output_directory()
    folder, name, counter, _subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise OFTError(f"cannot create the output folder ({e.strerror or e})", path=folder) from None
    while True:
        path = os.path.join(folder, f"{name}_{counter:05}_{suffix}")
        if not os.path.lexists(path):
            return path
        counter += 1


class OFTSave(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OFTSave",
            display_name="OFT Save",
            category=CATEGORY,
            description="Write an OFT adapter under ComfyUI's output folder as a kohya, LyCORIS or PEFT file (PEFT: a "
            "folder with adapter_model.safetensors and adapter_config.json). Never overwrites: a counter is added. "
            "Refuses, with the reason, a layer the chosen format cannot hold exactly.",
            inputs=[
                OFTAdapterType.Input("oft_adapter", tooltip="The adapter to write (e.g. from OFT Merge or OFT Blend)."),
                io.Combo.Input("format", options=list(FORMATS), default="kohya",
                               tooltip="kohya: sd-scripts networks.oft / oft_flux (UNet only). lycoris: LyCORIS "
                               "diag-oft / BOFT. peft: a PEFT adapter folder (needs dotted module names)."),
                io.String.Input("filename_prefix", default="oft/ComfyUI_oft",
                                tooltip="Path under the output folder; _00001_ etc. is appended, never overwriting."),
                io.Combo.Input("fractional_block_strength", options=FRACTIONAL_POLICIES, default="refuse",
                               tooltip="Only for adapters from OFT Block Strength with multipliers other than 0 and "
                               "1. refuse: stop with an error (a file has no per-layer strength). orthogonal: write "
                               "each such layer's rotation to the power m, R(m·Q); this equals the adapter with "
                               "strength_mode orthogonal, not kohya."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, oft_adapter, format, filename_prefix, fractional_block_strength) -> io.NodeOutput:
        adapter = scale_layers(oft_adapter, "orthogonal" if fractional_block_strength == "orthogonal" else "kohya",
                               hint=_FRACTIONAL_HINT)
        if len(adapter) == 0:
            raise OFTError(f"nothing to save: the adapter has no layer left (block strength "
                           f"{oft_adapter.block_spec!r} switched every layer off)",
                           path=oft_adapter.path or None)
        try:
            source_family = format_family(oft_adapter.format)
        except OFTError:
            source_family = oft_adapter.format
        metadata = {
            "comfyui_oft.saved_by": "OFTSave",
            "comfyui_oft.made_from": json.dumps({"source_format": oft_adapter.format, "source_family": source_family,
                                                 "saved_as": format, "made_from": provenance(oft_adapter),
                                                 "block_strength": oft_adapter.block_spec,
                                                 "fractional_block_strength": fractional_block_strength
                                                 if adapter is not oft_adapter else None}),
        }
        path = next_free_path(filename_prefix, "" if format == "peft" else ".safetensors")
        written = write_adapter(adapter, path, format, overwrite=False, metadata=metadata)
        text = f"saved {format} adapter ({len(adapter)} layers): {written}"
        notes = tool_notes(load_adapter(written))  # what the format's own tool will do differently with the file
        if notes:
            text += "\n" + "\n".join(f"note: {n}" for n in notes)
        log.info("OFT: %s", text)
        return io.NodeOutput(ui=ui.PreviewText(text))


NODES = [OFTBlockStrength, OFTBlend, OFTMerge, OFTSave]
