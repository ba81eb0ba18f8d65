"""Bypass apply mode in ComfyUI: OFT as forward hooks installed by a ModelPatcher injection (no weight patch).

`add_bypass(patcher, matches, ...)` builds one `oft_core.bypass.ModuleBypass` per adapted module and registers a
`PatcherInjection` under a key of its own on the (already cloned) patcher. ComfyUI calls `inject` at the end of
every `patch_model` / `partially_load` (full load and low-VRAM alike) and `eject` before unpatching, detaching or
loading another clone of the same model, so the hooks live exactly as long as this patcher is the loaded one:

- the clone: `ModelPatcher.clone()` copies the injection lists; the parent has none of ours, and a model is
  re-loaded when its injection keys differ from the loaded clone's (`clone_has_same_weights`).
- offloading: the hooks sit around the module's forward, so whatever the forward does to get its weight
  (`comfy.ops.cast_bias_weight`, low-VRAM `LowVramPatch`es, fp8 manual cast, a GGUF dequantise) happens first and
  untouched; nothing is written to any weight.
- stacking: each Apply adds its own key (insertion-ordered); torch hook handles are removed independently of the
  order they were added in, so ejecting never breaks another pack's or another Apply's hooks. Weight patches (LoRA,
  merge-mode OFT) are inside the forward: bypass OFT realises M·(W + ΔW) whatever the node order (oft_core/bypass).
"""

from __future__ import annotations

import itertools
import logging

import comfy.patcher_extension
import comfy.utils
import torch

from ..oft_core.bypass import ModuleBypass, module_bypasses

log = logging.getLogger(__name__)

INJECTION_PREFIX = "comfyui_oft_bypass:"
_counter = itertools.count()


def comfy_bias(module: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The bias a ComfyUI layer's forward adds, cast the way `comfy.ops.cast_bias_weight` casts it (to the
    activation dtype, its bias patches applied), in fp32. GGUF layers (city96's GGMLLayer) dequantise it first."""
    b = getattr(module, "bias", None)
    if b is None:
        return None
    if getattr(b, "tensor_type", None) is not None and hasattr(module, "get_weight"):  # GGMLTensor
        b = module.get_weight(b.to(device), dtype)
    functions = getattr(module, "bias_function", None) or []
    b = b.to(device=device, dtype=dtype, copy=bool(functions))
    for f in functions:  # low-VRAM LowVramPatch objects: the patches a full load would have baked into the bias
        b = f(b)
    return b.to(torch.float32)


class _Injection:
    """inject / eject for one Apply: the hooks of its modules, per ModelPatcher model they were attached to."""

    def __init__(self, modules: dict[str, ModuleBypass]):
        self.modules = modules
        self.handles: dict[int, list] = {}

    def inject(self, patcher) -> None:
        key = id(patcher.model)
        if key in self.handles:  # already on this model (two clones sharing the injection object)
            return
        handles = []
        for path, mb in self.modules.items():
            handles += mb.attach(comfy.utils.get_attr(patcher.model, path))
        self.handles[key] = handles

    def eject(self, patcher) -> None:
        for h in self.handles.pop(id(patcher.model), []):
            h.remove()


def _module_info(patcher):
    def info(path: str) -> tuple[bool, int]:
        w = comfy.utils.get_attr(patcher.model, path + ".weight")
        return w.ndim > 2, int(torch.Size(w.shape[2:]).numel()) if w.ndim > 2 else 1
    return info


def add_bypass(patcher, matches, strength_of, mode: str) -> list[str]:
    """Register the bypass hooks of `matches` (oft_core `Match`es onto this patcher's keys) on `patcher`.

    Returns the module paths hooked (empty when every layer is at strength 0). Raises OFTError (nothing registered)
    for a layer bypass cannot realise (input side of a fused slice or a k×k convolution).
    """
    modules = module_bypasses(matches, strength_of, mode, _module_info(patcher), comfy_bias)
    if not modules:
        return []
    injection = _Injection(modules)
    patcher.set_injections(f"{INJECTION_PREFIX}{next(_counter)}",
                           [comfy.patcher_extension.PatcherInjection(injection.inject, injection.eject)])
    return list(modules)
