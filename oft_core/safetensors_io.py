"""Reading safetensors files safely: header checks, clear errors, never unpickling anything.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then the tensor bytes. Checking that
layout ourselves lets a truncated download, an HTML error page or a pickle saved as ".safetensors" fail with a message
that says which, instead of a stack trace from deep inside a loader.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import itemgetter
from typing import NamedTuple

import numpy as np
import torch

from .errors import OFTError

_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
_MAX_HEADER = 100 * 1024 * 1024

_DTYPES = {
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
        _DTYPES[_name] = getattr(torch, _attr)


_DTYPE_NAME, _END = itemgetter(0), itemgetter(3)  # of a TensorInfo


class _TensorInfo(NamedTuple):
    """One checked header entry (a named tuple: a header of 200,000 entries makes 200,000 of them)."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class _Header:
    path: str
    tensors: dict[str, _TensorInfo]
    metadata: dict[str, str]
    data_offset: int  # where the tensor bytes begin
    # known from the all-at-once check of safetensors' compact form (else None: computed from the entries when asked):
    # the distinct dtype names, and where the tensor data ends (its size: the entries tile it)
    known_dtypes: frozenset[str] | None = field(default=None, compare=False)
    known_data_end: int | None = field(default=None, compare=False)

    @property
    def dtypes(self) -> set[str] | frozenset[str]:
        """The distinct dtype names of the entries."""
        if self.known_dtypes is not None:
            return self.known_dtypes
        return set(map(_DTYPE_NAME, self.tensors.values()))

    @property
    def data_end(self) -> int:
        """Where the last tensor's data ends (the data section's size)."""
        if self.known_data_end is not None:
            return self.known_data_end
        return max(map(_END, self.tensors.values()), default=0)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.tensors.items()}


def _refuse_pickle(path: str) -> None:
    raise OFTError(
        "this is a pickle (PyTorch .pt/.ckpt/.bin) file. Pickles can run arbitrary code when loaded, so they are "
        "never unpickled here: convert it to .safetensors with the tool that made it (or with safetensors' "
        "convert script) and load that",
        path=path,
    )


def _looks_like_pickle(head: bytes) -> bool:
    # torch.save zip archives start with "PK"; raw pickles with the PROTO opcode 0x80 and a protocol number.
    return head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


# Bits per element of every dtype safetensors itself knows (a base file may hold dtypes torch has no name for here,
# e.g. U32 or F8_E8M0: they are copied byte for byte, never computed on). A dtype outside this table is refused, as
# safetensors refuses it.
_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6,
    "F6_E3M2": 6,
}
# JSON numbers in a header are offsets and dims: 20 digits hold any 64-bit value. Longer digit strings are refused
# before Python converts them (which would take quadratic time, or fail past 4300 digits).
_MAX_INT_DIGITS = 20


# A run of more than _MAX_INT_DIGITS ASCII digits (what `\d` finds in bytes), found by mapping every digit to b"0" and
# everything else to b" ", then one substring search: a regex search over a 16 MB header took a quarter second.
_DIGITS_AS_ZERO = bytes(0x30 if 0x30 <= c <= 0x39 else 0x20 for c in range(256))
_LONG_RUN = b"0" * (_MAX_INT_DIGITS + 1)


def _has_long_digit_run(raw: bytes) -> bool:
    return _LONG_RUN in raw.translate(_DIGITS_AS_ZERO)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise ValueError(f"a number of {len(text)} digits")
    return int(text)


def _parse_json(raw: bytes | str, what: str, path: str):
    """JSON text (a safetensors header, adapter_config.json) parsed with the limits a hostile file needs: NaN and
    Infinity refused (they are not JSON), integers of more than 20 digits refused, and nesting too deep for the parser
    reported as such instead of a `RecursionError`. Raises `OFTError` naming the file."""
    try:
        if not _has_long_digit_run(raw if isinstance(raw, bytes) else raw.encode("utf-8", "replace")):
            return json.loads(raw, parse_constant=_refuse_constant)  # the C fast path for integers
        return json.loads(raw, parse_constant=_refuse_constant, parse_int=_parse_int)
    except RecursionError:
        raise OFTError(f"{what} is not usable: its JSON is nested too deeply to be read (thousands of levels; no "
                       "real file nests more than a few)", path=path) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise OFTError(f"{what} is not valid JSON ({e})", path=path) from None


