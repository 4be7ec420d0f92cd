"""edgert.formats.gguf: agreement with gguf-py's reader on files gguf-py writes, and refusal of hostile files.

Every malformed file must raise ModelFormatError (never another exception, a crash or a hang); files are built in
the test with gguf.GGUFWriter, then truncated, patched at known byte positions, or flipped at random.
"""
import struct

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgert import ModelFormatError, QTensor
from edgert.formats.gguf import COMPUTE_TYPES, GGML_TYPES, TensorInfo, open_gguf


RNG = np.random.default_rng(1234)
W_F32 = RNG.standard_normal((2, 3, 32)).astype(np.float32)
W_F16 = RNG.standard_normal((8, 40)).astype(np.float16)
W_Q = {t: RNG.standard_normal((6, 64)).astype(np.float32) for t in (T.Q4_0, T.Q4_1, T.Q8_0)}
NORM = RNG.standard_normal(64).astype(np.float32)
Q6K_RAW = RNG.integers(0, 256, size=(2, 210), dtype=np.uint8)  # 2 rows of one Q6_K block each (K = 256)

METADATA = {
    "test.u8": (200, "uint8"), "test.i8": (-100, "int8"), "test.u16": (60000, "uint16"), "test.i16": (-30000, "int16"),
    "test.u32": (4_000_000_000, "uint32"), "test.i32": (-2_000_000_000, "int32"), "test.f32": (1.5, "float32"),
    "test.u64": (2**63 + 5, "uint64"), "test.i64": (-(2**62), "int64"), "test.f64": (2.25, "float64"),
    "test.bool": (True, "bool"), "test.str": ("héllo ✓", "string"),
}


