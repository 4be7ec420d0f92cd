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


def test_a_device_of_another_protocol_version_stops_the_session(monkeypatch):
    """PROTOCOL §2.2: the host raises, naming both versions, and stops. ProtocolVersionError is a LinkError, so
    refine_unit planned with the profile instead and every run failed over to the host without a word to the
    caller."""
    import numpy as np

    import edgert
    from edgert.bridge import device as device_mod

    from bridge_models import int8_mlp, serial_npu_profile

    up = []

    def script(f, n):  # silent until up, then a version-9 device
        v9 = struct.pack("<HHIIIIBB", 9, 0, 1, 1 << 16, 4096, 0xFFFF, 0, 3) + b"fw9"
        return answer(f, v9, P.ERR_VERSION) if up else b""

    monkeypatch.setattr(device_mod, "SerialLink", lambda url, **kw: SerialLink(serial=FakePort(script), timeout=0.01,
                                                                               retries=1))
    model = int8_mlp()
    want = "edgert speaks version 1, the device \\(fw9\\) speaks version 9"
    up.append(1)
    with pytest.raises(ProtocolVersionError, match=want):  # at Session creation (refine_unit's HELLO)
        edgert.Session(model, device=serial_npu_profile(free_link=True), fallback="allow",
                       device_options={"url": "fake://v9-at-creation"}, telemetry=False)
    up.clear()  # silent at creation (planned with the profile), a version-9 device at the first run
    sess = edgert.Session(model, device=serial_npu_profile(free_link=True), fallback="allow",
                          device_options={"url": "fake://v9-at-run"}, telemetry=False)
    up.append(1)
    x = np.zeros((4, 64), np.int8)
    for _ in range(2):
        with pytest.raises(ProtocolVersionError, match=want):
            sess.run(None, {"x": x})
    assert sess.stats()["failovers"] == 0
    sess.close()


def hello_answer(max_payload=4096, boot=1):
    return struct.pack("<HHIIIIBB", P.PROTOCOL_VERSION, 0, boot, 1 << 16, max_payload, 0xFFFF, 1, 2) + b"\x01fw"


def scripted_device(answers, limit=200):
    """A FakePort script: HELLO answered by ``answers[P.HELLO]`` (a valid one by default), every other type by
    ``answers[type]`` (b"" when absent). More than ``limit`` frames fail the test instead of looping forever."""
    def script(f, n):
        if n > limit:
            raise AssertionError(f"the host sent {n} frames: it is looping")
        return answer(f, answers.get(f.type, hello_answer() if f.type == P.HELLO else b""))
    return script


def test_hello_limits_are_read_compatibly():
    """HELLO ends with the device's limits (u8 count, u16 each): an older answer without them means the reference
    firmware's, limits a later firmware adds are skipped, a count the answer does not hold is a malformed answer."""
    base = hello_answer()
    assert P.HelloInfo.parse(base).limits == P.DeviceLimits()
    lim = struct.pack("<B7H", 7, 32, 30, 8, 16, 4, 99, 98)
    assert P.HelloInfo.parse(base + lim).limits == P.DeviceLimits(32, 30, 8, 16, 4)
    assert P.HelloInfo.parse(base + struct.pack("<B2H", 2, 10, 20)).limits == P.DeviceLimits(10, 20)
    with pytest.raises(ValueError, match="shorter than its limits"):
        P.HelloInfo.parse(base + lim[:-1])


@pytest.mark.parametrize("max_payload", [0, 8, 12, 13, 63])
def test_hello_with_a_tiny_max_payload_is_a_link_error(max_payload):
    # were accepted: WRITE (8-byte header) at 8, READ at 0, LOAD_CHUNK (12) at 12 then sent 0-byte chunks forever
    dev = SerialNpuDevice(link=SerialLink(serial=FakePort(scripted_device({P.HELLO: hello_answer(max_payload)}))))
    with pytest.raises(LinkError, match=f"malformed HELLO answer \\(max_payload of {max_payload} bytes, expected at "
                                        f"least {P.MIN_MAX_PAYLOAD}"):
        dev.hello()
    assert dev.info is None
    assert P.HelloInfo.parse(hello_answer(P.MIN_MAX_PAYLOAD)).max_payload == P.MIN_MAX_PAYLOAD


