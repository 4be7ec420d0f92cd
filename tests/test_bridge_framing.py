"""Framing (COBS, header, CRC-32) and resynchronisation over random byte streams; protocol tables equal fw.h."""
import re
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from edgert.bridge import protocol as P
from edgert.bridge.framing import (CRC_BYTES, HEADER_BYTES, Frame, FrameDecoder, cobs_decode, cobs_encode, crc32,
                                   encode_frame, parse_body)

frames = st.builds(Frame, type=st.integers(0, 255), seq=st.integers(0, 2 ** 32 - 1),
                   payload=st.binary(max_size=1200), flags=st.integers(0, 255), status=st.integers(0, 255))


@given(st.binary(max_size=3000))
def test_cobs_roundtrip_and_no_zero(data):
    enc = cobs_encode(data)
    assert b"\x00" not in enc
    assert len(enc) <= len(data) + len(data) // 254 + 1
    assert cobs_decode(enc) == data


@given(frames)
def test_frame_roundtrip(f):
    wire = encode_frame(f)
    assert wire.endswith(b"\x00") and b"\x00" not in wire[:-1]
    assert FrameDecoder().feed(wire) == [f]


def test_crc_is_zlibs():
    assert crc32(b"123456789") == 0xCBF43926 == zlib.crc32(b"123456789")


@given(st.lists(st.tuples(st.binary(max_size=300), frames), max_size=8), st.binary(max_size=300), st.data())
@settings(max_examples=200)
def test_resync_after_garbage(chunks, tail, data):
    """Garbage (without 0x00, or ending in one) between frames never loses a frame that follows a delimiter; a
    decoder fed the stream in arbitrary pieces gives the same frames."""
    stream, want = b"", []
    for garbage, f in chunks:
        stream += garbage + b"\x00" + encode_frame(f)
        want.append(f)
    stream += tail
    d = FrameDecoder()
    got, i = [], 0
    while i < len(stream):
        n = data.draw(st.integers(1, 500))
        got += d.feed(stream[i:i + n])
        i += n
    # garbage may by chance decode as a well-formed frame only if its CRC matches: practically never, but allow
    # extra frames and require every real one, in order
    it = iter(got)
    assert all(any(g == w for g in it) for w in want)


@given(frames, st.integers(0, 10 ** 6), st.integers(0, 7))
def test_a_corrupted_bit_is_caught(f, pos, bit):
    wire = bytearray(encode_frame(f))
    i = pos % (len(wire) - 1)
    wire[i] ^= 1 << bit
    got = FrameDecoder().feed(bytes(wire))
    assert got in ([], [f]) and (got == [] or wire == encode_frame(f))


@given(frames, st.integers(0, 10 ** 6))
def test_truncated_frame_then_good_frame(f, cut):
    wire = encode_frame(f)
    d = FrameDecoder()
    assert d.feed(wire[:cut % (len(wire) - 1)]) == []  # at most all but the delimiter
    assert d.feed(b"\x00" + wire) == [f]


def test_overlong_frame_dropped_without_buffering():
    d = FrameDecoder(max_frame=64)
    assert d.feed(encode_frame(Frame(1, 1, b"x" * 1000))) == []
    assert d.broken == 1 and len(d._buf) == 0
    assert d.feed(encode_frame(Frame(1, 2, b"ok"))) == [Frame(1, 2, b"ok")]


def test_bad_length_rejected():
    body = struct.pack("<BBBBII", 1, 1, 0, 0, 5, 3) + b"ab"
    with pytest.raises(ValueError):
        parse_body(body + struct.pack("<I", crc32(body)))
    assert HEADER_BYTES == 12 and CRC_BYTES == 4


def test_tables_match_firmware_header():
    h = (Path(__file__).resolve().parents[1] / "firmware_bridge" / "core" / "fw.h").read_text()
    consts = {m[0]: int(m[1], 0) for m in re.findall(r"(FW_\w+) = (0x[0-9A-Fa-f]+|\d+)", h)}
    for code, name in P.MESSAGE_NAMES.items():
        assert consts[f"FW_MSG_{name}"] == code
    for code, name in P.ERRORS.items():
        assert consts["FW_OK" if name == "OK" else f"FW_{name}"] == code
    for code, name in P.DTYPES.items():
        assert consts[f"FW_DT_{name.upper()}"] == code
    ops = {"MatMulInteger": "MATMUL_INTEGER", "QLinearMatMul": "QLINEAR_MATMUL", "ConvInteger": "CONV_INTEGER",
           "QLinearConv": "QLINEAR_CONV", "Add": "ADD", "Mul": "MUL", "Relu": "RELU", "Copy": "COPY",
           "MatMulQBlock": "MATMUL_QBLOCK", "Clip": "CLIP", "FullyConnectedS8": "FC_S8", "Conv2DS8": "CONV2D_S8",
           "DepthwiseConv2DS8": "DWCONV2D_S8", "AddS8": "ADD_S8", "AveragePool2DS8": "AVGPOOL_S8", "Concat": "CONCAT"}
    for code, name in P.OPS.items():
        assert consts[f"FW_OP_{ops[name]}"] == code
    assert f"FW_PROTOCOL_VERSION {P.PROTOCOL_VERSION}u" in h


def test_fnv_and_blob():
    assert P.fnv1a64(b"") == 0xCBF29CE484222325
    assert P.fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    blob = P.encode_graph([P.BlobTensor("int8", (2, 3)), P.BlobTensor("int8", (2, 3))],
                          [P.BlobNode("Relu", [0], 1)], [0], [1])
    assert blob[:4] == b"EGRF" and len(blob) % 8 == 0