def _int_list(value, length: int | None) -> list[int] | None:
    """`value` when it is a JSON list of non-negative integers (of `length` items when given), else None."""
    if not isinstance(value, list) or (length is not None and len(value) != length):
        return None
    for v in value:
        if type(v) is not int or v < 0:  # bool is an int subclass; a float dim (1.0) is refused, as safetensors does
            return None
    return value


def _bad_entry(path: str, key: str, what: str, found) -> OFTError:
    return OFTError(f"not a valid safetensors file: tensor {key!r}: {what}, found {found}", path=path)


def _check_entries(header: dict, data_size: int, path: str) -> dict[str, _TensorInfo]:
    """Every tensor entry checked by safetensors' own rules (its `Metadata::validate`): a known dtype, integer dims
    and offsets ≥ 0, byte length = dtype size × element count, and the tensors tiling the data section exactly (in
    offset order, no gap, no overlap, ending at the end of the file).

    All entries are checked at once first (`_entries_at_once`: per distinct dtype and shape, and array ops over the
    offsets); when that finds anything wrong, or cannot tell, the entries are checked one by one
    (`_entries_one_by_one`), which raises for the first bad entry in file order with its own message."""
    tensors = _entries_at_once(header, data_size)
    return _entries_one_by_one(header, data_size, path) if tensors is None else tensors


def _entries_at_once(header: dict, data_size: int) -> dict[str, _TensorInfo] | None:
    """The checked entries when every rule of `_entries_one_by_one` holds for every entry, else None (never an
    error: the one-by-one check says what is wrong). The same rules, decided per distinct value: each distinct
    dtype known, each distinct shape integers ≥ 0 (exact `int`, as there), each distinct (dtype, shape) a whole
    number of bytes, every data_offsets a list of two `int` in int64; then, as arrays, begin ≥ 0, begin ≤ end,
    end − begin = that layout's bytes, and the entries sorted by (begin, end) tiling [0, data_size) exactly. 200,000
    entries take a few hundredths of a second instead of most of a second (issue 10: inspect of 200,000 keys)."""
    infos = list(header.values())
    try:
        dtypes = [info["dtype"] for info in infos]
        shapes = [info["shape"] for info in infos]
        offsets = [info["data_offsets"] for info in infos]
    except (TypeError, KeyError, IndexError):  # an entry that is no object (a list, a number, ...) or lacks a field
        return None
    if not infos:
        return {} if data_size == 0 else None
    if set(map(type, dtypes)) != {str} or not set(dtypes) <= _DTYPE_BITS.keys():
        return None
    if set(map(type, shapes)) != {list} or set(map(type, offsets)) != {list} or set(map(len, offsets)) != {2}:
        return None
    if not set(map(type, chain.from_iterable(shapes))) <= {int}:  # True == 1 == 1.0: `_tiled`'s layouts merge them
        return None
    flat = list(chain.from_iterable(offsets))
    if set(map(type, flat)) != {int}:
        return None
    return _tiled(list(header), dtypes, list(map(tuple, shapes)), flat[0::2], flat[1::2], data_size)


