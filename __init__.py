"""comfyui-oft: the ComfyUI entry point.

The nodes are imported only when ComfyUI is importable, so `oft_core` and its command line work without it
(the pattern of city96/ComfyUI-GGUF). V3 packs export `comfy_entrypoint` and must NOT export NODE_CLASS_MAPPINGS:
ComfyUI would then load the pack as V1 and ignore the entrypoint.
"""

import importlib.util

if importlib.util.find_spec("comfy_api") is not None and importlib.util.find_spec("comfy") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401
