"""Reading safetensors files safely: header checks, clear errors, never unpickling anything.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then the tensor bytes. Checking that
layout ourselves lets a truncated download, an HTML error page or a pickle saved as ".safetensors" fail with a message
that says which, instead of a stack trace from deep inside a loader.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch

from .errors import OFTError

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
_MAX_HEADER = 100 * 1024 * 1024

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_offset: int  # where the tensor bytes begin

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.tensors.items()}


def refuse_pickle(path: str) -> None:
    raise OFTError(
        "this is a pickle (PyTorch .pt/.ckpt/.bin) file. Pickles can run arbitrary code when loaded, so they are "
        "never unpickled here: convert it to .safetensors with the tool that made it (or with safetensors' "
        "convert script) and load that",
        path=path,
    )


def _looks_like_pickle(head: bytes) -> bool:
    # torch.save zip archives start with "PK"; raw pickles with the PROTO opcode 0x80 and a protocol number.
    return head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def read_header(path: str | os.PathLike) -> Header:
    """Parse and check a safetensors header without loading tensors."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise OFTError("file not found", path=path)
    if os.path.isdir(path):
        raise OFTError("expected a .safetensors file, found a directory", path=path)
    if path.lower().endswith(PICKLE_SUFFIXES):
        refuse_pickle(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise OFTError(f"not a safetensors file: only {size} bytes (empty or truncated)", path=path)
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            if _looks_like_pickle(head):
                refuse_pickle(path)
            raise OFTError(
                f"not a safetensors file, or truncated: header length field says {n} bytes, file has {size} bytes",
                path=path,
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        if _looks_like_pickle(head):
            refuse_pickle(path)
        raise OFTError(f"not a safetensors file: header is not valid JSON ({e})", path=path) from None
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    end_max = 0
    for key, info in header.items():
        try:
            start, end = (int(v) for v in info["data_offsets"])
            ti = TensorInfo(str(info["dtype"]), tuple(int(s) for s in info["shape"]), start, end)
        except (KeyError, TypeError, ValueError):
            raise OFTError(f"not a safetensors file: malformed header entry for tensor {key!r}", path=path) from None
        tensors[key] = ti
        end_max = max(end_max, end)
    if 8 + n + end_max > size:
        raise OFTError(
            f"truncated file: the header promises {8 + n + end_max} bytes, the file has {size} "
            "(an interrupted download or copy? fetch it again)",
            path=path,
        )
    return Header(path, tensors, {str(k): str(v) for k, v in metadata.items()}, 8 + n)


def load_tensors(path: str | os.PathLike, keys=None, device: str = "cpu") -> tuple[dict[str, torch.Tensor], Header]:
    """Load tensors (all, or `keys`) after checking the header."""
    header = read_header(path)
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(header.path, framework="pt", device=device) as f:
            for k in header.tensors if keys is None else keys:
                out[k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types; re-raise with the file named
        raise OFTError(f"could not read tensors ({type(e).__name__}: {e})", path=header.path) from e
    return out, header
