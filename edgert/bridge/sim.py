"""The NPU emulator, host side: build the reference firmware as a native program and run it on a pseudo-terminal
(``edgert npu-sim``, the tests, the benchmark).

Build: on first use, ``make -C firmware_bridge sim`` with the system C compiler into
``$EDGERT_HOME/npu-sim/<key>/`` (``~/.cache/edgert/npu-sim/<key>``), ``<key>`` a digest of the sources' contents and
the compiler (``source_key``): checkouts and installs with other sources never share a binary, whatever their files'
times say (make compares only times). The sources are firmware_bridge/ and the C core's reference kernels in
native/src/, shipped inside the package as edgert/_src/ (setup.py), found next to the package in a source checkout or
an editable install, or under ``$EDGERT_FIRMWARE_SRC`` (a firmware_bridge directory with native/ beside it).
Builds unused for 14 days (other sources, other compilers) are removed when a build is next asked for.
``asan=True`` (or ``EDGERT_NPU_SIM_ASAN=1``) runs the AddressSanitizer + UBSan build instead.

Must not import anything above edgert.bridge.
"""
from __future__ import annotations

import fcntl
import hashlib
import math
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from ..errors import DeviceError, check_count, check_number


def _home() -> Path:
    env = os.environ.get("EDGERT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgert"


def firmware_dir() -> Path:
    env = os.environ.get("EDGERT_FIRMWARE_SRC")
    if env:
        d = Path(env)
    else:
        here = Path(__file__).resolve()
        shipped = here.parents[1] / "_src" / "firmware_bridge"  # an installed package (setup.py ships them)
        d = shipped if shipped.is_dir() else here.parents[2] / "firmware_bridge"  # a source checkout
    if not (d / "Makefile").is_file() or not (d.parent / "native" / "src" / "matmul" / "ref.c").is_file():
        raise DeviceError(f"the NPU emulator's sources are not at {d} (firmware_bridge/ with native/ beside it): run "
                          "from an edgert source checkout (pip install -e .) or set EDGERT_FIRMWARE_SRC")
    return d


# what the emulator is built from, as setup.py ships it (the Makefile holds the compiler flags); "build" dirs left out
SOURCE_PATTERNS = {"firmware_bridge": ("*.c", "*.h", "*.ld", "Makefile"), "native": ("*.c", "*.h", "*.inc")}


def source_key(src: Path) -> str:
    """A digest naming the emulator's build: every source file's path and contents (``SOURCE_PATTERNS`` under
    firmware_bridge ``src`` and native/ beside it), and the compiler make runs (``$CC``, else cc, and what its
    ``--version`` says)."""
    h = hashlib.blake2b(digest_size=10)
    root = src.parent
    for top, patterns in SOURCE_PATTERNS.items():
        files = {f for p in patterns for f in (root / top).rglob(p) if "build" not in f.relative_to(root).parts}
        for f in sorted(files):
            data = f.read_bytes()
            h.update(f"{f.relative_to(root).as_posix()}\0{len(data)}\0".encode())
            h.update(data)
    cc = os.environ.get("CC") or "cc"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    except OSError:
        version = ""  # make says what is missing
    h.update(f"\0{cc}\0{version}".encode())
    return h.hexdigest()


def build(asan: bool = False) -> Path:
    """Path of the emulator binary, built now unless this build directory (one per ``source_key``) has it. One build
    at a time (a file lock)."""
    if shutil.which("make") is None:
        raise DeviceError("building the NPU emulator needs make and a C compiler (apt-get install make gcc)")
    src = firmware_dir()
    out = _home() / "npu-sim" / source_key(src)
    out.mkdir(parents=True, exist_ok=True)
    target = "sim-asan" if asan else "sim"
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        r = subprocess.run(["make", "-s", "-C", str(src), target, f"BUILD={out}"], capture_output=True, text=True)
    if r.returncode != 0:
        raise DeviceError(f"building the NPU emulator failed:\n{r.stdout}{r.stderr}")
    os.utime(out)  # the directory's time says when a build was last used
    _prune(out.parent, keep=out)
    return out / ("npu-sim-asan" if asan else "npu-sim")


STALE_BUILD_S = 14 * 86400  # an emulator build no process has asked for in this long is removed


def _prune(root: Path, keep: Path) -> None:
    """Remove the build directories under ``root`` (other sources, other compilers) unused for ``STALE_BUILD_S``,
    each only when nobody holds its lock (a process building there). A running emulator keeps its open binary."""
    import time

    for d in root.iterdir():
        try:
            if d == keep or not d.is_dir() or not (d / ".lock").is_file() or \
                    time.time() - d.stat().st_mtime < STALE_BUILD_S:
                continue
            with open(d / ".lock") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(d)
        except OSError:  # in use, gone already, or not ours to remove: leave it
            continue


class NpuSim:
    """A running emulator. ``url`` is its pty's path (any pyserial client opens it).

    Device model: ``baud`` (0: unpaced), ``ops_per_s`` (compute speed, 0: as fast as this CPU), ``arena`` (bytes).
    Faults: ``drop``/``corrupt``/``duplicate`` (per byte, both directions), ``stall_ms`` (per answer),
    ``reset_after`` (reset when that many frames have ended), ``seed``."""

    def __init__(self, *, baud: float = 0, ops_per_s: float = 0, arena: int = 0, drop: float = 0, corrupt: float = 0,
                 duplicate: float = 0, stall_ms: int = 0, reset_after: int | None = None, seed: int | None = None,
                 asan: bool | None = None):
        if asan is None:
            asan = os.environ.get("EDGERT_NPU_SIM_ASAN", "") not in ("", "0")
        self.asan = asan
        baud = check_number("baud", baud, 0.0, math.inf, hi_open=True)
        ops_per_s = check_number("ops_per_s", ops_per_s, 0.0, math.inf, hi_open=True)
        arena = check_count("arena", arena, hi=2**32 - 1, note=" (0: the build's size)")  # the firmware's is 32-bit
        drop, corrupt, duplicate = (check_number(k, v, 0.0, 1.0) for k, v in
                                    (("drop", drop), ("corrupt", corrupt), ("duplicate", duplicate)))
        stall_ms = check_count("stall_ms", stall_ms)
        if reset_after is not None:
            reset_after = check_count("reset_after", reset_after, lo=1)
        if seed is not None:
            seed = check_count("seed", seed)
        self.args = ["--baud", str(baud), "--ops-per-s", str(ops_per_s), "--arena", str(arena), "--drop",
                     str(drop), "--corrupt", str(corrupt), "--duplicate", str(duplicate), "--stall-ms",
                     str(stall_ms)]
        if reset_after is not None:
            self.args += ["--reset-after", str(reset_after)]
        if seed is not None:
            self.args += ["--seed", str(seed)]
        self.baud = baud
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.stderr = b""

    def start(self) -> "NpuSim":
        exe = build(self.asan)
        env = dict(os.environ)
        if self.asan:
            env.setdefault("ASAN_OPTIONS", "abort_on_error=1:detect_leaks=0")
            env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
        # stdin is a pipe we hold: the emulator exits when this process goes away
        self.proc = subprocess.Popen([str(exe), *self.args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env)
        line = self.proc.stdout.readline().decode().strip()
        if not line.startswith("npu-sim: "):
            self._end()
            why = (self.stderr + self.proc.stderr.read()).decode(errors="replace").strip()  # the drain has not started
            self.stop()
            raise DeviceError(f"the NPU emulator did not start: {why or line or 'no output'}")
        self.url = line.split(": ", 1)[1]
        self._err = threading.Thread(target=self._drain, daemon=True)
        self._err.start()
        return self

    def _drain(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read1(4096), b""):
            self.stderr += chunk
            sys.stderr.write(chunk.decode(errors="replace"))

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """Kill the emulator outright (a device that disappears)."""
        if self.alive:
            self.proc.kill()
            self.proc.wait()

    def _end(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # the emulator exits cleanly when its stdin closes
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self) -> int | None:
        """Stop it and close its pipes (also after kill()); returns its exit status (a sanitizer report makes it
        non-zero, and shows on stderr)."""
        if self.proc is None:
            return None
        self._end()
        drain = getattr(self, "_err", None)
        if drain is not None:
            drain.join(timeout=5)  # it ends at the EOF of the exited emulator's stderr, with the whole report read
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            pipe.close()
        return self.proc.returncode

    def __enter__(self) -> "NpuSim":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