def _tiled(keys: list[str], dtypes: list[str], shapes: list[tuple], begins: list[int], ends: list[int],
           data_size: int) -> dict[str, _TensorInfo] | None:
    """`_entries_at_once` on columns of known types (dtype names, shape tuples, offsets as ints): the checked
    entries, or None when any rule fails."""
    try:  # zip's pairs, not a list of them: 200,000 tuples fewer made and held (zip reuses a pair no one kept)
        layouts = set(zip(dtypes, shapes))
    except TypeError:  # a dim that is a list or an object: unhashable, and wrong
        return None
    nbytes_of = {}
    for dtype, shape in layouts:
        if any(v < 0 for v in shape):  # every dim an int (not a bool or a float): checked by the caller
            return None
        bits = math.prod(shape) * _DTYPE_BITS[dtype]
        if bits % 8 or bits // 8 >= 1 << 62:  # so large that no int64 offsets can hold it: the slow path says so
            return None
        nbytes_of[(dtype, shape)] = bits // 8
    try:
        begin = np.fromiter(begins, dtype=np.int64, count=len(begins))
        end = np.fromiter(ends, dtype=np.int64, count=len(ends))
    except OverflowError:  # beyond int64: not a valid offset of any file this size
        return None
    nbytes = np.fromiter(map(nbytes_of.__getitem__, zip(dtypes, shapes)), dtype=np.int64, count=len(keys))
    if (begin < 0).any() or (begin > end).any() or not np.array_equal(end - begin, nbytes):
        return None
    order = np.lexsort((end, begin))
    begin_sorted, end_sorted = begin[order], end[order]
    if begin_sorted[0] != 0 or end_sorted[-1] != data_size or not np.array_equal(begin_sorted[1:], end_sorted[:-1]):
        return None
    # tuple.__new__ mapped: no Python call per entry (TensorInfo._make took a tenth of a second; a partial a tenth
    # longer than this)
    return dict(zip(keys, map(tuple.__new__, repeat(_TensorInfo), zip(dtypes, shapes, begins, ends))))


# The header as safetensors itself writes it (serde_json, compact): `{"__metadata__":{...},"<key>":{"dtype":"F32",
# "shape":[2,4,4],"data_offsets":[0,128]},...}` then spaces. `_canonical` reads that form with one regex split
# instead of `json.loads` (which builds a dict and two lists per tensor); anything else, or any doubt, goes to
# `_parse_json`. Accepted: keys without escapes or control characters (a JSON string then is its text), numbers
# without sign, leading zero or more than 20 digits, every entry preceded by exactly one comma, nothing between.
_NUM = r"(?:0|[1-9][0-9]{0,19})"
_ENTRY = re.compile(r',"([^"\\\x00-\x1f]*)":\{"dtype":"([A-Z0-9_]+)","shape":\[(%s(?:,%s)*|)\],'
                    r'"data_offsets":\[(%s),(%s)\]\}' % (_NUM, _NUM, _NUM, _NUM))
_STRING = r'"(?:[^"\\\x00-\x1f]|\\.)*"'
_CHUNK = 1 << 20  # characters of the header split at once (~12,000 entries of the usual kohya names)
_METADATA = re.compile(r'\{"__metadata__":(\{(?:%s:%s(?:,%s:%s)*)?\})' % (_STRING, _STRING, _STRING, _STRING))


def _canonical(raw: bytes, data_size: int) -> tuple[dict[str, _TensorInfo], dict[str, str], frozenset[str]] | None:
    """(checked entries, metadata) of a header in safetensors' own compact form whose entries pass every check;
    None otherwise (then `_parse_json` and the checks say what is wrong, or read an unusual but valid header). The
    result is what `json.loads` and `_check_entries` give for the same text: the grammar admits only JSON whose
    values are exactly the matched texts, and a repeated key (where JSON keeps the last) is left to them."""
    try:
        text = raw.decode("utf-8").rstrip(" \t\n\r")
    except UnicodeDecodeError:
        return None
    if not text.endswith("}"):
        return None
    m = _METADATA.match(text)
    if m is not None:
        try:
            metadata = json.loads(m.group(1))  # small; its own escapes checked by the parser
        except ValueError:
            return None
        start = m.end()
        head = ""
    elif text.startswith("{"):
        metadata, start, head = {}, 1, ","
    else:
        return None
    keys: list[str] = []
    dtype_col: list[str] = []
    shapes: list[tuple] = []
    begins: list[int] = []
    ends: list[int] = []
    shape_of: dict[str, tuple] = {}
    stop = len(text) - 1  # the closing brace
    while start < stop or head:
        # A chunk of about `_CHUNK` characters ending where an entry ends (`]}` before the next `,"`), so the split's
        # temporary strings (six per entry) never live for the whole header at once: the columns kept are the same.
        # A cut inside a key that holds `]},` leaves a chunk that is not whole entries: then None, and the JSON path.
        cut = text.find(']},"', start + _CHUNK, stop)
        end = stop if cut < 0 else cut + 2
        parts = _ENTRY.split(head + text[start:end])
        head = ""
        if any(parts[0::6]):  # text before, between or after the entries: not the compact form
            return None
        keys += parts[1::6]
        dtype_col += parts[2::6]
        for t in set(parts[3::6]) - shape_of.keys():
            shape_of[t] = tuple(map(int, t.split(","))) if t else ()
        shapes += map(shape_of.__getitem__, parts[3::6])
        begins += map(int, parts[4::6])
        ends += map(int, parts[5::6])
        start = end
    dtypes = frozenset(dtype_col)
    if not keys or "__metadata__" in keys or not dtypes <= _DTYPE_BITS.keys():
        return None
    tensors = _tiled(keys, dtype_col, shapes, begins, ends, data_size)
    if tensors is None or len(tensors) != len(keys):  # a repeated key (fewer entries than keys): left to json
        return None
    return tensors, metadata, dtypes


