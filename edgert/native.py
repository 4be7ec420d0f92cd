"""The raw binding to the C core (``ffi``, ``lib``), C status -> edgert error, and the start-up choices of ISA and
thread count. Nothing else: shapes and dtypes are validated by the callers (quant.py) before any pointer gets here.

Environment, read once at import:
    EDGERT_ISA=ref|avx2|avx512|neon   force one kernel variant (an error if this CPU cannot run it)
    EDGERT_THREADS=N                  size of the kernel thread pool, 1..256 (default: the number of physical cores)
"""
from __future__ import annotations

import os
import sys

from .errors import DeviceError, EdgertError, InvalidArgumentError, NativeBuildError, NonFiniteError, check_count

try:
    from ._ffi import ffi, lib
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise NativeBuildError(
        "edgert's C core (edgert._ffi) is not built. It is compiled when the package is installed: run "
        "`pip install .` in the source checkout (needs a C compiler and cffi); running from the source tree "
        f"without installing does not build it. ({exc})"
    ) from exc

# threads one call may use: ET_MAX_THREADS in native/src/threadpool.c (the pool's size limit; above it the C core
# would quietly use fewer, and a count past 32 bits would not reach it at all)
MAX_THREADS = 256
ISA_NAMES = ("ref", "avx2", "avx512", "neon")  # the C core's kernel variants (EDGERT_ISA, set_isa, a profile's isa)

# C status codes (edgert.h) -> the error raised for them
_STATUS_ERRORS = {1: InvalidArgumentError, 2: MemoryError, 3: DeviceError, 4: InvalidArgumentError, 5: NonFiniteError}


def check(status: int) -> None:
    """Raise the edgert error for a non-zero C status, with the C core's message."""
    if status:
        msg = ffi.string(lib.et_last_error()).decode("utf-8", "replace")
        raise _STATUS_ERRORS.get(status, EdgertError)(msg)


def ptr(a, ctype: str = "void *"):
    """A C pointer (``ctype``, e.g. "float *") to the first byte of a C-contiguous numpy array, for a call into
    ``lib``. The pointer object keeps ``a`` alive. Through ``ffi.from_buffer``: a fraction of ``a.ctypes.data``'s
    per-call cost, which matters for calls of a few microseconds. The caller has checked dtype, shape and
    contiguity (a non-contiguous array raises BufferError here rather than handing C strided memory)."""
    if ctype == "void *":
        return ffi.from_buffer(a)
    return ffi.from_buffer(_ARRAY_TYPES.get(ctype) or _array_type(ctype), a)


_ARRAY_TYPES: dict[str, str] = {}


def _array_type(ctype: str) -> str:
    base = ctype.replace("const ", "").strip()
    if not base.endswith("*"):
        raise ValueError(f"not a pointer type: {ctype!r}")
    _ARRAY_TYPES[ctype] = base[:-1].strip() + "[]"
    return _ARRAY_TYPES[ctype]


def _str(p) -> str:
    return ffi.string(p).decode()


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads share a core's SIMD units, so they do not count)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # pragma: no cover - non-Linux
        allowed = set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{base}/core_id") as f1, open(f"{base}/physical_package_id") as f2:
                cores.add((f2.read().strip(), f1.read().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def set_isa(name: str | None) -> str:
    """Select a kernel variant ("ref", "avx2", "avx512", "neon"; None or "auto" = the best this CPU runs)."""
    if name is not None and (not isinstance(name, str) or "\x00" in name):  # C would read up to the NUL
        raise InvalidArgumentError(f"EDGERT_ISA / set_isa: the ISA is a name (str) or None, got {name!r}")
    if name is not None and len(name) > 24:  # no ISA is named that long; C's message would repeat all of it
        raise InvalidArgumentError(f"EDGERT_ISA / set_isa: unknown ISA {name[:20] + '...'!r} "
                                   f"(one of {', '.join(ISA_NAMES)}, auto)")
    st = lib.et_isa_select(ffi.NULL if name in (None, "", "auto") else name.encode())
    if st:
        msg = f"EDGERT_ISA / set_isa: {ffi.string(lib.et_last_error()).decode()}"
        raise DeviceError(msg) if st == 3 else InvalidArgumentError(msg)
    return _str(lib.et_isa_current())


def check_threads(threads, name: str = "threads") -> int | None:
    """A ``threads`` argument: None (the pool's size) or an int in [1, MAX_THREADS]; InvalidArgumentError naming
    ``name`` otherwise."""
    return None if threads is None else check_count(name, threads, lo=1, hi=MAX_THREADS, note=" or None")


def set_threads(n: int) -> None:
    """Resize the kernel thread pool (threads are created once and kept)."""
    check(lib.et_set_threads(check_count("thread count", n, lo=1, hi=MAX_THREADS)))


def threads() -> int:
    return lib.et_get_threads()


def _quant():
    from . import quant  # quant imports this module: resolved at call time

    return quant


def info() -> dict:
    """What the C core runs with: the ISA variant in use, those this CPU can run, threads, CPU features."""
    return {
        "version": _str(lib.et_version()),
        "isa": _str(lib.et_isa_current()),
        "isas": [s for s in _str(lib.et_isa_available()).split(",") if s],
        "threads": lib.et_get_threads(),
        "physical_cores": physical_cores(),
        "features": [s for s in _str(lib.et_cpu_features()).split(",") if s],
        # block formats whose x16 layout (edgert.repack) this ISA reads with its own kernels
        "repack": [f for f in _quant().BLOCK_FORMATS if _quant().repack_pays(f)],
    }


def _init_from_env() -> None:
    set_isa(os.environ.get("EDGERT_ISA") or None)
    env_threads = os.environ.get("EDGERT_THREADS")
    if env_threads:
        digits = env_threads.strip()
        # plain ASCII digits only: int() would also take "1_0", "+2" and other scripts' digits
        n = int(digits) if digits.isascii() and digits.isdigit() and len(digits) <= 6 else 0
        if not 1 <= n <= MAX_THREADS:
            shown = env_threads if len(env_threads) <= 24 else env_threads[:20] + "..."
            raise InvalidArgumentError(f"EDGERT_THREADS must be an integer in [1, {MAX_THREADS}], got {shown!r}")
        set_threads(n)
    else:
        set_threads(physical_cores())


def _launched_as_cli() -> bool:
    """This process is the `edgert` command: its console script, or `python -m edgert.cli`."""
    if os.path.basename(sys.argv[0]) in ("edgert", "edgert.exe"):
        return True
    argv = getattr(sys, "orig_argv", [])
    return any(a == "-m" and argv[i + 1:i + 2] == ["edgert.cli"] for i, a in enumerate(argv))


try:
    _init_from_env()
except EdgertError as _exc:
    # the command imports this before its main() can catch anything: it gets its one error line, not a traceback;
    # a Python program importing edgert gets the exception
    if _launched_as_cli():
        sys.exit(f"edgert: error: {_exc}")
    raise
