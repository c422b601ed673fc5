"""The output policy of every command, in one place, and the atomic writes that carry it out.

- Nothing the command did not create is deleted or replaced. A file output replaces only the file
  it names (never a directory); a directory output that exists and is not empty is refused unless
  `overwrite`, and then only the files the command writes are replaced, every other file stays.
- `check_output` refuses, before any work: a file output onto a directory, a directory output
  onto a file or onto a non-empty directory (without `overwrite`), an output that is also one of
  the inputs, and an output whose parent is not a writable directory (probed by creating a file).
- Everything is written in a hidden temporary directory next to the output (`.NAME.*.tmp`) and
  moved into place at the end, under a lock on the parent directory, so two commands writing the
  same output end with one complete result (or the same one twice), never a mix. Files get the
  user's umask. On any failure, or SIGINT/SIGTERM/SIGHUP (`on_signal`), the temporary directory
  and any parent directories created for the output are removed.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from .errors import OmniMoEInputError

# Write errors that are the user's to fix (a full disk, a read-only or forbidden place).
_USER_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                      errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENAMETOOLONG, errno.EXDEV}


def _special(path: Path) -> bool:
    """/dev/null, /dev/stdout, a FIFO: written through, never replaced."""
    return path.exists() and not path.is_file() and not path.is_dir()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _probe_parent(path: Path) -> None:
    """The nearest existing ancestor of `path` must be a directory we can create files in."""
    parent = path.parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OmniMoEInputError(f"{path}: cannot write there, {parent} is not a directory")
    try:
        with _critical():  # a signal between the two calls would leave the probe behind
            probe = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
            os.rmdir(probe)
    except OSError as e:
        raise OmniMoEInputError(f"{path}: cannot write in {parent} ({e.strerror or e})") from None


def check_output(path, *, directory: bool = False, inputs: Iterable = (), writes: Iterable[str] = (),
                 overwrite: bool = False, what: str = "output") -> Path:
    """Refuse, before any work, an output the policy forbids (see the module docstring).

    directory: the output is a directory the command fills with `writes` (relative paths);
    inputs: paths the command reads, which it must not write.
    """
    path = Path(path)
    if not directory:
        if path.is_dir():
            raise OmniMoEInputError(f"{path}: is a directory; the {what} must be a file path")
        if _special(path):
            if not os.access(path, os.W_OK):
                raise OmniMoEInputError(f"{path}: not writable")
            return path
        targets = [path]
    else:
        if path.exists() and not path.is_dir():
            raise OmniMoEInputError(f"{path}: exists and is not a directory")
        if path.is_dir() and not overwrite and any(path.iterdir()):
            raise OmniMoEInputError(
                f"{path}: exists and is not empty; pass --overwrite to replace the files omnimoe writes there (others stay)"
            )
        targets = [path / w for w in writes]
        for t in targets:
            if t.is_dir():
                raise OmniMoEInputError(f"{t}: is a directory where the {what} needs a file")
    for src in inputs:
        if src is None:
            continue
        src = Path(src)
        for t in targets:
            if _same_file(t, src):
                raise OmniMoEInputError(f"{t}: is also an input of this command; write the {what} elsewhere")
    _probe_parent(path)
    if directory and path.is_dir():
        _probe_parent(path / "x")
    return path


# ---------------------------------------------------------------------------------------------
# Signals: SIGINT, SIGTERM and SIGHUP unwind like KeyboardInterrupt, so every `finally` cleans up
# ---------------------------------------------------------------------------------------------
class Interrupted(KeyboardInterrupt):
    """Raised in the main thread on SIGINT/SIGTERM/SIGHUP; the exit code is 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_signal_state = {"critical": 0, "signum": None, "raised": False}


def on_signal(signum, frame) -> None:
    """Signal handler: raise Interrupted once; later signals wait for the cleanup it triggers.

    Inside `_critical()` (moving finished files into place) the signal is deferred to its end.
    """
    if _signal_state["signum"] is not None:
        return
    _signal_state["signum"] = signum
    if _signal_state["critical"] == 0:
        _signal_state["raised"] = True
        raise Interrupted(signum)


def reset_signal_state() -> None:
    _signal_state.update(critical=0, signum=None, raised=False)


