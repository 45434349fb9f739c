"""Packed sequences by ``cu_seqlens``: ``ssd_chunk_scan`` and ``causal_conv1d`` return every
sequence's final state (``return_varlen_states``), checked against the float64 oracles run
on each sequence alone, with gradients; the Mamba-2 mixer continues every sequence."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bjax
from tests import oracles
from tests.conftest import BACKENDS, KERNEL_BACKEND, assert_close, random
from tests.test_ssd import (CHUNK, GRAD_BOUND, SCALE, features, problem,
                            state_passing_config)

# Steps 0..69 of one row, chunks of 16: an empty sequence first, one ending on a chunk's
# last step, one of a single step, an empty one in the middle, one across three chunks,
# and three steps past the last boundary (a segment without a returned state).
LENGTH = 70
CU_SEQLENS = (0, 0, 16, 17, 40, 40, 67)


def _sequences(cu):
    return list(zip(cu[:-1], cu[1:]))


def _seq_idx(cu, length):
    ids = np.searchsorted(np.asarray(cu[1:]), np.arange(length), side="right")
    return jnp.asarray(ids[None], jnp.int32)


def _ssd_oracle(x, dt, A, B, C, cu, **kwargs):
    """``(y, varlen_states)`` in float64: y of the packed row, and each sequence's final
    state from the oracle run on that sequence alone (the one at step 0 from the initial
    state; an empty one's is 0)."""
    init = kwargs.pop("initial_states", None)
    y, _ = oracles.ssd_scan(x, dt, A, B, C, seq_idx=_seq_idx(cu, x.shape[1]),
                            initial_states=init, **kwargs)
    states = []
    for start, end in _sequences(cu):
        if start == end:
            states.append(jnp.zeros((*x.shape[2:], B.shape[-1]), jnp.float64))
            continue
        part = {k: (v[:, start:end] if k == "z" else v) for k, v in kwargs.items()}
        _, final = oracles.ssd_scan(x[:, start:end], dt[:, start:end], A, B[:, start:end],
                                    C[:, start:end], initial_states=init if start == 0 else None,
                                    **part)
        states.append(final[0])
    return y, jnp.stack(states)


def _ssd(backend, cu, **static):
    def run(x, dt, A, B, C, **kwargs):
        return bjax.ssd_chunk_scan(x, dt, A, B, C, chunk_size=CHUNK, cu_seqlens=jnp.array(cu),
                                   return_varlen_states=True, backend=backend, **kwargs,
                                   **static)
    return run


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_ssd_varlen_states_match_each_sequence_alone(dtype, backend):
    x, dt, A, B, C = problem(40, 1, LENGTH, 4, 8, 2, 16, dtype)
    kwargs = features(41, x, 16, ("D", "z", "dt", "init"))
    static = {k: kwargs.pop(k) for k in ("dt_softplus", "dt_limit")}
    y, states = jax.jit(_ssd(backend, CU_SEQLENS, **static))(x, dt, A, B, C, **kwargs)
    want_y, want_states = _ssd_oracle(x, dt, A, B, C, CU_SEQLENS, **kwargs, **static)
    assert states.dtype == jnp.float32 and states.shape == (6, 4, 8, 16)
    assert_close(y, want_y, dtype, SCALE[jnp.dtype(dtype)])
    assert_close(states, want_states, dtype, SCALE[jnp.dtype(dtype)])
    assert not np.asarray(states)[[0, 4]].any()          # the empty sequences


# The kernels walk the states at this size; "passed" forces them passed along (the
# states' cotangents enter each chunk's own term of the state gradient).
VARLEN_GRADIENT_RUNS = [(backend, False) for backend in BACKENDS] + [(KERNEL_BACKEND, True)]


@pytest.mark.parametrize("backend, passed", VARLEN_GRADIENT_RUNS,
                         ids=lambda v: v if isinstance(v, str) else ("passed" if v else "walked"))
def test_ssd_varlen_gradients(backend, passed):
    """<y, gy> + <varlen_states, gs> against autodiff of the float64 oracles."""
    x, dt, A, B, C = problem(42, 1, LENGTH, 4, 8, 2, 16, jnp.float32)
    kwargs = features(43, x, 16, ("D", "dt", "init"))
    static = {k: kwargs.pop(k) for k in ("dt_softplus", "dt_limit")}
    args = dict(x=x, dt=dt, A=A, B=B, C=C, **kwargs)
    gy = random(1, x.shape, jnp.float64, scale=1.0)
    gs = random(2, (6, 4, 8, 16), jnp.float64, scale=1.0)

    def grads(fn, args):
        def loss(args):
            y, states = fn(**args)
            return jnp.sum(y.astype(jnp.float64) * gy) + jnp.sum(states * gs)
        return jax.jit(jax.grad(loss))(args)

    if passed:
        static["config"] = state_passing_config(CHUNK, 8, 16, 2, jnp.float32)
    mine = grads(_ssd(backend, CU_SEQLENS, **static), args)
    static.pop("config", None)
    ref = grads(lambda **a: _ssd_oracle(**a, cu=CU_SEQLENS, **static),
                {k: jnp.asarray(v, jnp.float64) for k, v in args.items()})
    for name in args:
        out, want = np.asarray(mine[name], np.float64), np.asarray(ref[name])
        error = np.linalg.norm(out - want) / np.linalg.norm(want)
        assert error <= GRAD_BOUND[jnp.dtype(jnp.float32)], (name, error)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_varlen_states_match_each_sequence_alone(backend):
    k = 4
    x = random(44, (1, LENGTH, 24), jnp.float32, scale=1.0)
    weight = random(45, (24, k), jnp.float32, scale=1.0)
    init = random(46, (1, k - 1, 24), jnp.float32, scale=1.0)
    y, states = jax.jit(lambda x, w, i: bjax.causal_conv1d(
        x, w, activation="silu", initial_states=i, cu_seqlens=jnp.array(CU_SEQLENS),
        return_varlen_states=True, backend=backend))(x, weight, init)
    want_y = oracles.causal_conv1d(x, weight, activation="silu", initial_states=init,
                                   seq_idx=_seq_idx(CU_SEQLENS, LENGTH))
    assert_close(y, want_y, jnp.float32)
    # Each sequence's last k - 1 rows, zeros before its start (the initial rows before
    # the one at row 0), copied exactly.
    rows = np.concatenate([np.asarray(init[0]), np.asarray(x[0])])
    for i, (start, end) in enumerate(_sequences(CU_SEQLENS)):
        want = np.zeros((k - 1, 24), np.float32)
        if end > start:
            first = 0 if start == 0 else start + k - 1
            taken = rows[max(first, end):end + k - 1]
            want[k - 1 - len(taken):] = taken
        np.testing.assert_array_equal(states[i], want)


def test_conv_varlen_state_gradient_reaches_the_rows_it_copied():
    k = 3
    x = random(47, (1, LENGTH, 8), jnp.float32, scale=1.0)
    weight = jnp.ones((8, k), jnp.float32)
    g = random(48, (6, k - 1, 8), jnp.float32, scale=1.0)
    dx = jax.grad(lambda x: jnp.sum(g * bjax.causal_conv1d(
        x, weight, cu_seqlens=jnp.array(CU_SEQLENS), return_varlen_states=True,
        backend="xla")[1]))(x)
    want = np.zeros(x.shape, np.float32)
    for i, (start, end) in enumerate(_sequences(CU_SEQLENS)):
        for j, row in enumerate(range(end - (k - 1), end)):
            if end > start and row >= start:
                want[0, row] += g[i, j]
    np.testing.assert_array_equal(dx, want)


@pytest.mark.parametrize("change, message", [
    (dict(seq_idx=jnp.zeros((1, 20), jnp.int32)), "seq_idx must be None with cu_seqlens"),
    (dict(cu_seqlens=jnp.array([0.0, 20.0])), "cu_seqlens.dtype must be an integer dtype"),
    (dict(cu_seqlens=jnp.array([[0, 20]])), "cu_seqlens must be a vector"),
    (dict(cu_seqlens=None), "return_varlen_states must be False without cu_seqlens"),
    (dict(batch=2), r"x.shape\[0\] must be 1 with cu_seqlens"),
], ids=["with_seq_idx", "float", "matrix", "no_cu_seqlens", "batch"])
def test_errors(change, message):
    change = dict(change)
    batch = change.pop("batch", 1)
    x, dt, A, B, C = problem(49, batch, 20, 2, 4, 1, 4, jnp.float32)
    kwargs = {"cu_seqlens": jnp.array([0, 7, 20]), "return_varlen_states": True, **change}
    with pytest.raises(bjax.InvalidProblemError, match="ssd_chunk_scan: " + message):
        bjax.ssd_chunk_scan(x, dt, A, B, C, chunk_size=16, **kwargs)
    with pytest.raises(bjax.InvalidProblemError, match="causal_conv1d: " + message):
        bjax.causal_conv1d(x[..., 0, :], jnp.ones((4, 3)), **kwargs)
