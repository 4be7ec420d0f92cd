"""edgert.matmul: the reference kernel against float64 numpy, every SIMD variant against the reference, bad input.

Error budgets are derived, not tuned: a float32 sum of n terms, each carrying a few roundings, is within
(n + FP32_ROUNDINGS_PER_TERM) * FP32_UNIT_ROUNDOFF * sum(|term|) of the exact sum (the standard gamma_n bound).
"""
import zlib

import numpy as np
import pytest

import edgert

FORMATS = ["q4_0", "q4_1", "q8_0", "f16", "f32"]
BLOCK_FORMATS = ["q4_0", "q4_1", "q8_0"]
SWEEP_K = [32, 64, 96, 4128]
SWEEP_N = [1, 3, 17, 33, 64]
SWEEP_M = [1, 2, 7, 64]

FP32_UNIT_ROUNDOFF = 2.0**-24
# per block: int->float of the integer dot (exact below 2^24), dw*dx, the product with it, the min term of q4_1
FP32_ROUNDINGS_PER_TERM = 4
# two float32 results, each within the gamma bound of the same exact value, differ by at most twice that bound
SIMD_VS_REF_RTOL = 2.0
# activations are quantized to int8 per block of 32 with step amax/127, so each one moves by at most half a step
# (plus the float32 rounding of x * (127/amax)); that error is not in the weights, so the budget against the
# float64 product of the *unquantized* x scales with |w| * amax / 254, far looser than the accumulation bound
ACT_Q8_MAX_ERR_PER_AMAX = 0.5 / 127 * (1 + 1e-5)


