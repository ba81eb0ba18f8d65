"""Bake adapters into a base safetensors file, streaming one tensor at a time.

Everything but streamed layers' values is checked before the first byte is written: every adapter is read (for a file:
its skeleton, see below) and matched, and a layer that does not fit its weight, or (unless allowed) a layer with no
weight in the base, stops the bake with the match report. The output is written to a temporary file beside the target
and renamed into place, so a failed or interrupted bake leaves nothing behind and never touches an existing file
(unless `overwrite`). Every tensor keeps its dtype and shape (fp32 / fp16 / bf16 / fp8: computed in fp32, written back
in the tensor's own dtype); untouched tensors are copied byte for byte; the base's metadata is kept (plus a record of
what was baked).

Memory: the base is read with plain file reads (no memory map), one tensor at a time, and an adapter given as a file
is streamed too (`formats.open_streamed`): a skeleton first (every layer's structure and every check of its reader,
every tensor but the scalar alphas on the meta device), then each layer read alone when its weight comes up. A layer
whose values are damaged (NaN/Inf) is therefore found while writing: the bake stops naming the file and layer, the
temporary file is removed and nothing appears at the output path (checking values first would read the adapter twice:
11 GB more for a FLUX.1 all-linear dim-4 file). So at any moment the process holds the skeleton, one base tensor
(rotated in place, or its fp32 working copy when several patches or fp8 need one) and one adapter layer's working set,
whatever the model and adapter sizes; tests/test_bake_ops.py and tests/test_bake_stream.py measure the peak. A layer
whose effective strength is 0 (strength 0, or a per-block spec `--blocks` that switches its block off) is not touched:
its weight stays bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .blocks import BlockSpec, effective_strengths, parse_block_spec
from .errors import OFTError
from .formats import StreamedAdapter, open_streamed
from .match import Match, MatchReport, match_adapter, target_shape
from .names import build_key_map
from .rotation import STRENGTH_MODES, StrengthMode, rotate_weight_
from .safetensors_io import DTYPES, TensorInfo, read_header
from .spec import OFTAdapter, OFTLayer, resolve_for_weight

log = logging.getLogger(__name__)
_COPY_CHUNK = 16 * 1024 * 1024
# A bake is "long" (a progress display on a non-terminal stderr) after this many seconds.
LONG_BAKE_SECONDS = 10.0


@dataclass
class BakeResult:
    out: str
    reports: list[MatchReport]
    tensors_changed: int
    layers_skipped: int = 0  # matched adapter layers left untouched because their effective strength is 0
    seconds: float = 0.0


def _narrow(w: torch.Tensor, offset):
    return w if offset is None else w.narrow(*offset)


class _Progress:
    """A progress display on stderr: a live bar on a terminal, else a line every 10 % once the bake is long.

    Not logging: a bar redraws one line with carriage returns, which a log handler cannot do; nothing is shown for
    short bakes into a pipe or a file (tests, ComfyUI's console), so library users are not spammed.
    """

    def __init__(self, total: int, stream=None, *, always: bool = False):
        self.total, self.stream = max(total, 1), stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.always = always  # show_progress=True: lines even for a short bake into a pipe
        self.start = time.monotonic()
        self.last_decile = -1
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        elapsed = time.monotonic() - self.start
        frac = done / self.total
        if self.tty:
            bar = "#" * int(30 * frac)
            self.stream.write(f"\rbaking [{bar:<30}] {100 * frac:5.1f}% {elapsed:6.1f}s")
            self.shown = True
        elif (self.always or elapsed >= LONG_BAKE_SECONDS) and int(10 * frac) > self.last_decile:
            self.last_decile = int(10 * frac)
            self.stream.write(f"baking: {100 * frac:.0f}% after {elapsed:.0f}s\n")
            self.shown = True
        if done >= total and self.tty and self.shown:
            self.stream.write("\n")
        if self.shown:
            self.stream.flush()


def _read_tensor(src, header, ti: TensorInfo, key: str, buf: bytearray) -> torch.Tensor:
    """One tensor read with a plain file read into `buf` (no memory map: mapped pages would stay resident).

    `buf` is one buffer, sized for the largest patched tensor and reused for every tensor: a fresh allocation per
    tensor lets the C allocator fragment its heap, and the process would creep to several tensors' worth."""
    n = ti.end - ti.start
    dtype = DTYPES[ti.dtype]
    if n == 0:
        return torch.empty(ti.shape, dtype=dtype)
    view = memoryview(buf)[:n]
    src.seek(header.data_offset + ti.start)
    if src.readinto(view) != n:
        raise OFTError(f"base file ended while reading {key}", path=header.path)
    return torch.frombuffer(view, dtype=dtype).reshape(ti.shape)


def _real_layer(streamed: StreamedAdapter, m: Match, shapes) -> OFTLayer:
    """The matched layer `m` (a skeleton's) read for real and resolved for its weight like the skeleton was."""
    layer = resolve_for_weight(streamed.layer(m.layer.key), target_shape(m.target, shapes), path=streamed.header.path)
    structure = ("side", "kind", "num_blocks", "block_sizes", "transpose", "parameterization", "neumann_coeffs",
                 "constraint", "component", "name")
    if any(getattr(layer, f) != getattr(m.layer, f) for f in structure):
        raise OFTError("read on its own, this layer differs from the same layer read with the whole file",
                       path=streamed.header.path, layer=m.layer.key)
    return layer


def _adapter_items(adapters) -> list[tuple[object, float, BlockSpec | str | None]]:
    items = []
    for entry in adapters:
        if len(entry) == 2:
            items.append((entry[0], entry[1], None))
        elif len(entry) == 3:
            items.append(tuple(entry))
        else:
            raise OFTError(f"bake: each adapter is (file or adapter, strength[, block spec]), found {entry!r}")
    return items


def bake(
    base: str | os.PathLike,
    adapters: Sequence[tuple],
    out: str | os.PathLike,
    *,
    mode: StrengthMode = "kohya",
    block_spec: BlockSpec | str | None = None,
    overwrite: bool = False,
    allow_unmatched: bool = False,
    progress: Callable[[int, int], None] | None = None,
    show_progress: bool | None = None,
) -> BakeResult:
    """Write `base` with `adapters` applied in order to `out`.

    `adapters`: [(file or `OFTAdapter`, strength)] or [(…, strength, block spec)]; `block_spec` (the text of
    `oft_core.blocks`, e.g. "double=1, single:0-9=0.5, single=0") applies to every adapter without its own. Each
    layer is baked at strength × its block multiplier (`blocks.effective_strengths`) in strength `mode` ("kohya" or
    "orthogonal", see `rotation.py`); layers at 0 are left bit for bit. `progress(done_bytes, total_bytes)` is
    called after every tensor; `show_progress` (None: automatic) shows a bar on stderr (`_Progress`).
    """
    started = time.monotonic()
    if mode not in STRENGTH_MODES:
        raise OFTError(f"strength mode: expected one of {', '.join(STRENGTH_MODES)}, found {mode!r}")
    base, out = os.fspath(base), os.fspath(out)
    header = read_header(base)
    if os.path.exists(out):
        if os.path.abspath(out) == os.path.abspath(base):
            raise OFTError("refusing to write the output over the base file it reads from", path=out)
        if not overwrite:
            raise OFTError("output file exists; choose another name or pass --overwrite", path=out)
    items = _adapter_items(adapters)
    default_spec = parse_block_spec(block_spec) if isinstance(block_spec, str) else block_spec
    shapes = header.shapes
    keymap = build_key_map(shapes)
    patches: dict[str, list] = {}
    reports = []
    record = []
    skipped = 0
    for item, strength, spec in items:
        # A file is streamed: its skeleton now (structure, every reader check), each layer read alone when its
        # weight comes up. An OFTAdapter given as an object is already in memory and used as it is.
        streamed = None if isinstance(item, OFTAdapter) else open_streamed(item)
        adapter = item if streamed is None else streamed.skeleton
        spec = parse_block_spec(spec) if isinstance(spec, str) else (spec if spec is not None else default_spec)
        report = match_adapter(adapter, shapes, keymap, base_name=os.path.basename(base))
        reports.append(report)
        if not report.matched:
            raise OFTError(f"no layer of this adapter matches a weight of {base} ({report.summary()}): is it for "
                           f"another model architecture ({keymap.architecture} here)?", path=adapter.path)
        if report.unmatched and not allow_unmatched:
            raise OFTError(f"{report.summary()}. Nothing was written: pass --allow-unmatched to bake the matched "
                           "layers anyway", path=adapter.path)
        if spec is None:
            per_layer = {k: float(strength) for k in adapter.layers}
        else:
            per_layer = effective_strengths(adapter, spec, float(strength))
        for m in report.matched:
            s = per_layer[(m.layer.component, m.layer.name)]
            if s == 0:
                skipped += 1
                continue
            patches.setdefault(m.target.key, []).append((m, s, streamed))
        record.append({"adapter": os.path.basename(report.adapter), "strength": float(strength), "mode": mode,
                       "layers": len(report.matched), **({"blocks": spec.text} if spec is not None else {})})
    for key in patches:
        dtype = DTYPES.get(header.tensors[key].dtype)
        if dtype is None or not dtype.is_floating_point:
            raise OFTError(f"weight {key} has dtype {header.tensors[key].dtype}, expected a floating point type",
                           path=base)

    metadata = dict(header.metadata)
    metadata["comfyui_oft.baked"] = json.dumps(record)
    entries = {"__metadata__": metadata}
    for key, ti in header.tensors.items():
        entries[key] = {"dtype": ti.dtype, "shape": list(ti.shape), "data_offsets": [ti.start, ti.end]}
    blob = json.dumps(entries, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    order = sorted(header.tensors.items(), key=lambda kv: kv[1].start)
    total = sum(ti.end - ti.start for _, ti in order)
    show = _Progress(total, always=bool(show_progress)) if show_progress is not False else None
    out_dir = os.path.dirname(os.path.abspath(out))
    fd, tmp = tempfile.mkstemp(prefix=".oft-bake-", suffix=".tmp", dir=out_dir)
    done = 0
    # One buffer for everything read: a patched tensor (whole) or a chunk of an untouched one (copied through it).
    largest_patched = max((header.tensors[k].end - header.tensors[k].start for k in patches), default=0)
    readbuf = bytearray(max(largest_patched, min(_COPY_CHUNK, max((ti.end - ti.start for _, ti in order), default=0))))
    copybuf = memoryview(readbuf)
    try:
        with os.fdopen(fd, "wb") as dst, open(base, "rb") as src:
            dst.write(len(blob).to_bytes(8, "little") + blob)
            for key, ti in order:
                if key in patches:
                    w = _read_tensor(src, header, ti, key, readbuf)
                    dtype = w.dtype
                    # One patch on an fp32/fp16/bf16 weight: rotated in place in the read buffer (fp32 math chunk by
                    # chunk, rounded once). Several patches (fused slices, several adapters) or fp8: one fp32 copy,
                    # rounded once at the end.
                    direct = len(patches[key]) == 1 and dtype in (torch.float32, torch.float16, torch.bfloat16)
                    work = w if direct else w.to(torch.float32)
                    del w
                    for m, strength, streamed in patches[key]:
                        layer = m.layer if streamed is None else _real_layer(streamed, m, shapes)
                        rotate_weight_(layer, _narrow(work, m.target.offset), strength, mode)
                        del layer
                    data = work.to(dtype).contiguous().view(torch.uint8).reshape(-1)
                    del work
                    if data.numel() != ti.end - ti.start:
                        raise OFTError(f"internal size mismatch writing {key}", path=out)
                    dst.write(memoryview(data.numpy()))
                    del data
                else:
                    src.seek(header.data_offset + ti.start)
                    left = ti.end - ti.start
                    while left:
                        got = src.readinto(copybuf[:min(left, _COPY_CHUNK)])
                        if not got:
                            raise OFTError(f"base file ended while copying {key}", path=base)
                        dst.write(copybuf[:got])
                        left -= got
                done += ti.end - ti.start
                if progress is not None:
                    progress(done, total)
                if show is not None:
                    show(done, total)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    changed = len(patches)
    seconds = time.monotonic() - started
    log.info("baked %d tensors into %s in %.1fs (%d layers at strength 0 left untouched)", changed, out, seconds,
             skipped)
    return BakeResult(out, reports, changed, skipped, seconds)