@pytest.mark.parametrize("max_payload, call", [(8, "write"), (0, "read"), (12, "load_graph")])
def test_chunked_transfer_refuses_a_chunk_of_no_bytes(max_payload, call):
    dev = SerialNpuDevice(link=SerialLink(serial=FakePort(scripted_device({P.LOAD_BEGIN: b"\x00"}))))
    dev.hello()
    dev.link.max_payload = max_payload  # a link that never saw such a HELLO (parse refuses it)
    with pytest.raises(LinkError, match=f"max_payload of {max_payload} bytes leaves no room for data"):
        {"write": lambda: dev.write(1, b"abc"), "read": lambda: dev.read(1, bytearray(3)),
         "load_graph": lambda: dev.load_graph(b"blob")}[call]()


def test_a_device_allowing_frames_larger_than_the_hosts_decoder_gets_reads_that_fit():
    """A device reporting a max_payload above the host decoder's 64 KiB got READs whose answers the host dropped as
    overlong frames, again and again, until the chunk had been halved under the cap."""
    data = bytes(range(256)) * 400  # 102400 bytes
    asked = []

    def script(f, n):
        if f.type == P.HELLO:
            return answer(f, hello_answer(max_payload=200000))
        handle, off, length = struct.unpack("<III", f.payload)
        asked.append(length)
        return answer(f, data[off:off + length])

    dev = SerialNpuDevice(link=SerialLink(serial=FakePort(script), timeout=0.05))
    dev.hello()
    out = bytearray(len(data))
    dev.read(1, out)
    assert out == data and max(asked) <= dev.link.decoder.max_frame - 16 and dev.link.stats.retransmits == 0


def test_a_port_that_refuses_writes_ends_a_transfer_at_once():
    """A write timeout (a device that stopped reading) was taken as a lost answer: the chunk was halved and sent
    again down to 32 bytes, each try waiting out the port's write timeout (81 s with pyserial's 10 s)."""
    class StalledPort(FakePort):
        writes = 0

        def write(self, data):
            if self.n >= 1:  # HELLO went through; then the device stops reading
                StalledPort.writes += 1
                raise OSError("Write timeout")
            return super().write(data)

    dev = SerialNpuDevice(link=SerialLink(serial=StalledPort(scripted_device({}))))
    dev.hello()
    with pytest.raises(LinkError, match="write failed: Write timeout"):
        dev.write(1, bytes(12000))
    assert StalledPort.writes == 1


@pytest.mark.parametrize("command, payload, call, want", [
    ("STATS", b"\x01" * 12, lambda d: d.stats(), 56),
    ("ALLOC", b"\x07\x00", lambda d: d.alloc(64), 4),
    ("INVOKE", b"\x00" * 8, lambda d: d.invoke(1, [1], [2]), 12),
])
def test_short_answers_are_link_errors(command, payload, call, want):
    # were struct.error (unpack of a short payload)
    t = {"STATS": P.STATS, "ALLOC": P.ALLOC, "INVOKE": P.INVOKE}[command]
    dev = SerialNpuDevice(link=SerialLink(serial=FakePort(scripted_device({t: payload}))))
    with pytest.raises(LinkError, match=f"{command} answer of {len(payload)} bytes, expected {want}"):
        call(dev)


def test_device_with_a_tiny_max_payload_falls_back_to_the_host(monkeypatch, caplog):
    # was a LOAD_CHUNK of 0 bytes sent again and again: the run never ended
    import numpy as np

    import edgert
    from edgert.bridge import device as device_mod

    from bridge_models import int8_mlp, serial_npu_profile
    from onnx_models import ort_run

    fake = scripted_device({P.HELLO: hello_answer(12), P.LOAD_BEGIN: b"\x00"}, limit=50)
    monkeypatch.setattr(device_mod, "SerialLink", lambda url, **kw: SerialLink(serial=FakePort(fake), timeout=0.05,
                                                                               retries=1))
    model = int8_mlp()
    x = np.random.default_rng(0).integers(-128, 128, (4, 64)).astype(np.int8)
    sess = edgert.Session(model, device=serial_npu_profile(free_link=True), fallback="allow",
                          device_options={"url": "fake://tiny-allow"}, telemetry=False)
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], ort_run(model, {"x": x})[0])
    assert sess.stats()["failovers"] == 1 and "max_payload of 12 bytes" in caplog.text
    sess.close()


