"""The serial NPU bridge, host side (firmware_bridge/PROTOCOL.md): framing (transport-free), protocol tables and
payloads, ``SerialLink`` (pyserial, any URL), ``SerialNpuDevice`` (the commands), and the emulator (``NpuSim``)."""
from .device import DeviceResetError, ProtocolVersionError, SerialNpuDevice
from .framing import Frame, FrameDecoder, cobs_decode, cobs_encode, crc32, encode_frame
from .link import DeviceStatusError, SerialLink
from .sim import NpuSim

__all__ = ["DeviceResetError", "DeviceStatusError", "Frame", "FrameDecoder", "NpuSim", "ProtocolVersionError",
           "SerialLink", "SerialNpuDevice", "cobs_decode", "cobs_encode", "crc32", "encode_frame"]
