"""Bake adapters into a base safetensors file, streaming one tensor at a time.

Everything is checked before the first byte is written: every adapter is read and matched, and a layer that does not
fit its weight, or (unless allowed) a layer with no weight in the base, stops the bake with the match report. The
output is written to a temporary file beside the target and renamed into place, so a failed or interrupted bake
leaves nothing behind and never touches an existing file (unless `overwrite`). Every tensor keeps its dtype and shape;
untouched tensors are copied byte for byte; the base's metadata is kept (plus a record of what was baked).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .errors import OFTError
from .formats import load_adapter
from .match import MatchReport, match_adapter
from .names import build_key_map
from .rotation import StrengthMode, rotate_weight
from .safetensors_io import DTYPES, read_header
from .spec import OFTAdapter

log = logging.getLogger(__name__)
_COPY_CHUNK = 16 * 1024 * 1024


@dataclass
class BakeResult:
    out: str
    reports: list[MatchReport]
    tensors_changed: int


def _narrow(w: torch.Tensor, offset):
    return w if offset is None else w.narrow(*offset)


def bake(
    base: str | os.PathLike,
    adapters: Sequence[tuple[str | os.PathLike | OFTAdapter, float]],
    out: str | os.PathLike,
    *,
    mode: StrengthMode = "kohya",
    overwrite: bool = False,
    allow_unmatched: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> BakeResult:
    """Write `base` with `adapters` ([(file or adapter, strength)], applied in order) to `out`."""
    base, out = os.fspath(base), os.fspath(out)
    header = read_header(base)
    if os.path.exists(out):
        if os.path.abspath(out) == os.path.abspath(base):
            raise OFTError("refusing to write the output over the base file it reads from", path=out)
        if not overwrite:
            raise OFTError("output file exists; choose another name or pass --overwrite", path=out)
    shapes = header.shapes
    keymap = build_key_map(shapes)
    patches: dict[str, list] = {}
    reports = []
    for item, strength in adapters:
        adapter = item if isinstance(item, OFTAdapter) else load_adapter(item)
        report = match_adapter(adapter, shapes, keymap, base_name=os.path.basename(base))
        reports.append(report)
        if not report.matched:
            raise OFTError(f"no layer of this adapter matches a weight of {base} ({report.summary()}): is it for "
                           f"another model architecture ({keymap.architecture} here)?", path=adapter.path)
        if report.unmatched and not allow_unmatched:
            raise OFTError(f"{report.summary()}. Nothing was written: pass --allow-unmatched to bake the matched "
                           "layers anyway", path=adapter.path)
        for m in report.matched:
            patches.setdefault(m.target.key, []).append((m, float(strength)))
    for key in patches:
        if header.tensors[key].dtype not in DTYPES or not DTYPES[header.tensors[key].dtype].is_floating_point:
            raise OFTError(f"weight {key} has dtype {header.tensors[key].dtype}, expected a floating point type",
                           path=base)

    metadata = dict(header.metadata)
    metadata["comfyui_oft.baked"] = json.dumps(
        [{"adapter": os.path.basename(r.adapter), "strength": s, "mode": mode, "layers": len(r.matched)}
         for r, (_, s) in zip(reports, adapters)]
    )
    entries = {"__metadata__": metadata}
    for key, ti in header.tensors.items():
        entries[key] = {"dtype": ti.dtype, "shape": list(ti.shape), "data_offsets": [ti.start, ti.end]}
    blob = json.dumps(entries, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    out_dir = os.path.dirname(os.path.abspath(out))
    fd, tmp = tempfile.mkstemp(prefix=".oft-bake-", suffix=".tmp", dir=out_dir)
    order = sorted(header.tensors.items(), key=lambda kv: kv[1].start)
    try:
        from safetensors import safe_open

        with os.fdopen(fd, "wb") as dst, open(base, "rb") as src, safe_open(base, "pt") as st:
            dst.write(len(blob).to_bytes(8, "little") + blob)
            for i, (key, ti) in enumerate(order):
                if key in patches:
                    w = st.get_tensor(key)
                    dtype = w.dtype
                    work = w.to(torch.float32)
                    for m, strength in patches[key]:
                        part = _narrow(work, m.target.offset)
                        part.copy_(rotate_weight(m.layer, part, strength, mode, out_dtype=torch.float32))
                    data = work.to(dtype).contiguous().view(torch.uint8).numpy().tobytes()
                    if len(data) != ti.end - ti.start:
                        raise OFTError(f"internal size mismatch writing {key}", path=out)
                    dst.write(data)
                else:
                    src.seek(header.data_offset + ti.start)
                    left = ti.end - ti.start
                    while left:
                        chunk = src.read(min(left, _COPY_CHUNK))
                        if not chunk:
                            raise OFTError(f"base file ended while copying {key}", path=base)
                        dst.write(chunk)
                        left -= len(chunk)
                if progress is not None:
                    progress(i + 1, len(order))
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    changed = len(patches)
    log.info("baked %d tensors into %s", changed, out)
    return BakeResult(out, reports, changed)
