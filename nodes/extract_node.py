"""OFTExtractLoRA: approximate an OFT adapter by a LoRA on the loaded model (schema and glue; the math is
oft_core/extract.py). The LoRA goes to ComfyUI's output folder (default output/loras/, never over an existing file);
core's LoraLoader and kohya sd-scripts read it. Node IDs are permanent: never rename one."""

from __future__ import annotations

import logging
import os

import comfy.model_management
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..oft_core import OFTError
from ..oft_core.blocks import layer_multiplier
from ..oft_core.extract import ExtractResult, extract, lora_metadata
from ..oft_core.publish import publish_safetensors
from .oft_nodes import _mode_input
from .patch import TE_COMPONENTS, UNET_PREFIX, model_kind, model_shapes
from .types import OFTAdapterType

log = logging.getLogger(__name__)


def _weights_of(patcher):
    """key -> the weight the layer computes with, as ComfyUI's ModelPatcher reads it before patching
    (`get_key_weight`): through the layer's `convert_weight` where it has one (a "scaled fp8" checkpoint's stored
    fp8 weight times its scale_weight), in fp32."""
    sd = patcher.model.state_dict()

    def get(key):
        w = sd[key]
        if getattr(w, "tensor_type", None) is not None:  # a GGUF-quantised weight (city96's GGMLTensor)
            raise OFTError(f"{key} is a GGUF-quantised weight: extract from the unquantised base file with "
                           "`python -m oft_core extract-lora FILE --base BASE`")
        _, _, convert = comfy.model_patcher.get_key_weight(patcher.model, key)
        return w if convert is None else convert(w.to(dtype=torch.float32, copy=True), inplace=True)
    return get


def extract_from_models(adapter, model, clip, *, rank, rel_error, strength, mode):
    """(tensors, layer reports) for the UNet / transformer layers on `model` and text-encoder layers on `clip`."""
    strength_of = lambda layer: float(strength) * layer_multiplier(adapter, layer)  # noqa: E731
    tensors, layers = {}, []
    parts = [(model, UNET_PREFIX, ("unet",), f"the loaded {model_kind(model)} model")]
    if clip is not None:
        parts.append((clip.patcher, "", TE_COMPONENTS, "the loaded CLIP"))
    total = sum(1 for layer in adapter if layer.component in ("unet",) + (TE_COMPONENTS if clip else ()))
    bar = comfy.utils.ProgressBar(max(total, 1))

    def progress(i, n):
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update(1)

    for patcher, prefix, comps, what in parts:
        if not any(layer.component in comps for layer in adapter):
            continue
        t, lay = extract(adapter, _weights_of(patcher), model_shapes(patcher, prefix), rank=rank,
                         rel_error=rel_error, strength=strength, mode=mode, strength_of=strength_of,
                         components=comps, base_name=what, progress=progress)
        tensors.update(t)
        layers += lay
    if not layers:
        raise OFTError("the adapter has only text-encoder layers: connect the CLIP", path=adapter.path)
    return tensors, layers


class OFTExtractLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OFTExtractLoRA",
            display_name="Extract LoRA from OFT",
            category="loaders/oft/operations",
            description="Approximate an OFT adapter by a LoRA: per adapted layer ΔW = R·W − W on this model's "
            "weights, truncated SVD. Saves a kohya-style LoRA (core Load LoRA and sd-scripts read it) and reports "
            "the relative error of ΔW per layer.",
            inputs=[
                io.Model.Input("model", tooltip="The base model the adapter is applied to (its weights are read, "
                               "never changed; patches already on it are not included)."),
                OFTAdapterType.Input("oft_adapter", tooltip="An adapter from Load OFT Adapter (per-block strengths "
                                     "from OFT Block Strength are included)."),
                io.Int.Input("rank", default=32, min=1, max=4096,
                             tooltip="LoRA rank of every layer (higher: closer to the OFT, larger file). Ignored "
                             "when rel_error is above 0."),
                io.Float.Input("rel_error", default=0.0, min=0.0, max=0.99, step=0.001,
                               tooltip="Instead of a fixed rank: per layer, the smallest rank whose relative error "
                               "‖ΔW − LoRA‖/‖ΔW‖ is at most this (0 = use rank)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="The adapter strength the LoRA reproduces (load the LoRA at strength 1)."),
                _mode_input(),
                io.String.Input("filename_prefix", default="loras/oft_extracted",
                                tooltip="Where to save, relative to ComfyUI's output folder; a counter is added, "
                                "existing files are never overwritten."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The CLIP, for adapters with text-encoder layers (optional)."),
            ],
            outputs=[io.String.Output(display_name="report", tooltip="Per-layer rank and relative error.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, oft_adapter, rank, rel_error, strength, strength_mode, filename_prefix,
                clip=None) -> io.NodeOutput:
        import time

        t0 = time.perf_counter()
        target = rel_error if rel_error > 0 else None
        tensors, layers = extract_from_models(oft_adapter, model, clip, rank=None if target else rank,
                                              rel_error=target, strength=strength, mode=strength_mode)
        if not tensors:
            raise OFTError("the adapter changes no weight at this strength: nothing to extract",
                           path=oft_adapter.path)
        folder, filename, counter, _, _ = folder_paths.get_save_image_path(filename_prefix,
                                                                           folder_paths.get_output_directory())
        while True:
            out = os.path.join(folder, f"{filename}_{counter:05}_.safetensors")
            if not os.path.exists(out):
                break
            counter += 1
        meta = lora_metadata(oft_adapter, layers, rank=None if target else rank, rel_error=target,
                             strength=strength, mode=strength_mode, dtype="fp32")
        publish_safetensors(out, tensors, meta, inputs=(oft_adapter.path or None,), what="LoRA file")
        text = ExtractResult(out, layers, time.perf_counter() - t0).text()
        log.info("%s", text.splitlines()[0])
        return io.NodeOutput(text, ui=ui.PreviewText(text))


NODES = [OFTExtractLoRA]