def write_sample(path, *, tokens: int = 300, extra=None):
    w = gguf.GGUFWriter(str(path), "llama")
    for key, (val, kind) in METADATA.items():
        getattr(w, f"add_{kind}")(key, val)
    w.add_array("test.ints", list(range(tokens)))
    w.add_array("test.floats", [0.5, -1.0, 2.0])
    w.add_array("test.strs", [f"tok{i}" for i in range(tokens)] + ["ĠΩ", ""])
    w.add_array("test.bools", [True, False, True])
    w.add_array("test.nested", [[1, 2], [3]])
    if extra:
        extra(w)
    w.add_tensor("w.f32", W_F32)
    w.add_tensor("w.f16", W_F16)
    for t, a in W_Q.items():
        w.add_tensor(f"w.{t.name.lower()}", gguf.quants.quantize(a, t), raw_dtype=t)
    w.add_tensor("w.norm", NORM)
    w.add_tensor("w.q6_k", Q6K_RAW, raw_dtype=T.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    path = write_sample(tmp_path_factory.mktemp("gguf") / "sample.gguf")
    return path, path.read_bytes()


@pytest.fixture
def scratch(tmp_path):
    """Write bytes to a file and open it."""
    path = tmp_path / "x.gguf"
    path.touch()

    def open_bytes(data: bytes):
        # rewrite in place: opening with O_TRUNC costs milliseconds on some filesystems, thousands of times over
        with open(path, "r+b") as f:
            f.write(data)
            f.truncate()
        return open_gguf(path)

    return open_bytes


def _rejects(open_bytes, data: bytes, *needles: str) -> str:
    with pytest.raises(ModelFormatError) as ei:
        open_bytes(data).close()
    msg = str(ei.value)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def _patch(data: bytes, pos: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, pos, value)
    return bytes(b)


def _key_pos(data: bytes, key: str) -> int:
    """Byte position just after a metadata key's text (where its value type is)."""
    k = key.encode()
    i = data.index(struct.pack("<Q", len(k)) + k)
    return i + 8 + len(k)


def _tensor_pos(data: bytes, name: str) -> dict[str, int]:
    """Byte positions of one tensor-info record's fields."""
    n = name.encode()
    i = data.index(struct.pack("<Q", len(n)) + n) + 8 + len(n)  # n_dims follows the name
    n_dims = struct.unpack_from("<I", data, i)[0]
    dims = i + 4
    return {"len": i - 8 - len(n), "n_dims": i, "dims": dims, "type": dims + 8 * n_dims, "offset": dims + 8 * n_dims + 4}


# -- agreement with gguf-py --------------------------------------------------------------------------------------


def test_metadata_matches_gguf_reader(sample):
    path, _ = sample
    ref = gguf.GGUFReader(path)
    with open_gguf(path) as g:
        assert g.version == 3 and g.alignment == 32
        for key, field in ref.fields.items():
            if key.startswith("GGUF."):
                continue
            ours = g.metadata[key]
            if key == "test.nested":  # gguf-py flattens nested arrays; we keep the structure
                assert [list(a) for a in ours] == [[1, 2], [3]]
            elif isinstance(ours, np.ndarray):
                np.testing.assert_array_equal(ours, np.asarray(field.contents()))
            elif isinstance(ours, float):
                assert ours == pytest.approx(field.contents())
            else:
                assert ours == field.contents(), key
        assert list(g.metadata) == [k for k in ref.fields if not k.startswith("GGUF.")]
        for key, (val, _) in METADATA.items():
            assert g.metadata[key] == val and type(g.metadata[key]) is type(val)
        assert g.metadata["test.strs"][-2:] == ["ĠΩ", ""]
        assert g.metadata["test.ints"].dtype == np.int32 and g.metadata["test.bools"].dtype == bool


def test_tensors_match_gguf_reader(sample):
    path, _ = sample
    ref = gguf.GGUFReader(path)
    with open_gguf(path) as g:
        assert list(g.tensors) == [t.name for t in ref.tensors]
        for rt in ref.tensors:
            t = g.tensors[rt.name]
            assert isinstance(t, TensorInfo)
            assert t.shape == tuple(int(s) for s in rt.shape)
            assert t.type_id == int(rt.tensor_type) and t.type_name == rt.tensor_type.name
            assert t.offset == rt.data_offset and t.nbytes == rt.n_bytes
            assert g.tensor_bytes(rt.name).tobytes() == rt.data.tobytes()
            assert t.offset % g.alignment == 0 and t.offset >= g.data_offset


def test_tensor_array_and_qtensor_views(sample):
    path, _ = sample
    with open_gguf(path) as g:
        a = g.tensor_array("w.f32")
        np.testing.assert_array_equal(a, W_F32)
        assert a.dtype == np.float32 and not a.flags.writeable
        assert np.shares_memory(a, g.tensor_bytes("w.f32"))
        np.testing.assert_array_equal(g.tensor_array("w.f16"), W_F16)
        np.testing.assert_array_equal(g.tensor_array("w.norm"), NORM)
        for t, w in W_Q.items():
            q = g.qtensor(f"w.{t.name.lower()}")
            assert isinstance(q, QTensor) and q.fmt == t.name.lower() and q.shape == w.shape
            np.testing.assert_array_equal(q.dequantize(), gguf.quants.dequantize(gguf.quants.quantize(w, t), t))
        q = g.qtensor("w.f16")
        assert q.shape == (8, 40) and q.fmt == "f16"
        np.testing.assert_array_equal(q.dequantize(), W_F16.astype(np.float32))
        raw = g.qtensor("w.q8_0").raw
        assert raw.base is not None and not raw.flags.writeable  # a view of the mapping, not a copy


def test_unsupported_types_fail_at_use_not_parse(sample):
    path, _ = sample
    with open_gguf(path) as g:
        assert g.tensors["w.q6_k"].type_name == "Q6_K" and g.tensors["w.q6_k"].shape == (256, 2)
        assert g.tensor_bytes("w.q6_k").tobytes() == Q6K_RAW.tobytes()
        with pytest.raises(ModelFormatError, match=r"unsupported type Q6_K for tensor 'w.q6_k' \(supported: F32, F16"):
            g.qtensor("w.q6_k")
        with pytest.raises(ModelFormatError, match="F32 or F16 only"):
            g.tensor_array("w.q4_0")
        with pytest.raises(ModelFormatError, match="2-D"):
            g.qtensor("w.f32")
        with pytest.raises(ModelFormatError, match="no tensor named 'nope'"):
            g.tensor_bytes("nope")


def test_type_table_agrees_with_gguf_py():
    for tid, (name, block, size) in GGML_TYPES.items():
        if name == "Q8_1":  # gguf-py still lists the old float-scaled block (40 B); ggml stores two halves (36 B)
            continue
        assert gguf.GGML_QUANT_SIZES[T(tid)] == (block, size) and T(tid).name == name
    assert COMPUTE_TYPES == ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")


def test_views_outlive_close(sample):
    path, _ = sample
    g = open_gguf(path)
    a = g.tensor_array("w.f32")
    g.close()
    np.testing.assert_array_equal(a, W_F32)
    with pytest.raises(Exception, match="closed"):
        g.tensor_bytes("w.f32")
    with open_gguf(path) as g:
        pass
    g.close()  # twice is fine


def test_version_2_parses_and_v1_big_endian_refused(sample, scratch):
    _, data = sample
    with scratch(_patch(data, 4, "<I", 2)) as g:
        assert g.version == 2 and len(g.tensors) == 7
    _rejects(scratch, _patch(data, 4, "<I", 1), "version 1")
    _rejects(scratch, _patch(data, 4, "<I", 4), "unsupported GGUF version 4")
    _rejects(scratch, _patch(data, 4, ">I", 3), "big-endian")


def test_big_endian_writer_file_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "be.gguf"), "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_tensor("x", np.zeros((2, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFormatError, match="big-endian"):
        open_gguf(tmp_path / "be.gguf")


