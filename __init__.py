"""comfyui-oft: the ComfyUI entry point.

The nodes are imported only when ComfyUI is importable, so `oft_core` and its command line work without it
(the pattern of city96/ComfyUI-GGUF). V3 packs export `comfy_entrypoint` and must NOT export NODE_CLASS_MAPPINGS:
ComfyUI would then load the pack as V1 and ignore the entrypoint.
"""

import importlib.util

# The frontend extension that shows each node's report on the node (web/oft_reports.js). ComfyUI reads this module
# attribute for V1 and V3 packs alike (nodes.py load_custom_node) and serves the folder under /extensions/<pack>/.
WEB_DIRECTORY = "./web"

if importlib.util.find_spec("comfy_api") is not None and importlib.util.find_spec("comfy") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401
