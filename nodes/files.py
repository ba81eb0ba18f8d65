"""Adapter files: the `oft` model folder, the file dropdown, and a cache of loaded adapters.

The dropdown lists ComfyUI's `loras` folder (where most users keep OFT files) and a dedicated `oft` folder. The `oft`
folder is registered with folder_paths only if absent, because users may define it in extra_model_paths.yaml;
otherwise our default path is added to theirs.

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

log = logging.getLogger(__name__)

FOLDER = "oft"
EXTENSIONS = {".safetensors"}  # pickles are refused by oft_core; PEFT dirs are listed by their adapter_model file
_MAX_CACHED = 8

_cache: dict[str, tuple[tuple[int, int], oft_core.OFTAdapter]] = {}
_lock = threading.Lock()
_registered = False


def register_folder() -> None:
    """Make `models/oft` a model folder (idempotent; no I/O beyond the folder_paths table)."""
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
    _registered = True


def adapter_files() -> list[str]:
    """Every .safetensors file of the `oft` and `loras` folders (names as the dropdown shows them)."""
    register_folder()
    names = set(folder_paths.get_filename_list(FOLDER))
    names.update(n for n in folder_paths.get_filename_list("loras") if os.path.splitext(n)[1].lower() in EXTENSIONS)
    return sorted(names)


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
