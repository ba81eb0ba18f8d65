"""Publishing an output (a baked model, an adapter file, a PEFT adapter directory): whole or absent, never replacing
what it must not. The one place where bake and the writers put files on disk.

Rules (every refusal is an `OFTError` naming the path, raised before anything is written where possible):

- An output never replaces any of the command's own inputs, whatever the path says: the same file through another
  name, a symbolic link, a hard link, or a directory holding an input. Compared by (device, inode), after links.
- Without `overwrite` nothing that exists is replaced, not even by a run that started at the same time: the finished
  file is published with a link that fails when the name exists (`link`/`linkat`, `renameat2(RENAME_NOREPLACE)` for
  directories), so of two concurrent runs to one output exactly one succeeds and the other says why.
- With `overwrite` only what the command could itself have written is replaced: one regular file (`kind="file"`), or
  for PEFT one adapter directory holding nothing but adapter_model.safetensors and adapter_config.json
  (`kind="dir"`). Never a symbolic link, a directory with other content, or anything holding an input.
- The output folder must exist (a typo in it is an error, not a new folder tree).
- Nothing is left behind after any kind of end. On Linux the file is written as an unnamed `O_TMPFILE` in the output
  folder and only gets a name when it is complete, so a SIGKILL or a power cut leaves nothing. Elsewhere (and for
  PEFT directories, which have no unnamed form) the work in progress has a recognisable name,
  `.oft-tmp-<pid>-<random>.<tmp|d|old>`, removed on every error and swept by the next run in that folder once its
  process is gone.
- OS errors about the output (folder read-only, disk full, permission denied) are input errors: `OFTError` with the
  path and the system's words.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import stat
import sys
import time
from typing import Callable, Iterable

from .errors import OFTError, _mismatch

log = logging.getLogger(__name__)

_TEMP_PREFIX = ".oft-tmp-"
_TEMP_NAME = re.compile(rf"^{re.escape(_TEMP_PREFIX)}(\d+)-[0-9a-f]+\.(tmp|d|old)$")
# what bakes of the pack's first versions left beside their output when killed (tempfile.mkstemp's 8 characters):
# swept once a day old, as regular files only (a bake that is still writing keeps its file's mtime fresh)
_LEGACY_TEMP_NAME = re.compile(r"^\.oft-bake-[a-z0-9_]{8}\.tmp$")
_ADAPTER_DIR_FILES = ("adapter_model.safetensors", "adapter_config.json")
# Where a process id cannot be checked (Windows), a temp file older than this is taken to be a leftover.
_STALE_SECONDS = 24 * 3600


# ------------------------------------------------------------------------------------------------ checks
def check_output_name(text, what: str = "filename_prefix") -> str:
    """A user-given output name (e.g. OFT Save's filename_prefix): non-empty text, no NUL, a last part that is a
    visible file name (an empty one wrote a hidden `._00001_` file). Returns it."""
    if not isinstance(text, str):
        raise OFTError(_mismatch(what, "text", type(text).__name__))
    if "\0" in text:
        raise OFTError(_mismatch(what, "a name without NUL characters", repr(text)))
    last = re.split(r"[\\/]", text.strip())[-1]
    if not last:
        raise OFTError(_mismatch(what, "a path ending in a file name (e.g. 'oft/my_adapter')", repr(text)))
    if last.startswith("."):
        raise OFTError(_mismatch(what, "a file name that does not start with '.' (it would be hidden)", repr(text)))
    return text


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _input_identities(inputs: Iterable) -> tuple[set, list[str]]:
    """(dev, inode) of every input (a directory input: it and the files in it) and the inputs' real paths."""
    ids, real = set(), []
    for p in inputs:
        if p is None:
            continue
        p = os.fspath(p)
        ident = _identity(p)
        if ident is None:
            continue
        ids.add(ident)
        real.append(os.path.realpath(p))
        if os.path.isdir(p):
            for name in os.listdir(p):
                sub = _identity(os.path.join(p, name))
                if sub is not None:
                    ids.add(sub)
    return ids, real


def _check_output(out, inputs: Iterable = (), *, overwrite: bool = False, kind: str = "file") -> str:
    """Refuse an output path that the rules above forbid; returns it absolute. No side effects."""
    out = os.fspath(out)
    if not out or "\0" in out:
        raise OFTError(_mismatch("output path", "a file path without NUL characters", repr(out)))
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        what = "is not a folder" if os.path.lexists(parent) else "does not exist"
        raise OFTError(f"the output folder {what}; create it first or choose another output path", path=parent)
    ids, real = _input_identities(inputs)
    _check_not_over_inputs(out, real, kind)
    if not os.path.lexists(out):
        return out
    st = os.lstat(out)
    if stat.S_ISLNK(st.st_mode):
        raise OFTError("exists as a symbolic link; an output never replaces a link (it could point anywhere, an "
                       "input too): remove it or choose another name", path=out)
    if (st.st_dev, st.st_ino) in ids:
        raise OFTError("refusing to write the output over one of this command's inputs (the same file under another "
                       "name or a hard link); choose another output path", path=out)
    if kind == "file" and not stat.S_ISREG(st.st_mode):
        raise OFTError("exists and is not a regular file (a folder?); only a file this command could have written "
                       "is ever replaced", path=out)
    if kind == "dir":
        _check_replaceable_dir(out, st, ids)
    if not overwrite:
        raise OFTError("output exists; choose another name or pass --overwrite (overwrite=True)", path=out)
    return out


def _check_not_over_inputs(out: str, real: Iterable[str], kind: str) -> None:
    """The output path (links resolved) is none of the inputs' and, for a folder, holds none of them."""
    out_real = os.path.realpath(out)
    for r in real:
        if r == out_real:
            raise OFTError(f"refusing to write the output over one of this command's inputs ({r}); choose another "
                           "output path", path=out)
        if kind == "dir" and r.startswith(out_real.rstrip(os.sep) + os.sep):
            raise OFTError(f"refusing to write the output over a folder that holds one of this command's inputs "
                           f"({r}); choose another output path", path=out)


def _check_replaceable_dir(out: str, st: os.stat_result, ids) -> None:
    """An existing output folder is replaced only when it is a PEFT adapter folder (nothing but its files, none of
    them an input)."""
    if not stat.S_ISDIR(st.st_mode):
        raise OFTError("exists and is not a folder; a PEFT adapter output is a folder", path=out)
    for name in os.listdir(out):
        sub = os.path.join(out, name)
        sst = os.lstat(sub)
        if name not in _ADAPTER_DIR_FILES or not stat.S_ISREG(sst.st_mode):
            raise OFTError(f"exists and holds {name!r}: only a PEFT adapter folder holding nothing but "
                           f"{' and '.join(_ADAPTER_DIR_FILES)} is ever replaced", path=out)
        if (sst.st_dev, sst.st_ino) in ids:
            raise OFTError(f"refusing to write the output over a folder that holds one of this command's inputs "
                           f"({name}); choose another output path", path=out)


# ------------------------------------------------------------------------------------------------ temp names
def _temp_name(parent: str, suffix: str) -> str:
    return os.path.join(parent, f"{_TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}.{suffix}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def _sweep(folder: str) -> list[str]:
    """Remove the temp files and folders that runs which are gone left in `folder` (named `.oft-tmp-<pid>-…`), and
    the day-old `.oft-bake-*.tmp` files of the first versions' bake."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TEMP_NAME.match(name)
        if not m:
            if _LEGACY_TEMP_NAME.match(name):
                _sweep_legacy(os.path.join(folder, name), removed)
            continue
        path = os.path.join(folder, name)
        try:
            if os.name == "posix":
                if _alive(int(m.group(1))):
                    continue
            elif time.time() - os.lstat(path).st_mtime < _STALE_SECONDS:  # os.kill(pid, 0) would kill on Windows
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed.append(path)
        except OSError as e:
            log.debug("could not remove leftover %s: %s", path, e)
    if removed:
        log.info("removed %d leftovers of interrupted runs in %s", len(removed), folder)
    return removed


def _sweep_legacy(path: str, removed: list[str]) -> None:
    try:
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode) and time.time() - st.st_mtime >= _STALE_SECONDS:
            os.unlink(path)
            removed.append(path)
    except OSError as e:
        log.debug("could not remove leftover %s: %s", path, e)


def _remove(path: str | None) -> None:
    if path is None or not os.path.lexists(path):
        return
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except OSError as e:
        log.warning("could not remove the temporary %s: %s", path, e)


# ------------------------------------------------------------------------------------------------ renames
_RENAME_NOREPLACE = 1
_renameat2 = None


def _load_renameat2():
    global _renameat2
    if _renameat2 is None:
        _renameat2 = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                libc = ctypes.CDLL(None, use_errno=True)
                fn = libc.renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _renameat2 = fn
            except (OSError, AttributeError):
                pass
    return _renameat2


def _rename_noreplace(src: str, dst: str) -> None:
    """Rename `src` to `dst`, failing with FileExistsError when `dst` exists (atomically where the system can)."""
    fn = _load_renameat2()
    if fn:
        import ctypes

        at_fdcwd = -100
        if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # EINVAL: the file system cannot do it
            raise OSError(err, os.strerror(err), dst)
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    if os.name == "nt":
        os.rename(src, dst)  # never replaces on Windows
    elif os.path.isdir(src):
        os.rename(src, dst)  # replaces at most an empty folder created in the instant since the check
    else:
        try:
            os.link(src, dst)  # fails when dst exists
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                raise
            os.rename(src, dst)  # a file system without hard links (FAT, some network shares): checked just above
            return
        os.unlink(src)


def _fsync_dir(folder: str) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _os_error(e: OSError, out: str, what: str) -> OFTError:
    if isinstance(e, FileExistsError):
        return OFTError("output appeared while this run was writing it (another run writing the same output?); "
                        "nothing was replaced: choose another name or pass --overwrite", path=out)
    where = e.filename if isinstance(e.filename, str) and not os.path.basename(e.filename).startswith(_TEMP_PREFIX) \
        else out
    if e.errno == errno.ENOSPC:
        why = "no space left on the device"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = f"the output folder is not writable ({e.strerror})"
    else:
        why = e.strerror or str(e)
    return OFTError(f"cannot write the {what}: {why}; nothing was written", path=where)


# ------------------------------------------------------------------------------------------------ publish
def _tmpfile_supported() -> bool:
    return hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")


def _link_unnamed(fd: int, path: str) -> None:
    """Give the unnamed (O_TMPFILE) file `fd` the name `path`: linkat("/proc/self/fd/N", AT_SYMLINK_FOLLOW), which
    needs no privilege (AT_EMPTY_PATH would). A directory fd makes CPython call linkat with that flag (a plain
    link() would try to hard-link the /proc symlink itself and fail with EXDEV)."""
    dfd = os.open(os.path.dirname(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.link(f"/proc/self/fd/{fd}", os.path.basename(path), dst_dir_fd=dfd, follow_symlinks=True)
    finally:
        os.close(dfd)


def publish_safetensors(out, tensors: dict, metadata: dict, *, inputs: Iterable = (), overwrite: bool = False,
                        what: str = "output") -> str:
    """`_publish_file` of a safetensors file holding `tensors` (made contiguous) and string `metadata`."""
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in tensors.items()}, metadata={str(k): str(v) for k, v in
                                                                           metadata.items()})
    return _publish_file(out, lambda f: f.write(blob), inputs=inputs, overwrite=overwrite, what=what)


def _publish_file(out, write: Callable, *, inputs: Iterable = (), overwrite: bool = False, what: str = "output") -> str:
    """Write a file with `write(f)` (a binary file object) and publish it at `out` under the rules above. Returns the
    absolute output path. Any exception leaves nothing behind; OS errors become `OFTError`s naming the path."""
    inputs = [i for i in inputs if i is not None]
    out = _check_output(out, inputs, overwrite=overwrite, kind="file")
    parent = os.path.dirname(out)
    _sweep(parent)
    staged = None
    try:
        staged = _Staged(parent)
        with os.fdopen(staged.fd, "wb", closefd=False) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        staged.publish(out, inputs, overwrite)
        _fsync_dir(parent)
    except OSError as e:
        raise _os_error(e, out, what) from None
    finally:
        if staged is not None:
            staged.close()
    return out


class _Staged:
    """The temporary file a published file is written to, beside its output: unnamed (O_TMPFILE) where the
    filesystem allows, else under a unique temporary name. `close()` closes it and removes whatever is left."""

    def __init__(self, parent: str):
        self.parent, self.fd, self.named = parent, None, None
        if _tmpfile_supported():
            try:
                self.fd = os.open(parent, os.O_TMPFILE | os.O_WRONLY, 0o666)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
        if self.fd is None:
            self.named = _temp_name(parent, "tmp")
            self.fd = os.open(self.named, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)

    def publish(self, out: str, inputs: list, overwrite: bool) -> None:
        """Give the written file the name `out`: never over an existing file, unless `overwrite` (then the output
        rules are checked again just before the atomic replace)."""
        replace = overwrite and os.path.lexists(out)
        if replace:
            _check_output(out, inputs, overwrite=True, kind="file")
        if self.named is None:
            if not replace:
                _link_unnamed(self.fd, out)  # fails when `out` exists: never replaces
                return
            self.named = _temp_name(self.parent, "tmp")
            _link_unnamed(self.fd, self.named)
        if replace:
            os.replace(self.named, out)
        else:
            _rename_noreplace(self.named, out)
        self.named = None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        _remove(self.named)


def _publish_dir(out, write: Callable[[str], None], *, inputs: Iterable = (), overwrite: bool = False,
                what: str = "adapter folder") -> str:
    """Write a folder with `write(folder)` and publish it at `out` (PEFT adapters); rules as `_publish_file`."""
    inputs = [i for i in inputs if i is not None]
    out = _check_output(out, inputs, overwrite=overwrite, kind="dir")
    parent = os.path.dirname(out)
    _sweep(parent)
    tmp = _temp_name(parent, "d")
    old = None
    try:
        os.mkdir(tmp)
        write(tmp)
        for name in os.listdir(tmp):
            fd = os.open(os.path.join(tmp, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if overwrite and os.path.lexists(out):
            _check_output(out, inputs, overwrite=True, kind="dir")
            old = _temp_name(parent, "old")
            os.rename(out, old)
            try:
                _rename_noreplace(tmp, out)
            except BaseException:
                os.rename(old, out)  # put the previous output back
                old = None
                raise
        else:
            _rename_noreplace(tmp, out)
        tmp = None
        _fsync_dir(parent)
    except OSError as e:
        raise _os_error(e, out, what) from None
    finally:
        _remove(tmp)
        _remove(old)
    return out
