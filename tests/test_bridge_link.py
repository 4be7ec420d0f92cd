"""SerialLink over pyserial URLs without the emulator: loop:// carries frames; a scripted fake device checks
retransmission, NAK handling, stale-answer discarding and the version-mismatch error."""
import struct
import time

import pytest
import serial

from edgert.bridge import protocol as P
from edgert.bridge.device import ProtocolVersionError, SerialNpuDevice
from edgert.bridge.framing import FLAG_ERROR, FLAG_RESPONSE, Frame, FrameDecoder, encode_frame
from edgert.bridge.link import SerialLink
from edgert.errors import LinkError


def test_loop_url_carries_frames():
    link = SerialLink("loop://", baudrate=115200)
    f = Frame(P.STATS, 7, b"hello \x00 world" * 100)
    link.send_frame(f)
    # pyserial's loop:// read(n) gives up after the port timeout (5 ms) even mid-buffer, so on a busy machine one
    # call can return part of the frame: keep reading, as SerialLink.transact does
    got, deadline = [], time.monotonic() + 5.0
    while not got and time.monotonic() < deadline:
        got += link.recv_frames(0.1)
    assert got == [f]
    link.close()


def test_bad_url_is_a_link_error():
    with pytest.raises(LinkError, match="cannot open"):
        SerialLink("/dev/does-not-exist-npu")


class FakePort:
    """A pyserial-like port whose 'device' answers by a script: script(frame, n) -> bytes to return."""

    def __init__(self, script):
        self.script, self.dec, self.buf, self.n, self.port, self.timeout = script, FrameDecoder(), b"", 0, "fake", 0

    def write(self, data):
        for f in self.dec.feed(data):
            self.n += 1
            self.buf += self.script(f, self.n)
        return len(data)

    def flush(self):
        pass

    @property
    def in_waiting(self):
        return len(self.buf)

    def read(self, n):
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def close(self):
        pass


def answer(f, payload=b"", status=0):
    return encode_frame(Frame(f.type, f.seq, payload, FLAG_RESPONSE | (FLAG_ERROR if status else 0), status))


def test_retransmits_after_silence_nak_and_garbage():
    def script(f, n):
        if n == 1:
            return b""                                      # lost: the host times out
        if n == 2:
            return encode_frame(Frame(P.NAK, 0, b"", FLAG_RESPONSE | FLAG_ERROR))  # device saw garbage
        if n == 3:
            return b"\x17\x42garbage\x00"                  # broken answer
        return answer(Frame(f.type, f.seq - 5), b"old") + answer(f, b"ok")  # a stale answer, then the real one
    link = SerialLink(serial=FakePort(script), timeout=0.05)
    assert link.transact(P.STATS).payload == b"ok"
    s = link.stats
    assert s.retransmits == 3 and s.timeouts == 1 and s.naks == 1 and s.broken == 1 and s.discarded == 1
    assert s.resyncs == 2


def test_gives_up_with_link_error():
    link = SerialLink(serial=FakePort(lambda f, n: b""), timeout=0.01, retries=3)
    with pytest.raises(LinkError, match="after 3 retransmissions"):
        link.transact(P.STATS)
    assert link.stats.retransmits == 3


def test_version_mismatch_is_clear():
    def script(f, n):
        hello = struct.pack("<HHIIIIBB", 9, 0, 1, 1024, 4096, 0, 0, 3) + b"fw9"
        return answer(f, hello, P.ERR_VERSION)
    dev = SerialNpuDevice(link=SerialLink(serial=FakePort(script)))
    with pytest.raises(ProtocolVersionError, match="edgert speaks version 1, the device \\(fw9\\) speaks version 9"):
        dev.hello()