def _entries_one_by_one(header: dict, data_size: int, path: str) -> dict[str, _TensorInfo]:
    """`_check_entries` entry by entry, raising for the first bad one (in file order) with what was expected and
    found."""
    tensors: dict[str, _TensorInfo] = {}
    bits_of = _DTYPE_BITS
    for key, info in header.items():
        try:
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError):
            raise _bad_entry(path, key, "expected an object with dtype, shape and data_offsets",
                             type(info).__name__ if not isinstance(info, dict) else sorted(info)) from None
        if type(dtype) is not str or dtype not in bits_of:
            raise _bad_entry(path, key, f"expected a dtype safetensors knows ({', '.join(bits_of)})", repr(dtype))
        if _int_list(shape, None) is None:
            raise _bad_entry(path, key, "expected a shape of integers ≥ 0", repr(shape)[:80])
        if _int_list(offsets, 2) is None or offsets[0] > offsets[1]:
            raise _bad_entry(path, key, "expected data_offsets [begin, end] with integers 0 ≤ begin ≤ end",
                             repr(offsets)[:80])
        bits = math.prod(shape) * bits_of[dtype]
        if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
            raise _bad_entry(path, key, f"a {dtype} tensor of shape {tuple(shape)} takes {bits / 8:g} bytes",
                             f"data_offsets {offsets} ({offsets[1] - offsets[0]} bytes)")
        tensors[key] = _TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])
    end = 0
    for ti in tensors.values():  # the usual file lists its tensors in data order: tiled without sorting
        if ti.start != end:
            break
        end = ti.end
    else:
        if end == data_size:
            return tensors
    end = 0
    for key, ti in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if ti.start != end:
            what = "overlaps the tensor before it" if ti.start < end else "leaves a gap after the tensor before it"
            raise OFTError(f"not a valid safetensors file: tensor {key!r} {what} (data_offsets begin at {ti.start}, "
                           f"expected {end})", path=path)
        end = ti.end
    if end != data_size:
        if end > data_size:
            raise OFTError(f"truncated file: the header promises {end} bytes of tensor data, the file has "
                           f"{data_size} (an interrupted download or copy? fetch it again)", path=path)
        raise OFTError(f"not a valid safetensors file: {data_size - end} bytes after the last tensor's data "
                       f"(tensor data ends at {end} of {data_size})", path=path)
    return tensors


