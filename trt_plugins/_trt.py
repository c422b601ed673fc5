"""One import shim for `tensorrt` (10.x / 11.x) and `tensorrt_rtx`.

`load(backend)` returns the TensorRT Python module to use:

    auto          -> `tensorrt` when importable, else `tensorrt_rtx`
    tensorrt      -> `tensorrt`
    tensorrt-rtx  -> `tensorrt_rtx`

The tensorrt_rtx wheel quirk (SPEC §4): `libtensorrt_rtx.so.1` dlopens `libtensorrt_rtx.so` when
the ONNX parser adds a plugin layer, and the wheel ships only the `.so.1` file, so the process
aborts ("terminate called without an active exception"). The dlopen searches the library's
RPATH, `$ORIGIN`, which is the directory the library was *first loaded from* (glibc does not
resolve symlinks for `$ORIGIN`). `ensure_rtx_libs()` fixes this before `tensorrt_rtx` is used:

1. `libtensorrt_rtx.so` already next to the `.so.1` (fixed before, or a system install): nothing.
2. That directory is writable: create the symlink there (atomically; races are harmless).
3. Otherwise, before `tensorrt_rtx` is imported: build a directory of symlinks in a user cache
   (`.so.1` files plus the missing `.so` name) and load the libraries from there with
   RTLD_GLOBAL. `$ORIGIN` is then the cache directory, where `libtensorrt_rtx.so` exists; the
   wheel's own loader later opens the original paths, which glibc recognises as the same files
   (same inode), so exactly one copy of each library is mapped.
4. Otherwise (read-only install and `tensorrt_rtx` already imported by someone else): a clear
   OmniMoEInputError saying how to fix it.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

from omnimoe.errors import OmniMoEInputError

BACKENDS = ("auto", "tensorrt", "tensorrt-rtx")
_MODULE_FOR_BACKEND = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
_RTX_CORE = "libtensorrt_rtx.so.1"
_RTX_UNVERSIONED = "libtensorrt_rtx.so"

# How the libtensorrt_rtx.so quirk was handled in this process (for diagnostics and tests):
# None (not needed / not yet), "present", "symlink", "cache:<dir>".
rtx_lib_fix: str | None = None


def _rtx_libs_dir() -> Path | None:
    """Directory of the tensorrt_rtx_libs wheel, found without importing it (importing loads it)."""
    try:
        spec = importlib.util.find_spec("tensorrt_rtx_libs")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _cache_root() -> Path:
    base = os.environ.get("OMNIMOE_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME")
    if base:
        return Path(base) / ("" if os.environ.get("OMNIMOE_CACHE_DIR") else "omnimoe")
    home = Path.home()
    if home and os.access(home, os.W_OK):
        return home / ".cache" / "omnimoe"
    return Path(tempfile.gettempdir()) / f"omnimoe-{os.getuid()}"


def _symlink_atomic(target: Path, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _fix_in_place(libs: Path) -> bool:
    try:
        _symlink_atomic(Path(_RTX_CORE), libs / _RTX_UNVERSIONED)
    except OSError:
        return False
    return (libs / _RTX_UNVERSIONED).exists()


def _fix_via_cache(libs: Path) -> Path:
    """Symlink farm in a cache dir; load the libraries from it so $ORIGIN points there."""
    # One farm per libs directory (several venvs may share a cache).
    tag = hashlib.sha1(str(libs.resolve()).encode()).hexdigest()[:12]
    farm = _cache_root() / "tensorrt_rtx_libs" / tag
    farm.mkdir(parents=True, exist_ok=True)
    libraries = sorted(p for p in libs.iterdir() if ".so" in p.name and p.is_file())
    for lib in libraries:
        link = farm / lib.name
        if not (link.is_symlink() and os.readlink(link) == str(lib)):
            _symlink_atomic(lib, link)
    link = farm / _RTX_UNVERSIONED
    if not (link.is_symlink() and os.readlink(link) == str(libs / _RTX_CORE)):
        _symlink_atomic(libs / _RTX_CORE, link)
    # The core library first: the parser's NEEDED entry then resolves to it by soname.
    ordered = sorted(libraries, key=lambda p: p.name != _RTX_CORE)
    for lib in ordered:
        ctypes.CDLL(str(farm / lib.name), mode=ctypes.RTLD_GLOBAL)
    return farm


def ensure_rtx_libs() -> str:
    """Make `libtensorrt_rtx.so` resolvable for the tensorrt_rtx wheel (see module docstring)."""
    global rtx_lib_fix
    if rtx_lib_fix is not None:
        return rtx_lib_fix
    libs = _rtx_libs_dir()
    if libs is None or not (libs / _RTX_CORE).exists():
        # Not the wheel layout (e.g. a tarball install with its own lib dir): nothing to fix.
        rtx_lib_fix = "present"
        return rtx_lib_fix
    forced = os.environ.get("OMNIMOE_TRT_RTX_LIBFIX", "")  # "cache" forces method 3 (tests)
    if (libs / _RTX_UNVERSIONED).exists() and forced != "cache":
        rtx_lib_fix = "present"
    elif forced != "cache" and os.access(libs, os.W_OK) and _fix_in_place(libs):
        rtx_lib_fix = "symlink"
    elif "tensorrt_rtx_libs" not in sys.modules and "tensorrt_rtx" not in sys.modules:
        try:
            rtx_lib_fix = f"cache:{_fix_via_cache(libs)}"
        except OSError as e:
            raise OmniMoEInputError(
                f"cannot work around the tensorrt_rtx wheel's missing {_RTX_UNVERSIONED} ({e}); "
                f"run: ln -s {_RTX_CORE} {libs / _RTX_UNVERSIONED}"
            ) from None
    else:
        raise OmniMoEInputError(
            f"tensorrt_rtx was imported before omnimoe could add the missing {_RTX_UNVERSIONED} and "
            f"{libs} is read-only; import trt_plugins first, or run: ln -s {_RTX_CORE} {libs / _RTX_UNVERSIONED}"
        )
    return rtx_lib_fix


def available_backends() -> list[str]:
    """Concrete backends whose Python module can be found (without importing it)."""
    found = []
    for backend, module in _MODULE_FOR_BACKEND.items():
        try:
            if importlib.util.find_spec(module) is not None:
                found.append(backend)
        except (ImportError, ValueError):
            pass
    return found


def _cuda_visible() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no usable torch/CUDA: treat as no GPU
        return False


def resolve_backend(backend: str = "auto") -> str:
    """auto -> `tensorrt` when importable, else `tensorrt-rtx`; but with both installed and no
    GPU visible, `tensorrt-rtx` (full TensorRT cannot even create a builder without a GPU)."""
    if backend not in BACKENDS:
        raise OmniMoEInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    found = available_backends()
    if backend == "auto":
        if not found:
            raise OmniMoEInputError(
                "no TensorRT Python module found: pip install 'omnimoe[tensorrt]' or 'omnimoe[tensorrt-rtx]'"
            )
        if len(found) > 1 and not _cuda_visible():
            return "tensorrt-rtx"
        return found[0]
    if backend not in found:
        extra = "tensorrt" if backend == "tensorrt" else "tensorrt-rtx"
        raise OmniMoEInputError(f"backend {backend} is not installed: pip install 'omnimoe[{extra}]'")
    return backend


def load(backend: str = "auto"):
    """Import and return the TensorRT module for `backend` (see module docstring)."""
    backend = resolve_backend(backend)
    if backend == "tensorrt-rtx":
        ensure_rtx_libs()
    module = importlib.import_module(_MODULE_FOR_BACKEND[backend])
    return module


def backend_of(trt) -> str:
    """'tensorrt' or 'tensorrt-rtx' for an imported TensorRT module."""
    return "tensorrt-rtx" if trt.__name__.split(".")[0] == "tensorrt_rtx" else "tensorrt"


def is_strongly_typed_only(trt) -> bool:
    """TensorRT-RTX and TensorRT >= 11 take precision from tensor types only (SPEC §4)."""
    if backend_of(trt) == "tensorrt-rtx":
        return True
    try:
        major = int(str(trt.__version__).split(".")[0])
    except ValueError:
        return False
    return major >= 11 or not hasattr(trt.BuilderFlag, "FP16")
