"""ComfyUI V3 entry point of the pack: `comfy_entrypoint()` -> a ComfyExtension listing the nodes.

No NODE_CLASS_MAPPINGS here on purpose: ComfyUI would then load the pack as V1 and ignore the entrypoint.
Importing this package does no I/O and queries no device; the `oft` model folder is registered when ComfyUI asks
for the node list.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import extract_node, files, hook_nodes, images_node, oft_nodes, op_nodes, train_node

NODES = [*oft_nodes.NODES, *op_nodes.NODES, *train_node.NODES, *hook_nodes.NODES, *extract_node.NODES,
         *images_node.NODES]


class OFTExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        files.register_folder()
        return list(NODES)


def comfy_entrypoint() -> OFTExtension:
    return OFTExtension()
