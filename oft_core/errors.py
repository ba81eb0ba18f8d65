"""The one error type of oft_core: what happened, where, what was expected and what was found.

Readers, validation and the baker raise `OFTError` (a `ValueError`) so that ComfyUI shows the message in the UI
and the CLI can print it without a traceback. Never `assert` on user data, never log and carry on.
"""

from __future__ import annotations

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
        if self.path is not None:
            where.append(f"{self.path}")
        if layer is not None:
            where.append(f"layer {layer!r}")
        self.detail = message
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


def mismatch(what: str, expected, found) -> str:
    """Uniform wording for "expected X, found Y" messages."""
    return f"{what}: expected {expected}, found {found}"
