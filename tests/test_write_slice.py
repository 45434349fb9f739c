"""write_slice against the NumPy oracle: bits, positions, fast paths, in place, errors."""
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import lax
from jax.experimental import checkify
from jax.test_util import check_grads

import bjax
from pallas_kernels.tiling import TileConfig
from tests import oracles
from tests.conftest import BACKENDS, KERNEL_BACKEND, random

_BYTE_DTYPES = (
    jnp.int8, jnp.uint8, jnp.int16, jnp.uint16, jnp.int32, jnp.uint32, jnp.int64, jnp.uint64,
    jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.float8_e4m3, jnp.float8_e3m4, jnp.float8_e4m3fnuz,
    jnp.float8_e5m2fnuz, jnp.float8_e4m3b11fnuz, jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64,
    jnp.complex64, jnp.complex128,
)
ALL_DTYPES = (jnp.bool_, jnp.int4, jnp.uint4) + _BYTE_DTYPES


def random_bits(seed, shape, dtype):
    """Random values covering the dtype's bit patterns (NaN payloads, -0.0, fp8 specials)."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    if dtype in (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4)):
        info = ml_dtypes.iinfo(dtype)
        return rng.integers(info.min, info.max + 1, shape).astype(dtype)
    raw = rng.integers(0, 256, (*shape, dtype.itemsize), dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def assert_same_bits(out, ref):
    out, ref = np.asarray(out), np.asarray(ref)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if out.dtype in (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4)):
        out, ref = out.astype(np.int8), ref.astype(np.int8)
    np.testing.assert_array_equal(out.view(np.uint8), ref.view(np.uint8))


def check(dest_shape, window, start, dtype, backend, seed=0, jit_start=True):
    """Random dest and source; compare write_slice (start entries traced if jit_start)."""
    dest = random_bits(seed, dest_shape, dtype)
    source = random_bits(seed + 1, window, dtype)
    static = [i for i, s in enumerate(start) if isinstance(s, int) and not jit_start]

    def run(dest, source, *traced):
        traced = iter(traced)
        full = [s if i in static else next(traced) for i, s in enumerate(start)]
        return bjax.write_slice(dest, source, full, backend=backend)

    traced = [jnp.asarray(s, jnp.int32) for i, s in enumerate(start) if i not in static]
    out = jax.jit(run)(dest, source, *traced)
    assert_same_bits(out, oracles.write_slice(dest, source, start))
    return out


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_dtype_bit_exact(dtype, backend):
    check((3, 7, 6), (2, 3, 4), (1, 2, 2), dtype, backend, jit_start=False)
    check((3, 7, 6), (2, 3, 4), (1, 2, 2), dtype, backend, seed=5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dest_shape,window,start", [
    ((17,), (5,), (11,)),                              # rank 1
    ((9, 33), (4, 33), (5, 0)),                        # full minor axis: one contiguous chunk
    ((4, 40, 3, 8), (4, 1, 3, 8), (0, 39, 0, 0)),      # KV append at the last position
    ((2, 5, 300), (1, 4, 129), (1, 1, 170)),           # generic, ragged tiles
    ((6, 5, 4), (6, 5, 4), (0, 0, 0)),                 # the whole of dest
    ((3, 2, 3, 2, 3, 2, 3, 2), (2, 1, 2, 2, 1, 2, 3, 1), (1, 1, 0, 0, 2, 0, 0, 1)),  # rank 8
    ((1, 1, 1), (1, 1, 1), (0, 0, 0)),
], ids=["rank1", "contiguous", "kv_append", "generic", "whole", "rank8", "ones"])
def test_fast_paths_and_awkward_shapes(dest_shape, window, start, backend):
    for dtype in (jnp.bfloat16, jnp.float32):
        check(dest_shape, window, start, dtype, backend, jit_start=False)
        check(dest_shape, window, start, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_window_is_a_no_op(backend):
    dest = random_bits(0, (4, 6), jnp.float32)
    for window, start in [((0, 6), (4, 0)), ((2, 0), (1, 3))]:
        out = bjax.write_slice(dest, np.zeros(window, np.float32), start, backend=backend)
        assert_same_bits(out, dest)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_positions_and_out_of_range_rows(backend):
    # Row 2 appends past the end and row 4 at a negative position: both untouched.
    lengths = np.array([0, 7, 9, 3, -1, 8])
    check((6, 10, 2, 8), (6, 2, 2, 8), (0, lengths, 0, 0), jnp.bfloat16, backend)
    # A window of rows 1..3 reads lengths of dest rows 1..3, with a dynamic row start.
    check((6, 10, 5), (3, 3, 4), (1, lengths, 1), jnp.float32, backend)
    # Per-row positions on two axes.
    check((4, 6, 7), (4, 2, 3), (0, np.array([0, 4, 5, 1]), np.array([4, 0, 2, 5])),
          jnp.int8, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("start", [(0, 9, 0), (0, -1, 0), (3, 0, 0), (0, 2**31 - 1, 0)],
                         ids=["past_end", "negative", "axis0", "huge"])
def test_out_of_range_scalar_position_changes_nothing(start, backend):
    # lax.dynamic_update_slice would clamp and overwrite the last valid rows.
    out = check((3, 10, 4), (1, 2, 4), start, jnp.float32, backend)
    dest = random_bits(0, (3, 10, 4), jnp.float32)
    assert_same_bits(out, dest)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("position", [
    np.int8(-1), np.uint8(255), np.int16(297), np.uint16(299), np.int64(2**40), np.int64(5),
    np.uint32(2**32 - 1), np.uint64(2**63 + 3)], ids=repr)
def test_positions_of_every_integer_dtype(position, backend):
    # A window of extent 2 on an axis of 300 fits at 0..298. Out-of-range values
    # must not wrap into range when narrowed (2**40 to 0, 2**32 - 1 to -1).
    dest = random_bits(0, (3, 300, 4), jnp.float32)
    source = random_bits(1, (2, 2, 4), jnp.float32)
    write = jax.jit(lambda d, s, p: bjax.write_slice(d, s, (1, p, 0), backend=backend))
    out = write(dest, source, jnp.asarray(position))
    assert_same_bits(out, oracles.write_slice(dest, source, (1, int(position), 0)))


_STARTS = {"inside": (1, 3, 2), "last": (0, 8, 0), "past_the_end": (0, 9, 0),
           "negative": (2, -1, 0)}
# Every start for one float, one narrow float and one integer; every other dtype (no
# complex) inside and past the end. The guard does not depend on the dtype, nor the bits
# on where they land.
_GUARD_CASES = [pytest.param(_STARTS[name], dtype, id=f"{name}-{np.dtype(dtype).name}")
                for dtype in _BYTE_DTYPES[:-2] for name in _STARTS
                if dtype in (jnp.float32, jnp.bfloat16, jnp.int8)
                or name in ("inside", "past_the_end")]


@pytest.mark.parametrize("start, dtype", _GUARD_CASES)
def test_guarded_dynamic_update_slice_path(start, dtype, monkeypatch):
    # The Pallas backend's route for small one-position windows is XLA code,
    # so it runs on CPU too once the backend believes a GPU is present.
    monkeypatch.setattr(bjax._op, "cuda_available", lambda: True)
    dest = jax.ShapeDtypeStruct((3, 10, 4), dtype)
    traced = tuple(jax.ShapeDtypeStruct((), jnp.int32) for _ in start)
    plan = bjax.plan(bjax.write_slice, dest, jax.ShapeDtypeStruct((1, 2, 2), dtype), traced,
                     backend="pallas")
    assert plan.kernel.startswith("lax.dynamic_update_slice")
    check((3, 10, 4), (1, 2, 2), start, dtype, "pallas")
    # Static starts beside a traced one of another integer dtype.
    dest, source = random_bits(0, (3, 10, 4), dtype), random_bits(1, (1, 2, 2), dtype)
    write = jax.jit(lambda d, s, p: bjax.write_slice(d, s, (start[0], p, start[2]),
                                                     backend="pallas"))
    for position_dtype in (jnp.int8, jnp.uint16, jnp.int64):
        position = jnp.asarray(start[1]).astype(position_dtype)  # -1 is 65535 as uint16
        out = write(dest, source, position)
        assert_same_bits(out, oracles.write_slice(dest, source,
                                                  (start[0], int(position), start[2])))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.int4, jnp.uint4], ids=["int4", "uint4"])
@pytest.mark.parametrize("window,start", [((2, 4), (1, 2)), ((2, 3), (1, 2)), ((2, 4), (1, 3)),
                                          ((3, 10), (0, 0)), ((2, 1), (0, 9))],
                         ids=["even", "odd_extent", "odd_start", "full_rows", "last_nibble"])
def test_nibble_windows(window, start, dtype, backend):
    check((3, 10), window, start, dtype, backend, jit_start=False)
    check((3, 10), window, start, dtype, backend)


def test_nibble_even_windows_use_the_kernel_and_odd_ones_xla():
    dest = jax.ShapeDtypeStruct((3, 10), jnp.int4)
    even = bjax.plan(bjax.write_slice, dest, jax.ShapeDtypeStruct((2, 4), jnp.int4), (1, 2),
                     backend="interpret")
    odd = bjax.plan(bjax.write_slice, dest, jax.ShapeDtypeStruct((2, 3), jnp.int4), (1, 2),
                    backend="interpret")
    assert even.kernel == "bjax_write_slice" and odd.kernel == "lax.dynamic_update_slice (guarded)"


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients(backend):
    dest = random(0, (4, 9, 3), jnp.float64, scale=1.0)
    source = random(1, (4, 2, 3), jnp.float64, scale=1.0)
    dy = random(2, (4, 9, 3), jnp.float64, scale=1.0)
    lengths = jnp.array([0, 7, 8, 2])  # row 2 does not fit

    def f(dest, source):
        return bjax.write_slice(dest, source, (0, lengths, 0), backend=backend)

    _, vjp = jax.vjp(f, dest, source)
    d_dest, d_source = vjp(dy)
    written = oracles.write_slice(np.zeros(dest.shape), np.ones(source.shape), (0, lengths, 0))
    np.testing.assert_array_equal(d_dest, np.where(written == 1, 0.0, dy))
    fits = np.array([True, True, False, True])[:, None, None]
    expected = np.stack([np.asarray(dy)[r, p:p + 2] if ok else np.zeros((2, 3))
                         for r, (p, ok) in enumerate(zip([0, 7, 8, 2], fits[:, 0, 0]))])
    np.testing.assert_array_equal(d_source, expected)
    check_grads(f, (dest, source), order=1, modes=("rev",))
    check_grads(lambda d, s: bjax.write_slice(d, s, (1, 3, 0), backend=backend)[1:3] ** 2,
                (dest, source[:2]), order=1, modes=("rev",))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_dest_source_and_positions(backend):
    dest = random_bits(0, (3, 4, 8, 5), jnp.float32)
    source = random_bits(1, (3, 4, 2, 5), jnp.float32)
    positions = np.array([6, 0, 7])
    out = jax.vmap(lambda d, s, p: bjax.write_slice(d, s, (0, p, 0), backend=backend))(
        dest, source, jnp.asarray(positions))
    for b in range(3):
        assert_same_bits(out[b], oracles.write_slice(dest[b], source[b], (0, positions[b], 0)))
    # Batched positions only, on a per-row axis.
    lengths = np.array([[0, 6, 3, 7], [1, 1, 9, 2]])
    out = jax.vmap(lambda p: bjax.write_slice(dest[0], source[0], (0, p, 0), backend=backend))(
        jnp.asarray(lengths))
    for b in range(2):
        assert_same_bits(out[b], oracles.write_slice(dest[0], source[0], (0, lengths[b], 0)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_loop_with_the_cache_as_carry(backend):
    # Normal values: indexing tokens[i] in XLA may canonicalize NaN payloads.
    cache = random(0, (2, 12, 3, 4), jnp.bfloat16)
    tokens = random(1, (10, 2, 1, 3, 4), jnp.bfloat16)

    @jax.jit
    def decode(cache, tokens):
        def step(i, cache):
            return bjax.write_slice(cache, tokens[i], (0, i + 1, 0, 0), backend=backend)
        return lax.fori_loop(0, tokens.shape[0], step, cache)

    def scan_decode(cache, tokens):
        def step(cache, xs):
            i, token = xs
            return bjax.write_slice(cache, token, (0, i, 0, 0), backend=backend), None
        return lax.scan(step, cache, (jnp.arange(1, 11), tokens))[0]

    ref = np.array(cache)
    ref[:, 1:11] = np.moveaxis(np.asarray(tokens)[:, :, 0], 0, 1)
    assert_same_bits(decode(cache, tokens), ref)
    assert_same_bits(jax.jit(scan_decode)(cache, tokens), ref)


@pytest.mark.parametrize("backend", ["xla", KERNEL_BACKEND])
@pytest.mark.parametrize("per_row", [False, True], ids=["scalar", "per_row"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int4, jnp.float8_e4m3fn],
                         ids=lambda d: jnp.dtype(d).name)
def test_donated_dest_is_updated_in_place(dtype, backend, per_row):
    """The compiled program aliases dest to the output and holds no temporary anywhere near
    dest's size (memory_analysis, which sees copies that the HLO text may not name)."""
    if backend == "interpret":
        pytest.skip("in place is a property of compiled programs; the interpreter emulates")
    shape = (8, 256, 4, 64)
    dest = jnp.ones(shape, dtype)
    token = jnp.zeros((8, 1, 4, 64), dtype)
    position = jnp.arange(8) % 3 + 5 if per_row else jnp.int32(5)
    append = jax.jit(lambda c, t, p: bjax.write_slice(c, t, (0, p, 0, 0), backend=backend),
                     donate_argnums=0)
    compiled = append.lower(dest, token, position).compile()
    text = compiled.as_text()
    assert re.search(r"input_output_alias=\{ \{\}: \(0, \{\}, (may|must)-alias\) \}", text), \
        text[:2000]
    dest_bytes = dest.size * jnp.dtype(dtype).itemsize // (2 if dtype == jnp.int4 else 1)
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < dest_bytes // 16, (temp, dest_bytes)
    out = append(dest, token, position)
    assert dest.is_deleted()
    assert float(out[0, 5, 0, 0]) == 0 and float(out[0, 4, 0, 0]) == 1 and out.shape == shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkify_reports_the_out_of_range_position(backend):
    dest = jnp.zeros((3, 10, 4), jnp.float32)
    source = jnp.ones((3, 2, 4), jnp.float32)
    checked = checkify.checkify(jax.jit(
        lambda p: bjax.write_slice(dest, source, (0, p, 0), backend=backend)))
    err, _ = checked(jnp.array([1, 9, 0]))
    assert err.get() is not None
    assert re.search(r"start\[1\] = 9 \(window row 1\) is out of range \[0, 8\]", err.get())
    err, out = checked(jnp.array([1, 8, 0]))
    assert err.get() is None and float(out.sum()) == 3 * 2 * 4
    # Outside checkify the same call runs and drops the row.
    out = bjax.write_slice(dest, source, (0, jnp.array([1, 9, 0]), 0), backend=backend)
    assert float(out.sum()) == 2 * 2 * 4
    # ... and carries no effect, which would take jit's dispatch off its fast path.
    assert not jax.make_jaxpr(lambda p: bjax.write_slice(dest, source, (0, p, 0),
                                                         backend=backend))(1).effects


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkify_reports_under_vmap_and_in_a_loop(backend):
    dest = jnp.zeros((2, 3, 10, 4), jnp.float32)
    source = jnp.ones((2, 3, 2, 4), jnp.float32)

    def write(dest, source, p):
        return bjax.write_slice(dest, source, (0, p, 0), backend=backend)

    err, _ = checkify.checkify(jax.jit(jax.vmap(write)))(dest, source, jnp.array([3, 9]))
    assert re.search(r"start\[1\] = 9 \(window row 0\)", err.get())

    def decode(cache, p):
        return lax.fori_loop(0, 4, lambda i, c: write(c, source[0], p + 3 * i), cache)
    err, _ = checkify.checkify(jax.jit(decode))(dest[0], jnp.int32(0))
    assert re.search(r"start\[1\] = 9 \(window row 0\)", err.get())
    err, _ = checkify.checkify(jax.jit(decode))(dest[0], jnp.int32(-2))
    assert re.search(r"start\[1\] = -2 \(window row 0\)", err.get())


