"""Frames of the serial NPU protocol (firmware_bridge/PROTOCOL.md §1): COBS, the 12-byte header, CRC-32, and a
receiver that resynchronises on the 0x00 delimiter after any garbage.

Transport-free: bytes in, frames out. ``link.py`` puts these on a pyserial port; the tests drive them with random
byte streams. Nothing here reads or writes a port.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

VERSION = 1
HEADER = struct.Struct("<BBBBII")  # version, type, flags, status, seq, length
HEADER_BYTES = HEADER.size          # 12
CRC_BYTES = 4
FLAG_RESPONSE, FLAG_ERROR, FLAG_RETRANSMIT = 0x01, 0x02, 0x04

assert HEADER_BYTES == 12


def crc32(data: bytes) -> int:
    """CRC-32 (IEEE 802.3, zlib's), the frame trailer."""
    return zlib.crc32(data) & 0xFFFFFFFF


def cobs_encode(data: bytes) -> bytes:
    """COBS: ``data`` without any 0x00 (one code byte per run of up to 254 non-zero bytes)."""
    out = bytearray()
    for part in bytes(data).split(b"\x00"):
        while len(part) >= 254:
            out.append(0xFF)
            out += part[:254]
            part = part[254:]
        out.append(len(part) + 1)
        out += part
    # a part of exactly 254k bytes followed by a zero still needs its (empty) block: handled by the loop leaving
    # part == b"" and appending code 1 above; the implied zero after the last block is dropped by the decoder
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    """Inverse of ``cobs_encode``; ValueError when ``data`` is not a valid COBS encoding (a 0x00 inside, a block
    running past the end)."""
    out = bytearray()
    i, n = 0, len(data)
    pending = False
    while i < n:
        code = data[i]
        if code == 0:
            raise ValueError("0x00 inside a COBS block")
        if pending:
            out.append(0)
        end = i + code
        if end > n:
            raise ValueError("COBS block runs past the end of the frame")
        block = data[i + 1:end]
        if 0 in block:
            raise ValueError("0x00 inside a COBS block")
        out += block
        pending = code != 0xFF
        i = end
    return bytes(out)


@dataclass(frozen=True)
class Frame:
    type: int
    seq: int
    payload: bytes = b""
    flags: int = 0
    status: int = 0
    version: int = VERSION

    @property
    def is_response(self) -> bool:
        return bool(self.flags & FLAG_RESPONSE)


def encode_frame(frame: Frame) -> bytes:
    """The frame's bytes on the wire: COBS(header ‖ payload ‖ crc) ‖ 0x00."""
    body = HEADER.pack(frame.version, frame.type, frame.flags, frame.status, frame.seq & 0xFFFFFFFF,
                       len(frame.payload)) + bytes(frame.payload)
    return cobs_encode(body + struct.pack("<I", crc32(body))) + b"\x00"


def parse_body(body: bytes) -> Frame:
    """A decoded (un-COBSed) frame body -> Frame; ValueError if it is not well-formed."""
    if len(body) < HEADER_BYTES + CRC_BYTES:
        raise ValueError(f"frame of {len(body)} bytes is shorter than header + CRC ({HEADER_BYTES + CRC_BYTES})")
    version, type_, flags, status, seq, length = HEADER.unpack_from(body)
    if length != len(body) - HEADER_BYTES - CRC_BYTES:
        raise ValueError(f"header says {length} payload bytes, frame holds {len(body) - HEADER_BYTES - CRC_BYTES}")
    (crc,) = struct.unpack_from("<I", body, len(body) - CRC_BYTES)
    if crc != crc32(body[:-CRC_BYTES]):
        raise ValueError("CRC mismatch")
    return Frame(type_, seq, bytes(body[HEADER_BYTES:-CRC_BYTES]), flags, status, version)


class FrameDecoder:
    """Bytes in, frames out: ``feed(data)`` returns the well-formed frames completed by ``data``. Every broken
    candidate between two delimiters (garbage, a partial or corrupted frame, an overlong one) is dropped and counted
    in ``broken``; the decoder is back in step at the next 0x00. ``max_frame`` bounds the bytes held (decoded
    header + payload + CRC): a longer candidate is dropped without being buffered whole."""

    def __init__(self, max_frame: int = HEADER_BYTES + 65536 + CRC_BYTES):
        self.max_frame = max_frame
        self._buf = bytearray()
        self._overflow = False
        self.frames = 0
        self.broken = 0

    def reset(self) -> None:
        self._buf.clear()
        self._overflow = False

    @property
    def partial(self) -> bool:
        """Bytes of an unfinished frame are held."""
        return bool(self._buf) or self._overflow

    def feed(self, data: bytes) -> list[Frame]:
        out: list[Frame] = []
        parts = bytes(data).split(b"\x00")
        for k, part in enumerate(parts):
            if not self._overflow:
                # COBS adds at most 1 byte per 254 plus one: a longer encoded candidate cannot be a valid frame
                if len(self._buf) + len(part) > self.max_frame + self.max_frame // 254 + 2:
                    self._overflow = True
                    self._buf.clear()
                else:
                    self._buf += part
            if k == len(parts) - 1:
                break  # no delimiter after this part (yet)
            self._end(out)
        return out

    def _end(self, out: list) -> None:
        enc, over = bytes(self._buf), self._overflow
        self.reset()
        if not enc and not over:
            return  # two delimiters in a row: nothing, not an error
        try:
            if over:
                raise ValueError("frame longer than max_frame")
            f = parse_body(cobs_decode(enc))
        except ValueError:
            self.broken += 1
            return
        self.frames += 1
        out.append(f)