def test_a_full_vocabulary_parses_into_arrays(tmp_path):
    """A SmolLM2-sized vocabulary (49152 tokens, 48900 merges): every string and type arrives (its parse time is in
    benchmarks/llm.py's load column, on the real model)."""
    def vocab(w):
        w.add_token_list([f"tok_{i:05d}_ĠΩ" for i in range(49152)])
        w.add_token_types([1] * 49152)
        w.add_token_merges([f"t{i} o{i}" for i in range(48900)])

    path = write_sample(tmp_path / "vocab.gguf", extra=vocab)
    with open_gguf(path) as g:
        tokens, merges = g.metadata["tokenizer.ggml.tokens"], g.metadata["tokenizer.ggml.merges"]
        assert len(tokens) == 49152 and tokens[0] == "tok_00000_ĠΩ" and tokens[-1] == "tok_49151_ĠΩ"
        assert len(merges) == 48900 and merges[48899] == "t48899 o48899"
        assert g.metadata["tokenizer.ggml.token_type"].shape == (49152,)
        assert (g.metadata["tokenizer.ggml.token_type"] == 1).all()


# -- hostile files ----------------------------------------------------------------------------------------------


def test_not_a_file_and_tiny_files(tmp_path, scratch):
    import os

    from cli_run import run_python

    from edgert.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="does not exist"):
        open_gguf(tmp_path / "missing.gguf")
    for path in (tmp_path, "/dev/zero"):
        with pytest.raises(ModelNotFoundError, match=f"GGUF model '{path}' is not a regular file"):
            open_gguf(path)
    # a FIFO blocked the open (in a child, so that a regression fails by its timeout rather than hanging the tests)
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    code = (f"from edgert.formats.gguf import open_gguf\nfrom edgert import ModelNotFoundError\ntry:\n"
            f"    open_gguf({str(fifo)!r})\nexcept ModelNotFoundError as e:\n    print(e)")
    r = run_python("-c", code, timeout=60)
    assert f"GGUF model '{fifo}' is not a regular file" in r.stdout, r.stderr
    _rejects(scratch, b"", "truncated")
    _rejects(scratch, b"GGUF", "truncated")
    _rejects(scratch, b"GGML" + bytes(20), "bad magic")
    _rejects(scratch, b"\x00" * 4096, "bad magic")


def test_truncation_at_every_header_byte_and_in_the_data(sample, scratch):
    path, data = sample
    with open_gguf(path) as g:
        header_end = g.data_offset
        data_end = max(t.offset + t.nbytes for t in g.tensors.values())
    for cut in range(header_end + 1):
        _rejects(scratch, data[:cut])
    for cut in np.linspace(header_end + 1, data_end - 1, 40).astype(int):
        _rejects(scratch, data[:cut], "past the end of the file")


