"""edgert.native: info(), ISA selection (set_isa and EDGERT_ISA), thread pool (set_threads and EDGERT_THREADS),
C status -> edgert error, and the GIL being released while kernels run."""
import json
import os
import platform
import sys
import threading
import time

import numpy as np
import pytest

import edgert
from edgert import native

from cli_run import run_python

KNOWN_ISAS = ("ref", "avx2", "avx512", "neon")


def unavailable_isa() -> str | None:
    """A known ISA name this CPU cannot run (neon on x86, avx2 on ARM)."""
    missing = [name for name in KNOWN_ISAS if name not in native.info()["isas"]]
    return missing[0] if missing else None


def run_with_env(**env):
    """Import edgert in a fresh interpreter with the given environment and print info() as JSON."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("EDGERT_")}
    full.update(env)
    code = "import json, edgert; print(json.dumps(edgert.native.info()))"
    return run_python("-c", code, env=full, timeout=60)


# --- info and run-time selection ------------------------------------------------------------------------------

def test_info_fields():
    info = native.info()
    assert info["isa"] in info["isas"]
    assert "ref" in info["isas"] and set(info["isas"]) <= set(KNOWN_ISAS)
    assert isinstance(info["threads"], int) and info["threads"] >= 1
    assert isinstance(info["features"], list) and info["version"] == edgert.__version__


def test_expected_variants_for_this_architecture():
    isas = native.info()["isas"]
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        assert "neon" not in isas
        if "avx2" in native.info()["features"]:
            assert "avx2" in isas
    elif machine in ("aarch64", "arm64"):
        assert "neon" in isas and "avx2" not in isas


def test_set_isa_selects_each_available_variant(isa):
    assert native.info()["isa"] == isa


def test_set_isa_auto_picks_the_best():
    native.set_isa("ref")
    assert native.set_isa("auto") == native.info()["isas"][-1]
    native.set_isa("ref")
    assert native.set_isa(None) == native.info()["isas"][-1]


def test_set_isa_unknown_name():
    with pytest.raises(edgert.InvalidArgumentError, match="sse9") as e:
        native.set_isa("sse9")
    assert "ref" in str(e.value)
    with pytest.raises(edgert.InvalidArgumentError, match="ref\\\\x00junk"):  # C read it as "ref"
        native.set_isa("ref\x00junk")


def test_set_isa_unavailable_variant():
    name = unavailable_isa()
    if name is None:
        pytest.skip("this CPU runs every known variant")
    before = native.info()["isa"]
    with pytest.raises(edgert.DeviceError, match=name) as e:
        native.set_isa(name)
    assert "ref" in str(e.value)  # says what this CPU can run instead
    assert native.info()["isa"] == before


def test_set_threads():
    native.set_threads(1)
    assert native.info()["threads"] == 1
    native.set_threads(3)
    assert native.info()["threads"] == 3
    for bad in (0, -2, 1.5, "2", True):
        with pytest.raises(edgert.InvalidArgumentError):
            native.set_threads(bad)
    assert native.info()["threads"] == 3


def test_c_status_becomes_typed_error_with_c_message():
    st = native.lib.et_dequantize(99, native.ffi.NULL, native.ffi.NULL, 1, 32)
    assert st == 1
    with pytest.raises(edgert.InvalidArgumentError, match="unknown tensor type 99"):
        native.check(st)
    native.check(0)


# --- environment variables, read once at import -----------------------------------------------------------------

@pytest.mark.parametrize("name", native.info()["isas"])
def test_env_isa_forces_variant(name):
    proc = run_with_env(EDGERT_ISA=name)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["isa"] == name


def test_env_isa_unavailable_is_an_error():
    name = unavailable_isa()
    if name is None:
        pytest.skip("this CPU runs every known variant")
    proc = run_with_env(EDGERT_ISA=name)
    assert proc.returncode != 0
    assert "DeviceError" in proc.stderr and f"'{name}'" in proc.stderr and "EDGERT_ISA" in proc.stderr


def test_env_isa_unknown_is_an_error():
    proc = run_with_env(EDGERT_ISA="mmx")
    assert proc.returncode != 0 and "InvalidArgumentError" in proc.stderr and "mmx" in proc.stderr


@pytest.mark.parametrize("n", [1, 3])
def test_env_threads(n):
    proc = run_with_env(EDGERT_THREADS=str(n))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["threads"] == n


@pytest.mark.parametrize("value", ["0", "-1", "two", "1_0", "+2", "\u0662", "2.0"])
def test_env_threads_invalid(value):
    proc = run_with_env(EDGERT_THREADS=value)
    assert proc.returncode != 0
    assert "EDGERT_THREADS" in proc.stderr and repr(value) in proc.stderr


def test_env_isa_long_value_is_shortened_in_the_message():
    proc = run_with_env(EDGERT_ISA="x" * 5000)
    assert proc.returncode != 0 and "EDGERT_ISA" in proc.stderr and "x" * 100 not in proc.stderr


def test_env_threads_invalid_long_value_is_shortened_in_the_message():
    proc = run_with_env(EDGERT_THREADS="9" * 5000)
    assert proc.returncode != 0 and "got '99999999999999999999...'" in proc.stderr and "9" * 100 not in proc.stderr


def test_default_threads_is_physical_cores():
    proc = run_with_env()
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["threads"] == info["physical_cores"] and info["isa"] == info["isas"][-1]


# --- concurrency ----------------------------------------------------------------------------------------------

def test_gil_is_released_while_a_kernel_runs():
    """With a huge switch interval a thread holding the GIL is never preempted, so the counter thread can only
    advance while the main thread is blocked in C with the GIL released. The pure-Python control holds the GIL for
    a comparable time and must see the counter stand still: that shows the test can fail."""
    native.set_isa("ref")
    rng = np.random.default_rng(0)
    w = edgert.quantize(rng.standard_normal((1024, 2048)).astype(np.float32), "f32")
    x = rng.standard_normal((48, 2048)).astype(np.float32)
    counter = [0]
    stop = threading.Event()

    def count():
        while not stop.is_set():
            counter[0] += 1
            time.sleep(0.0005)  # releases the GIL, then needs it back to run the next increment

    old_interval = sys.getswitchinterval()
    t = threading.Thread(target=count)
    t.start()
    try:
        time.sleep(0.05)  # let the counter thread get going
        sys.setswitchinterval(1000.0)
        # A thread already waiting for the GIL keeps the old interval for that wait and may still force one switch:
        # sleeping lets every such wait finish, so each later wait uses the new interval.
        time.sleep(0.02)
        before = counter[0]
        deadline = time.perf_counter() + 0.1
        while time.perf_counter() < deadline:  # control: pure Python, GIL held throughout
            pass
        held = counter[0] - before
        before = counter[0]
        edgert.matmul(x, w, threads=1)
        released = counter[0] - before
    finally:
        sys.setswitchinterval(old_interval)
        stop.set()
        t.join()
    # At most one increment already in flight when the control began; released must be far above it.
    assert held <= 1, f"control: the counter moved {held} times while Python held the GIL"
    assert released >= 5, f"the counter thread ran {released} times during the matmul: the GIL was not released"


def test_concurrent_matmuls_from_python_threads_match_sequential(isa):
    rng = np.random.default_rng(1)
    cases = []
    for fmt in ("q4_0", "q4_1", "q8_0", "f16"):
        w = edgert.quantize(rng.standard_normal((257, 512)).astype(np.float32), fmt)
        x = rng.standard_normal((9, 512)).astype(np.float32)
        cases.append((x, w, edgert.matmul(x, w, threads=1)))
    errors = []

    def worker(threads):
        for _ in range(10):
            for x, w, expected in cases:
                if not np.array_equal(edgert.matmul(x, w, threads=threads), expected):
                    errors.append((threads, w.fmt))

    pool = [threading.Thread(target=worker, args=(t,)) for t in (1, 2, 2, 3)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, f"concurrent results differ from sequential: {errors[:5]}"


SMALL_STACK_CHILD = r"""
import sys, threading
import numpy as np
import edgert, edgert.quant as eq
rng = np.random.default_rng(3)
cases = []
for fmt in ("q4_0", "q4_1", "q8_0", "f16", "f32"):
    w = edgert.quantize(rng.standard_normal((100, 512)).astype(np.float32), fmt)
    ws = [w] + ([eq.repack(w)] if fmt in eq.BLOCK_FORMATS else [])
    for m in (1, 64):  # the GEMV and the GEMM (AMX where the CPU has it): the largest frames
        x = rng.standard_normal((m, 512)).astype(np.float32)
        cases += [(lambda x=x, w=v, th=th: edgert.matmul(x, w, threads=th)) for v in ws for th in (1, 2)]