_D = jax.ShapeDtypeStruct((4, 10, 8), jnp.float32)
_S = jax.ShapeDtypeStruct((4, 2, 8), jnp.float32)


@pytest.mark.parametrize("dest,source,start,error,message", [
    (jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32), (),
     bjax.InvalidProblemError, r"dest must be an array of rank >= 1; got rank 0"),
    (_D, jax.ShapeDtypeStruct((4, 2), jnp.float32), (0, 0, 0), bjax.InvalidProblemError,
     r"source must be of dest's rank 3; got rank 2"),
    (_D, jax.ShapeDtypeStruct((4, 2, 8), jnp.bfloat16), (0, 0, 0), bjax.InvalidProblemError,
     r"source.dtype must be dest's dtype float32 \(no implicit casting\); got bfloat16"),
    (_D, jax.ShapeDtypeStruct((4, 11, 8), jnp.float32), (0, 0, 0), bjax.InvalidProblemError,
     r"source.shape\[1\] must be <= dest.shape\[1\] = 10"),
    (_D, _S, (0, 0), bjax.InvalidProblemError, r"start must be one entry per axis of dest \(3\); "
     r"got 2 entries"),
    (_D, _S, 5, bjax.InvalidProblemError, r"start must be a tuple or list"),
    (_D, _S, (0, -1, 0), bjax.InvalidProblemError,
     r"start\[1\] must be in \[0, 8\] so that the window of extent 2 fits dest.shape\[1\] = 10; "
     r"got -1"),
    (_D, _S, (0, 9, 0), bjax.InvalidProblemError, r"start\[1\] must be in \[0, 8\].*got 9"),
    (_D, _S, (0, 1.0, 0), bjax.InvalidProblemError, r"start\[1\] must be an integer.*got 1.0"),
    (_D, _S, (0, True, 0), bjax.InvalidProblemError, r"start\[1\] must be an integer.*got True"),
    (_D, _S, (0, jax.ShapeDtypeStruct((), jnp.float32), 0), bjax.InvalidProblemError,
     r"start\[1\] must be an integer.*got an array of dtype float32"),
    (_D, _S, (jax.ShapeDtypeStruct((4,), jnp.int32), 0, 0), bjax.InvalidProblemError,
     r"start\[0\] must be a scalar \(per-row position vectors are for axes other than 0\)"),
    (_D, _S, (0, jax.ShapeDtypeStruct((3,), jnp.int32), 0), bjax.InvalidProblemError,
     r"start\[1\] must be a scalar or a vector of length dest.shape\[0\] = 4; got an array of "
     r"shape \(3,\)"),
    (_D, _S, (0, jax.ShapeDtypeStruct((4, 1), jnp.int32), 0), bjax.InvalidProblemError,
     r"start\[1\] must be a scalar or a vector of length dest.shape\[0\] = 4"),
    (jax.ShapeDtypeStruct((4,), jnp.float4_e2m1fn), jax.ShapeDtypeStruct((2,), jnp.float4_e2m1fn),
     (0,), bjax.UnsupportedError, r"dest.dtype must be bool, an integer, float8, float or "
     r"complex dtype; got float4_e2m1fn"),
], ids=["rank0", "rank_mismatch", "dtype_mismatch", "window_too_big", "few_starts", "not_seq",
        "negative", "past_end", "float_start", "bool_start", "float_array", "vector_axis0",
        "vector_length", "matrix_start", "dtype"])
