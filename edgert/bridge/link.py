"""SerialLink: one request, one answer, over any pyserial URL (a real port, ``loop://``, ``socket://host:port``, the
emulator's pty), with the retransmission rules of firmware_bridge/PROTOCOL.md §4.

``transact`` sends a request, waits for the answer with its sequence number, and retransmits on a timeout (with
back-off), on a NAK, or when a broken frame arrives; frames that are not the awaited answer are discarded. Framing is
framing.py's; this module only moves bytes and counts what happened. It knows nothing about graphs or tensors
(device.py).
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

from ..errors import LinkError
from . import protocol as P
from .framing import (CRC_BYTES, FLAG_ERROR, FLAG_RESPONSE, FLAG_RETRANSMIT, HEADER_BYTES, Frame, FrameDecoder,
                      encode_frame)

log = logging.getLogger("edgert.bridge")
READ_POLL_S = 0.005


class LinkWriteError(LinkError):
    """The port refused or timed out a write: the link is down (a device that stopped reading), not noisy, so
    retrying smaller frames cannot help (each try waits out the port's write timeout)."""


class NoAnswerError(LinkError):
    """A request got no answer within its retransmissions (a stalled device, or a line too noisy for the budget):
    the port itself is fine, so the connection and its session can be kept. ``silent``: the retransmissions made
    after unanswered waits (what ``retries`` bounds); ``noisy``: those after a NAK or a broken answer; ``stalled``:
    whether it gave up on silence (else on noise)."""

    def __init__(self, message: str, silent: int = 0, noisy: int = 0, stalled: bool = True):
        super().__init__(message)
        self.silent, self.noisy, self.stalled = silent, noisy, stalled


class DeviceStatusError(LinkError):
    """The device answered with an error status. ``status`` is the code, ``name`` its PROTOCOL.md name."""

    def __init__(self, msg: str, status: int):
        super().__init__(msg)
        self.status = status
        self.name = P.ERRORS.get(status, f"status {status}")


@dataclass
class LinkStats:
    bytes_tx: int = 0
    bytes_rx: int = 0
    frames_tx: int = 0
    frames_rx: int = 0
    retransmits: int = 0
    timeouts: int = 0
    naks: int = 0
    broken: int = 0    # broken frames received (each a resync on the next delimiter)
    resyncs: int = 0   # broken frames dropped by either side (host: decoder; device: NAKs received)
    discarded: int = 0  # well-formed frames that were not the awaited answer

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# bytes of a frame on the wire beyond its payload: header, CRC, COBS (2 for a short frame), the delimiter
FRAME_OVERHEAD = HEADER_BYTES + CRC_BYTES + 3


class LineQuality:
    """The line's byte error rate, measured: each attempt at a request exposes its bytes (the request and its answer;
    half of them when it failed, which on average happens half-way) and either got its answer or ended in a broken
    frame (a NAK, a broken answer; a timeout says nothing about the line: the device may be busy or stalled).
    Estimated as failures per byte exposed, both decayed per attempt
    (``DECAY``: about the last 100 attempts count), so it follows a line that gets better or worse. A chunked
    transfer sizes its chunks for it from the first one (``chunk``), instead of finding the size again by halving
    at every transfer. One estimate lives as long as the line does: the serial-npu delegate keeps it across
    reconnections."""

    DECAY = 0.99

    def __init__(self):
        self.exposed = 0.0  # bytes, decayed
        self.failed = 0.0   # failed attempts, decayed

    def note(self, nbytes: int, failed: bool) -> None:
        self.exposed = self.exposed * self.DECAY + nbytes
        self.failed = self.failed * self.DECAY + failed

    @property
    def byte_error_rate(self) -> float:
        return self.failed / self.exposed if self.exposed else 0.0

    def chunk(self, overhead: int, top: int, floor: int) -> int:
        """The data bytes per frame that move the most data per byte sent at this error rate λ, in [floor, top]: a
        round trip carrying n bytes beside o bytes of frames arrives whole with probability e^(-λ(n+o)), so
        n·e^(-λ(n+o))/(n+o) is largest at n(n+o) = o/λ (o: both frames' overhead)."""
        lam = self.byte_error_rate
        if lam <= 0:
            return top
        o = 2 * FRAME_OVERHEAD + overhead
        n = (-o + math.sqrt(o * o + 4 * o / lam)) / 2
        return int(max(floor, min(top, n)))


# The defaults (PROTOCOL.md §4). ``retries`` bounds the waits a device leaves unanswered (silence: a stalled or busy
# device), which back off from ``timeout``: a stalled device costs sum(TIMEOUT_S * min(2^i, 8), i = 0..RETRIES) ~ 11 s
# before the host fails over; 0.2 s leaves room for a device that answers a few hundred ms late. A loss the device or
# the line reports at once (a NAK, a broken answer) costs line time, not a wait: those immediate retransmissions have
# a budget of their own, NOISE_RESENDS per retry (32 by default carry a request through 1% dropped + 1% corrupted
# bytes, where a round trip arrives whole about one time in four)
DEFAULT_TIMEOUT_S = 0.2
DEFAULT_RETRIES = 8
NOISE_RESENDS = 4


class SerialLink:
    """``SerialLink(url, baudrate=115200, timeout=DEFAULT_TIMEOUT_S, retries=DEFAULT_RETRIES)``: the host end of the
    protocol's link layer.

    ``timeout`` is the first wait for an answer (the time the request and a full answer take at ``baudrate`` is
    added); each unanswered wait doubles it, up to 8x. ``retries`` retransmissions after unanswered waits, or
    ``NOISE_RESENDS`` times that immediate ones after a NAK or broken answer, then NoAnswerError (PROTOCOL.md §4).
    A write may block for ``timeout`` plus the largest frame's time on the line (``write_timeout_s``): a port that
    takes no more bytes for that long belongs to a device that stopped reading (LinkWriteError, no retry).
    ``serial`` may be an open pyserial-like object instead of a URL (tests)."""

    def __init__(self, url: str | None = None, baudrate: int = 115200, timeout: float = DEFAULT_TIMEOUT_S,
                 retries: int = DEFAULT_RETRIES, *,
                 serial=None, max_payload: int = 4096, line: LineQuality | None = None):
        self.baudrate = int(baudrate)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.stats = LinkStats()
        self.line = line or LineQuality()
        self.decoder = FrameDecoder()
        self.port = None
        self.max_payload = max_payload
        if serial is None:
            try:
                import serial as pyserial
            except ImportError as exc:  # pragma: no cover
                raise LinkError("the serial NPU link needs pyserial: pip install pyserial") from exc
            try:
                serial = pyserial.serial_for_url(url, baudrate=baudrate, timeout=READ_POLL_S,
                                                 write_timeout=self.write_timeout_s())
            except (pyserial.SerialException, ValueError, OSError) as exc:
                raise LinkError(f"cannot open the serial NPU link {url!r}: {exc}. Start the emulator with "
                                "`edgert npu-sim` and pass the path it prints, or check the port") from None
        self.url = url or getattr(serial, "port", "?")
        self.port = serial
        self._set_write_timeout()
        self._seq = int.from_bytes(os.urandom(2), "little")  # any start: HELLO sets the device's baseline
        self._closed = False

    @property
    def max_payload(self) -> int:
        """The largest payload of a frame either way: the device's (HELLO), at most what the host's decoder takes
        (64 KiB): READ asks for no more, so every answer fits, however much the device allows."""
        return self._max_payload

    @max_payload.setter
    def max_payload(self, n: int) -> None:
        self._max_payload = min(int(n), self.decoder.max_frame - HEADER_BYTES - CRC_BYTES)
        self._set_write_timeout()

    def write_timeout_s(self) -> float:
        """``timeout`` plus the time the largest frame (a retransmission: delimiter, COBS, header, CRC) takes on the
        line. A fixed 10 s made every attempt on a stalled device cost 10 s whatever timeout and retries said."""
        n = self._max_payload + HEADER_BYTES + CRC_BYTES
        return self.timeout + self.line_seconds(n + n // 254 + 3)

    def _set_write_timeout(self) -> None:
        if self.port is not None and hasattr(self.port, "write_timeout"):
            t = self.write_timeout_s()
            if self.port.write_timeout != t:  # pyserial reconfigures a tty for each change: only when it changes
                self.port.write_timeout = t

    # ---- bytes ------------------------------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        try:
            self.port.write(data)
            self.port.flush()
        except Exception as exc:  # pyserial raises SerialException/OSError/SerialTimeoutException
            raise LinkWriteError(f"serial NPU link {self.url}: write failed: {exc}") from None
        self.stats.bytes_tx += len(data)

    def _read(self, wait: float) -> bytes:
        try:
            n = self.port.in_waiting
            if n:
                data = self.port.read(n)
            else:
                # the port's timeout stays at READ_POLL_S (setting it per call costs a tcsetattr on a tty)
                data = b""
                end = time.monotonic() + wait
                while True:
                    data = self.port.read(1)
                    if data or time.monotonic() >= end:
                        break
                if data:
                    n = self.port.in_waiting
                    if n:
                        data += self.port.read(n)
        except Exception as exc:
            raise LinkError(f"serial NPU link {self.url}: read failed (device gone?): {exc}") from None
        self.stats.bytes_rx += len(data)
        return data

    def send_frame(self, frame: Frame) -> None:
        self._write(encode_frame(frame))
        self.stats.frames_tx += 1

    def recv_frames(self, wait: float) -> list[Frame]:
        """Frames completed within ``wait`` seconds (possibly none)."""
        before = self.decoder.broken
        frames = self.decoder.feed(self._read(wait))
        self.stats.broken += self.decoder.broken - before
        self.stats.resyncs += self.decoder.broken - before  # the decoder skipped to the next delimiter
        self.stats.frames_rx += len(frames)
        return frames

    def line_seconds(self, nbytes: int) -> float:
        return nbytes * 10.0 / self.baudrate if self.baudrate > 0 else 0.0

    # ---- one request, one answer ------------------------------------------------------------------------------
    def next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def transact(self, type_: int, payload: bytes = b"", *, expect_bytes: int = 0, check: bool = True,
                 retries: int | None = None, busy_s: float = 0.0) -> Frame:
        """Send request ``type_`` with ``payload`` and return its answer (a Frame). Retransmits per PROTOCOL.md §4.
        ``check``: raise DeviceStatusError when the answer carries an error status. ``retries`` overrides the link's
        (unanswered waits; immediate retransmissions after a NAK or a broken answer: ``NOISE_RESENDS`` times that).
        ``busy_s``: the time the device is expected to work on it (an INVOKE), added to the first wait and to the wait
        after each immediate retransmission (the device had not got the request whole), not to the back-off."""
        if self._closed:
            raise LinkError(f"serial NPU link {self.url} is closed")
        seq = self.next_seq()
        req = Frame(type_, seq, bytes(payload))
        wire = encode_frame(req)
        base = self.timeout + self.line_seconds(len(wire) + expect_bytes + 64)
        step = base  # the wait after an unanswered one: doubles, up to 8x
        wait, silent, noisy = base + busy_s, 0, 0
        self._write(wire + b"\x00")  # a second delimiter: a frame whose one delimiter is lost waits for a timeout
        self.stats.frames_tx += 1
        while True:
            deadline = time.monotonic() + wait
            resend = False
            while not resend:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.stats.timeouts += 1
                    break
                before = self.decoder.broken
                for f in self.recv_frames(min(left, 0.05)):
                    if f.type == P.NAK and f.flags & FLAG_RESPONSE:
                        self.stats.naks += 1
                        self.stats.resyncs += 1  # the device dropped a broken frame and resynchronised
                        resend = True
                    elif f.flags & FLAG_RESPONSE and f.seq == seq and f.type == type_:
                        self.line.note(len(wire) + len(f.payload) + FRAME_OVERHEAD, False)
                        if check and (f.flags & FLAG_ERROR or f.status):
                            raise DeviceStatusError(
                                f"serial NPU {self.url}: {P.MESSAGE_NAMES.get(type_, type_)} failed with "
                                f"{P.ERRORS.get(f.status, f.status)}: {f.payload.decode('ascii', 'replace')}",
                                f.status)
                        return f
                    else:
                        self.stats.discarded += 1
                if self.decoder.broken != before:
                    resend = True
            limit = self.retries if retries is None else retries
            name = P.MESSAGE_NAMES.get(type_, type_)
            if resend:  # a broken frame either way: noise (a silent device says nothing about the line); on
                # average it broke half-way. The device is alive: the request goes again at once
                self.line.note((len(wire) + max(expect_bytes, FRAME_OVERHEAD)) // 2, True)
                noisy += 1
                if noisy > NOISE_RESENDS * limit:
                    raise NoAnswerError(f"serial NPU {self.url}: no whole answer to {name} (seq {seq}) after "
                                        f"{noisy - 1} immediate retransmissions (NAKs, broken frames): the line is "
                                        "too noisy", silent, noisy - 1, stalled=False)
                wait = step + busy_s
            else:
                silent += 1
                if silent > limit:
                    raise NoAnswerError(f"serial NPU {self.url}: no answer to {name} (seq {seq}) after {limit} "
                                        "retransmissions; the device stopped answering (is the emulator running, the "
                                        "cable in, the baud rate right?)", silent - 1, noisy)
                step = min(step * 2, base * 8)
                wait = step
            self.stats.retransmits += 1
            # a delimiter first ends any partial frame the device holds, then the same request again (same seq)
            self._write(b"\x00" + encode_frame(Frame(type_, seq, req.payload, FLAG_RETRANSMIT)) + b"\x00")
            self.stats.frames_tx += 1

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self.port.close()
            except Exception:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