def test_absurd_counts(sample, scratch):
    _, data = sample
    _rejects(scratch, _patch(data, 8, "<Q", 2**63), "cannot fit")
    _rejects(scratch, _patch(data, 16, "<Q", 2**64 - 1), "cannot fit")
    _rejects(scratch, _patch(data, 16, "<Q", 1000), "cannot fit")
    _rejects(scratch, _patch(data, 24, "<Q", 2**40), "metadata key #0", "at most 65536")
    _rejects(scratch, _patch(data, 24, "<Q", 60000), "metadata key #0", "truncated")
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    _rejects(scratch, _patch(data, 16, "<Q", n_kv + 1))  # the first tensor record is read as a key
    _rejects(scratch, _patch(data, 16, "<Q", n_kv - 1))  # the last key's bytes are read as a tensor


def test_corrupt_metadata_values(sample, scratch):
    _, data = sample
    p = _key_pos(data, "test.u8")
    _rejects(scratch, _patch(data, p, "<I", 13), "'test.u8'", "unknown value type 13")
    _rejects(scratch, _patch(data, _key_pos(data, "test.bool") + 4, "<B", 2), "'test.bool'", "expected 0 or 1")
    p = _key_pos(data, "test.str")
    _rejects(scratch, _patch(data, p + 4, "<Q", 2**62), "'test.str'", "truncated")
    _rejects(scratch, _patch(data, p + 4 + 8, "<B", 0xFF), "'test.str'", "UTF-8")
    p = _key_pos(data, "test.ints")  # type, element type, count, elements
    _rejects(scratch, _patch(data, p + 4, "<I", 99), "'test.ints'", "unknown element type 99")
    _rejects(scratch, _patch(data, p + 8, "<Q", 2**61), "'test.ints'", "claims")
    _rejects(scratch, _patch(data, p + 8, "<Q", 2**64 - 1), "claims")
    p = _key_pos(data, "test.strs")
    _rejects(scratch, _patch(data, p + 8, "<Q", 2**60), "'test.strs'", "claims")
    _rejects(scratch, _patch(data, p + 16, "<Q", 2**50), "'test.strs'[0]", "truncated")
    _rejects(scratch, _patch(data, p + 24, "<B", 0xC3), "'test.strs'[0]", "UTF-8")
    _rejects(scratch, _patch(data, _key_pos(data, "test.bools") + 16, "<B", 7), "'test.bools'", "expected 0 or 1")
    p = _key_pos(data, "test.u16")
    _rejects(scratch, _patch(data, p - 1, "<B", 0x80), "metadata key", "UTF-8")
    b = bytearray(data)  # test.i8 -> test.u8: same length, now a duplicate
    i = b.index(b"test.i8")
    b[i:i + 7] = b"test.u8"
    _rejects(scratch, bytes(b), "duplicate metadata key 'test.u8'")


def _kv_file(*kvs: bytes, n_tensors: int = 0, tail: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs)) + b"".join(kvs) + tail


def _key(k: str) -> bytes:
    return struct.pack("<Q", len(k)) + k.encode()


def test_handmade_values(scratch):
    nested = _key("a") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 5, 0)
    _rejects(scratch, _kv_file(nested), "'a'", "nests arrays 3 deep")
    ok = _key("a") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQi", 5, 1, 7)
    with scratch(_kv_file(ok)) as g:
        assert [list(x) for x in g.metadata["a"]] == [[7]] and g.tensors == {}
    _rejects(scratch, _kv_file(_key("") + struct.pack("<IB", 0, 1)), "key #0 is empty")
    _rejects(scratch, _kv_file(_key("k" * 70000) + struct.pack("<IB", 0, 1)), "at most 65536")
    empty = _key("e") + struct.pack("<IIQ", 9, 8, 0)
    with scratch(_kv_file(empty)) as g:
        assert g.metadata["e"] == []


@pytest.mark.parametrize("value, needle", [(0, "power of two"), (3, "power of two"), (2**30, "power of two"),
                                           (64, "not a multiple of general.alignment 64")])
def test_bad_alignment(tmp_path, scratch, value, needle):
    path = write_sample(tmp_path / "a.gguf", extra=lambda w: w.add_uint32("general.alignment", 32))
    data = path.read_bytes()
    _rejects(scratch, _patch(data, _key_pos(data, "general.alignment") + 4, "<I", value), "general.alignment", needle)