def read_header(path: str | os.PathLike) -> _Header:
    """Parse and check a safetensors header without loading tensors, as strictly as safetensors itself: a file that
    passes opens with safetensors, and everything derived from it (a baked copy) does too."""
    path = os.fspath(path)
    if "\0" in path:
        raise OFTError("expected a file path, found one with a NUL character", path=repr(path))
    if not os.path.exists(path):
        raise OFTError("file not found", path=path)
    if os.path.isdir(path):
        raise OFTError("expected a .safetensors file, found a directory", path=path)
    if path.lower().endswith(_PICKLE_SUFFIXES):
        _refuse_pickle(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise OFTError(f"not a safetensors file: only {size} bytes (empty or truncated)", path=path)
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                if _looks_like_pickle(head):
                    _refuse_pickle(path)
                raise OFTError(
                    f"not a safetensors file, or truncated: header length field says {n} bytes, file has {size} bytes",
                    path=path,
                )
            raw = f.read(n)
    except OSError as e:
        raise OFTError(f"cannot read the file ({e.strerror or e})", path=path) from None
    fast = _canonical(raw, size - 8 - n)
    if fast is not None:
        return _Header(path, *fast[:2], 8 + n, known_dtypes=fast[2], known_data_end=size - 8 - n)
    try:
        header = _parse_json(raw, "the safetensors header", path)
    except OFTError as e:
        if _looks_like_pickle(head):
            _refuse_pickle(path)
        raise OFTError(f"not a safetensors file: {e.detail}", path=path) from None
    if not isinstance(header, dict):
        raise OFTError(f"not a safetensors file: the header is JSON {type(header).__name__}, expected an object",
                       path=path)
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        found = type(metadata).__name__ if not isinstance(metadata, dict) else next(
            f"{k!r}: {type(v).__name__}" for k, v in metadata.items() if not isinstance(v, str))
        raise OFTError(f"not a valid safetensors file: __metadata__: expected an object of text values, found {found}",
                       path=path)
    tensors = _check_entries(header, size - 8 - n, path)
    return _Header(path, tensors, metadata, 8 + n)


def _load_tensors(path: str | os.PathLike | _Header, keys=None, device: str = "cpu"
                 ) -> tuple[Mapping[str, torch.Tensor], _Header]:
    """Load tensors (all, or `keys`) after checking the header (`path` may be an already checked `_Header`).

    All tensors: a `_FileTensors` (the data section read once, each tensor a view of it); some: a dict of tensors read
    one by one (`_TensorFile`)."""
    header = path if isinstance(path, _Header) else read_header(path)
    if keys is not None:
        f = _TensorFile(header)
        try:
            return f.get(keys), header
        finally:
            f.close()
    tensors = _FileTensors(header)
    if device != "cpu":
        return {k: t.to(device) for k, t in tensors.items()}, header
    return tensors, header


def _unknown_dtype(path: str, key: str, dtype: str) -> OFTError:
    return OFTError(f"tensor {key!r} has dtype {dtype}, which no OFT trainer writes", path=path)


class _FileTensors(Mapping):
    """Every tensor of a checked file, as a read-only mapping key -> tensor: the data section is read once (one read
    instead of one call per key: for 200,000 keys that was most of the time), a tensor is a view of it made when
    asked for, and `stack` gives the tensors of many keys of one layout as one batch without making a tensor per
    key (a kohya file of 100,000 layers is read in a few batched ops, issue 10). Every dtype is checked here, as
    when every view was made at once: a tensor of a dtype torch has no name for is refused even if never asked for."""

    def __init__(self, header: _Header):
        self.header = header
        if not header.dtypes <= _DTYPES.keys():
            key, ti = next((k, ti) for k, ti in header.tensors.items() if ti.dtype not in _DTYPES)
            raise _unknown_dtype(header.path, key, ti.dtype)
        try:
            with open(header.path, "rb") as f:
                f.seek(header.data_offset)
                self._data = bytearray(f.read())
        except OSError as e:
            raise OFTError(f"cannot read the file ({e.strerror or e})", path=header.path) from None
        if len(self._data) < header.data_end:
            raise OFTError("the file became shorter while it was read: was it changed meanwhile?", path=header.path)
        self._typed: dict[torch.dtype, torch.Tensor] = {}  # the whole data section as each dtype
        self._all: dict[str, torch.Tensor] | None = None

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._all is not None:
            return self._all[key]
        return self._view(self.header.tensors[key])

    def __iter__(self):
        return iter(self.header.tensors)

    def __len__(self) -> int:
        return len(self.header.tensors)

    def __contains__(self, key) -> bool:
        return key in self.header.tensors

    def items(self):
        return self._views().items()

    def values(self):
        return self._views().values()

    def _views(self) -> dict[str, torch.Tensor]:
        if self._all is None:
            view = self._view
            self._all = {k: view(ti) for k, ti in self.header.tensors.items()}
        return self._all

    def _whole(self, dtype: torch.dtype) -> torch.Tensor:
        whole = self._typed.get(dtype)
        if whole is None:
            whole = self._typed[dtype] = torch.frombuffer(self._data, dtype=dtype,
                                                          count=len(self._data) // dtype.itemsize)
        return whole

    def _view(self, ti: _TensorInfo) -> torch.Tensor:
        dtype = _DTYPES[ti.dtype]
        count = math.prod(ti.shape)
        size = dtype.itemsize
        if count and ti.start % size == 0:  # aligned (safetensors writes it so): a strided view, one call
            return torch.as_strided(self._whole(dtype), ti.shape, _contiguous_strides(ti.shape), ti.start // size)
        t = torch.frombuffer(self._data, dtype=dtype, count=count, offset=ti.start) if count else torch.empty(
            0, dtype=dtype)
        return t.reshape(ti.shape)

    def stack(self, keys: Sequence[str]) -> torch.Tensor:
        """`torch.stack([self[k] for k in keys])` (equal values) for keys of one dtype and shape, without a tensor
        per key: a strided view of the data when the tensors lie evenly spaced in the file (as safetensors writes
        a file of many layers), else one gather. Read-only, like every view of this mapping."""
        infos = list(map(self.header.tensors.__getitem__, keys))
        if list(map(_DTYPE_SHAPE, infos)).count(_DTYPE_SHAPE(infos[0])) != len(infos):
            raise ValueError("stack: expected keys of one dtype and shape")
        return self.stack_entries(infos)

    def stack_entries(self, infos: Sequence[_TensorInfo]) -> torch.Tensor:
        """`stack` of header entries the caller has grouped by dtype and shape (not checked again)."""
        name, shape = _DTYPE_SHAPE(infos[0])
        dtype = _DTYPES[name]
        count = math.prod(shape)
        starts = np.fromiter(map(_START, infos), dtype=np.int64, count=len(infos))
        if count == 0 or (starts % dtype.itemsize).any():
            return torch.stack([self._view(ti) for ti in infos])
        first = starts // dtype.itemsize
        whole = self._whole(dtype)
        steps = np.diff(first)
        if len(first) == 1 or (steps[0] >= 0 and (steps == steps[0]).all()):
            step = int(steps[0]) if len(first) > 1 else count
            return torch.as_strided(whole, (len(infos), *shape), (step, *_contiguous_strides(shape)), int(first[0]))
        index = torch.from_numpy((first[:, None] + np.arange(count, dtype=np.int64)).reshape(-1))
        return whole[index].reshape(len(infos), *shape)


_DTYPE_SHAPE, _START = itemgetter(0, 1), itemgetter(2)  # of a TensorInfo


def _stack_values(tensors: Mapping[str, torch.Tensor], keys: Sequence[str]) -> torch.Tensor:
    """`torch.stack([tensors[k] for k in keys])` for keys of one dtype and shape; a `_FileTensors` does it without a
    tensor per key."""
    if isinstance(tensors, _FileTensors):
        return tensors.stack(keys)
    return torch.stack([tensors[k] for k in keys])


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


class _TensorFile:
    """Tensors of one checked file read a few at a time with plain file reads: the header is parsed once (`_Header`),
    the file stays open, nothing is memory-mapped (mapped pages would stay resident for the whole bake). What a
    streamed adapter reads each layer with: opening the file per layer parsed its header again every time, which
    made a bake of N layers cost O(N²)."""

    def __init__(self, header: _Header):
        self.header = header
        self._file = None

    def get(self, keys) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        try:
            if self._file is None:
                self._file = open(self.header.path, "rb")
            for k in keys:
                ti = self.header.tensors[k]
                dtype = _DTYPES.get(ti.dtype)
                if dtype is None:
                    raise _unknown_dtype(self.header.path, k, ti.dtype)
                n = ti.end - ti.start
                buf = bytearray(n)
                self._file.seek(self.header.data_offset + ti.start)
                if n and self._file.readinto(buf) != n:
                    raise OFTError(f"the file ended while reading tensor {k!r}: was it changed while in use?",
                                   path=self.header.path)
                out[k] = torch.frombuffer(buf, dtype=dtype).reshape(ti.shape) if n else torch.empty(ti.shape,
                                                                                                     dtype=dtype)
        except OSError as e:
            raise OFTError(f"cannot read the file ({e.strerror or e})", path=self.header.path) from None
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
