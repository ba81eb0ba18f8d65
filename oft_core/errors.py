"""The one error type of oft_core: what happened, where, what was expected and what was found.

Readers, validation and the baker raise `OFTError` (a `ValueError`) so that ComfyUI shows the message in the UI
and the CLI can print it without a traceback. Never `assert` on user data, never log and carry on.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os


class OFTError(ValueError):
    """A problem with an adapter file, a base file or their combination.

    The message always names the file (when there is one) and, where it applies, the layer,
    what was expected and what was found.
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, layer: str | None = None):
        self.path = None if path is None else os.fspath(path)
        self.layer = layer
        where = []
        if self.path:  # "" (an adapter made in memory) names no file
            where.append(f"{self.path}")
        if layer is not None:
            where.append(f"layer {layer!r}")
        self.detail = message
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


def _mismatch(what: str, expected, found) -> str:
    """Uniform wording for "expected X, found Y" messages."""
    return f"{what}: expected {expected}, found {found}"


# Strengths, multipliers and weights larger than this are refused: a kohya-mode strength s scales R − I by s, so
# s = 1e30 wrote weights of ~1e27 without a word, and no adapter is meant to be used at a thousand times its strength.
_MAX_STRENGTH = 1000.0


def _finite_number(value, what: str, *, path: str | os.PathLike | None = None, limit: float | None = None) -> float:
    """`value` as a float, or an `OFTError` saying `what` expected a finite number (|value| ≤ `limit`) and what it got.

    The one check of user numbers (strengths, block multipliers, merge weights, blend ratios) for the CLI, the nodes
    and oft_core's entry points. NaN needs it most: it passes every comparison-based range check (ComfyUI's min/max
    too), since every comparison with NaN is false.
    """
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise OFTError(_mismatch(what, "a number", repr(value)), path=path) from None
    if not math.isfinite(number):
        raise OFTError(_mismatch(what, "a finite number", number), path=path)
    if limit is not None and abs(number) > limit:
        raise OFTError(_mismatch(what, f"a number from {-limit:g} to {limit:g}", f"{number:g}"), path=path)
    return number


def check_strength(value, what: str = "strength", *, path: str | os.PathLike | None = None) -> float:
    """The one definition of a valid strength (also a block multiplier and strength × multiplier): finite, |s| ≤
    `_MAX_STRENGTH`."""
    return _finite_number(value, what, path=path, limit=_MAX_STRENGTH)


@contextlib.contextmanager
def _bulk():
    """Python's cyclic garbage collector paused while oft_core builds or walks many small objects (an adapter of
    100,000 layers, a bake of 10,000): every full collection scans every live object, so with it running the cost
    per layer grew with the layer count (inspect of 100,000 layers: 2.6× slower, bench_scale.py). These phases make
    no reference cycles worth collecting (tensors and frozen dataclasses are freed by reference counting).

    On the way out, the objects made meanwhile are moved to the oldest generation (`gc.freeze()` then
    `gc.unfreeze()`: two list splices, no scan) instead of being left in the youngest, where the first allocation
    after `gc.enable()` scanned them all (a third of a second after reading 100,000 layers). They are still
    collected, by the next full collection, like any long-lived object."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            if gc.get_freeze_count() == 0:  # nobody else's frozen objects to thaw
                gc.freeze()
                gc.unfreeze()
            gc.enable()
