"""Live tensor bytes of a training step, by where they were made: the CPU stand-in for a GPU's max_memory_allocated.

`LiveTensors` is a TorchDispatchMode that records every storage an op creates (bytes, the op, and the phase it was
made in: forward, backward — which includes checkpoint recomputation, made while autograd runs a node — or the
optimizer) and drops it when the storage dies. It keeps the peak of the live total and, at that peak, the live bytes
grouped by (phase, op, tag), where `tag` is a label the caller sets around a region (`with tracker.tagged("…")`).
Storages that existed before the mode was entered (the model's weights) are not counted; buffers an op allocates
inside a kernel and frees before returning (workspaces) are not seen either.

Only for benchmarks: a Python call per op makes the step several times slower, and the record itself costs memory,
so peak RSS is measured in a separate run.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MiB = 2**20


class LiveTensors(TorchDispatchMode):
    def __init__(self, snapshot_step: int = 1 * MiB, detail_bytes: int = 1 << 62):
        super().__init__()
        self.detail_bytes = detail_bytes
        self.live: dict[int, tuple[int, tuple[str, str, str]]] = {}  # storage key -> (bytes, (phase, op, tag))
        self.total = 0
        self.peak = 0
        self.at_peak: dict[tuple[str, str, str], int] = {}
        self._snap_at = 0
        self._snap_step = snapshot_step
        self.tags: list[str] = [""]
        self.phase_override: str | None = None

    @contextlib.contextmanager
    def tagged(self, tag: str):
        self.tags.append(tag)
        try:
            yield
        finally:
            self.tags.pop()

    def _phase(self) -> str:
        if self.phase_override:
            return self.phase_override
        return "backward" if torch._C._current_autograd_node() is not None else "forward"

    def _drop(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.total -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat, _ = tree_flatten(out)
        inputs, _ = tree_flatten((args, kwargs))
        seen = {t.untyped_storage().data_ptr() for t in inputs
                if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in flat:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            n = st.nbytes()
            if key in self.live or key in seen or n == 0:  # (a view or an in-place result: no new memory)
                continue
            try:
                weakref.finalize(st, self._drop, key)
            except TypeError:
                continue
            op = str(func.overloadpacket.__name__)
            if n >= self.detail_bytes:  # large ones also by dtype and shape
                op += f" {str(t.dtype).replace('torch.', '')}{list(t.shape)}"
            self.live[key] = (n, (self._phase(), op, self.tags[-1]))
            self.total += n
            if self.total > self.peak:
                self.peak = self.total
                if self.total >= self._snap_at:
                    self._snap_at = self.total + self._snap_step
                    self._snapshot()
        return out

    def _snapshot(self) -> None:
        groups: dict[tuple[str, str, str], int] = defaultdict(int)
        for n, label in self.live.values():
            groups[label] += n
        self.at_peak = dict(groups)

    def summary(self, top: int = 12) -> dict:
        """Peak live MiB, and at the (last snapshotted) peak: MiB by phase, by tag and the largest (phase, op, tag)."""
        by_phase: dict[str, float] = defaultdict(float)
        by_tag: dict[str, float] = defaultdict(float)
        for (phase, _op, tag), n in self.at_peak.items():
            by_phase[phase] += n / MiB
            by_tag[tag or "-"] += n / MiB
        largest = sorted(self.at_peak.items(), key=lambda kv: -kv[1])[:top]
        return {"peak_MiB": self.peak / MiB, "snapshot_MiB": sum(self.at_peak.values()) / MiB,
                "by_phase": dict(by_phase), "by_tag": dict(by_tag),
                "largest": [[p, o, t, n / MiB] for (p, o, t), n in largest]}
