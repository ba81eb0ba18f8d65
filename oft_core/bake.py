"""Bake adapters into a base safetensors file, streaming one tensor at a time.

Everything but streamed layers' values is checked before the first byte is written: every adapter is read (for a file:
its skeleton, see below) and matched, and a layer that does not fit its weight, or (unless allowed) a layer with no
weight in the base, stops the bake with the match report. The output is written to a temporary file beside the target
and renamed into place, so a failed or interrupted bake leaves nothing behind and never touches an existing file
(unless `overwrite`). Every tensor keeps its dtype and shape (fp32 / fp16 / bf16 / fp8: computed in fp32, written back
in the tensor's own dtype); untouched tensors are copied byte for byte; the base's metadata is kept (plus a record of
what was baked).

Memory: the base is read with plain file reads (no memory map), one tensor at a time, and an adapter given as a file
is streamed too (`formats._open_streamed`): a skeleton first (every layer's structure and every check of its reader,
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
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .blocks import _BlockSpec, _effective_strengths, parse_block_spec
from .errors import OFTError, _bulk, check_strength
from .formats import _open_streamed, _StreamedAdapter
from .match import Match, MatchReport, _target_shape, match_adapter
from .names import bias_key, build_key_map
from .publish import _check_output, _publish_file
from .rotation import STRENGTH_MODES, _all_finite, _StrengthMode, adapted_bias, rotate_weight_
from .safetensors_io import _DTYPES, _TensorInfo, read_header
from .spec import OFTAdapter, OFTLayer, resolve_for_weight

log = logging.getLogger(__name__)
_COPY_CHUNK = 16 * 1024 * 1024
# A bake is "long" (a progress display on a non-terminal stderr) after this many seconds.
_LONG_BAKE_SECONDS = 10.0


@dataclass
class _BakeResult:
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
        elif (self.always or elapsed >= _LONG_BAKE_SECONDS) and int(10 * frac) > self.last_decile:
            self.last_decile = int(10 * frac)
            self.stream.write(f"baking: {100 * frac:.0f}% after {elapsed:.0f}s\n")
            self.shown = True
        if done >= total and self.tty and self.shown:
            self.stream.write("\n")
        if self.shown:
            self.stream.flush()


def _read_tensor(src, header, ti: _TensorInfo, key: str, buf: bytearray) -> torch.Tensor:
    """One tensor read with a plain file read into `buf` (no memory map: mapped pages would stay resident).

    `buf` is one buffer, sized for the largest patched tensor and reused for every tensor: a fresh allocation per
    tensor lets the C allocator fragment its heap, and the process would creep to several tensors' worth."""
    n = ti.end - ti.start
    dtype = _DTYPES[ti.dtype]
    if n == 0:
        return torch.empty(ti.shape, dtype=dtype)
    view = memoryview(buf)[:n]
    src.seek(header.data_offset + ti.start)
    if src.readinto(view) != n:
        raise OFTError(f"base file ended while reading {key}", path=header.path)
    return torch.frombuffer(view, dtype=dtype).reshape(ti.shape)


def _real_layer(streamed: _StreamedAdapter, m: Match, shapes) -> OFTLayer:
    """The matched layer `m` (a skeleton's) read for real and resolved for its weight like the skeleton was."""
    layer = resolve_for_weight(streamed.layer(m.layer.key), _target_shape(m.target, shapes), path=streamed.header.path)
    structure = ("side", "kind", "num_blocks", "block_sizes", "transpose", "parameterization", "neumann_coeffs",
                 "constraint", "component", "name")
    if any(getattr(layer, f) != getattr(m.layer, f) for f in structure):
        raise OFTError("read on its own, this layer differs from the same layer read with the whole file",
                       path=streamed.header.path, layer=m.layer.key)
    return layer


def _patched_bytes(src, header, ti: _TensorInfo, key: str, readbuf, patches, shapes, mode) -> memoryview:
    """The weight `key` with its patches applied, as bytes in its own dtype."""
    try:
        w = _read_tensor(src, header, ti, key, readbuf)
    except OSError as e:
        raise OFTError(f"cannot read the base file ({e.strerror})", path=header.path) from None
    dtype = w.dtype
    # One patch on an fp32/fp16/bf16 weight: rotated in place in the read buffer (fp32 math chunk by chunk, rounded
    # once). Several patches (fused slices, several adapters) or fp8: one fp32 copy, rounded once at the end.
    direct = len(patches) == 1 and dtype in (torch.float32, torch.float16, torch.bfloat16)
    was_finite = direct or _all_finite(w)
    work = w if direct else w.to(torch.float32)
    del w
    for m, strength, streamed in patches:
        layer = m.layer if streamed is None else _real_layer(streamed, m, shapes)
        source = streamed.header.path if streamed is not None else None
        try:
            part = _narrow(work, m.target.offset)
            if key != m.target.key:  # the layer's trained bias, at its key beside the weight's
                part.copy_(adapted_bias(layer, part, strength, m.target.perm))
            else:
                rotate_weight_(layer, part, strength, mode)
        except OFTError as e:
            raise OFTError(f"{e.detail} (base weight {key}); nothing was written", path=source,
                           layer=layer.key) from None
        del layer
    data = work.to(dtype)
    if not direct and was_finite and not _all_finite(data):  # finite in fp32, overflowing the weight's own dtype
        raise OFTError(f"the adapted weight {key} would hold NaN or Inf values in {ti.dtype}, while the base weight "
                       "had none: it overflows its dtype; use a smaller strength. Nothing was written",
                       path=header.path)
    data = data.contiguous().view(torch.uint8).reshape(-1)
    del work
    if data.numel() != ti.end - ti.start:
        raise OFTError(f"internal size mismatch writing {key}")
    return memoryview(data.numpy())


