"""SerialNpuDevice: the protocol's commands as Python calls — handshake, load a graph by hash, allocate/free,
write/read tensors in chunks, invoke, stats, reset — over a SerialLink.

A device reset is noticed (``ERR_NO_SESSION``, or a new ``boot_id`` in HELLO) and raised as DeviceResetError after
the session is re-opened; ``generation`` then counts up so callers know every handle and graph they held is gone.
What to redo is the caller's business (the serial-npu delegate reloads by hash and falls back to the host).

Each SerialNpuDevice is one host session (PROTOCOL.md §2.5, a random ``host_session`` sent in HELLO): its HELLO
makes the device free the tensors and unfinished loads of the connection before it, which a failed-over, crashed or
reconnected host can no longer free itself.
"""
from __future__ import annotations

import os
import struct
import time

import numpy as np

from ..errors import LinkError
from . import protocol as P
from .link import DEFAULT_RETRIES, DEFAULT_TIMEOUT_S, DeviceStatusError, NoAnswerError, SerialLink


class DeviceResetError(LinkError):
    """The device reset (power cycle, watchdog, RESET): its graphs and tensors are gone. The session is open again."""


class ProtocolVersionError(LinkError):
    """Host and device speak different protocol versions."""


class SerialNpuDevice:
    """``SerialNpuDevice(url, baudrate=..., timeout=..., retries=...)`` or ``SerialNpuDevice(link=SerialLink(...))``."""

    def __init__(self, url: str | None = None, baudrate: int = 921600, timeout: float = DEFAULT_TIMEOUT_S,
                 retries: int = DEFAULT_RETRIES, *,
                 link: SerialLink | None = None, protocol_version: int = P.PROTOCOL_VERSION, line=None):
        self.link = link or SerialLink(url, baudrate=baudrate, timeout=timeout, retries=retries, line=line)
        self.protocol_version = protocol_version
        self.host_session = int.from_bytes(os.urandom(4), "little") or 1  # 0 would mean none
        self.info: P.HelloInfo | None = None
        self.generation = 0  # +1 at every device reset the host notices
        self.resets = 0
        self.bytes_graph = 0       # graph blobs (weights) sent
        self.bytes_to_device = 0   # tensor bytes written
        self.bytes_to_host = 0     # tensor bytes read
        self.graphs_sent = 0
        self.graphs_cached = 0     # LOAD_BEGIN found the graph already on the device
        # a request that changes handles or graphs got no answer: the host no longer knows what the device holds,
        # so only a new host session (HELLO, PROTOCOL.md §2.5) frees it
        self.lost_track = False
        self._loads: dict[int, tuple[int, int]] = {}  # unfinished loads: hash -> (generation, bytes acknowledged)
        self._compute_s: dict[int, float] = {}         # graph hash -> its last INVOKE's device compute seconds

    # ---- session ----------------------------------------------------------------------------------------------
    def hello(self) -> P.HelloInfo:
        f = self.link.transact(P.HELLO, P.hello_request(self.protocol_version, self.host_session), check=False)
        try:
            info = P.HelloInfo.parse(f.payload)
        except ValueError as exc:
            raise LinkError(f"serial NPU {self.link.url}: malformed HELLO answer ({exc})") from None
        if f.status == P.ERR_VERSION or info.protocol_version != self.protocol_version:
            raise ProtocolVersionError(
                f"serial NPU {self.link.url}: protocol version mismatch: edgert speaks version {self.protocol_version}, "
                f"the device ({info.firmware_version}) speaks version {info.protocol_version}. Update the firmware or "
                "edgert so both speak the same version")
        if f.status:
            raise DeviceStatusError(f"serial NPU {self.link.url}: HELLO failed with {P.ERRORS.get(f.status)}", f.status)
        reset = self.info is not None and info.boot_id != self.info.boot_id
        self.info = info
        self.link.max_payload = info.max_payload
        if reset:
            self._note_reset()
        return info

    def _note_reset(self) -> None:
        self.generation += 1
        self.resets += 1

    def ensure_session(self) -> P.HelloInfo:
        return self.info if self.info is not None else self.hello()

    def _call(self, type_: int, payload: bytes = b"", expect_bytes: int = 0, retries: int | None = None,
              busy_s: float = 0.0):
        self.ensure_session()
        try:
            return self.link.transact(type_, payload, expect_bytes=expect_bytes, retries=retries, busy_s=busy_s)
        except DeviceStatusError as exc:
            if exc.status != P.ERR_NO_SESSION:
                raise
        except NoAnswerError:
            self.lost_track |= type_ in (P.ALLOC, P.FREE, P.UNLOAD)
            raise
        old = self.info.boot_id if self.info else None
        self.info = None  # so hello() does not count the reset too: it is counted here, once, whatever the boot id
        info = self.hello()
        self._note_reset()
        raise DeviceResetError(f"serial NPU {self.link.url} reset (boot id {old} -> {info.boot_id}): its graphs and "
                               "tensors are gone; the session is open again")

    # ---- graphs -----------------------------------------------------------------------------------------------
    def load_graph(self, blob: bytes, graph_hash: int | None = None) -> int:
        """Make the graph ``blob`` resident; returns its hash. Sends nothing but LOAD_BEGIN when it already is."""
        h = P.fnv1a64(blob) if graph_hash is None else graph_hash
        done = self._loads.pop(h, None) if self._loads.get(h, (None,))[0] == self.generation else None
        if done is None:
            f = self._call(P.LOAD_BEGIN, struct.pack("<QI", h, len(blob)))
            if f.payload[:1] == b"\x01":
                self.graphs_cached += 1
                return h
            done = 0
        else:
            done = done[1]
        mv = memoryview(blob)
        progress = [done]

        def put(off, n, r):
            off += done
            self._call(P.LOAD_CHUNK, struct.pack("<QI", h, off) + mv[off:off + n].tobytes(), retries=r)
            self.bytes_graph += n  # what crossed, also when LOAD_COMMIT then refuses the graph
            progress[0] = off + n

        try:
            self._chunked(len(blob) - done, P.CHUNK_HEADER["LOAD_CHUNK"], put)
        except DeviceStatusError as exc:
            if exc.status == P.ERR_NO_GRAPH and done:  # the unfinished load is gone (another host session): anew
                return self.load_graph(blob, h)
            raise
        except NoAnswerError:
            # a noisy line ran out of retransmissions: the device keeps the unfinished load (§3.2), so the next
            # try on this session sends only the rest instead of starting again (a big graph might never arrive
            # whole otherwise)
            self._loads[h] = (self.generation, progress[0])
            raise
        self._call(P.LOAD_COMMIT, struct.pack("<Q", h))
        self.graphs_sent += 1
        return h

    def unload_graph(self, graph_hash: int) -> None:
        self._call(P.UNLOAD, struct.pack("<Q", graph_hash))

    # ---- tensors ----------------------------------------------------------------------------------------------
    def alloc(self, nbytes: int) -> int:
        return struct.unpack_from("<I", self._answer("ALLOC", self._call(P.ALLOC, struct.pack("<I", nbytes)), 4))[0]

    def free(self, handle: int) -> None:
        self._call(P.FREE, struct.pack("<I", handle))

    def write(self, handle: int, data, offset: int = 0) -> None:
        """Stream ``data`` (any buffer) into the tensor, one frame per chunk of at most max_payload - 8 bytes."""
        mv = memoryview(np.ascontiguousarray(data)).cast("B") if not isinstance(data, (bytes, bytearray)) else memoryview(data)
        def put(off, n, r):
            self._call(P.WRITE, struct.pack("<II", handle, offset + off) + mv[off:off + n].tobytes(), retries=r)
            self.bytes_to_device += n
        self._chunked(len(mv), P.CHUNK_HEADER["WRITE"], put)

    def read(self, handle: int, out, offset: int = 0) -> None:
        """Stream the tensor into ``out`` (a writable contiguous buffer: numpy array, bytearray)."""
        mv = memoryview(out).cast("B") if not isinstance(out, bytearray) else memoryview(out)
        def get(off, n, r):
            f = self._call(P.READ, struct.pack("<III", handle, offset + off, n), expect_bytes=n + n // 254 + 20,
                           retries=r)
            if len(f.payload) != n:
                raise LinkError(f"serial NPU {self.link.url}: READ returned {len(f.payload)} bytes, asked for {n}")
            mv[off:off + n] = f.payload
            self.bytes_to_host += n
        self._chunked(len(mv), P.CHUNK_HEADER["READ"], get)

    MIN_CHUNK = 16
    HALVE_AFTER = 3  # unanswered waits of a chunk over MIN_CHUNK before it is sent again as two halves (a noisy
    # line: NOISE_RESENDS times that immediate retransmissions)

    def _chunked(self, total: int, overhead: int, send) -> None:
        """Call ``send(offset, n, retries)`` over ``total`` bytes in chunks sized for the line's measured error rate
        (``LineQuality.chunk``; the whole ``max_payload`` on a clean line). WRITE, READ and LOAD_CHUNK are
        idempotent by content (the same bytes at the same offset), so a chunk that gets no answer within
        HALVE_AFTER retransmissions is sent again smaller under new sequence numbers, halved or at once to the size
        the failures measured: on a noisy line long frames rarely arrive whole, short ones do. Unanswered waits spend
        one budget across the halvings (PROTOCOL.md §4): from one answer to the next the host waits on at most
        ``1 + retries`` frames, so halving never makes a stalled device cost more than one request does."""
        top = self.link.max_payload - overhead
        if top < 1:  # HelloInfo.parse refuses such a device; a link made without HELLO could still get here
            raise LinkError(f"serial NPU {self.link.url}: max_payload of {self.link.max_payload} bytes leaves no room "
                            f"for data after a {overhead}-byte command header")
        stats, line = self.link.stats, self.link.line
        off, left, cap = 0, self.link.retries, top  # retransmissions left until the next answer; halving's cap
        while off < total:
            n = min(line.chunk(overhead, cap, min(self.MIN_CHUNK, cap)), total - off)
            small = n <= self.MIN_CHUNK
            try:  # (an answer, or a port that takes no more, is no reason to halve: those propagate)
                send(off, n, left if small else min(left, self.HALVE_AFTER))
            except NoAnswerError as exc:
                # the unanswered waits spend the budget; after one (the device may be stalled) the smaller chunk's
                # first frame is a retransmission too. A line too noisy for the chunk leaves the budget alone
                left -= exc.silent + exc.stalled
                if small or left < 0 or (exc.stalled and left < 1):
                    raise
                stats.retransmits += 1  # the chunk's data again, under a new sequence number
                # halved, or at once to the size the failures just measured when that is smaller (a stale
                # estimate, the first transfer on a noisy line)
                cap = max(self.MIN_CHUNK, min(n // 2, line.chunk(overhead, top, self.MIN_CHUNK)))
                continue
            off += n
            left = self.link.retries

    def invoke(self, graph_hash: int, inputs: list[int], outputs: list[int]) -> tuple[float, int]:
        """Run a resident graph on bound tensors; returns (device compute seconds, ops)."""
        p = struct.pack("<QHH", graph_hash, len(inputs), len(outputs)) + struct.pack(f"<{len(inputs) + len(outputs)}I",
                                                                                     *inputs, *outputs)
        # the device computes before it answers: its last compute time for this graph is added to the first wait, so
        # a slow graph is not retransmitted for (nor, with few retries, failed over). An INVOKE left unanswered
        # teaches a lower bound: the time waited (a graph computing longer than timeout and retries allow failed
        # over at every run, the first wait of each knowing no compute time)
        busy, t0 = self._compute_s.get(graph_hash, 0.0), time.monotonic()
        try:
            f = self._call(P.INVOKE, p, busy_s=busy)
        except NoAnswerError as exc:
            if exc.stalled:
                self._compute_s[graph_hash] = max(busy, time.monotonic() - t0)
            raise
        us, lo, hi = struct.unpack_from("<III", self._answer("INVOKE", f, 12))
        self._compute_s[graph_hash] = us * 1e-6
        return us * 1e-6, lo | hi << 32

    def _answer(self, command: str, frame, nbytes: int) -> bytes:
        """The payload of ``command``'s answer, when it holds at least ``nbytes``; LinkError otherwise."""
        if len(frame.payload) < nbytes:
            raise LinkError(f"serial NPU {self.link.url}: {command} answer of {len(frame.payload)} bytes, expected "
                            f"{nbytes}")
        return frame.payload

    # ---- housekeeping -----------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """The device's own counters (PROTOCOL.md §3.3)."""
        return P.parse_stats(self._answer("STATS", self._call(P.STATS), P.STATS_BYTES))

    def reset(self) -> None:
        """Ask the device to reset: every graph and tensor goes; the next call re-handshakes."""
        self.ensure_session()  # without one, RESET gets ERR_NO_SESSION, or ERR_STALE after another host's seq
        self.link.transact(P.RESET)
        self.info = None
        self._note_reset()

    def link_stats(self) -> dict:
        d = self.link.stats.as_dict()
        d.update(bytes_graph=self.bytes_graph, bytes_tensors_to_device=self.bytes_to_device,
                 bytes_tensors_to_host=self.bytes_to_host, graphs_sent=self.graphs_sent,
                 graphs_cached=self.graphs_cached, device_resets=self.resets)
        return d

    def close(self) -> None:
        self.link.close()