@pytest.mark.parametrize("rate", [1e-6, 1e-4, 1e-3, 0.02])
def test_chunks_are_sized_for_the_measured_error_rate(rate):
    """The chunk is the size that moves the most data per byte sent at the measured byte error rate (a brute force
    over every size agrees); a clean line gets whole max_payload frames, a noisy one short frames at once (a
    reconnection found the size again by halving from 4096 bytes, each halving three lost retransmissions)."""
    import numpy as np

    from edgert.bridge.link import FRAME_OVERHEAD, LineQuality

    line = LineQuality()
    assert line.chunk(8, 4088, 16) == 4088  # nothing measured: a clean line
    every = 10  # attempts of 1 / (10 rate) bytes, one in ten failing: the estimate is the rate
    for i in range(1000):
        line.note(1 / (every * rate), i % every == every - 1)
    lam = line.byte_error_rate
    assert lam == pytest.approx(rate, rel=0.1)
    n = np.arange(1, 4089)
    o = 2 * FRAME_OVERHEAD + 8
    best = int(n[np.argmax(n * np.exp(-lam * (n + o)) / (n + o))])
    assert abs(line.chunk(8, 4088, 16) - max(16, best)) <= 1


def test_a_silent_device_is_no_line_noise():
    """Timeouts do not raise the measured error rate: after a stall the chunks would stay small for hundreds of
    requests. A NAK does."""
    link = SerialLink(serial=FakePort(lambda f, n: b""), timeout=0.01, retries=2)
    with pytest.raises(LinkError, match="after 2 retransmissions"):
        link.transact(P.STATS)
    assert link.line.byte_error_rate == 0

    def script(f, n):
        return encode_frame(Frame(P.NAK, 0, b"", FLAG_RESPONSE | FLAG_ERROR)) if n == 1 else answer(f)
    link = SerialLink(serial=FakePort(script), timeout=0.01)
    link.transact(P.STATS)
    assert link.line.byte_error_rate > 0


@pytest.mark.parametrize("call, lost", [("alloc", True), ("free", True), ("unload", True), ("write", False),
                                        ("invoke", False)])
def test_an_unanswered_request_that_changes_handles_loses_track_of_the_device(call, lost):
    """After an ALLOC, FREE or UNLOAD without answer the host no longer knows what the device holds: the serial-npu
    delegate then opens a new host session (whose HELLO frees it) instead of keeping the connection."""
    answering = [True]
    dev = SerialNpuDevice(link=SerialLink(serial=FakePort(lambda f, n: answer(f, hello_answer()) if answering[0]
                                                          else b""), timeout=0.01, retries=1))
    dev.hello()
    answering[0] = False
    with pytest.raises(LinkError, match="no answer"):
        {"alloc": lambda: dev.alloc(64), "free": lambda: dev.free(1), "unload": lambda: dev.unload_graph(5),
         "write": lambda: dev.write(1, b"abc"), "invoke": lambda: dev.invoke(5, [1], [2])}[call]()
    assert dev.lost_track is lost


def test_an_unfinished_graph_load_resumes_where_the_answers_stopped():
    """A LOAD that ran out of retransmissions (a noisy line) started again with LOAD_BEGIN at its next try, so a
    graph of many chunks on a noisy line might never arrive whole. The device keeps an unfinished load (PROTOCOL
    §3.2): the next try on the session sends only the chunks it has no answer for, then LOAD_COMMIT."""
    blob = bytes(range(256)) * 3
    got, seen = bytearray(len(blob)), []
    silent = [None]  # None: not yet; True: silent now; False: answering again

    def script(f, n):
        if f.type == P.HELLO:
            return answer(f, hello_answer(max_payload=64 + 12))
        seen.append((f.type, struct.unpack_from("<I", f.payload, 8)[0] if f.type == P.LOAD_CHUNK else None))
        if f.type == P.LOAD_CHUNK:
            off = seen[-1][1]
            if off >= 320 and silent[0] is None:
                silent[0] = True  # the device stops answering mid-load
            if silent[0]:
                return b""
            got[off:off + len(f.payload) - 12] = f.payload[12:]
        return answer(f, b"\x00" if f.type == P.LOAD_BEGIN else b"")

    dev = SerialNpuDevice(link=SerialLink(serial=FakePort(script), timeout=0.01, retries=1))
    dev.hello()
    with pytest.raises(LinkError, match="no answer to LOAD_CHUNK"):
        dev.load_graph(blob)
    first = len(seen)
    silent[0] = False
    dev.load_graph(blob)
    again = seen[first:]
    assert got == blob and again[-1] == (P.LOAD_COMMIT, None)
    assert [t for t, _ in again[:-1]] == [P.LOAD_CHUNK] * (len(again) - 1)  # no LOAD_BEGIN: it would start anew
    assert again[0][1] == 320  # from the first chunk without an answer