def _copy_bytes(src, dst, header, ti: _TensorInfo, key: str, copybuf: memoryview) -> None:
    left = ti.end - ti.start
    try:
        src.seek(header.data_offset + ti.start)
    except OSError as e:
        raise OFTError(f"cannot read the base file ({e.strerror})", path=header.path) from None
    while left:
        try:
            got = src.readinto(copybuf[:min(left, _COPY_CHUNK)])
        except OSError as e:
            raise OFTError(f"cannot read the base file ({e.strerror})", path=header.path) from None
        if not got:
            raise OFTError(f"base file ended while copying {key}: was it changed during the bake?", path=header.path)
        dst.write(copybuf[:got])  # an OSError here is about the output: publish_file names it
        left -= got


def _adapter_items(adapters) -> list[tuple[object, float, _BlockSpec | str | None]]:
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
    mode: _StrengthMode = "kohya",
    block_spec: _BlockSpec | str | None = None,
    overwrite: bool = False,
    allow_unmatched: bool = False,
    progress: Callable[[int, int], None] | None = None,
    show_progress: bool | None = None,
) -> _BakeResult:
    """Write `base` with `adapters` applied in order to `out`.

    `adapters`: [(file or `OFTAdapter`, strength)] or [(…, strength, block spec)]; `block_spec` (the text of
    `oft_core.blocks`, e.g. "double=1, single:0-9=0.5, single=0") applies to every adapter without its own. Each
    layer is baked at strength × its block multiplier (`blocks._effective_strengths`) in strength `mode` ("kohya" or
    "orthogonal", see `rotation.py`); layers at 0 are left bit for bit. `progress(done_bytes, total_bytes)` is
    called after every tensor; `show_progress` (None: automatic) shows a bar on stderr (`_Progress`).
    """
    started = time.monotonic()
    if mode not in STRENGTH_MODES:
        raise OFTError(f"strength mode: expected one of {', '.join(STRENGTH_MODES)}, found {mode!r}")
    base, out = os.fspath(base), os.fspath(out)
    items = _adapter_items(adapters)
    inputs = [base] + [_input_paths(item) for item, _, _ in items]
    inputs = [p for group in inputs for p in ([group] if isinstance(group, str) else group)]
    # Refused before anything is read: an output over an input (any path, any link) or over an existing file
    # without `overwrite` (checked again, atomically, when the finished file is published).
    _check_output(out, inputs, overwrite=overwrite)
    header = read_header(base)
    default_spec = parse_block_spec(block_spec) if isinstance(block_spec, str) else block_spec
    streams = []
    try:
        with _bulk():
            return _bake(header, items, out, inputs, mode, default_spec, overwrite, allow_unmatched, progress,
                         show_progress, started, streams)
    finally:
        for streamed in streams:
            streamed.file.close()


def _input_paths(item) -> list[str]:
    """The files an adapter argument reads (a PEFT folder: the folder, its files; a file: it and a config beside)."""
    if isinstance(item, OFTAdapter):
        return [item.path] if item.path else []
    path = os.fspath(item)
    config = os.path.join(os.path.dirname(os.path.abspath(path)), "adapter_config.json")
    return [path, config] if os.path.isfile(config) else [path]


def _bake(header, items, out, inputs, mode, default_spec, overwrite, allow_unmatched, progress, show_progress,
          started, streams) -> _BakeResult:
    plan = _plan(header, items, mode, default_spec, allow_unmatched, streams)
    write = _streamer(header, plan.patches, _output_header(header, plan.record), mode, progress, show_progress)
    _publish_file(out, write, inputs=inputs, overwrite=overwrite, what="baked model")
    changed = len(plan.patches)
    seconds = time.monotonic() - started
    log.info("baked %d tensors into %s in %.1fs (%d layers at strength 0 left untouched)", changed, out, seconds,
             plan.skipped)
    return _BakeResult(out, plan.reports, changed, plan.skipped, seconds)


# ------------------------------------------------------------------------------------------------ plan
@dataclass
class _Plan:
    """What a bake does, decided before the first byte is written."""

    patches: dict[str, list] = field(default_factory=dict)  # base weight key -> [(Match, strength, stream or None)]
    reports: list[MatchReport] = field(default_factory=list)
    record: list[dict] = field(default_factory=list)  # the output's "comfyui_oft.baked" metadata, one per adapter
    skipped: int = 0  # matched layers whose effective strength is 0


