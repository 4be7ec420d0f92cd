"""Buffers for tensors that cross a partition boundary: a pinned pool carved from one allocation per session, and
the counter of bytes copied over a link in each direction.

A ``PinnedPool`` is laid out in two steps, like TFLite Micro's arena: ``reserve`` every (name, shape, dtype) while a
session is built, then ``allocate`` once. After that ``view(name)`` hands out the same 64-byte-aligned numpy view run
after run; nothing on the run path allocates. The allocation is page-locked with ``mlock`` where the OS allows it
(``locked`` says whether it worked, ``lock_error`` why not: RLIMIT_MEMLOCK is often small in containers).

This module must not import from the layers above it (delegates, session).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import operator
import sys
from dataclasses import dataclass

import numpy as np

from .errors import DTypeError, InvalidArgumentError, ShapeError

ALIGN = 64  # bytes; a cache line, and what AVX-512 loads like
DIRECTIONS = ("to_device", "to_host")


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _libc():
    if sys.platform.startswith("win"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def mlock(addr: int, nbytes: int) -> tuple[bool, str]:
    """Page-lock [addr, addr + nbytes). Returns (locked, why not)."""
    if nbytes == 0:
        return True, ""
    if _LIBC is None or not hasattr(_LIBC, "mlock"):
        return False, f"mlock is not available on {sys.platform}"
    _LIBC.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    if _LIBC.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(nbytes)) == 0:
        return True, ""
    import os

    err = ctypes.get_errno()
    return False, (f"mlock of {nbytes} bytes failed: {os.strerror(err)} (raise RLIMIT_MEMLOCK, `ulimit -l`, to "
                   "page-lock session buffers)")


def munlock(addr: int, nbytes: int) -> None:
    if _LIBC is not None and hasattr(_LIBC, "munlock") and nbytes:
        _LIBC.munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        _LIBC.munlock(ctypes.c_void_p(addr), ctypes.c_size_t(nbytes))


@dataclass(frozen=True)
class Slot:
    """Where one buffer lives in the pool: byte ``offset`` (a multiple of ALIGN) from the aligned base."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int
    nbytes: int


class PinnedPool:
    """Named, 64-byte-aligned numpy buffers carved from one allocation. ``reserve`` all, ``allocate`` once, then
    ``view``/``acquire`` return the same arrays for the pool's lifetime. ``allocations`` counts the allocations the
    pool made (1 after ``allocate``, and it stays 1: tests check that the run path never adds one)."""

    def __init__(self, name: str = "pool", lock: bool = True):
        self.name = name
        self.lock = lock
        self.slots: dict[str, Slot] = {}
        self.nbytes = 0
        self.allocations = 0
        self.locked = False
        self.lock_error = "" if lock else "page-locking not requested"
        self._raw: np.ndarray | None = None
        self._base = 0
        self._views: dict[str, np.ndarray] = {}

    # ---- layout -------------------------------------------------------------------------------------------
    def reserve(self, name: str, shape, dtype) -> Slot:
        """Set aside a buffer for ``name``; before ``allocate`` only. Reserving a name twice with the same shape
        and dtype returns the existing slot."""
        try:
            shape = tuple(operator.index(d) for d in shape)  # integers only: int(2.5) would silently be 2
        except TypeError:
            raise ShapeError(f"pool {self.name!r}: buffer {name!r} needs a shape of integers, got {shape!r}") from None
        try:
            dtype = np.dtype(dtype)
        except TypeError as exc:
            raise DTypeError(f"pool {self.name!r}: buffer {name!r}: {exc}") from None
        if dtype.hasobject:
            raise DTypeError(f"pool {self.name!r}: buffer {name!r} is {dtype}: Python objects cannot live in a "
                             "pool's raw memory")
        if any(d < 0 for d in shape):
            raise ShapeError(f"pool {self.name!r}: buffer {name!r} needs a concrete shape, got {shape}")
        old = self.slots.get(name)
        if old is not None:
            if old.shape != shape or old.dtype != dtype:
                raise InvalidArgumentError(f"pool {self.name!r}: buffer {name!r} is reserved as {old.dtype} "
                                           f"{old.shape}, asked again as {dtype} {shape}")
            return old
        if self._raw is not None:
            raise InvalidArgumentError(f"pool {self.name!r} is already allocated; reserve {name!r} before allocate()")
        nbytes = math.prod(shape) * dtype.itemsize
        slot = Slot(name, shape, dtype, self.nbytes, nbytes)
        self.slots[name] = slot
        self.nbytes = _round_up(self.nbytes + max(nbytes, 1), ALIGN)
        return slot

    def allocate(self) -> None:
        """The pool's one allocation (zeroed, so first reads are deterministic), then page-locking."""
        if self._raw is not None:
            return
        try:
            self._raw = np.zeros(self.nbytes + ALIGN, dtype=np.uint8)
        except (MemoryError, ValueError) as exc:  # ValueError: more bytes than numpy can index
            raise InvalidArgumentError(f"pool {self.name!r}: cannot allocate {self.nbytes} bytes for "
                                       f"{len(self.slots)} buffers ({type(exc).__name__}: {exc})") from None
        self.allocations += 1
        addr = self._raw.ctypes.data
        start = _round_up(addr, ALIGN) - addr
        self._base = addr + start
        for s in self.slots.values():
            buf = self._raw[start + s.offset:start + s.offset + s.nbytes]
            self._views[s.name] = buf.view(s.dtype).reshape(s.shape)
        if self.lock and self.nbytes:
            self.locked, self.lock_error = mlock(self._base, self.nbytes)

    # ---- access -------------------------------------------------------------------------------------------
    def view(self, name: str) -> np.ndarray:
        try:
            return self._views[name]
        except KeyError:
            if self._raw is None:
                raise InvalidArgumentError(f"pool {self.name!r} is not allocated yet") from None
            raise InvalidArgumentError(f"pool {self.name!r} has no buffer {name!r}") from None

    def acquire(self, name: str, shape, dtype) -> np.ndarray:
        """The buffer for ``name``, checked to have ``shape`` and ``dtype`` (reserved and allocated before)."""
        v = self.view(name)
        if v.shape != tuple(shape) or v.dtype != np.dtype(dtype):
            raise ShapeError(f"pool {self.name!r}: buffer {name!r} is {v.dtype} {v.shape}, asked for "
                             f"{np.dtype(dtype)} {tuple(shape)}")
        return v

    def __contains__(self, name: str) -> bool:
        return name in self.slots

    def close(self) -> None:
        if self._raw is not None and self.locked:
            munlock(self._base, self.nbytes)
            self.locked = False

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __repr__(self) -> str:
        return (f"PinnedPool({self.name!r}, {len(self.slots)} buffers, {self.nbytes} bytes, "
                f"locked={self.locked})")


class CopyCounter:
    """Bytes (and copies) moved over links, per direction."""

    __slots__ = ("bytes", "copies")

    def __init__(self):
        self.bytes = {d: 0 for d in DIRECTIONS}
        self.copies = {d: 0 for d in DIRECTIONS}

    def copy(self, dst: np.ndarray, src: np.ndarray, direction: str) -> None:
        """dst[...] = src, counted; shapes and dtypes must already match (the session laid both out)."""
        np.copyto(dst, src, casting="no")
        self.bytes[direction] += dst.nbytes
        self.copies[direction] += 1

    @property
    def bytes_to_device(self) -> int:
        return self.bytes["to_device"]

    @property
    def bytes_to_host(self) -> int:
        return self.bytes["to_host"]

    def reset(self) -> None:
        for d in DIRECTIONS:
            self.bytes[d] = 0
            self.copies[d] = 0