def test_bad_input_raises_at_trace_time(dest, source, start, error, message):
    with pytest.raises(error, match="write_slice: " + message):
        bjax.plan(bjax.write_slice, dest, source, start, backend="xla")
    # The op itself, traced, with array starts passed as traced arguments.
    entries = list(start) if isinstance(start, tuple) else start
    arrays = [e for e in entries if isinstance(e, jax.ShapeDtypeStruct)] \
        if isinstance(entries, list) else []

    def call(dest, source, *traced):
        traced = iter(traced)
        full = [next(traced) if isinstance(e, jax.ShapeDtypeStruct) else e for e in entries] \
            if isinstance(entries, list) else entries
        return bjax.write_slice(dest, source, full, backend="xla")

    with pytest.raises(error, match="write_slice: " + message):
        jax.eval_shape(call, dest, source, *arrays)


def test_plan_names_the_path():
    cache = jax.ShapeDtypeStruct((8, 512, 8, 128), jnp.bfloat16)
    token = jax.ShapeDtypeStruct((8, 1, 8, 128), jnp.bfloat16)
    p = bjax.plan(bjax.write_slice, cache, token, (0, jax.ShapeDtypeStruct((), jnp.int32), 0, 0),
                  backend="interpret")
    assert p.kernel == "bjax_write_slice" and p.descriptor.starts == (0, "scalar", 0, 0)
    assert p.block_config is not None and p.precision.deterministic
    view = p.descriptor.kernel_view()
    assert view.dest_shape == (8, 512 * 8 * 128) and view.window_shape == (8, 8 * 128)
    assert bjax.plan(bjax.write_slice, cache, cache, (0, 0, 0, 0), backend="xla").kernel \
        == "none (source replaces dest)"
    c64 = jax.ShapeDtypeStruct((4, 4), jnp.complex64)
    assert bjax.plan(bjax.write_slice, c64, c64, (0, 0), backend="interpret").kernel.startswith(
        "none")
    assert bjax.plan(bjax.write_slice, c64, jax.ShapeDtypeStruct((2, 4), jnp.complex64), (1, 0),
                     backend="interpret").kernel == "lax.dynamic_update_slice (guarded)"
    per_row = (0, jax.ShapeDtypeStruct((4,), jnp.int32))
    assert bjax.plan(bjax.write_slice, c64, jax.ShapeDtypeStruct((4, 2), jnp.complex64), per_row,
                     backend="xla").kernel.startswith("lax.dynamic_update_slice per row")