def _plan(header, items, mode, default_spec, allow_unmatched, streams) -> _Plan:
    """Every adapter read (a file: its skeleton, its stream appended to `streams`), checked and matched."""
    keymap = build_key_map(header.shapes)
    plan = _Plan()
    for item, strength, spec in items:
        # A file is streamed: its skeleton now (structure, every reader check), each layer read alone when its
        # weight comes up. An OFTAdapter given as an object is already in memory and used as it is.
        streamed = None if isinstance(item, OFTAdapter) else _open_streamed(item)
        if streamed is not None:
            streams.append(streamed)
        adapter = item if streamed is None else streamed.skeleton
        strength = check_strength(strength, f"strength of {os.path.basename(adapter.path) or 'the adapter'}",
                                  path=adapter.path or None)
        spec = parse_block_spec(spec) if isinstance(spec, str) else (spec if spec is not None else default_spec)
        report = _checked_match(adapter, header, keymap, allow_unmatched)
        plan.reports.append(report)
        per_layer = {k: strength for k in adapter.layers} if spec is None else \
            _effective_strengths(adapter, spec, strength)
        _add_patches(plan, report, per_layer, streamed)
        plan.record.append({"adapter": os.path.basename(report.adapter), "strength": float(strength), "mode": mode,
                            "layers": len(report.matched), **({"blocks": spec.text} if spec is not None else {})})
    _check_float_weights(header, plan.patches)
    return plan


def _checked_match(adapter: OFTAdapter, header, keymap, allow_unmatched: bool) -> MatchReport:
    """The adapter matched against the base; OFTError when nothing matches, or (unless allowed) something does not."""
    base = header.path
    report = match_adapter(adapter, header.shapes, keymap, base_name=os.path.basename(base))
    if not report.matched:
        raise OFTError(f"no layer of this adapter matches a weight of {base} ({report.summary()}): is it for "
                       f"another model architecture ({keymap.architecture} here)?", path=adapter.path)
    if report.unmatched and not allow_unmatched:
        raise OFTError(f"{report.summary()}. Nothing was written: pass --allow-unmatched to bake the matched "
                       "layers anyway", path=adapter.path)
    return report


def _add_patches(plan: _Plan, report: MatchReport, per_layer: dict, streamed) -> None:
    """The report's matched layers as patches of their base weights; those at strength 0 counted, not patched."""
    for m in report.matched:
        s = per_layer[(m.layer.component, m.layer.name)]
        if s == 0:
            plan.skipped += 1
            continue
        plan.patches.setdefault(m.target.key, []).append((m, s, streamed))
        if m.layer.bias is not None:  # its trained bias (match_adapter checked the base has one there)
            plan.patches.setdefault(bias_key(m.target.key), []).append((m, s, streamed))


def _check_float_weights(header, patches: dict) -> None:
    for key in patches:
        dtype = _DTYPES.get(header.tensors[key].dtype)
        if dtype is None or not dtype.is_floating_point:
            raise OFTError(f"weight {key} has dtype {header.tensors[key].dtype}, expected a floating point type",
                           path=header.path)


# ------------------------------------------------------------------------------------------------ output
def _output_header(header, record: list[dict]) -> bytes:
    """The output's safetensors header: the base's tensors at the base's offsets, its metadata plus the record."""
    metadata = dict(header.metadata)
    metadata["comfyui_oft.baked"] = json.dumps(record)
    entries = {"__metadata__": metadata}
    for key, ti in header.tensors.items():
        entries[key] = {"dtype": ti.dtype, "shape": list(ti.shape), "data_offsets": [ti.start, ti.end]}
    blob = json.dumps(entries, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob


# ------------------------------------------------------------------------------------------------ stream
def _streamer(header, patches: dict, head: bytes, mode, progress, show_progress) -> Callable:
    """`write(dst)` for `_publish_file`: the header, then every tensor in file order, patched or copied."""
    base, shapes = header.path, header.shapes
    order = sorted(header.tensors.items(), key=lambda kv: kv[1].start)
    total = sum(ti.end - ti.start for _, ti in order)
    show = _Progress(total, always=bool(show_progress)) if show_progress is not False else None
    ticks = [f for f in (progress, show) if f is not None]
    readbuf = _read_buffer(header, patches, order)
    copybuf = memoryview(readbuf)

    def write(dst) -> None:
        done = 0
        try:
            src = open(base, "rb")
        except OSError as e:
            raise OFTError(f"cannot read the base file ({e.strerror})", path=base) from None
        with src:
            dst.write(head)
            for key, ti in order:
                if key in patches:
                    dst.write(_patched_bytes(src, header, ti, key, readbuf, patches[key], shapes, mode))
                else:
                    _copy_bytes(src, dst, header, ti, key, copybuf)
                done += ti.end - ti.start
                for tick in ticks:
                    tick(done, total)

    return write


def _read_buffer(header, patches: dict, order) -> bytearray:
    """One buffer for everything read: a patched tensor (whole) or a chunk of an untouched one (copied through it)."""
    largest_patched = max((header.tensors[k].end - header.tensors[k].start for k in patches), default=0)
    return bytearray(max(largest_patched, min(_COPY_CHUNK, max((ti.end - ti.start for _, ti in order), default=0))))
