"""Adapter file formats: a list of readers, each saying "mine" or "not mine"; the first that claims a file reads it.

All key conventions in one table (details and quirks in each reader's docstring):

| reader  | keys                                                          | name prefix -> model part            |
|---------|---------------------------------------------------------------|--------------------------------------|
| kohya   | `oft_unet_<path_>.oft_blocks`, `.oft_blocks.<i>`, `.alpha`     | `oft_unet_` -> unet                  |
| lycoris | `<prefix><path_>.oft_blocks` (3-D diag, 4-D BOFT), `.oft_diag`,| `lycoris_`, `lora_unet_` -> unet;    |
|         | `.alpha`, `.rescale`                                          | `lora_te_`/`lora_te1_`/`lora_te2_`   |
| peft    | `base_model.model.<path>.oft_R.weight`; legacy `.oft_r`,      | `base_model.model.` -> unet          |
|         | `.oft_s`; plus `adapter_config.json` beside the file          | (`text_encoder.` -> te, ...)         |

`<path_>` is the module path with "." replaced by "_" (not reversible by string rules: `names.py` maps it through the
base model's own keys); `<path>` keeps its dots. Only safetensors is read; pickles are refused, never unpickled.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

from ..errors import OFTError
from ..safetensors_io import Header, load_tensors, read_header
from ..spec import OFTAdapter
from . import kohya, lycoris, peft


class Reader(NamedTuple):
    name: str
    claims: Callable  # (header, config) -> bool
    read: Callable  # (header, tensors, config) -> OFTAdapter


READERS: list[Reader] = [
    Reader("kohya", kohya.claims, kohya.read),
    Reader("lycoris", lycoris.claims, lycoris.read),
    Reader("peft", peft.claims, peft.read),
]


def load_adapter(path: str | os.PathLike) -> OFTAdapter:
    """Read any supported OFT adapter: a .safetensors file, or a PEFT adapter directory."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise OFTError("file not found", path=path)
    model_path, config = peft.find_config(path)
    header = read_header(model_path)
    for reader in READERS:
        if reader.claims(header, config):
            tensors, _ = load_tensors(model_path)
            adapter = reader.read(header, tensors, config)
            if not adapter.layers:
                raise OFTError(f"no OFT layer found by the {reader.name} reader", path=model_path)
            return adapter
    raise OFTError(_not_oft_message(header), path=model_path)


def _not_oft_message(header: Header) -> str:
    keys = list(header.tensors)
    sample = ", ".join(keys[:3]) or "no tensors at all"
    if any(k.endswith((".lora_up.weight", ".lora_down.weight", ".lora_A.weight", ".lora_B.weight")) for k in keys):
        return (f"this is a LoRA file, not OFT (keys like {sample}): load it with ComfyUI's LoraLoader")
    return (
        "not an OFT adapter: expected keys of kohya (oft_unet_*.oft_blocks), LyCORIS (*.oft_blocks) or PEFT "
        f"(*.oft_R.weight, *.oft_r); found {len(keys)} keys like {sample}"
    )
