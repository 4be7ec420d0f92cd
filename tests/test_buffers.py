"""PinnedPool layout (one allocation, 64-byte alignment, stable views), page-locking reported, CopyCounter."""
import numpy as np
import pytest

from edgert.buffers import ALIGN, CopyCounter, PinnedPool
from edgert.errors import InvalidArgumentError, ShapeError


def test_pool_one_allocation_aligned_views():
    pool = PinnedPool("t")
    pool.reserve("a", (3, 5), np.float32)
    pool.reserve("b", (7,), np.int8)
    pool.reserve("c", (2, 2, 2), np.float64)
    pool.reserve("empty", (0, 4), np.float32)
    pool.allocate()
    assert pool.allocations == 1
    for name in ("a", "b", "c"):  # (a zero-size view has no data to align)
        v = pool.view(name)
        assert v.ctypes.data % ALIGN == 0
        assert v.flags.c_contiguous
    assert pool.view("a").shape == (3, 5) and pool.view("b").dtype == np.int8
    # buffers do not overlap
    pool.view("a")[:] = 1.0
    pool.view("b")[:] = 7
    pool.view("c")[:] = 2.0
    assert (pool.view("a") == 1.0).all() and (pool.view("b") == 7).all()
    # the same arrays every time, no new allocation
    assert pool.view("a") is pool.view("a")
    pool.allocate()
    assert pool.allocations == 1


def test_pool_lock_is_reported():
    pool = PinnedPool("locked")
    pool.reserve("x", (1024,), np.float32)
    pool.allocate()
    assert isinstance(pool.locked, bool)
    assert pool.locked or pool.lock_error  # either it is locked, or we are told why not
    pool.close()
    assert not pool.locked
    off = PinnedPool("off", lock=False)
    off.reserve("x", (4,), np.float32)
    off.allocate()
    assert not off.locked and "not requested" in off.lock_error


def test_pool_errors():
    pool = PinnedPool("e")
    pool.reserve("a", (2,), np.float32)
    assert pool.reserve("a", (2,), np.float32).name == "a"
    with pytest.raises(InvalidArgumentError, match="reserved as"):
        pool.reserve("a", (3,), np.float32)
    with pytest.raises(ShapeError, match="concrete shape"):
        pool.reserve("neg", (-1, 2), np.float32)
    with pytest.raises(InvalidArgumentError, match="not allocated"):
        pool.view("a")
    pool.allocate()
    with pytest.raises(InvalidArgumentError, match="before allocate"):
        pool.reserve("late", (1,), np.float32)
    with pytest.raises(InvalidArgumentError, match="no buffer"):
        pool.view("nope")
    assert pool.acquire("a", (2,), np.float32) is pool.view("a")
    with pytest.raises(ShapeError):
        pool.acquire("a", (2,), np.int32)


def test_copy_counter():
    c = CopyCounter()
    src, dst = np.arange(6, dtype=np.float32), np.zeros(6, np.float32)
    c.copy(dst, src, "to_device")
    c.copy(dst, src, "to_device")
    c.copy(dst[:2], src[:2], "to_host")
    assert (dst == src).all()
    assert c.bytes_to_device == 48 and c.bytes_to_host == 8 and c.copies == {"to_device": 2, "to_host": 1}
    with pytest.raises(TypeError):
        c.copy(np.zeros(6, np.float64), src, "to_host")  # no silent casts
    c.reset()
    assert c.bytes_to_device == 0


def test_reserve_refuses_what_would_be_silently_wrong_or_crash_later():
    from edgert.errors import DTypeError, InvalidArgumentError, ShapeError

    p = PinnedPool("p")
    with pytest.raises(ShapeError, match="integers"):
        p.reserve("f", (2.5, 4), np.float32)  # was truncated to (2, 4)
    with pytest.raises(ShapeError, match="integers"):
        p.reserve("s", 3, np.float32)  # was TypeError: 'int' object is not iterable
    with pytest.raises(DTypeError, match="objects"):
        p.reserve("o", (2,), object)  # was accepted, then TypeError at allocate()
    with pytest.raises(DTypeError, match="not understood"):
        p.reserve("d", (2,), "nope")
    p.reserve("ok", (np.int64(3),), np.float32)
    p.allocate()
    assert p.view("ok").shape == (3,)
    huge = PinnedPool("huge")
    huge.reserve("x", (2**40, 2**40), np.float32)
    with pytest.raises(InvalidArgumentError, match="cannot allocate"):
        huge.allocate()  # was numpy's ValueError