def test_string_alignment_refused(tmp_path, scratch):
    path = write_sample(tmp_path / "a.gguf", extra=lambda w: w.add_string("general.alignment", "32"))
    _rejects(scratch, path.read_bytes(), "general.alignment must be an integer")


def test_corrupt_tensor_infos(sample, scratch):
    _, data = sample
    t = _tensor_pos(data, "w.q4_0")
    _rejects(scratch, _patch(data, t["n_dims"], "<I", 0), "'w.q4_0'", "n_dims 0")
    _rejects(scratch, _patch(data, t["n_dims"], "<I", 5), "'w.q4_0'", "n_dims 5")
    _rejects(scratch, _patch(data, t["n_dims"], "<I", 2**32 - 1), "'w.q4_0'", "n_dims")
    _rejects(scratch, _patch(data, t["dims"], "<Q", 0), "'w.q4_0'", "zero dimension")
    _rejects(scratch, _patch(data, t["dims"] + 8, "<Q", 0), "'w.q4_0'", "zero dimension")
    _rejects(scratch, _patch(data, t["dims"], "<Q", 33), "'w.q4_0'", "multiple of its block size 32")
    _rejects(scratch, _patch(data, t["dims"], "<Q", 2**63), "'w.q4_0'", "past the end")
    _rejects(scratch, _patch(data, t["dims"] + 8, "<Q", 2**64 - 1), "'w.q4_0'", "past the end")
    _rejects(scratch, _patch(data, t["type"], "<I", 99), "'w.q4_0'", "unknown ggml type id 99")
    _rejects(scratch, _patch(data, t["type"], "<I", 4), "'w.q4_0'", "unknown ggml type id 4")
    _rejects(scratch, _patch(data, t["type"], "<I", 0), "'w.q4_0'")  # as F32 it is 4x bigger: overlaps or overruns
    off = struct.unpack_from("<Q", data, t["offset"])[0]
    _rejects(scratch, _patch(data, t["offset"], "<Q", off + 1), "'w.q4_0'", "not a multiple of general.alignment 32")
    _rejects(scratch, _patch(data, t["offset"], "<Q", 2**64 - 32), "'w.q4_0'", "past the end")
    _rejects(scratch, _patch(data, t["offset"], "<Q", 0), "overlaps")
    _rejects(scratch, _patch(data, t["len"], "<Q", 2**63), "name of tensor #2", "at most")
    _rejects(scratch, _patch(data, t["len"] + 8, "<B", 0xFE), "name of tensor #2", "UTF-8")
    _rejects(scratch, _patch(data, t["len"], "<Q", 0), "tensor #2 has an empty name")
    b = bytearray(data)  # w.q4_1 -> w.q4_0: duplicate
    i = b.index(b"w.q4_1\x02")
    b[i:i + 6] = b"w.q4_0"
    _rejects(scratch, bytes(b), "duplicate tensor name 'w.q4_0'")


def _check_all_access(g) -> None:
    for name, t in g.tensors.items():
        assert g.tensor_bytes(name).nbytes == t.nbytes
        try:
            g.qtensor(name)
        except ModelFormatError:
            pass
        try:
            g.tensor_array(name)
        except ModelFormatError:
            pass


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_byte_flips_raise_only_model_format_error(sample, scratch, data):
    path, raw = sample
    b = bytearray(raw)
    with open_gguf(path) as g:
        header = g.data_offset  # most flips land in the header, where the parser's decisions are
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, header - 1) if data.draw(st.booleans()) else st.integers(0, len(b) - 1))
        b[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        b = b[:data.draw(st.integers(0, len(b)))]
    try:
        g = scratch(bytes(b))
    except ModelFormatError:
        return
    with g:
        _check_all_access(g)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=300), n_tensors=st.integers(0, 4), n_kv=st.integers(0, 4))
def test_random_bodies_raise_only_model_format_error(scratch, body, n_tensors, n_kv):
    try:
        g = scratch(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + body)
    except ModelFormatError:
        return
    with g:
        _check_all_access(g)
