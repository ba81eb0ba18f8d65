"""Adapter files: the `oft` model folder, the file dropdown, and a cache of loaded adapters.

The dropdown lists the OFT files of ComfyUI's `loras` folder (where most users keep OFT files) and of a dedicated
`oft` folder. The `oft` folder is registered with folder_paths only if absent, because users may define it in
extra_model_paths.yaml; otherwise our default path is added to theirs.

Which files are OFT is decided from the safetensors header alone (the format readers' `claims`, no tensor read), cached
by (path, mtime, size): a user with hundreds of LoRAs sees only the OFT files, and a listing after the first costs one
stat per file.

Loaded adapters are cached at module level by (path, mtime, size): re-running a workflow with only the strength
changed does not read the file again, and an edited file is read again. ComfyUI node classes are stateless, so the
cache cannot live on a node.
"""

from __future__ import annotations

import logging
import os
import threading

import folder_paths

from .. import oft_core
from ..oft_core.errors import OFTError
from ..oft_core.formats import READERS, not_oft_message, peft
from ..oft_core.safetensors_io import read_header

log = logging.getLogger(__name__)

FOLDER = "oft"
EXTENSIONS = {".safetensors"}  # pickles are refused by oft_core; PEFT dirs are listed by their adapter_model file
_MAX_CACHED = 8

_cache: dict[str, tuple[tuple[int, int], oft_core.OFTAdapter]] = {}
_kinds: dict[str, tuple[tuple[int, int], str | None]] = {}  # path -> (stamp, reader name or None: not OFT)
_lock = threading.Lock()
_registered = False


def register_folder() -> None:
    """Make `models/oft` a model folder, and `output/oft` too (idempotent; no I/O beyond the folder_paths table).

    `output/oft` is where OFT Save and the trainer's checkpoints write by default (prefix "oft/…"): listing it lets a
    user load what a workflow just saved without moving the file, as ComfyUI's main.py does for `output/loras` and
    `output/checkpoints`.
    """
    global _registered
    if _registered:
        return
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(EXTENSIONS))
    else:
        folder_paths.add_model_folder_path(FOLDER, default)
        _paths, exts = folder_paths.folder_names_and_paths[FOLDER]
        exts.update(EXTENSIONS)  # a user entry from extra_model_paths.yaml starts with no extensions
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.get_output_directory(), FOLDER))
    _registered = True


def adapter_files() -> list[str]:
    """The OFT .safetensors files of the `oft` and `loras` folders (names as the dropdown shows them).

    A file is listed when a format reader claims its header (`oft_kind`); LoRAs and unreadable files are left out.
    """
    register_folder()
    names, seen = set(), set()
    for folder in (FOLDER, "loras"):
        for name in folder_paths.get_filename_list(folder):
            if os.path.splitext(name)[1].lower() not in EXTENSIONS or name in seen:
                continue
            seen.add(name)  # the name resolves to this folder's file (`resolve` looks in the same order)
            path = folder_paths.get_full_path(folder, name)
            if path is not None and oft_kind(path, quiet=folder != FOLDER) is not None:
                names.add(name)
    return sorted(names)


def oft_kind(path: str, quiet: bool = False) -> str | None:
    """The format reader ("kohya", "lycoris", "peft") that claims the file at `path` from its header, or None.

    Reads only the safetensors header (and a PEFT adapter_config.json beside the file), cached by (path, mtime,
    size). A file that cannot be read is not OFT here; unless `quiet`, the reason is logged once per file version.
    """
    path = os.path.abspath(path)
    try:
        stamp = _stamp(path)
    except OSError:
        return None
    with _lock:
        hit = _kinds.get(path)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    kind = None
    try:
        model_path, config = peft.find_config(path)
        header = read_header(model_path)
        kind = next((r.name for r in READERS if r.claims(header, config)), None)
        if kind is None and not quiet:
            log.warning("OFT: not listed in the adapter list: %s: %s", path, not_oft_message(header))
    except (OFTError, OSError, ValueError) as e:
        (log.debug if quiet else log.warning)("OFT: not listed in the adapter list: %s", e)
    with _lock:
        _kinds[path] = (stamp, kind)
    return kind


def check_name(name) -> str | None:
    """Why `name` cannot be loaded as an OFT adapter (missing, or not an OFT file), or None when it can.

    What the loaders' `validate_inputs` returns, so a bad file is refused when the prompt is queued (as core's Load
    LoRA refuses a missing file), not when the node runs. Header only, cached: cheap on every queue.
    """
    if not isinstance(name, str) or not name:
        return f"expected an OFT adapter file name, found {name!r}"
    try:
        path = resolve(name)
    except FileNotFoundError as e:
        listed = adapter_files()
        return f"{e}; the OFT files there: {_short_list(listed)}"
    if oft_kind(path, quiet=True) is None:
        try:
            model_path, config = peft.find_config(path)
            header = read_header(model_path)
        except (OFTError, OSError, ValueError) as e:
            return f"{path}: cannot be read as an OFT adapter: {e}"
        return f"{path}: {not_oft_message(header)}"
    return None


def _short_list(names: list[str], limit: int = 8) -> str:
    if not names:
        return "none"
    return ", ".join(names[:limit]) + (f" … ({len(names)} in all)" if len(names) > limit else "")


def resolve(name: str) -> str:
    """The full path of a dropdown entry (the `oft` folder first, then `loras`); raises when it is in neither."""
    register_folder()
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise FileNotFoundError(
            f"OFT adapter {name!r} not found in the '{FOLDER}' folders {folder_paths.get_folder_paths(FOLDER)} "
            f"or the 'loras' folders {folder_paths.get_folder_paths('loras')}"
        )
    return path


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


def load(path: str) -> oft_core.OFTAdapter:
    """`oft_core.load_adapter(path)`, cached by (path, mtime, size). Errors are never cached."""
    path = os.path.abspath(path)
    stamp = _stamp(path)
    with _lock:
        hit = _cache.get(path)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    adapter = oft_core.load_adapter(path)
    with _lock:
        _cache.pop(path, None)
        _cache[path] = (stamp, adapter)
        while len(_cache) > _MAX_CACHED:  # oldest first (dicts keep insertion order)
            _cache.pop(next(iter(_cache)))
    log.debug("OFT: read %s (%d layers, %s)", path, len(adapter), adapter.format)
    return adapter


def load_by_name(name: str) -> oft_core.OFTAdapter:
    return load(resolve(name))


def clear_cache() -> None:
    with _lock:
        _cache.clear()
        _kinds.clear()