w8 = eq.Int8Weights(rng.integers(-128, 128, (100, 512)).astype(np.int8), scale=0.01)
x8 = rng.standard_normal((64, 512)).astype(np.float32)
cases += [(lambda th=th: eq.BoundDynamicInt8(w8, 64, threads=th)(x8).copy()) for th in (1, 2)]
expected = [f() for f in cases]  # on the main thread (8 MiB)
threading.stack_size(int(sys.argv[1]) * 1024)
got = []
t = threading.Thread(target=lambda: got.extend(f() for f in cases))
t.start()
t.join()
same = len(got) == len(expected) and all(np.array_equal(a, b) for a, b in zip(got, expected))
print("same" if same else "differ", len(expected))
"""


@pytest.mark.parametrize("kib", [64, 128])
def test_kernels_from_a_thread_with_a_small_stack(kib):
    """A thread made with a small stack (musl's default 128 KiB; Python's threading.stack_size) segfaulted in the
    AVX-512 GEMV/GEMM (frames up to ~190 KiB): now the pool's workers, which get 2 MiB, run its shares. In a child,
    so that a regression fails the test rather than the test run."""
    r = run_python("-c", SMALL_STACK_CHILD, str(kib), timeout=120)
    assert r.returncode == 0 and r.stdout.split()[0] == "same", (r.returncode, r.stdout, r.stderr[-2000:])


FORK_CHILD = r"""
import os, signal, threading
import numpy as np
import edgert
q = edgert.quantize(np.ones((256, 1024), np.float32), "q4_0")
x = np.ones((32, 1024), np.float32)
edgert.native.set_threads(2)
expected = edgert.matmul(x, q)  # the pool's workers exist from here on

def child(body):
    pid = os.fork()
    if pid == 0:
        signal.alarm(10)  # a hang ends the child, not the test run
        try:
            os._exit(0 if np.array_equal(body(), expected) else 3)
        except BaseException:
            os._exit(4)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

def small_stack_thread():
    threading.stack_size(128 * 1024)
    out = []
    t = threading.Thread(target=lambda: out.append(edgert.matmul(x, q)))
    t.start()
    t.join()
    return out[0]

codes = [child(small_stack_thread)]
stop = []
busy = threading.Thread(target=lambda: [edgert.matmul(x, q) for _ in iter(lambda: bool(stop), True)])
busy.start()  # forks below land while this thread is inside a matmul, holding the pool
codes += [child(lambda: edgert.matmul(x, q)) for _ in range(20)]
stop.append(1)
busy.join()
print(" ".join(map(str, codes)))
"""


def test_pool_in_a_forked_child():
    """fork() copies only the calling thread. A child whose small-stack thread handed its shares to the parent's
    workers (absent in the child) spun for ever; a child forked while another parent thread was inside a matmul
    inherited the pool's lock held and deadlocked (5 of 30). The child now starts from an empty pool."""
    r = run_python("-c", FORK_CHILD, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["0"] * 21, r.stdout
