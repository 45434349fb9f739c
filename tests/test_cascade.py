"""Cascade merge against the float64 oracle: values, empty states, mask, gradients, errors."""
import re
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import bjax
from bjax.cascade import LSE_BASES, LseBase
from tests import oracles
from tests.conftest import BACKENDS, KERNEL_BACKEND, FLOAT_DTYPES, assert_close, copies_of

BASES = (2, "e")
# Awkward extents: head_dim and heads off powers of two, single rows, a tile's edge.
SHAPES = [(7, 3, 80), (1, 1, 1), (33, 5, 128), (16, 4, 64)]


def states(seed, seq_len, num_states, num_heads, head_dim, dtype, spread=100.0):
    """Random v [S, K, H, D] in ``dtype`` and s [S, K, H] float32 (float64 for float64 v),
    with log-sum-exps differing by up to +-``spread``."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(seq_len, num_states, num_heads, head_dim)) * 3
    s = rng.uniform(-spread, spread, size=(seq_len, num_states, num_heads))
    s_dtype = np.float64 if dtype == jnp.float64 else np.float32
    return jnp.asarray(v, dtype), jnp.asarray(s, s_dtype)


def pair(v, s):
    return v[:, 0], s[:, 0], v[:, 1], s[:, 1]


def reference(v, s, base):
    return oracles.cascade_merge(np.asarray(v, np.float64), np.asarray(s, np.float64),
                                 base)


def bits(x):
    x = np.asarray(x)
    return x.view(np.dtype(f"uint{8 * x.dtype.itemsize}"))


# Every shape in float32 and bfloat16; every dtype at the first shape. Shapes exercise
# the tiling and masks, the same for every dtype; dtypes the rounding, the same for
# every shape.
PAIR_CASES = [(shape, dtype) for shape in SHAPES for dtype in FLOAT_DTYPES
              if shape == SHAPES[0] or dtype in (jnp.float32, jnp.bfloat16)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("shape, dtype", PAIR_CASES,
                         ids=[f"{s}-{jnp.dtype(d).name}" for s, d in PAIR_CASES])
def test_merge_state_matches_oracle(shape, dtype, base, backend):
    v, s = states(0, shape[0], 2, *shape[1:], dtype)
    ref_v, ref_s = reference(v, s, base)
    for in_place in (True, False):
        out_v, out_s = jax.jit(lambda *a: bjax.merge_state(
            *a, lse_base=base, in_place=in_place, backend=backend))(*pair(v, s))
        assert out_v.dtype == dtype and out_s.dtype == s.dtype
        assert_close(out_v, ref_v, dtype)
        assert_close(out_s, ref_s, s.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("num_states", [1, 3, 6])
def test_merge_states_matches_oracle(num_states, dtype, base, backend):
    v, s = states(1, 9, num_states, 5, 96, dtype)
    out_v, out_s = bjax.merge_states(v, s, lse_base=base, backend=backend)
    ref_v, ref_s = reference(v, s, base)
    assert out_v.shape == (9, 5, 96) and out_v.dtype == dtype and out_s.dtype == s.dtype
    assert_close(out_v, ref_v, dtype)
    assert_close(out_s, ref_s, s.dtype)


def _with_empty_states(dtype):
    """Three states of 8 rows: row r's empty pattern is r's bits (row 7: all empty);
    empty states hold NaN garbage in v and alternate -inf / +inf in s."""
    v, s = states(2, 8, 3, 2, 16, dtype)
    v, s = np.array(v), np.array(s)
    for r in range(8):
        for k in range(3):
            if r >> k & 1:
                v[r, k] = np.nan
                s[r, k] = -np.inf if (r + k) % 2 else np.inf
    s[1, 1] = -0.0  # a lone survivor's s comes back with its sign
    return jnp.asarray(v), jnp.asarray(s)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bfloat16", "float32"])
def test_empty_states_are_exact(dtype, backend):
    v, s = _with_empty_states(dtype)
    out_v, out_s = bjax.merge_states(v, s, backend=backend)
    ref_v, ref_s = reference(v, s, 2)
    assert not np.isnan(np.asarray(out_v, np.float32)).any()
    for r in range(8):
        alive = [k for k in range(3) if not r >> k & 1]
        if len(alive) == 1:  # the lone non-empty state, bit for bit
            np.testing.assert_array_equal(bits(out_v[r]), bits(v[r, alive[0]]))
            np.testing.assert_array_equal(bits(out_s[r]), bits(s[r, alive[0]]))
        elif not alive:  # empty with empty: (0, -inf)
            np.testing.assert_array_equal(np.asarray(out_v[r], np.float32), 0)
            np.testing.assert_array_equal(out_s[r], -np.inf)
        else:
            assert_close(out_v[r], ref_v[r], dtype)
            assert_close(out_s[r], ref_s[r], jnp.float32)
    # The pairwise op on the same patterns (states 0 and 1).
    out_v, out_s = bjax.merge_state(*pair(v, s), backend=backend)
    lone_a, lone_b = [r for r in range(8) if r & 3 == 2], [r for r in range(8) if r & 3 == 1]
    np.testing.assert_array_equal(bits(out_v[np.array(lone_a)]), bits(v[np.array(lone_a), 0]))
    np.testing.assert_array_equal(bits(out_v[np.array(lone_b)]), bits(v[np.array(lone_b), 1]))
    np.testing.assert_array_equal(bits(out_s[np.array(lone_b)]), bits(s[np.array(lone_b), 1]))
    both = np.array([r for r in range(8) if r & 3 == 3])
    np.testing.assert_array_equal(np.asarray(out_v[both], np.float32), 0)
    np.testing.assert_array_equal(out_s[both], -np.inf)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_non_empty_state_propagates(backend):
    v, s = states(3, 4, 2, 2, 8, jnp.float32)
    v = v.at[0, 1, 0, 3].set(jnp.nan)  # row 0: NaN in v_b
    s = s.at[1, 0, 1].set(jnp.nan)  # row 1: NaN in s_a
    out_v, out_s = bjax.merge_state(*pair(v, s), backend=backend)
    assert np.isnan(out_v[0, 0, 3]) and not np.isnan(out_s[0]).any()
    assert np.isnan(out_v[1, 1]).all() and np.isnan(out_s[1, 1])
    assert not np.isnan(out_v[2:]).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "fresh"])
@pytest.mark.parametrize("base", BASES)
def test_mask_keeps_a_where_false(base, in_place, backend):
    v, s = states(4, 6, 2, 3, 40, jnp.float32)
    v_a, s_a, v_b, s_b = pair(v, s)
    v_a = v_a.at[2].set(jnp.nan)  # a row the mask turns off is returned as it is
    mask = jnp.array([True, False, False, True, False, True])
    out_v, out_s = bjax.merge_state(v_a, s_a, v_b, s_b, mask=mask, lse_base=base,
                                    in_place=in_place, backend=backend)
    off = ~np.asarray(mask)
    np.testing.assert_array_equal(bits(out_v[off]), bits(v_a[off]))
    np.testing.assert_array_equal(bits(out_s[off]), bits(s_a[off]))
    ref_v, ref_s = reference(v, s, base)
    assert_close(out_v[~off], ref_v[~off], jnp.float32)
    assert_close(out_s[~off], ref_s[~off], jnp.float32)


def _grad_reference(v, s, dv, ds, base):
    return oracles.cascade_merge_grad(np.asarray(v, np.float64), np.asarray(s, np.float64),
                                      np.asarray(dv, np.float64), np.asarray(ds, np.float64),
                                      base)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float64],
                         ids=["float32", "bfloat16", "float64"])
def test_gradients_match_oracle(dtype, base, backend):
    v, s = states(5, 11, 3, 3, 24, dtype, spread=3.0)
    dv = jnp.asarray(np.random.default_rng(6).normal(size=(11, 3, 24)), dtype)
    ds = jnp.asarray(np.random.default_rng(7).normal(size=(11, 3)), s.dtype)
    ref_dv, ref_ds = _grad_reference(v.astype(jnp.float64), s, dv.astype(jnp.float64), ds, base)
    # The backward's dot products run over head_dim in the math dtype: a few
    # ulp of it on top of rounding the result, hence 4x the output tolerance.
    _, vjp = jax.vjp(lambda v, s: bjax.merge_states(v, s, lse_base=base, backend=backend), v, s)
    got_dv, got_ds = vjp((dv, ds))
    assert_close(got_dv, ref_dv, dtype)
    assert_close(got_ds, ref_ds, s.dtype, scale=4)
    # Pairwise: the first two states.
    ref_dv, ref_ds = _grad_reference(v[:, :2].astype(jnp.float64), s[:, :2],
                                     dv.astype(jnp.float64), ds, base)
    _, vjp = jax.vjp(lambda *a: bjax.merge_state(*a, lse_base=base, backend=backend),
                     *pair(v, s))
    d_va, d_sa, d_vb, d_sb = vjp((dv, ds))
    assert_close(d_va, ref_dv[:, 0], dtype)
    assert_close(d_vb, ref_dv[:, 1], dtype)
    assert_close(d_sa, ref_ds[:, 0], s.dtype, scale=4)
    assert_close(d_sb, ref_ds[:, 1], s.dtype, scale=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_at_empty_states_and_mask(backend):
    v, s = _with_empty_states(jnp.float32)
    dv = jnp.ones((8, 2, 16), jnp.float32)
    ds = jnp.full((8, 2), 0.5, jnp.float32)
    _, vjp = jax.vjp(lambda v, s: bjax.merge_states(v, s, backend=backend), v, s)
    got_dv, got_ds = vjp((dv, ds))
    ref_dv, ref_ds = _grad_reference(np.nan_to_num(np.asarray(v)), s, dv, ds, 2)
    empty = np.isinf(np.asarray(s))
    assert not np.isnan(got_dv).any() and not np.isnan(got_ds).any()
    np.testing.assert_array_equal(np.asarray(got_dv)[empty], 0)
    np.testing.assert_array_equal(np.asarray(got_ds)[empty], 0)
    assert_close(got_dv, ref_dv, jnp.float32)
    assert_close(got_ds, ref_ds, jnp.float32, scale=4)
    # mask: rows turned off pass (dv, ds) to a and nothing to b.
    mask = jnp.array([True, False] * 4)
    _, vjp = jax.vjp(lambda *a: bjax.merge_state(*a, mask=mask, backend=backend), *pair(v, s))
    d_va, d_sa, d_vb, d_sb = vjp((dv, ds))
    off = ~np.asarray(mask)
    np.testing.assert_array_equal(d_va[off], dv[off])
    np.testing.assert_array_equal(d_sa[off], ds[off])
    np.testing.assert_array_equal(d_vb[off], 0)
    np.testing.assert_array_equal(d_sb[off], 0)
    ref_dv, ref_ds = _grad_reference(np.nan_to_num(np.asarray(v[:, :2])), s[:, :2], dv, ds, 2)
    assert_close(d_vb[~off], ref_dv[~off, 1], jnp.float32)
    assert_close(d_sa[~off], ref_ds[~off, 0], jnp.float32, scale=4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", BASES)
def test_check_grads_float64(base, backend):
    v, s = states(8, 3, 3, 2, 5, jnp.float64, spread=2.0)
    check_grads(lambda v, s: bjax.merge_states(v, s, lse_base=base, backend=backend), (v, s),
                order=1, modes=["rev"])
    mask = jnp.array([True, False, True])
    check_grads(lambda *a: bjax.merge_state(*a, mask=mask, lse_base=base, backend=backend),
                pair(v, s), order=1, modes=["rev"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_jit_and_grad(backend):
    v, s = states(9, 4 * 5, 2, 3, 8, jnp.float32)
    v, s = v.reshape(4, 5, 2, 3, 8), s.reshape(4, 5, 2, 3)
    mask = jnp.asarray(np.random.default_rng(1).integers(0, 2, (4, 5)).astype(bool))
    merge = jax.jit(jax.vmap(lambda v, s, m: bjax.merge_state(*pair(v, s), mask=m,
                                                              backend=backend)))
    out_v, out_s = merge(v, s, mask)
    for i in range(4):
        want_v, want_s = bjax.merge_state(*pair(v[i], s[i]), mask=mask[i], backend=backend)
        np.testing.assert_allclose(out_v[i], want_v, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out_s[i], want_s, rtol=1e-6)
    many = jax.vmap(lambda v, s: bjax.merge_states(v, s, backend=backend), in_axes=(2, 2))
    out_v, out_s = many(v.transpose(1, 2, 0, 3, 4), s.transpose(1, 2, 0, 3))
    ref_v, ref_s = reference(v.reshape(20, 2, 3, 8), s.reshape(20, 2, 3), 2)
    assert_close(out_v, ref_v.reshape(4, 5, 3, 8), jnp.float32)
    assert_close(out_s, ref_s.reshape(4, 5, 3), jnp.float32)
    grad = jax.jit(jax.grad(lambda v: bjax.merge_states(v, s[0], backend=backend)[0].sum()))
    ref_dv, _ = _grad_reference(v[0], s[0], np.ones((5, 3, 8)), np.zeros((5, 3)), 2)
    assert_close(grad(v[0]), ref_dv, jnp.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sequence(backend):
    v, s = states(0, 0, 3, 2, 8, jnp.float32)
    out_v, out_s = bjax.merge_states(v, s, backend=backend)
    assert out_v.shape == (0, 2, 8) and out_s.shape == (0, 2)
    out_v, out_s = bjax.merge_state(*pair(v, s), backend=backend)
    assert out_v.shape == (0, 2, 8) and out_s.shape == (0, 2)
    grads = jax.grad(lambda v: bjax.merge_states(v, s, backend=backend)[0].sum())(v)
    assert grads.shape == v.shape


def _aliased_outputs(compiled_text):
    """Output indices the compiled program writes over a parameter of the same index."""
    return [i for i in (0, 1) if re.search(
        rf"input_output_alias=\{{[^\n]*\{{{i}\}}: \({i}, \{{\}}, (may|must)-alias\)",
        compiled_text)]


@pytest.mark.parametrize("backend", ["xla", KERNEL_BACKEND])
def test_donated_state_is_merged_in_place(backend):
    if backend == "interpret":
        pytest.skip("in place is a property of compiled programs; the interpreter emulates")
    v, s = states(10, 64, 2, 8, 128, jnp.bfloat16)
    merge = jax.jit(lambda *a: bjax.merge_state(*a, in_place=True, backend=backend),
                    donate_argnums=(0, 1))
    v_a, s_a, v_b, s_b = pair(v, s)
    text = merge.lower(v_a, s_a, v_b, s_b).compile().as_text()
    # merged v over v_a (parameter 0), merged s over s_a (parameter 1), no copy of v_a
    assert _aliased_outputs(text) == [0, 1], text[:1500]
    assert not copies_of(text, (64, 8, 128), jnp.bfloat16)
    ref_v, _ = reference(v, s, 2)
    out_v, _ = merge(v_a, s_a, v_b, s_b)
    assert v_a.is_deleted() and s_a.is_deleted()
    assert_close(out_v, ref_v, jnp.bfloat16)


@pytest.mark.skipif(KERNEL_BACKEND != "pallas", reason="compiled kernels only")
def test_fresh_output_by_default_and_under_grad():
    v, s = states(11, 64, 2, 8, 128, jnp.bfloat16)
    args = pair(v, s)
    text = jax.jit(lambda *a: bjax.merge_state(*a)).lower(*args).compile().as_text()
    assert not copies_of(text, (64, 8, 128), jnp.bfloat16) and not _aliased_outputs(text)
    # Without donation an in-place kernel makes XLA copy v_a first.
    in_place = jax.jit(lambda *a: bjax.merge_state(*a, in_place=True))
    assert copies_of(in_place.lower(*args).compile().as_text(), (64, 8, 128), jnp.bfloat16)
    # Under grad, v_a is a residual: the forward must not write over it.
    grad = jax.jit(jax.grad(
        lambda *a: bjax.merge_state(*a, in_place=True)[0].astype(jnp.float32).sum(),
        argnums=(0, 2)))
    assert not copies_of(grad.lower(*args).compile().as_text(), (64, 8, 128), jnp.bfloat16)


_V = jax.ShapeDtypeStruct((4, 2, 8), jnp.float32)
_S = jax.ShapeDtypeStruct((4, 2), jnp.float32)


@pytest.mark.parametrize("args,kwargs,error,message", [
    ((_V, _S, jax.ShapeDtypeStruct((4, 2, 16), jnp.float32), _S), {}, bjax.InvalidProblemError,
     r"merge_state: v_b.shape must be \(4, 2, 8\) to match v_a \(4, 2, 8\); got \(4, 2, 16\)"),
    ((_V, jax.ShapeDtypeStruct((4, 3), jnp.float32), _V, _S), {}, bjax.InvalidProblemError,
     r"merge_state: s_a.shape must be \(4, 2\) to match v_a \(4, 2, 8\); got \(4, 3\)"),
    ((_V, _S, jax.ShapeDtypeStruct((4, 2, 8), jnp.bfloat16), _S), {}, bjax.InvalidProblemError,
     r"merge_state: v_b.dtype must be float32 \(v_a's dtype\); got bfloat16"),
    ((_V, jax.ShapeDtypeStruct((4, 2), jnp.bfloat16), _V, _S), {}, bjax.InvalidProblemError,
     r"merge_state: s_a.dtype must be float32 \(a log-sum-exp, with v in float32\); "
     r"got bfloat16"),
    ((_V, _S, _V, jax.ShapeDtypeStruct((4, 2), jnp.float64)), {}, bjax.InvalidProblemError,
     r"merge_state: s_b.dtype must be float32 \(s_a's dtype\); got float64"),
    ((jax.ShapeDtypeStruct((4, 2, 8), jnp.int32), _S, jax.ShapeDtypeStruct((4, 2, 8), jnp.int32),
      _S), {}, bjax.UnsupportedError,
     r"merge_state: v_a.dtype must be float16, bfloat16, float32 or float64; got int32"),
    ((jax.ShapeDtypeStruct((4, 8), jnp.float32), _S, _V, _S), {}, bjax.InvalidProblemError,
     r"merge_state: v_a must be an array of rank 3 \[seq_len, num_heads, head_dim\]; "
     r"got shape \(4, 8\)"),
    ((jax.ShapeDtypeStruct((4, 2, 0), jnp.float32), _S, jax.ShapeDtypeStruct((4, 2, 0),
                                                                           jnp.float32), _S),
     {}, bjax.InvalidProblemError, r"merge_state: v_a.shape must be num_heads >= 1 and "
     r"head_dim >= 1; got \(4, 2, 0\)"),
    ((_V, _S, _V, _S), {"mask": jax.ShapeDtypeStruct((4,), jnp.int32)}, bjax.InvalidProblemError,
     r"merge_state: mask must be None or a bool array of shape \(4,\) \(seq_len\); "
     r"got int32 of shape \(4,\)"),
    ((_V, _S, _V, _S), {"mask": jax.ShapeDtypeStruct((5,), jnp.bool_)}, bjax.InvalidProblemError,
     r"merge_state: mask must be None or a bool array of shape \(4,\).*got bool of shape \(5,\)"),
    ((_V, _S, _V, _S), {"lse_base": 2.718281828459045}, bjax.InvalidProblemError,
     r"merge_state: lse_base must be 2 \(FlashInfer's log2-sum-exp\) or 'e' \(flash-attn's, "
     r"vLLM's\); got 2.718281828459045"),
    ((_V, _S, _V, _S), {"lse_base": "2"}, bjax.InvalidProblemError,
     r"merge_state: lse_base must be 2 .*; got '2'"),
    ((_V, _S, _V, _S), {"in_place": 1}, bjax.InvalidProblemError,
     r"merge_state: in_place must be a bool; got 1"),
], ids=["v_shape", "s_shape", "v_dtype", "s_dtype", "s_dtypes_differ", "integer_v", "rank",
        "zero_head_dim", "mask_dtype", "mask_shape", "base_float", "base_string", "in_place"])
def test_merge_state_bad_input_raises_at_trace_time(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        bjax.plan(bjax.merge_state, *args, backend="xla", **kwargs)
    mask = kwargs.pop("mask", None)
    with pytest.raises(error, match=message):
        jax.eval_shape(lambda *a: bjax.merge_state(*a[:4], mask=a[4], backend="xla", **kwargs),
                       *args, mask)


@pytest.mark.parametrize("v,s,kwargs,error,message", [
    (jax.ShapeDtypeStruct((4, 3, 2, 8), jnp.float32), jax.ShapeDtypeStruct((4, 2, 2), jnp.float32),
     {}, bjax.InvalidProblemError,
     r"merge_states: s.shape must be \(4, 3, 2\) to match v \(4, 3, 2, 8\); got \(4, 2, 2\)"),
    (jax.ShapeDtypeStruct((4, 0, 2, 8), jnp.float32), jax.ShapeDtypeStruct((4, 0, 2), jnp.float32),
     {}, bjax.InvalidProblemError, r"merge_states: v.shape\[1\] \(num_index_sets\) must be >= 1; "
     r"got 0"),
    (jax.ShapeDtypeStruct((4, 3, 2, 8), jnp.float16), jax.ShapeDtypeStruct((4, 3, 2), jnp.float16),
     {}, bjax.InvalidProblemError, r"merge_states: s.dtype must be float32"),
    (jax.ShapeDtypeStruct((4, 2, 8), jnp.float32), jax.ShapeDtypeStruct((4, 2), jnp.float32),
     {}, bjax.InvalidProblemError, r"merge_states: v must be an array of rank 4 "
     r"\[seq_len, num_index_sets, num_heads, head_dim\]; got shape \(4, 2, 8\)"),
    (jax.ShapeDtypeStruct((4, 3, 2, 8), jnp.bool_), jax.ShapeDtypeStruct((4, 3, 2), jnp.float32),
     {}, bjax.UnsupportedError, r"merge_states: v.dtype must be float16, bfloat16, float32 or "
     r"float64; got bool"),
    (jax.ShapeDtypeStruct((4, 3, 2, 8), jnp.float32), jax.ShapeDtypeStruct((4, 3, 2), jnp.float32),
     {"lse_base": 10}, bjax.InvalidProblemError, r"merge_states: lse_base must be 2"),
], ids=["s_shape", "no_index_sets", "s_dtype", "rank", "bool_v", "base"])
def test_merge_states_bad_input_raises_at_trace_time(v, s, kwargs, error, message):
    with pytest.raises(error, match=message):
        bjax.plan(bjax.merge_states, v, s, backend="xla", **kwargs)
    with pytest.raises(error, match=message):
        jax.eval_shape(lambda v, s: bjax.merge_states(v, s, backend="xla", **kwargs), v, s)


def test_plan_names_the_kernel():
    plan = bjax.plan(bjax.merge_states, jax.ShapeDtypeStruct((16384, 4, 32, 128), jnp.bfloat16),
                     jax.ShapeDtypeStruct((16384, 4, 32), jnp.float32), backend="interpret")
    assert plan.kernel == "bjax_merge_states" and plan.precision.accumulator == "float32"
    tile = plan.block_config.forward
    assert plan.config_source == "heuristic"
    assert tile.block_rows * tile.block_cols * 128 == 4096
    plan = bjax.plan(bjax.merge_state, _V, _S, _V, _S, lse_base="e", backend="xla")
    assert plan.kernel == "bjax.xla.cascade.merge_pair" and plan.descriptor.lse_base == "e"


def test_lse_base_type_names_every_base():
    """The type hint offers exactly the bases the merges accept."""
    assert typing.get_args(LseBase) == LSE_BASES
