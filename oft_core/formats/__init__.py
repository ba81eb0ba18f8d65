"""Adapter file formats: a list of readers, each saying "mine" or "not mine"; the first that claims a file reads it.
Each format's module owns its key grammar, its reader and its writer; writing is a lookup by format family
(`write_adapter(adapter, out, to=...)`), and each writer refuses, naming the layers and why, whatever the target
cannot hold exactly: nothing is approximated. What each format can hold:

| target  | rotated side | blocks                                | parameterization       | constraint kept as       |
|---------|--------------|---------------------------------------|------------------------|--------------------------|
| kohya   | out          | diag, splits (FLUX)                   | Cayley                 | one `.alpha` per file    |
| lycoris | out          | diag (one split, b ≤ blocks), BOFT, R | Cayley                 | per-layer `.alpha` (0 off)|
| peft    | in           | diag (one split), block_share         | Cayley / Cayley–Neumann| COFT eps (global)        |

All key conventions in one table (details and quirks in each reader's docstring):

| reader  | keys                                                          | name prefix -> model part            |
|---------|---------------------------------------------------------------|--------------------------------------|
| kohya   | `oft_unet_<path_>.oft_blocks`, `.oft_blocks.<i>`, `.alpha`     | `oft_unet_` -> unet                  |
| lycoris | `<prefix><path_>.oft_blocks` (3-D diag, 4-D BOFT), `.oft_diag`,| `lycoris_`, `lora_unet_`,            |
|         |                                                               | `lora_transformer_` -> unet;         |
|         | `.alpha`, `.rescale`                                          | `lora_te_`/`lora_te1_`/`lora_te2_`   |
| peft    | `base_model.model.<path>.oft_R.weight`; legacy `.oft_r`,      | `base_model.model.` -> unet          |
|         | `.oft_s`; plus `adapter_config.json` beside the file          | (`text_encoder.` -> te, ...)         |
|         | BOFT: `.boft_R` (factors, blocks, b, b), `.boft_s`            | as PEFT OFT                          |
|         | OneTrainer: `<prefix><path>.oft_R.weight`, `.oft_R.scaled_oft`,| `lora_unet_`, `lora_transformer_`,   |
|         | no config (`ot_branch` / `ot_revision` in the header)         | `diffusion_model.` -> unet; `lora_te*`|

`<path_>` is the module path with "." replaced by "_" (not reversible by string rules: `names.py` maps it through the
base model's own keys); `<path>` keeps its dots. Only safetensors is read; pickles are refused, never unpickled.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Mapping, NamedTuple

import torch

from ..choices import FORMATS
from ..errors import OFTError, _bulk
from ..publish import _check_output
from ..safetensors_io import _DTYPES, _Header, _load_tensors, _TensorFile, _unknown_dtype, read_header
from ..spec import OFTAdapter
from . import _write, kohya, lycoris, peft

__all__ = ["READERS", "WRITERS", "format_family", "load_adapter", "write_adapter"]


class _Reader(NamedTuple):
    name: str
    claims: Callable  # (header, config) -> bool
    read: Callable  # (header, tensors, config) -> OFTAdapter
    key: re.Pattern  # the reader's key grammar; group 1 is the layer's key (OFTLayer.key)
    write: Callable  # (adapter, out, *, overwrite, metadata, inputs, **format options) -> the output path


READERS: list[_Reader] = [
    _Reader("kohya", kohya.claims, kohya.read, kohya._KEY, kohya.write),
    _Reader("lycoris", lycoris.claims, lycoris.read, lycoris._KEY, lycoris.write),
    _Reader("peft", peft.claims, peft.read, peft._KEY, peft.write),
]
WRITERS: dict[str, Callable] = {reader.name: reader.write for reader in READERS}
assert tuple(WRITERS) == FORMATS, "choices.FORMATS names the formats the readers above read and write"
_write_kohya, _write_lycoris, _write_peft = kohya.write, lycoris.write, peft.write


def format_family(fmt: str) -> str:
    """The writer family of a reader format id ("kohya_flux" -> "kohya", "lycoris_boft" -> "lycoris", ...)."""
    for family in FORMATS:
        if fmt.startswith(family):
            return family
    raise OFTError(f"unknown adapter format {fmt!r}: expected one of {', '.join(FORMATS)}")


def write_adapter(adapter: OFTAdapter, out, to: str, *, overwrite: bool = False,
                  metadata: Mapping[str, str] | None = None, **options) -> str:
    """Write `adapter` as `to` ("kohya" | "lycoris" | "peft"); options go to that writer (`inputs`: files the output
    must never replace, besides the adapter's own file). Returns the output path."""
    if to not in WRITERS:
        raise OFTError(f"output format: expected one of {', '.join(FORMATS)}, found {to!r}")
    # the output rules first (never over an input, never over an existing output without overwrite): a refusal
    # about the path comes before any work on the layers
    _check_output(out, _write.inputs_of(adapter, options.get("inputs", ())), overwrite=overwrite,
                 kind="dir" if to == "peft" else "file")
    return WRITERS[to](adapter, out, overwrite=overwrite, metadata=metadata, **options)


def _open(path: str | os.PathLike) -> tuple[_Reader, _Header, dict | None]:
    """The reader that claims the file, its checked header and the PEFT config (if any)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise OFTError("file not found", path=path)
    model_path, config = peft.find_config(path)
    header = read_header(model_path)
    for reader in READERS:
        if reader.claims(header, config):
            _check_generator_dtypes(header)
            return reader, header, config
    raise OFTError(not_oft_message(header), path=model_path)


# The tensors that hold a layer's rotation (generator or stored R) in every format. Trainers write them in a floating
# point dtype; integer values would be read as a rotation nobody trained.
_GENERATOR = re.compile(r"\.(oft_blocks(\.\d+)?|oft_diag|oft_R\.weight|oft_r|boft_R)$")


_FLOAT_DTYPES = frozenset(("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"))


def _check_generator_dtypes(header: _Header) -> None:
    if header.dtypes <= _FLOAT_DTYPES:  # every tensor floating point: nothing to
        return  # look for (a key-by-key pass over 200,000 keys took a twentieth of a second)
    for k, ti in header.tensors.items():
        if ti.dtype not in _FLOAT_DTYPES and _GENERATOR.search(k):
            raise OFTError(f"tensor {k!r} holds the layer's rotation in dtype {ti.dtype}: expected a floating point "
                           "dtype (F32, F16, BF16, F64), as every OFT trainer writes", path=header.path)


def _read(reader: _Reader, header: _Header, tensors: dict, config) -> OFTAdapter:
    adapter = reader.read(header, tensors, config)
    if not adapter.layers:
        raise OFTError(f"no OFT layer found by the {reader.name} reader", path=header.path)
    return adapter


def load_adapter(path: str | os.PathLike) -> OFTAdapter:
    """Read any supported OFT adapter: a .safetensors file, or a PEFT adapter directory."""
    with _bulk():
        reader, header, config = _open(path)
        tensors, _ = _load_tensors(header)  # the header already checked: not parsed again
        return _read(reader, header, tensors, config)


# ---------------------------------------------------------------------------------------------- streaming
# What `bake` uses to hold one layer at a time: a skeleton of the whole adapter (every check the reader makes across
# layers, every layer's structure) with its large tensors on the meta device, then each layer read for real, alone,
# through the same reader (so a streamed layer is the layer `load_adapter` gives).

# What a skeleton reads for real: `.alpha` (the one value a reader uses: kohya / LyCORIS constraints) and tensors up to
# this size. Everything else is on the meta device, so the skeleton, alive for the whole bake, holds no blocks: with a
# larger bound an adapter of many small layers (SD1.5 widths, small PEFT blocks) stayed in memory almost whole.
_SKELETON_REAL_BYTES = 64


class _StreamedAdapter(NamedTuple):
    skeleton: OFTAdapter  # every layer's structure; generators and row scales on the meta device (bar tiny ones)
    reader: _Reader
    header: _Header
    config: dict | None
    keys: dict[str, list[str]]  # layer key (OFTLayer.key) -> the file's keys of that layer
    file: _TensorFile  # the file kept open, its header parsed once (per-layer cost independent of the layer count)

    def layer(self, key: str):
        """One layer with its tensors, read alone (only its keys) by the same reader as the skeleton."""
        tensors = self.file.get(self.keys.get(key, []))
        layers = [layer for layer in _read(self.reader, self.header, tensors, self.config) if layer.key == key]
        if len(layers) != 1:
            raise OFTError(f"layer {key!r} could not be read on its own ({len(layers)} layers found)",
                           path=self.header.path)
        return layers[0]


def _open_streamed(path: str | os.PathLike) -> _StreamedAdapter:
    """The adapter at `path` for layer-by-layer use: its skeleton now (scalars only read), each layer on demand."""
    reader, header, config = _open(path)
    small = [k for k, ti in header.tensors.items()
             if ti.end - ti.start <= _SKELETON_REAL_BYTES or k.endswith(".alpha")]
    tensors, _ = _load_tensors(header, keys=small)
    for k, ti in header.tensors.items():
        if k not in tensors:
            if ti.dtype not in _DTYPES:
                raise _unknown_dtype(header.path, k, ti.dtype)
            tensors[k] = torch.empty(ti.shape, dtype=_DTYPES[ti.dtype], device="meta")
    try:
        skeleton = _read(reader, header, tensors, config)
    except (RuntimeError, NotImplementedError) as e:  # a reader that needs a value the skeleton left on meta
        raise OFTError(f"the {reader.name} reader needs tensor values to read this file's structure, so it cannot be "
                       f"streamed ({type(e).__name__}: {e}); load it whole with load_adapter instead",
                       path=header.path) from e
    keys: dict[str, list[str]] = {}
    for k in header.tensors:
        m = reader.key.match(k)
        if m:
            keys.setdefault(m.group(1), []).append(k)
    return _StreamedAdapter(skeleton, reader, header, config, keys, _TensorFile(header))


def not_oft_message(header: _Header) -> str:
    keys = list(header.tensors)
    sample = ", ".join(keys[:3]) or "no tensors at all"
    if any(k.endswith((".lora_up.weight", ".lora_down.weight", ".lora_A.weight", ".lora_B.weight")) for k in keys):
        return (f"this is a LoRA file, not OFT (keys like {sample}): load it with ComfyUI's LoraLoader")
    return (
        "not an OFT adapter: expected keys of kohya (oft_unet_*.oft_blocks), LyCORIS (*.oft_blocks) or PEFT "
        f"(*.oft_R.weight, *.oft_r, BOFT *.boft_R); found {len(keys)} keys like {sample}"
    )
