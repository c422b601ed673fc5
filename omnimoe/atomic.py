"""Atomic writes: a failed command never leaves a half-written artifact behind."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `final`; rename it onto `final` only on success.

    Works for files and directories (the caller decides what it writes at the path).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    tmp = tmp_dir / final.name
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


@contextlib.contextmanager
def atomic_files(finals: list[str | os.PathLike]) -> Iterator[list[Path]]:
    """Like atomic_path for several sibling files written together (e.g. model.onnx + model.onnx.data).

    All temp files live in one temp directory; they are renamed into place only if the block
    succeeds, so either every file appears or none does.
    """
    finals = [Path(f) for f in finals]
    parent = finals[0].parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{finals[0].name}.", suffix=".tmp", dir=parent))
    try:
        yield [tmp_dir / f.name for f in finals]
        for f in finals:
            src = tmp_dir / f.name
            if src.exists():
                os.replace(src, f)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