def rng_for(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def make_case(fmt, n, m, k, seed_key=()):
    rng = rng_for(fmt, n, m, k, *seed_key)
    # a per-row offset makes q4_1's min term matter; varied block magnitudes exercise the scales
    w = (rng.standard_normal((n, k)) * rng.uniform(0.1, 3.0, (n, 1)) + rng.uniform(-1, 1, (n, 1))).astype(np.float32)
    x = (rng.standard_normal((m, k)) * rng.uniform(0.5, 2.0, (m, 1))).astype(np.float32)
    return x, edgert.quantize(w, fmt)


def q8_activations(x: np.ndarray) -> np.ndarray:
    """x as the C core sees it for block formats: per block of 32, q = rint(x * (127 / amax)), d = amax / 127,
    every step in float32 as in et_quantize_row_q8_s; returned dequantized (q * d) in float64."""
    m, k = x.shape
    xb = x.reshape(m, k // 32, 32)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(xb * inv)  # numpy rint rounds half to even, as nearbyintf does
    d = (amax / np.float32(127)).astype(np.float32)
    return (q.astype(np.float64) * d.astype(np.float64)).reshape(m, k)


def q4_1_mins(w: edgert.QTensor) -> np.ndarray:
    """Per-weight |m| of a q4_1 tensor (the min term the kernel adds separately), zeros for other formats."""
    n, k = w.shape
    if w.fmt != "q4_1":
        return np.zeros((n, k))
    m = w.raw.reshape(n, k // 32, 20)[:, :, 2:4].copy().view(np.float16).astype(np.float64)
    return np.repeat(np.abs(m).reshape(n, k // 32), 32, axis=1)


def exact_and_budget(x: np.ndarray, w: edgert.QTensor):
    """(float64 product of what the kernel actually multiplies, its float32 accumulation budget)."""
    wd = w.dequantize().astype(np.float64)
    k = w.shape[1]
    if w.fmt in BLOCK_FORMATS:
        xa, n_terms = q8_activations(x), k // 32
    else:
        xa, n_terms = x.astype(np.float64), k
    # each term's magnitude is at most (|w| + 2|m|) |x|: for q4_1 the kernel adds d*q*x and m*x separately
    magnitude = np.abs(xa) @ (np.abs(wd) + 2 * q4_1_mins(w)).T
    budget = (n_terms + FP32_ROUNDINGS_PER_TERM) * FP32_UNIT_ROUNDOFF * magnitude
    return xa @ wd.T, budget


def assert_within(y, expected, budget, what):
    err = np.abs(y.astype(np.float64) - expected)
    worst = np.unravel_index(np.argmax(err - budget), err.shape)
    assert np.all(err <= budget), (
        f"{what}: |error| {err[worst]:.3g} > budget {budget[worst]:.3g} at {worst} (value {y[worst]:.6g})"
    )


# --- the reference kernel against float64 ---------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k", SWEEP_K)
def test_ref_matches_float64_on_what_it_multiplies(fmt, k):
    """Tight: float64 math on the dequantized weights and the same q8 activations the kernel computes."""
    edgert.native.set_isa("ref")
    for n in SWEEP_N:
        for m in (1, 7):
            x, w = make_case(fmt, n, m, k)
            expected, budget = exact_and_budget(x, w)
            assert_within(edgert.matmul(x, w, threads=1), expected, budget, f"ref {fmt} n={n} m={m} k={k}")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k", SWEEP_K)
def test_ref_matches_float64_on_unquantized_activations(fmt, k):
    """Looser: against x @ dequantized(w).T with the original float activations."""
    edgert.native.set_isa("ref")
    x, w = make_case(fmt, 17, 7, k, ("loose",))
    wd = w.dequantize().astype(np.float64)
    exact = x.astype(np.float64) @ wd.T
    _, budget = exact_and_budget(x, w)
    if fmt in BLOCK_FORMATS:
        amax = np.repeat(np.abs(x.reshape(7, k // 32, 32)).max(axis=-1), 32, axis=1).astype(np.float64)
        budget = budget + ACT_Q8_MAX_ERR_PER_AMAX * (amax @ np.abs(wd).T)
    assert_within(edgert.matmul(x, w), exact, budget, f"ref {fmt} vs float64, k={k}")


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_activation_budget_is_not_vacuous(fmt):
    """The q8 activation error the loose test allows for is real: the kernel does not multiply float x."""
    x, w = make_case(fmt, 8, 2, 256, ("vacuous",))
    y = edgert.matmul(x, w)
    exact_float_x = x.astype(np.float64) @ w.dequantize().astype(np.float64).T
    _, tight = exact_and_budget(x, w)
    assert np.any(np.abs(y - exact_float_x) > tight)


# --- every SIMD variant against the reference ----------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k", SWEEP_K)
def test_simd_matches_ref_over_shape_sweep(simd_isa, fmt, k):
    for n in SWEEP_N:
        for m in SWEEP_M:
            x, w = make_case(fmt, n, m, k)
            _, budget = exact_and_budget(x, w)
            edgert.native.set_isa("ref")
            y_ref = edgert.matmul(x, w, threads=1)
            edgert.native.set_isa(simd_isa)
            for threads in (1, 2):
                y = edgert.matmul(x, w, threads=threads)
                assert y.shape == (m, n) and y.dtype == np.float32
                assert_within(y, y_ref, SIMD_VS_REF_RTOL * budget, f"{simd_isa} {fmt} n={n} m={m} k={k} t={threads}")


@pytest.mark.parametrize("fmt", ["f16", "f32"])
def test_simd_float_formats_scalar_tail(simd_isa, fmt):
    """Float formats take any K: every vector loop must end with its scalar tail."""
    for k in (1, 7, 8, 9, 15, 16, 17, 31, 33, 47, 100):
        x, w = make_case(fmt, 9, 3, k)
        _, budget = exact_and_budget(x, w)
        edgert.native.set_isa("ref")
        y_ref = edgert.matmul(x, w)
        edgert.native.set_isa(simd_isa)
        assert_within(edgert.matmul(x, w), y_ref, SIMD_VS_REF_RTOL * budget, f"{simd_isa} {fmt} k={k}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_result_does_not_depend_on_thread_count(isa, fmt):
    # work is split in whole row tiles, so each output is computed by the same instructions whatever the split
    x, w = make_case(fmt, 1000, 5, 256, ("threads",))
    y1 = edgert.matmul(x, w, threads=1)
    for threads in (2, 3, 8):
        np.testing.assert_array_equal(edgert.matmul(x, w, threads=threads), y1, err_msg=f"{isa} threads={threads}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_do_not_depend_on_the_batch(isa, fmt):
    """Row i of an M-row product is bit for bit the 1-row product of x[i]: whatever kernel path M picks (GEMV, packed
    tiles, AMX), however rows share a tile, N tails, K tails and thread splits. The LLM's output must not depend on
    how a prompt was batched."""
    for k in ((96, 4128) if fmt in BLOCK_FORMATS else (17, 4131)):
        x, w = make_case(fmt, 75, 64, k, ("batch",))
        for threads in (1, 2):
            rows = [edgert.matmul(x[i : i + 1], w, threads=threads) for i in range(64)]
            for m in (2, 5, 16, 17, 64):
                y = edgert.matmul(np.ascontiguousarray(x[:m]), w, threads=threads)
                for i in range(m):
                    assert np.array_equal(y[i], rows[i][0]), f"{isa} {fmt} k={k} m={m} threads={threads}: row {i}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_inputs_give_exact_zeros(isa, fmt):
    x, w = make_case(fmt, 33, 3, 96)
    np.testing.assert_array_equal(edgert.matmul(np.zeros_like(x), w), np.zeros((3, 33), np.float32))
    zero_w = edgert.quantize(np.zeros((33, 96), np.float32), fmt)
    np.testing.assert_array_equal(edgert.matmul(x, zero_w), np.zeros((3, 33), np.float32))


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_extreme_q8_codes(isa, fmt):
    """Saturated codes everywhere: q8_0 +-127 (and -128 from a foreign file), q4 nibbles 0 and 15."""
    n, k = 8, 128
    rng = rng_for("extreme", fmt)
    raw = edgert.quantize(np.ones((n, k), np.float32), fmt).raw.copy()
    bs = raw.shape[1] // (k // 32)
    blocks = raw.reshape(n, k // 32, bs)
    head = bs - (32 if fmt == "q8_0" else 16)
    codes = [0x80, 0x81, 0x7F] if fmt == "q8_0" else [0x00, 0xFF, 0xF0, 0x0F]
    blocks[:, :, head:] = rng.choice(np.array(codes, np.uint8), blocks[:, :, head:].shape)
    w = edgert.QTensor.from_raw(fmt, (n, k), raw)
    x = np.where(rng.random((4, k)) < 0.5, -1.0, 1.0).astype(np.float32) * 3.0
    expected, budget = exact_and_budget(x, w)
    assert_within(edgert.matmul(x, w), expected, budget, f"{isa} {fmt} saturated codes")


# --- shapes and bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_one_dimensional_x(fmt):
    x, w = make_case(fmt, 17, 1, 64)
    y = edgert.matmul(x[0], w)
    assert y.shape == (17,)
    np.testing.assert_array_equal(y, edgert.matmul(x, w)[0])


def _views_that_are_not_c_contiguous():
    base = np.random.default_rng(1).standard_normal((8, 128)).astype(np.float32)
    return {
        "column_stride": base[:4, ::2],          # (4, 64), stride 8 bytes
        "row_slice_step": base[::2, :64],        # (4, 64), rows 512 bytes apart
        "transposed": np.ascontiguousarray(base[:, :64].T[:, :4]).T,  # (4, 64) Fortran order
        "one_d_strided": base[0, ::2],           # (64,)
    }


@pytest.mark.parametrize("view", list(_views_that_are_not_c_contiguous()))
def test_non_contiguous_x_is_rejected(view):
    x = _views_that_are_not_c_contiguous()[view]
    assert x.shape[-1] == 64 and not x.flags.c_contiguous
    w = edgert.quantize(np.ones((3, 64), np.float32), "q4_0")
    with pytest.raises(edgert.InvalidArgumentError, match="C-contiguous") as e:
        edgert.matmul(x, w)
    assert str(x.strides) in str(e.value) and "ascontiguousarray" in str(e.value)
    assert edgert.matmul(np.ascontiguousarray(x), w).shape[-1] == 3


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_wrong_x_dtype(dtype):
    w = edgert.quantize(np.ones((3, 64), np.float32), "q8_0")
    with pytest.raises(edgert.DTypeError) as e:
        edgert.matmul(np.ones((2, 64), dtype), w)
    assert np.dtype(dtype).name in str(e.value) and "float32" in str(e.value)


def test_x_must_be_an_array_and_w_a_qtensor():
    w = edgert.quantize(np.ones((3, 64), np.float32), "q8_0")
    with pytest.raises(edgert.DTypeError, match="list"):
        edgert.matmul([[1.0] * 64], w)
    with pytest.raises(edgert.DTypeError, match="QTensor"):
        edgert.matmul(np.ones((2, 64), np.float32), np.ones((3, 64), np.float32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_k_mismatch(fmt):
    w = edgert.quantize(np.ones((3, 64), np.float32), fmt)
    for x in (np.ones((2, 96), np.float32), np.ones(32, np.float32)):
        with pytest.raises(edgert.ShapeError) as e:
            edgert.matmul(x, w)
        assert f"K={x.shape[-1]}" in str(e.value) and "(3, 64)" in str(e.value)


@pytest.mark.parametrize("shape", [(2, 3, 64), (0, 64), ()])
def test_bad_x_rank_or_empty(shape):
    w = edgert.quantize(np.ones((3, 64), np.float32), "q4_1")
    with pytest.raises(edgert.ShapeError):
        edgert.matmul(np.ones(shape, np.float32), w)


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_bad_thread_argument(threads):
    w = edgert.quantize(np.ones((3, 64), np.float32), "q4_0")
    with pytest.raises(edgert.InvalidArgumentError, match="threads"):
        edgert.matmul(np.ones((2, 64), np.float32), w, threads=threads)


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_activations_for_block_formats(isa, fmt, bad):
    w = edgert.quantize(np.ones((3, 64), np.float32), fmt)
    x = np.ones((4, 64), np.float32)
    x[2, 5] = bad
    with pytest.raises(edgert.InvalidArgumentError, match="row 2"):
        edgert.matmul(x, w)


def test_out_and_scratch_are_used_and_nothing_is_allocated():
    import tracemalloc

    from edgert.quant import matmul_scratch_size

    rng = np.random.default_rng(7)
    w = edgert.quantize(rng.standard_normal((96, 128)).astype(np.float32), "q8_0")
    x = rng.standard_normal((40, 128)).astype(np.float32)
    want = edgert.matmul(x, w)
    out = np.full((40, 96), np.nan, np.float32)
    scratch = np.empty(matmul_scratch_size(w, 40), np.uint8)
    assert edgert.matmul(x, w, out=out, scratch=scratch) is out
    np.testing.assert_array_equal(out, want)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(20):
        edgert.matmul(x, w, out=out, scratch=scratch)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak - before < min(out.nbytes, scratch.nbytes) // 2, (peak - before)
    y1 = np.empty(96, np.float32)  # a 1-D x writes a 1-D out
    np.testing.assert_array_equal(edgert.matmul(x[3], w, out=y1), want[3])


@pytest.mark.parametrize("bad", [np.empty((40, 95), np.float32), np.empty((40, 96), np.float64),
                                 np.empty((96, 40), np.float32).T, "not an array"])
def test_bad_out_is_rejected(bad):
    rng = np.random.default_rng(8)
    w = edgert.quantize(rng.standard_normal((96, 128)).astype(np.float32), "q8_0")
    with pytest.raises(edgert.InvalidArgumentError, match="out must be"):
        edgert.matmul(rng.standard_normal((40, 128)).astype(np.float32), w, out=bad)


def test_short_scratch_is_rejected():
    rng = np.random.default_rng(9)
    w = edgert.quantize(rng.standard_normal((96, 128)).astype(np.float32), "q8_0")
    with pytest.raises(edgert.InvalidArgumentError, match="scratch must be"):
        edgert.matmul(rng.standard_normal((40, 128)).astype(np.float32), w, scratch=np.empty(1, np.uint8))


# --- BoundMatMul: short and strided rows, bound buffers ---------------------------------------------------------

@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
@pytest.mark.parametrize("m,kx,k", [(1, 1, 32), (3, 31, 32), (40, 120, 128), (5, 33, 96), (17, 64, 64)])
def test_bound_matmul_equals_the_zero_padded_product(isa, fmt, m, kx, k):
    from edgert.quant import BoundMatMul

    rng = rng_for("bound", fmt, m, kx, k)
    w = edgert.quantize(rng.standard_normal((37, k)).astype(np.float32), fmt)
    wide = np.full((m, kx + 5), np.nan, np.float32)   # rows kx + 5 apart; what lies past kx is never read
    wide[:, :kx] = rng.standard_normal((m, kx))
    padded = np.zeros((m, k), np.float32)
    padded[:, :kx] = wide[:, :kx]
    want = edgert.matmul(padded, w)
    bound = BoundMatMul(w, m, kx)
    got = bound(wide[:, :kx])
    np.testing.assert_array_equal(got, want)
    assert got is bound.out
    x = np.ascontiguousarray(wide[:, :kx])
    out = np.full((m, 37), np.nan, np.float32)
    assert bound(x, out) is out
    np.testing.assert_array_equal(out, want)


def test_bound_matmul_float64_reference_and_no_allocation():
    import tracemalloc

    from edgert.quant import BoundMatMul

    rng = rng_for("bound-f64")
    w = edgert.quantize(rng.standard_normal((96, 128)).astype(np.float32), "q8_0")
    x = rng.standard_normal((40, 120)).astype(np.float32)
    padded = np.zeros((40, 128), np.float32)
    padded[:, :120] = x
    expected, budget = exact_and_budget(padded, w)
    bound = BoundMatMul(w, 40, 120)
    assert_within(bound(x), expected, budget, "BoundMatMul q8_0 kx=120")
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(20):
        bound(x)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak - before < bound.out.nbytes // 2, (peak - before)


def test_bound_matmul_rejects_bad_input():
    from edgert.quant import BoundMatMul

    rng = rng_for("bound-bad")
    w = edgert.quantize(rng.standard_normal((8, 64)).astype(np.float32), "q4_0")
    wf = edgert.quantize(rng.standard_normal((8, 64)).astype(np.float32), "f32")
    for bad in [dict(m=0), dict(m=2, kx=65), dict(m=2, kx=0), dict(m=2, threads=0)]:
        with pytest.raises((edgert.ShapeError, edgert.InvalidArgumentError)):
            BoundMatMul(w, **bad)
    with pytest.raises(edgert.ShapeError, match="kx=60 must be K=64 \\(f32 weights\\)"):
        BoundMatMul(wf, 2, 60)
    # a block format's message said 'exactly K' too (they take shorter rows), and a numpy int kx was refused
    with pytest.raises(edgert.ShapeError, match="kx=0 must be an int in \\[1, K=64\\]$"):
        BoundMatMul(w, 2, 0)
    assert BoundMatMul(w, 2, np.int64(60)).kx == 60
    with pytest.raises(edgert.DTypeError, match="a numpy scalar"):
        edgert.matmul(np.float32(1.0), w)
    bound = BoundMatMul(w, 2, 60)
    for x in [np.zeros((2, 64), np.float32), np.zeros((3, 60), np.float32), np.zeros((2, 60), np.float64),
              np.zeros((60, 2), np.float32).T, np.zeros((2, 120), np.float32)[:, ::2], [[0.0] * 60] * 2]:
        with pytest.raises(edgert.ShapeError, match="x must be float32"):
            bound(x)
    with pytest.raises(edgert.InvalidArgumentError, match="out must be"):
        bound(np.zeros((2, 60), np.float32), np.zeros((2, 9), np.float32))
    with pytest.raises(edgert.InvalidArgumentError, match="finite"):
        bound(np.full((2, 60), np.inf, np.float32))


@pytest.mark.parametrize("fmt", ["f32", "f16", "q8_0"])
def test_bound_matmul_refuses_x_that_overlaps_its_output(fmt):
    """x in the output (b(b.out) with N == K, or out=x) was a silently wrong product on f32/f16 weights: the
    kernels read x while they write the output. Another output buffer is fine."""
    from edgert.quant import BoundMatMul

    rng = rng_for("bound-overlap")
    w = edgert.quantize(rng.standard_normal((64, 64)).astype(np.float32), fmt)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    b = BoundMatMul(w, 4)
    expected = b(x).copy()
    with pytest.raises(edgert.InvalidArgumentError, match="x overlaps the bound output"):
        b(b.out)
    xx = x.copy()
    with pytest.raises(edgert.InvalidArgumentError, match="out overlaps x"):
        b(xx, out=xx)
    np.testing.assert_array_equal(xx, x)  # untouched
    b.out[...] = x
    np.testing.assert_array_equal(b(b.out, out=np.empty((4, 64), np.float32)), expected)
    np.testing.assert_array_equal(b(x), expected)



def test_bound_matmul_same_x_again_sees_its_new_data_and_checks_it_again():
    """a run loop passes the same x every call: BoundMatMul reuses its pointer, so the product must follow the data,
    and a dtype, shape or strides reassigned in place on that same object must still be refused"""
    from edgert.quant import BoundMatMul

    rng = rng_for("bound-same-x")
    w = edgert.quantize(rng.standard_normal((24, 64)).astype(np.float32), "q4_1")
    wide = rng.standard_normal((3, 70)).astype(np.float32)
    for x in (np.ascontiguousarray(wide[:, :64]), wide[:, :64]):  # contiguous, and rows 70 apart
        bound = BoundMatMul(w, 3, 64)
        np.testing.assert_array_equal(bound(x), edgert.matmul(np.ascontiguousarray(x), w))
        x[...] = rng.standard_normal(x.shape)  # same object, new values
        np.testing.assert_array_equal(bound(x), edgert.matmul(np.ascontiguousarray(x), w))
    x = np.zeros((3, 64), np.float32)
    bound = BoundMatMul(w, 3, 64)
    bound(x)
    x.dtype = np.int32  # numpy allows this in place (same item size): the bytes are no longer float32
    with pytest.raises(edgert.ShapeError, match="x must be float32"):
        bound(x)
    x.dtype = np.float32
    x.shape = (64, 3)
    with pytest.raises(edgert.ShapeError, match="x must be float32"):
        bound(x)
    x.shape = (3, 64)
    np.testing.assert_array_equal(bound(x), np.zeros((3, 24), np.float32))


# --- repack: the x16 layout ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
@pytest.mark.parametrize("n", [1, 15, 16, 17, 75])
def test_repacked_weights_give_the_same_bits(isa, fmt, n):
    """A PackedQTensor holds the QTensor's values: its products are bit for bit those of the GGUF rows on an ISA
    with its own x16 kernels, and the reference kernel's GGUF product elsewhere; unpack() gives the blocks back."""
    for k in (32, 96, 4128):
        x, w = make_case(fmt, n, 17, k, ("x16",))
        p = edgert.repack(w)
        assert (p.fmt, p.shape, p.layout) == (fmt, w.shape, "x16")
        assert p.raw.ctypes.data % 64 == 0 and p.nbytes % 64 == 0
        assert w.nbytes <= p.nbytes <= -(-n // 16) * 16 * w.raw.shape[1] + 64 * -(-n // 16)
        np.testing.assert_array_equal(p.unpack().raw, w.raw)
        np.testing.assert_array_equal(p.dequantize(), w.dequantize())
        native = edgert.repack_pays(fmt)
        for m in (1, 2, 3, 5, 17):
            xm = np.ascontiguousarray(x[:m])
            for threads in (1, 2):
                if not native:
                    edgert.native.set_isa("ref")
                want = edgert.matmul(xm, w, threads=threads)
                edgert.native.set_isa(isa)
                np.testing.assert_array_equal(edgert.matmul(xm, p, threads=threads), want,
                                              err_msg=f"{isa} {fmt} n={n} k={k} m={m} threads={threads}")
        bound = edgert.BoundMatMul(p, 2, k - 1)  # short rows: the missing column counts as zero
        padded = np.zeros((2, k), np.float32)
        padded[:, : k - 1] = x[:2, : k - 1]
        np.testing.assert_array_equal(bound(np.ascontiguousarray(x[:2, : k - 1])), edgert.matmul(padded, p))


def test_repack_pays_only_where_the_isa_has_x16_kernels():
    info = edgert.native.info()
    expected = ["q4_0", "q4_1", "q8_0"] if info["isa"] in ("avx512", "avx2") else []
    assert info["repack"] == expected
    assert edgert.repack_pays("f16") is False and edgert.repack_pays("nope") is False
    edgert.native.set_isa("ref")
    try:
        assert edgert.native.info()["repack"] == [] and not edgert.repack_pays("q4_0")
    finally:
        edgert.native.set_isa(info["isa"])


def test_repack_rejects_what_it_cannot_hold():
    rng = rng_for("x16-bad")
    for fmt in ("f16", "f32"):
        with pytest.raises(edgert.InvalidArgumentError, match="only block formats"):
            edgert.repack(edgert.quantize(rng.standard_normal((4, 32)).astype(np.float32), fmt))
    with pytest.raises(edgert.DTypeError, match="QTensor"):
        edgert.repack(np.zeros((4, 32), np.float32))
    with pytest.raises(edgert.DTypeError, match="PackedQTensor"):
        edgert.matmul(np.zeros((1, 32), np.float32), np.zeros((4, 32), np.uint8))
    p = edgert.repack(edgert.quantize(rng.standard_normal((4, 64)).astype(np.float32), "q4_0"))
    with pytest.raises(edgert.ShapeError, match="K must match"):
        edgert.matmul(np.zeros((1, 32), np.float32), p)
    with pytest.raises(edgert.InvalidArgumentError, match="finite"):
        edgert.matmul(np.full((1, 64), np.nan, np.float32), p)


def test_repack_into_an_arena():
    """repack(w, out) writes into the caller's buffer (a loader's one arena for many matrices) and checks it."""
    rng = rng_for("x16-arena")
    ws = [edgert.quantize(rng.standard_normal((n, 64)).astype(np.float32), "q4_1") for n in (17, 32)]
    sizes = [edgert.quant.repack_size(w) for w in ws]
    arena = edgert.quant.aligned_empty(sum(sizes) + 10)
    packed = [edgert.repack(ws[0], arena), edgert.repack(ws[1], arena[sizes[0]:])]
    assert packed[1].raw.ctypes.data == arena.ctypes.data + sizes[0] and packed[1].raw.ctypes.data % 64 == 0
    x = rng.standard_normal((3, 64)).astype(np.float32)
    for w, p in zip(ws, packed):
        np.testing.assert_array_equal(p.unpack().raw, w.raw)
        if edgert.repack_pays("q4_1"):
            np.testing.assert_array_equal(edgert.matmul(x, p), edgert.matmul(x, w))
    for bad in (arena[: sizes[0] - 1], arena.view(np.int8), np.zeros((2, sizes[0]), np.uint8), bytearray(sizes[0])):
        with pytest.raises(edgert.InvalidArgumentError, match="out must be"):
            edgert.repack(ws[0], bad)
    with pytest.raises(edgert.InvalidArgumentError, match="overlaps"):  # in place would read what it overwrote
        edgert.repack(ws[1], ws[1].raw.reshape(-1))


@pytest.mark.parametrize("m", [1, 64])
def test_activation_blocks_too_small_to_scale_are_zero_on_every_isa(isa, m):
    """127 / amax overflows below ~3.7e-37: the codes were x * inf, an undefined float->int conversion (avx512 gave
    -6.5e-36 for an exact 3.2e-36, ref and avx2 0). Blocks below 2^-120 now quantize to zeros on every ISA."""
    w = edgert.quantize(np.ones((3, 64), np.float32), "q8_0")
    x = np.full((m, 64), 1e-37, np.float32)
    x[:, 32:] = 1e-30  # the second block is representable
    y = edgert.matmul(x, w)
    np.testing.assert_allclose(y, np.full((m, 3), 32e-30), rtol=1e-2)
    x[:, 32:] = 0
    assert not np.any(y := edgert.matmul(x, w)) and not np.signbit(y).any()
    x[:, :32] = 5e-37  # 127/amax is finite here but the block is below 2^-120: zeros too, on every ISA
    assert not np.any(edgert.matmul(x, w))
    x[:, :32] = 1e-35  # above 2^-120: quantized as usual
    np.testing.assert_allclose(edgert.matmul(x, w), np.full((m, 3), 32e-35), rtol=1e-2)