@pytest.mark.parametrize("start", [(1, 250, 0), (1, 301, 0), (3, 250, 0)],
                         ids=["fits", "axis1_out", "axis0_out"])
def test_large_window_through_the_kernel(start):
    # Windows over 1 MiB take the kernel on every kernel backend (smaller ones
    # with one position take dynamic_update_slice under "pallas").
    dest = jax.ShapeDtypeStruct((4, 600, 512), jnp.float32)
    window = jax.ShapeDtypeStruct((2, 300, 512), jnp.float32)
    traced = (jax.ShapeDtypeStruct((), jnp.int32),) * 3
    assert bjax.plan(bjax.write_slice, dest, window, traced,
                     backend=KERNEL_BACKEND).kernel == "bjax_write_slice"
    check(dest.shape, window.shape, start, jnp.float32, KERNEL_BACKEND)


def test_config_runs_the_kernel_even_where_the_heuristic_would_not():
    """A caller's config asks for the kernel: small windows, which Pallas otherwise hands
    to dynamic_update_slice, run it; a dtype it cannot view as bits is refused."""
    dest, src = jnp.zeros((4, 64, 8), jnp.float32), jnp.ones((4, 3, 8), jnp.float32)
    desc = bjax.plan(bjax.write_slice, dest, src, (0, 5, 0), backend="xla").descriptor
    assert desc.route("pallas") == "dus"
    assert desc.route("pallas", configured=True) == "kernel"
    with pytest.raises(bjax.UnsupportedError, match="config must be None for this call"):
        bjax.write_slice(dest.astype(bool), src.astype(bool), (0, 5, 0),
                         backend=KERNEL_BACKEND, config=TileConfig(1, 8, 1))