@contextlib.contextmanager
def _critical() -> Iterator[None]:
    _signal_state["critical"] += 1
    try:
        yield
    finally:
        _signal_state["critical"] -= 1
    signum = _signal_state["signum"]
    if signum is not None and _signal_state["critical"] == 0 and not _signal_state["raised"]:
        _signal_state["raised"] = True
        raise Interrupted(signum)


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _apply_umask(root: Path) -> None:
    """Temporary files (mkdtemp, some writers) are private; outputs get the user's umask."""
    mask = _umask()
    paths = [root] + (list(root.rglob("*")) if root.is_dir() and not root.is_symlink() else [])
    for p in paths:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def _parent_lock(parent: Path) -> Iterator[None]:
    """Exclusive lock on the output's directory while finished files are moved into place."""
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _make_parents(path: Path) -> list[Path]:
    """Create path's missing parent directories; returns those created (outermost first)."""
    missing = []
    parent = path.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    created = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            raise OmniMoEInputError(f"{path}: cannot create {d} ({e.strerror or e})") from None
        created.append(d)
    return created


def _remove_empty(dirs: list[Path]) -> None:
    for d in reversed(dirs):
        with contextlib.suppress(OSError):
            d.rmdir()


def _commit_dir(tmp: Path, final: Path, overwrite: bool) -> None:
    """Move a finished directory into place: rename when `final` is absent or empty, else (with
    overwrite) replace exactly the files it holds."""
    if not final.exists() or (final.is_dir() and not any(final.iterdir())):
        os.rename(tmp, final)  # onto an empty directory too; refused by the OS if one was filled meanwhile
        return
    if not final.is_dir():
        raise OmniMoEInputError(f"{final}: exists and is not a directory")
    if not overwrite:
        raise OmniMoEInputError(f"{final}: was written by another command meanwhile; nothing replaced")
    for src in sorted(tmp.rglob("*")):
        dst = final / src.relative_to(tmp)
        if src.is_dir():
            if dst.exists() and not dst.is_dir():
                raise OmniMoEInputError(f"{dst}: exists and is not a directory")
            dst.mkdir(exist_ok=True)
        elif dst.is_dir():
            raise OmniMoEInputError(f"{dst}: is a directory where omnimoe writes a file")
        else:
            os.replace(src, dst)


@contextlib.contextmanager
def atomic_files(finals: list, overwrite: bool = False, stale: Iterable = ()) -> Iterator[list[Path]]:
    """Temporary paths for sibling outputs written together (model.onnx + model.onnx.data, or one
    checkpoint directory); they are moved into place only if the block succeeds, all under one
    lock, so either every output appears or none does. A temporary path the block leaves absent is
    not an output; files in `stale` (e.g. an old model.onnx.data) are removed at that moment.
    """
    finals = [Path(f) for f in finals]
    parent = finals[0].parent
    created: list[Path] = []
    tmp_dir = None
    ok = False
    try:
        # Signals wait until both are recorded: one landing between a mkdir and its assignment
        # would leave a folder nobody removes (the deferred signal is raised inside this try).
        with _critical():
            created = _make_parents(finals[0])
            try:
                tmp_parent = None if _special(finals[0]) else parent  # /dev is no place for temporary files
                tmp_dir = Path(tempfile.mkdtemp(prefix=f".{finals[0].name}.", suffix=".tmp", dir=tmp_parent))
            except OSError as e:
                raise OmniMoEInputError(f"{finals[0]}: cannot write in {parent} ({e.strerror or e})") from None
        tmps = [tmp_dir / f.name for f in finals]
        yield tmps
        with _critical(), _parent_lock(parent):
            for tmp, final in zip(tmps, finals):
                if not tmp.exists():
                    continue
                _apply_umask(tmp)
                if tmp.is_dir() and not tmp.is_symlink():
                    _commit_dir(tmp, final, overwrite)
                elif final.is_dir() and not final.is_symlink():
                    raise OmniMoEInputError(f"{final}: is a directory; nothing replaced")
                elif _special(final):
                    with open(tmp, "rb") as src, open(final, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                else:
                    os.replace(tmp, final)
            for path in stale:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        ok = True
    except OSError as e:
        if e.errno not in _USER_WRITE_ERRORS:
            raise
        name = e.filename if e.filename and not str(e.filename).startswith(str(tmp_dir)) else finals[0]
        raise OmniMoEInputError(f"{name}: cannot write ({e.strerror or e})") from None
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        if not ok:
            _remove_empty(created)


@contextlib.contextmanager
def atomic_path(final, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path for `final` (the caller writes a file or makes a directory there);
    it is moved onto `final` only on success, by the policy of this module."""
    with atomic_files([final], overwrite=overwrite) as (tmp,):
        yield tmp


def flush_and_exit(code: int) -> None:
    """Leave at once (used once the command is over: nothing left to clean up)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
