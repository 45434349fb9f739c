"""Mamba-2 SSD against the float64 step-by-step oracle: every feature, dtypes, step, errors."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import bjax
from pallas_kernels import ssd as pk
from pallas_kernels import ssd_backward as pkb
from pallas_kernels.blocks import padded
from tests import oracles
from tests.conftest import BACKENDS, KERNEL_BACKEND, assert_close, random, uniform

DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)
# Tolerance multipliers of conftest.RTOL: matmul operands (B * weights, C . B
# products, stored bf16 chunk states) are rounded to the input dtype before
# their float32 accumulation, so a 16-bit output carries about two roundings.
SCALE = {jnp.dtype(jnp.float32): 5.0, jnp.dtype(jnp.float16): 2.0,
         jnp.dtype(jnp.bfloat16): 2.0}
CHUNK = 16


def problem(seed, batch, seq_len, heads, head_dim, groups, state_dim, dtype):
    """Random (x, dt, A, B, C): dt in [0.01, 0.3], A in [-4, -0.5] (never zeros)."""
    x = random((seed, 0), (batch, seq_len, heads, head_dim), dtype, scale=1.0)
    dt = uniform((seed, 1), (batch, seq_len, heads), 0.01, 0.3, dtype)
    A = -uniform((seed, 2), (heads,), 0.5, 4.0, jnp.float32)
    B = random((seed, 3), (batch, seq_len, groups, state_dim), dtype, scale=1.0)
    C = random((seed, 4), (batch, seq_len, groups, state_dim), dtype, scale=1.0)
    return x, dt, A, B, C


def features(seed, x, state_dim, names):
    """Keyword arguments for the features in ``names`` (random, never zeros)."""
    batch, seq_len, heads, head_dim = x.shape
    kwargs = {}
    if "D" in names:
        kwargs["D"] = random((seed, 5), (heads,), jnp.float32, scale=1.0)
    if "D2" in names:
        kwargs["D"] = random((seed, 5), (heads, head_dim), jnp.float32, scale=1.0)
    if "z" in names:
        kwargs["z"] = random((seed, 6), x.shape, x.dtype, scale=1.0)
    if "dt" in names:
        kwargs.update(dt_bias=uniform((seed, 7), (heads,), -3.0, -1.0, jnp.float32),
                      dt_softplus=True, dt_limit=(0.02, 0.2))
    if "init" in names:
        kwargs["initial_states"] = random((seed, 8), (batch, heads, head_dim, state_dim),
                                          jnp.float32, scale=1.0)
    if "seq_idx" in names:
        # Several segments per row, one boundary on a chunk edge, ids not sorted.
        cuts = sorted({1, CHUNK, seq_len // 2, seq_len - 2} & set(range(1, seq_len)))
        ids = np.zeros(seq_len, np.int32)
        for i, cut in enumerate(cuts):
            ids[cut:] = (i + 1) * (-1) ** i
        kwargs["seq_idx"] = jnp.asarray(np.stack([ids, np.roll(ids, 3)])[:batch])
    return kwargs


def check(x, dt, A, B, C, backend, chunk_size=CHUNK, config=None, **kwargs):
    y, final = jax.jit(lambda *a: bjax.ssd_chunk_scan(
        *a, chunk_size=chunk_size, return_final_states=True, backend=backend, config=config,
        **kwargs))(
        x, dt, A, B, C)
    ref_y, ref_final = oracles.ssd_scan(x, dt, A, B, C, **kwargs)
    assert y.dtype == x.dtype and final.dtype == jnp.float32
    assert_close(y, ref_y, x.dtype, SCALE[jnp.dtype(x.dtype)])
    # The state sums dt x B^T with B * dt rounded to the input dtype: its tolerance is x's.
    assert_close(final, ref_final, x.dtype, SCALE[jnp.dtype(x.dtype)])


# Every length in float32; the 16-bit dtypes at one step and at a partial last chunk.
# Lengths exercise masking and chunk edges, the same code for every dtype; dtypes
# exercise rounding, the same at every length.
LENGTH_CASES = ([(seq_len, jnp.float32) for seq_len in (1, 7, CHUNK, CHUNK + 1, 3 * CHUNK - 5)]
                + [(seq_len, dtype) for dtype in (jnp.float16, jnp.bfloat16)
                   for seq_len in (1, 3 * CHUNK - 5)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seq_len, dtype", LENGTH_CASES,
                         ids=[f"{n}-{jnp.dtype(d).name}" for n, d in LENGTH_CASES])
def test_lengths_and_dtypes(seq_len, dtype, backend):
    check(*problem(seq_len, 2, seq_len, 4, 8, 2, 16, dtype), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups", [1, 2, 6])
def test_groups(groups, backend):
    check(*problem(groups, 2, 2 * CHUNK + 3, 6, 16, groups, 32, jnp.float32), backend)


FEATURE_SETS = [("D",), ("D2",), ("z",), ("dt",), ("init",), ("seq_idx",),
                ("D2", "z", "dt", "init", "seq_idx")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("names", FEATURE_SETS, ids="+".join)
def test_features(names, backend):
    x, dt, A, B, C = problem(3, 2, 3 * CHUNK - 5, 4, 8, 2, 16, jnp.float32)
    check(x, dt, A, B, C, backend, **features(4, x, 16, names))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
def test_all_features_16bit(dtype, backend):
    x, dt, A, B, C = problem(5, 2, 2 * CHUNK + 9, 4, 16, 1, 16, dtype)
    check(x, dt, A, B, C, backend, **features(6, x, 16, FEATURE_SETS[-1]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 40, 3, 7, 1, 5), (2, 70, 2, 80, 2, 130)], ids=str)
def test_awkward_dims_and_larger_chunk(shape, backend):
    """head_dim / state_dim off powers of two and over a 64-column block; chunk 32."""
    check(*problem(7, *shape, jnp.float32), backend, chunk_size=32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_largest_dims(dtype, backend):
    """head_dim = state_dim = 256 (the largest accepted), two heads per group."""
    check(*problem(18, 1, 70, 2, 256, 1, 256, dtype), backend, chunk_size=64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strongly_negative_A_stays_finite(backend):
    """Decays of exp(-1e4 * dt) on a partial last chunk: every exponent is masked
    before exp, so no inf * 0 reaches the output."""
    x, dt, _, B, C = problem(8, 1, 2 * CHUNK + 5, 2, 8, 1, 16, jnp.bfloat16)
    A = jnp.array([-1e4, -30.0], jnp.float32)
    y = bjax.ssd_chunk_scan(x, dt * 10, A, B, C, chunk_size=CHUNK, backend=backend)
    assert np.isfinite(np.asarray(y, np.float32)).all()
    ref, _ = oracles.ssd_scan(x, dt * 10, A, B, C)
    assert_close(y, ref, jnp.bfloat16, SCALE[jnp.dtype(jnp.bfloat16)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_sizes_agree(backend):
    x, dt, A, B, C = problem(9, 1, 70, 2, 16, 1, 16, jnp.float32)
    ys = [bjax.ssd_chunk_scan(x, dt, A, B, C, chunk_size=q, backend=backend) for q in (16, 64)]
    np.testing.assert_allclose(np.asarray(ys[0]), np.asarray(ys[1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sequence_and_batch(backend):
    for batch, seq_len in ((2, 0), (0, 5)):
        x, dt, A, B, C = problem(0, batch, seq_len, 2, 8, 1, 16, jnp.float32)
        init = jnp.ones((batch, 2, 8, 16), jnp.float32)
        y, final = bjax.ssd_chunk_scan(x, dt, A, B, C, chunk_size=CHUNK, initial_states=init,
                                       return_final_states=True, backend=backend)
        assert y.shape == x.shape and np.array_equal(final, init)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    x, dt, A, B, C = problem(10, 2, 40, 4, 16, 2, 16, jnp.bfloat16)
    run = jax.jit(lambda *a: bjax.ssd_chunk_scan(*a, chunk_size=CHUNK, backend=backend,
                                                 return_final_states=True))
    first, second = run(x, dt, A, B, C), run(x, dt, A, B, C)
    for a, b in zip(first, second):
        assert np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap(backend):
    x, dt, A, B, C = problem(11, 3, 20, 2, 8, 1, 16, jnp.float32)
    fn = lambda x, dt, B, C: bjax.ssd_chunk_scan(x, dt, A, B, C, chunk_size=CHUNK,  # noqa: E731
                                                 backend=backend)
    # Map over the head axis of x / dt (as a leading batch of single-head problems)
    # and over the batch axis.
    out = jax.vmap(fn, in_axes=(0, 0, 0, 0))(x[:, None], dt[:, None], B[:, None], C[:, None])
    ref, _ = oracles.ssd_scan(x, dt, A, B, C)
    assert_close(out[:, 0], ref, jnp.float32, SCALE[jnp.dtype(jnp.float32)])


DIFFERENTIABLE = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


def gradients(fn, args, seed):
    """Gradients of ``<y, gy> + <final, gf>`` (random cotangents) for every entry of ``args``."""
    y_shape = args["x"].shape
    final_shape = (*y_shape[:1], *y_shape[2:], args["B"].shape[-1])
    gy = random(seed, y_shape, jnp.float64, scale=1.0)
    gf = random(seed + 1, final_shape, jnp.float64, scale=1.0)

    def loss(args):
        y, final = fn(**args)
        return (jnp.sum(y.astype(jnp.float64) * gy)
                + jnp.sum(final.astype(jnp.float64) * gf))
    return jax.jit(jax.grad(loss))(args)


def gradient_errors(x, dt, A, B, C, backend, chunk_size=CHUNK, config=None, **kwargs) -> dict:
    """Relative norm error of every gradient against autodiff of the float64 oracle (each
    gradient checked for its dtype and finiteness on the way)."""
    args = {"x": x, "dt": dt, "A": A, "B": B, "C": C,
            **{k: v for k, v in kwargs.items() if k in DIFFERENTIABLE}}
    static = {k: v for k, v in kwargs.items() if k not in DIFFERENTIABLE}
    mine = gradients(lambda **a: bjax.ssd_chunk_scan(
        **a, chunk_size=chunk_size, return_final_states=True, backend=backend, config=config,
        **static), args, 1)
    ref = gradients(lambda **a: oracles.ssd_scan(**a, **static),
                    {k: jnp.asarray(v, jnp.float64) for k, v in args.items()}, 1)
    errors = {}
    for name in args:
        assert mine[name].dtype == args[name].dtype, name
        out, want = np.asarray(mine[name], np.float64), np.asarray(ref[name])
        assert np.isfinite(out).all(), name
        errors[name] = np.linalg.norm(out - want) / np.linalg.norm(want)
    return errors


def check_gradients(x, dt, A, B, C, backend, dtype_bound, chunk_size=CHUNK, config=None,
                    **kwargs):
    """Every gradient against autodiff of the float64 oracle, by relative norm error."""
    for name, error in gradient_errors(x, dt, A, B, C, backend, chunk_size, config,
                                       **kwargs).items():
        assert error <= dtype_bound, (name, error)


# Relative norm error of the gradients. float32: accumulation over the sequence,
# exponentials of cumulative sums and the reverse cumsum of the decay gradient (whose
# terms cancel) cost a few hundred float32 ulp at most (measured: under 1e-6; dA, the
# gradient that carries the cancellation, up to 2.4e-5 in the GPU sweep, which bounds it
# on its own).
# 16-bit: dy and the matmul operands are rounded to the input dtype, and each gradient
# is returned in it: about four roundings of 2^-8 (bf16) / 2^-11 (f16) (measured: 1.4
# and 1.1 ulp).
GRAD_BOUND = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 4 * 2**-8,
              jnp.dtype(jnp.float16): 4 * 2**-11}


# No feature, D alone (the [heads] form) and every other feature at once: each feature's
# own gradient code runs in the last set (test_features checks each one's forward alone).
GRADIENT_FEATURE_SETS = [(), ("D",), FEATURE_SETS[-1]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("names", GRADIENT_FEATURE_SETS, ids=lambda n: "+".join(n) or "plain")
def test_gradients(names, backend):
    x, dt, A, B, C = problem(19, 2, 3 * CHUNK - 5, 4, 8, 2, 16, jnp.float32)
    check_gradients(x, dt, A, B, C, backend, GRAD_BOUND[jnp.dtype(jnp.float32)],
                    **features(20, x, 16, names))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
def test_gradients_16bit(dtype, backend):
    x, dt, A, B, C = problem(21, 2, 2 * CHUNK + 9, 4, 16, 1, 16, dtype)
    check_gradients(x, dt, A, B, C, backend, GRAD_BOUND[jnp.dtype(dtype)],
                    **features(22, x, 16, FEATURE_SETS[-1]))


# Kernel backend only here and in test_gradients_largest_dims: these shapes exercise the
# kernels' blocks of head_dim, state_dim and heads; the XLA backend (autodiff of whole-array
# einsums) has none, and its gradients run in the tests above.
@pytest.mark.parametrize("shape", [(1, 40, 3, 7, 1, 5, 16), (1, 70, 4, 80, 2, 130, 32),
                                   (2, 33, 6, 8, 6, 16, 16), (1, 50, 8, 16, 1, 16, 16)],
                         ids=str)
def test_gradients_shapes(shape, backend=KERNEL_BACKEND):
    """Awkward head_dim / state_dim, chunk 32, groups = heads and 8 heads per group."""
    *dims, chunk = shape
    x, dt, A, B, C = problem(23, *dims, jnp.float32)
    check_gradients(x, dt, A, B, C, backend, GRAD_BOUND[jnp.dtype(jnp.float32)],
                    chunk_size=chunk, D=jnp.ones((dims[2],), jnp.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_gradients_largest_dims(dtype, backend=KERNEL_BACKEND):
    """head_dim = state_dim = 256: four blocks of head_dim, partial sums over them."""
    x, dt, A, B, C = problem(31, 1, 40, 2, 256, 1, 256, dtype)
    check_gradients(x, dt, A, B, C, backend, GRAD_BOUND[jnp.dtype(dtype)], chunk_size=32)


def state_passing_config(chunk_size, head_dim, state_dim, heads_per_group, dtype,
                         block_pass=4) -> pkb.ChunkScanConfig:
    """The heuristic configs with the chunk states passed along (``state_passing``), in
    ``block_pass`` rows of head_dim a pass program."""
    args = (chunk_size, head_dim, state_dim, heads_per_group, dtype)
    passing = {"state_passing": True, "block_pass": block_pass}
    return pkb.ChunkScanConfig(dataclasses.replace(pk.default_config(*args), **passing),
                               dataclasses.replace(pkb.default_config(*args), **passing))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_state_passing_matches_the_oracle(dtype, backend=KERNEL_BACKEND):
    """Chunk states computed per chunk and passed along, forward and gradients, with every
    feature (segments that start inside a chunk and on a chunk's first step, an initial
    state), a partial last chunk, head_dim 7 (a partial block of pass rows) and state 20."""
    x, dt, A, B, C = problem(50, 2, 3 * CHUNK - 5, 4, 7, 2, 20, dtype)
    kwargs = features(51, x, 20, FEATURE_SETS[-1])
    config = state_passing_config(CHUNK, 7, 20, 2, dtype)
    check(x, dt, A, B, C, backend, config=config, **kwargs)
    check_gradients(x, dt, A, B, C, backend, GRAD_BOUND[jnp.dtype(dtype)], config=config,
                    **kwargs)


@pytest.mark.parametrize("passing", [False, True], ids=["walked", "passed"])
def test_state_blocks_match_the_oracle(passing, backend=KERNEL_BACKEND):
    """The forward's chunk states and the backward's state gradients in blocks of 16 state
    columns (``block_n``) over state 40 (three blocks, the last partial), walked or
    computed per chunk and passed along, forward and gradients with every feature."""
    x, dt, A, B, C = problem(55, 2, 3 * CHUNK - 5, 4, 24, 2, 40, jnp.float32)
    kwargs = features(56, x, 40, FEATURE_SETS[-1])
    config = state_passing_config(CHUNK, 24, 40, 2, jnp.float32)
    blocks = {"state_passing": passing, "block_n": 16}
    config = pkb.ChunkScanConfig(dataclasses.replace(config.forward, **blocks),
                                 dataclasses.replace(config.backward, **blocks))
    check(x, dt, A, B, C, backend, config=config, **kwargs)
    check_gradients(x, dt, A, B, C, backend, GRAD_BOUND[jnp.dtype(jnp.float32)],
                    config=config, **kwargs)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shared", [False, True], ids=["alone", "shared"])
@pytest.mark.parametrize("heads", [2, 4])
def test_backward_heads_per_program(heads, shared, dtype, backend=KERNEL_BACKEND):
    """The backward's chunk kernels with several heads of a group a program (``block_h``,
    ``source_block_h``; their ``dC`` / ``dB`` come back summed over the program's heads),
    each head through the chunk alone or all sharing the scores (``shared_scores``): every
    gradient against the float64 oracle with every feature, a partial last chunk,
    head_dim 24 and state 40."""
    x, dt, A, B, C = problem(57, 2, 3 * CHUNK - 5, 8, 24, 2, 40, dtype)
    kwargs = features(58, x, 40, FEATURE_SETS[-1])
    args = (CHUNK, 24, 40, 4, dtype)
    config = pkb.ChunkScanConfig(pk.default_config(*args), dataclasses.replace(
        pkb.default_config(*args), block_h=heads, source_block_h=heads,
        shared_scores=shared))
    check_gradients(x, dt, A, B, C, backend, GRAD_BOUND[jnp.dtype(dtype)], config=config,
                    **kwargs)


@pytest.mark.parametrize("state_dim, block_n, passing", [(128, 128, True), (200, 64, False),
                                                     (256, 64, False)])
def test_state_blocks_past_128_columns(state_dim, block_n, passing):
    """The heuristic's state kernels take states padded past 128 in blocks of 64 columns,
    and each block's walk counts towards passing's rule: 64 heads of 64 over 32 chunks
    pass their states along at state 128 (64 walks) and walk them at 200 or 256 (256).
    The backward's state gradients keep whole states (64 walks: passed back); the tuner
    tries the same blocks in both directions."""
    args = (256, 64, state_dim, 64, jnp.bfloat16)
    config = pk.default_config(*args, batch_heads=64, chunks=32)
    assert (config.block_n, config.state_passing) == (block_n, passing)
    backward = pkb.default_config(*args, batch_heads=64, chunks=32)
    whole = padded(state_dim)
    assert (backward.block_n, backward.state_passing) == (whole, True)
    for tiles in (config, backward):
        widths = [c.block_n for c in pk.state_block_variants(tiles, state_dim)]
        assert widths == sorted({min(w, whole) for w in (32, 64, 128, 256)})


@pytest.mark.parametrize("batch, heads, chunks, passing", [
    (1, 2, 32, True), (1, 2, 31, False), (2, 66, 32, False), (1, 65, 32, True)])
def test_state_passing_where_walks_are_few_and_long(batch, heads, chunks, passing):
    """The heuristics pass the states along, and their gradients back, where fewer walks
    than an H200's 132 multiprocessors go through at least 32 chunks, and the plan names
    the kernels that run."""
    shape = (batch, chunks * CHUNK, heads, 8, 1, 16, jnp.bfloat16)
    args = [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in problem(0, *shape)]
    p = bjax.plan(bjax.ssd_chunk_scan, *args, chunk_size=CHUNK, backend=KERNEL_BACKEND)
    assert p.config_source == "heuristic"
    assert p.block_config.forward.state_passing == passing
    assert p.block_config.backward.state_passing == passing
    assert ("bjax_ssd_pass_states" in p.kernel) == passing


def test_state_passing_agrees_with_the_walk(backend=KERNEL_BACKEND):
    """Passed-along states equal the walk's to float32 rounding (the two sum the same
    terms in another order), forward and backward kernels alike; blocks of 16 pass rows
    over head_dim 40 (a partial last block)."""
    interpret = backend != "pallas"
    x, dt, A, B, C = problem(52, 2, 5 * CHUNK + 3, 4, 40, 2, 24, jnp.float32)
    dy = problem(53, 2, x.shape[1], 4, 40, 2, 24, jnp.float32)[0]
    init = random(54, (2, 4, 40, 24), jnp.float32, scale=1.0)
    dt_p, a_cs = pk.time_terms(dt, A, chunk_size=CHUNK, softplus=False,
                               limit=(0.0, float("inf")), interpret=interpret)
    kw = dict(chunk_size=CHUNK, interpret=interpret)
    walk = state_passing_config(CHUNK, 40, 24, 2, jnp.float32)
    walk = pkb.ChunkScanConfig(*(dataclasses.replace(c, state_passing=False)
                                 for c in (walk.forward, walk.backward)))
    results = []
    for config in (walk, state_passing_config(CHUNK, 40, 24, 2, jnp.float32, block_pass=16)):
        states, final = pk.chunk_states(x, B, dt_p, a_cs, None, init, config=config.forward,
                                        states_dtype=jnp.float32, **kw)
        results.append((states, final, *pkb.state_grads(dy, C, a_cs, states, None, init,
                                                         config=config.backward, **kw)))
    for name, walked, passed in zip(("states", "final", "G", "d init", "carry"), *results):
        if name == "carry":   # per block of head_dim rows: 64-row walk blocks, 16-row passes
            walked, passed = walked.sum(-1), passed.sum(-1)
        np.testing.assert_allclose(passed, walked, rtol=2e-5, atol=2e-5, err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_grads(backend):
    """Finite differences (float32, so loose tolerances) on a tiny problem with every feature."""
    x, dt, A, B, C = problem(24, 1, 20, 2, 4, 1, 4, jnp.float32)
    kwargs = features(25, x, 4, ("D", "z", "init"))

    def fn(x, dt, A, B, C, D, z, init):
        y, final = bjax.ssd_chunk_scan(x, dt, A, B, C, chunk_size=CHUNK, D=D, z=z,
                                       initial_states=init, return_final_states=True,
                                       backend=backend)
        return y.sum(axis=(2, 3)), final.sum(axis=(2, 3))
    check_grads(fn, (x, dt, A, B, C, kwargs["D"], kwargs["z"], kwargs["initial_states"]),
                order=1, modes=["rev"], atol=5e-2, rtol=5e-2, eps=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_deterministic(backend):
    x, dt, A, B, C = problem(26, 2, 40, 4, 16, 1, 16, jnp.bfloat16)
    grad = jax.jit(jax.grad(lambda x, dt, A, B, C: bjax.ssd_chunk_scan(
        x, dt, A, B, C, chunk_size=CHUNK, backend=backend).astype(jnp.float32).sum(),
        argnums=(0, 1, 2, 3, 4)))
    first, second = grad(x, dt, A, B, C), grad(x, dt, A, B, C)
    for a, b in zip(first, second):
        assert np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_finite_with_strongly_negative_A(backend):
    """bf16 training: decays of exp(-1e4 dt) on a partial last chunk give no NaN or inf."""
    x, dt, _, B, C = problem(27, 1, 2 * CHUNK + 5, 2, 8, 1, 16, jnp.bfloat16)
    A = jnp.array([-1e4, -30.0], jnp.float32)
    grads = jax.jit(jax.grad(lambda *a: bjax.ssd_chunk_scan(
        *a, chunk_size=CHUNK, dt_softplus=True, backend=backend).astype(jnp.float32).sum(),
        argnums=(0, 1, 2, 3, 4)))(x, dt * 10, A, B, C)
    for g in grads:
        assert np.isfinite(np.asarray(g, np.float32)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_and_compiles_once(backend):
    x, dt, A, B, C = problem(28, 1, 24, 2, 8, 1, 16, jnp.float32)

    @jax.checkpoint
    def layer(x, B, C):
        return bjax.ssd_chunk_scan(x, dt, A, B, C, chunk_size=CHUNK, backend=backend) * 2.0

    grad = jax.jit(jax.grad(lambda x, B, C: layer(x, B, C).sum(), argnums=(0, 1, 2)))
    first = grad(x, B, C)
    second = grad(x * 2, B, C)
    assert grad._cache_size() == 1
    ref = jax.jit(jax.grad(lambda x, B, C: 2 * oracles.ssd_scan(x, dt, A, B, C)[0].sum(),
                           argnums=(0, 1, 2)))(*(jnp.asarray(v, jnp.float64) for v in (x, B, C)))
    for g, r in zip(first, ref):
        assert np.linalg.norm(np.asarray(g) - r) <= 2e-5 * np.linalg.norm(r)
    assert not np.array_equal(np.asarray(first[1]), np.asarray(second[1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_gradients(backend):
    x, dt, A, B, C = problem(29, 2, 1, 4, 8, 2, 16, jnp.float32)
    kwargs = features(30, x, 16, ("D2", "z", "dt", "init"))
    state, z = kwargs.pop("initial_states"), kwargs.pop("z")[:, 0]
    args = (state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])

    def loss(fn, *args):
        y, new_state = fn(*args)
        return jnp.sum(y.astype(jnp.float64) ** 2) + jnp.sum(new_state.astype(jnp.float64) ** 2)

    def step(*args):
        return bjax.ssd_step(*args, z=z, backend=backend, **kwargs)

    def oracle_step(state, x, dt, A, B, C):  # one step of the oracle's scan
        y, final = oracles.ssd_scan(x[:, None], dt[:, None], A, B[:, None], C[:, None],
                                    z=z[:, None], initial_states=state, **kwargs)
        return y[:, 0], final

    argnums = tuple(range(6))
    grads = jax.jit(jax.grad(lambda *a: loss(step, *a), argnums=argnums))(*args)
    ref = jax.jit(jax.grad(lambda *a: loss(oracle_step, *a), argnums=argnums))(
        *(jnp.asarray(v, jnp.float64) for v in args))
    for g, r in zip(grads, ref):
        assert np.linalg.norm(np.asarray(g, np.float64) - r) <= 1e-5 * np.linalg.norm(r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_step_matches_chunk_scan(dtype, backend):
    """ssd_step over a sequence == ssd_chunk_scan with return_final_states (and the oracle)."""
    x, dt, A, B, C = problem(13, 2, 19, 4, 8, 2, 16, dtype)
    kwargs = features(14, x, 16, ("D2", "z", "dt", "init"))
    y_scan, final_scan = bjax.ssd_chunk_scan(x, dt, A, B, C, chunk_size=CHUNK,
                                             return_final_states=True, backend=backend,
                                             **kwargs)
    ref_y, ref_final = oracles.ssd_scan(x, dt, A, B, C, **kwargs)
    state, z = kwargs.pop("initial_states"), kwargs.pop("z")
    step = jax.jit(lambda s, *a, z: bjax.ssd_step(s, *a, z=z, backend=backend, **kwargs),
                   donate_argnums=0)
    ys = []
    for t in range(x.shape[1]):
        y_t, state = step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], z=z[:, t])
        ys.append(y_t)
    scale = SCALE[jnp.dtype(dtype)]
    assert_close(jnp.stack(ys, 1), ref_y, dtype, scale)
    assert_close(state, ref_final, jnp.float32, 5.0)  # the step's math is all float32
    assert_close(final_scan, ref_final, dtype, scale)
    assert_close(y_scan, ref_y, dtype, scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_in_place_and_vmap(backend):
    x, dt, A, B, C = problem(15, 4, 1, 2, 8, 1, 16, jnp.float32)
    state = random(16, (4, 2, 8, 16), jnp.float32, scale=1.0)
    args = (x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
    step = jax.jit(lambda s, *a: bjax.ssd_step(s, *a, backend=backend), donate_argnums=0)
    text = step.lower(state, *args).compile().as_text()
    assert "input_output_alias" in text or backend == "interpret"
    y, new_state = step(state + 0, *args)
    mapped = jax.vmap(lambda s, x, dt, B, C: bjax.ssd_step(s, x, dt, A, B, C, backend=backend),
                      in_axes=(0, 0, 0, 0, 0))
    y_v, state_v = mapped(state[:, None], *(v[:, None] for v in (x[:, 0], dt[:, 0], B[:, 0],
                                                                   C[:, 0])))
    np.testing.assert_allclose(np.asarray(y_v[:, 0]), np.asarray(y), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state_v[:, 0]), np.asarray(new_state), rtol=1e-6,
                               atol=1e-6)


def test_xla_runs_dims_past_the_kernels_limit():
    """head_dim and state_dim over MAX_DIM: the XLA implementation takes them, and the
    automatic choice passes the Pallas kernels over with that reason where they run."""
    problem_args = problem(8, 1, 20, 2, 300, 1, 260, jnp.float32)
    check(*problem_args, "xla", chunk_size=16)
    p = bjax.plan(bjax.ssd_chunk_scan, *problem_args, chunk_size=16)
    assert p.implementation == "xla"
    assert p.rejected[0][0] == "pallas_triton"
    if KERNEL_BACKEND == "pallas":
        assert "must be <= 256 for the Pallas kernels" in p.rejected[0][1]


def test_plan():
    x, dt, A, B, C = problem(0, 1, 8, 2, 64, 1, 128, jnp.bfloat16)
    p = bjax.plan(bjax.ssd_chunk_scan, x, dt, A, B, C, backend="interpret")
    assert p.kernel == "bjax_ssd_time_terms + bjax_ssd_chunk_states + bjax_ssd_chunk_scan"
    assert p.descriptor.chunk_size == 256 and p.precision.deterministic
    assert bjax.plan(bjax.ssd_chunk_scan, x, dt, A, B, C, backend="xla").block_config is None


# ---------------------------------------------------------------------------- errors

def _good():
    x, dt, A, B, C = problem(0, 2, 8, 4, 8, 2, 16, jnp.float32)
    return dict(x=x, dt=dt, A=A, B=B, C=C)


SCAN_ERRORS = [
    (dict(x=jnp.ones((2, 8, 4), jnp.float32)), bjax.InvalidProblemError, "x must be an array of rank 4"),
    (dict(x=jnp.ones((2, 8, 4, 8), jnp.int32)), bjax.UnsupportedError, "x.dtype must be float32"),
    (dict(x=jnp.ones((2, 8, 4, 300), jnp.float32), backend=KERNEL_BACKEND), bjax.UnsupportedError, r"x.shape\[-1\] \(head_dim\) must be <= 256 for the Pallas kernels"),
    (dict(dt=jnp.ones((2, 8, 3), jnp.float32)), bjax.InvalidProblemError, r"dt.shape must be \(2, 8, 4\)"),
    (dict(dt=jnp.ones((2, 8, 4), jnp.int32)), bjax.UnsupportedError, "dt.dtype must be"),
    (dict(A=jnp.ones((3,), jnp.float32)), bjax.InvalidProblemError, r"A.shape must be \(4,\)"),
    (dict(A=jnp.ones((4,), jnp.int32)), bjax.UnsupportedError, "A.dtype must be float64"),
    (dict(x=jnp.ones((2, 8, 0, 8), jnp.float32)), bjax.InvalidProblemError, r"x.shape\[-2\] \(heads\) must be >= 1"),
    (dict(x=jnp.ones((2, 8, 4, 0), jnp.float32)), bjax.InvalidProblemError, r"x.shape\[-1\] \(head_dim\) must be >= 1"),
    (dict(B=jnp.ones((2, 8, 2, 0), jnp.float32), C=jnp.ones((2, 8, 2, 0), jnp.float32)), bjax.InvalidProblemError, r"B.shape\[-1\] \(state_dim\) must be >= 1"),
    (dict(C=jnp.ones((2, 8, 2, 16), jnp.bfloat16)), bjax.InvalidProblemError, "C.dtype must be float32"),
    (dict(B=jnp.ones((2, 8, 3, 16), jnp.float32), C=jnp.ones((2, 8, 3, 16), jnp.float32)), bjax.InvalidProblemError, r"B.shape\[-2\] \(groups\) must be a divisor of heads = 4"),
    (dict(B=jnp.ones((2, 9, 2, 16), jnp.float32)), bjax.InvalidProblemError, "B.shape must be"),
    (dict(B=jnp.ones((2, 8, 16), jnp.float32)), bjax.InvalidProblemError, "B must be an array of rank 4"),
    (dict(C=jnp.ones((2, 8, 2, 8), jnp.float32)), bjax.InvalidProblemError, r"C.shape must be \(2, 8, 2, 16\)"),
    (dict(B=jnp.ones((2, 8, 2, 16), jnp.bfloat16)), bjax.InvalidProblemError, "B.dtype must be float32"),
    (dict(B=jnp.ones((2, 8, 2, 512), jnp.float32), C=jnp.ones((2, 8, 2, 512), jnp.float32), backend=KERNEL_BACKEND), bjax.UnsupportedError, r"B.shape\[-1\] \(state_dim\) must be <= 256 for the Pallas kernels"),
    (dict(chunk_size=48), bjax.InvalidProblemError, "chunk_size must be a power of two from 16 to 1024"),
    (dict(chunk_size=8), bjax.InvalidProblemError, "chunk_size must be a power of two"),
    (dict(chunk_size=64.0), bjax.InvalidProblemError, "chunk_size must be"),
    (dict(D=jnp.ones((4, 3), jnp.float32)), bjax.InvalidProblemError, r"D.shape must be \(4,\) or \(4, 8\)"),
    (dict(D=jnp.ones((4,), jnp.int32)), bjax.UnsupportedError, "D.dtype must be"),
    (dict(z=jnp.ones((2, 8, 4, 7), jnp.float32)), bjax.InvalidProblemError, "z.shape must be"),
    (dict(z=jnp.ones((2, 8, 4, 8), jnp.bfloat16)), bjax.InvalidProblemError, "z.dtype must be float32"),
    (dict(dt_bias=jnp.ones((2,), jnp.float32)), bjax.InvalidProblemError, r"dt_bias.shape must be \(4,\)"),
    (dict(dt_bias=jnp.ones((4,), jnp.int32)), bjax.UnsupportedError, "dt_bias.dtype must be"),
    (dict(dt_softplus=1), bjax.InvalidProblemError, "dt_softplus must be a bool"),
    (dict(dt_limit=(0.5, 0.1)), bjax.InvalidProblemError, "dt_limit must be a pair"),
    (dict(dt_limit=(-1.0, 1.0)), bjax.InvalidProblemError, "dt_limit must be a pair"),
    (dict(dt_limit=(0.0, math.nan)), bjax.InvalidProblemError, "dt_limit must be a pair"),
    (dict(dt_limit=0.1), bjax.InvalidProblemError, "dt_limit must be a pair"),
    (dict(initial_states=jnp.ones((2, 4, 8, 15), jnp.float32)), bjax.InvalidProblemError, "initial_states.shape must be"),
    (dict(initial_states=jnp.ones((2, 4, 8, 16), jnp.int32)), bjax.UnsupportedError, "initial_states.dtype must be"),
    (dict(seq_idx=jnp.ones((2, 7), jnp.int32)), bjax.InvalidProblemError, r"seq_idx.shape must be \(2, 8\)"),
    (dict(seq_idx=jnp.ones((2, 8), jnp.float32)), bjax.InvalidProblemError, "seq_idx.dtype must be an integer dtype"),
    (dict(return_final_states="yes"), bjax.InvalidProblemError, "return_final_states must be a bool"),
    (dict(backend="cuda"), bjax.InvalidProblemError, "backend must be one of"),
]


@pytest.mark.parametrize("change,error,message", SCAN_ERRORS,
                         ids=[str(i) for i in range(len(SCAN_ERRORS))])
def test_chunk_scan_errors(change, error, message):
    args = {**_good(), **change}
    positional = [args.pop(k) for k in ("x", "dt", "A", "B", "C")]
    with pytest.raises(error, match="ssd_chunk_scan: " + message) as info:
        jax.jit(lambda *a: bjax.ssd_chunk_scan(*a, **args))(*positional)
    assert "got" in str(info.value)


STEP_ERRORS = [
    (dict(state=jnp.ones((2, 4, 8, 16), jnp.bfloat16)), bjax.InvalidProblemError, "state.dtype must be float32"),
    (dict(state=jnp.ones((2, 4, 8, 15), jnp.float32)), bjax.InvalidProblemError, "state.shape must be"),
    (dict(x=jnp.ones((2, 4, 8, 1), jnp.float32)), bjax.InvalidProblemError, "x must be an array of rank 3"),
    (dict(x=jnp.ones((2, 4, 8), jnp.int8)), bjax.UnsupportedError, "x.dtype must be float32"),
    (dict(dt=jnp.ones((2, 3), jnp.float32)), bjax.InvalidProblemError, r"dt.shape must be \(2, 4\)"),
    (dict(dt=jnp.ones((2, 4), jnp.int32)), bjax.UnsupportedError, "dt.dtype must be"),
    (dict(A=jnp.ones((2,), jnp.float32)), bjax.InvalidProblemError, r"A.shape must be \(4,\)"),
    (dict(B=jnp.ones((2, 3, 16), jnp.float32), C=jnp.ones((2, 3, 16), jnp.float32)), bjax.InvalidProblemError, r"B.shape\[-2\] \(groups\) must be a divisor of heads"),
    (dict(z=jnp.ones((2, 4, 7), jnp.float32)), bjax.InvalidProblemError, "z.shape must be"),
    (dict(dt_limit=(1.0, 0.0)), bjax.InvalidProblemError, "dt_limit must be a pair"),
]


@pytest.mark.parametrize("change,error,message", STEP_ERRORS,
                         ids=[str(i) for i in range(len(STEP_ERRORS))])
def test_step_errors(change, error, message):
    good = _good()
    args = dict(state=jnp.zeros((2, 4, 8, 16), jnp.float32), x=good["x"][:, 0],
                dt=good["dt"][:, 0], A=good["A"], B=good["B"][:, 0], C=good["C"][:, 0])
    args.update(change)
    positional = [args.pop(k) for k in ("state", "x", "dt", "A", "B", "C")]
    with pytest.raises(error, match="ssd_step: " + message) as info:
        jax.jit(lambda *a: bjax.ssd_step(*a, **args))(*positional)
    assert "got" in str(info.value)


@pytest.mark.skipif(KERNEL_BACKEND != "pallas", reason="needs a GPU: 6 GiB inputs")
def test_offsets_past_int32():
    """x with 3 * 2^30 elements (b*l*h*p well past 2^31): the last segment, packed after
    2M other tokens, matches the same tokens run alone. Pallas-Triton widens offsets to
    64 bits for arrays over 4 GiB; this checks it end to end."""
    seq_len, tail = 2**21 + 3 * 256 + 5, 300
    x, dt, A, B, C = problem(17, 1, seq_len, 24, 64, 1, 16, jnp.bfloat16)
    seq_idx = (jnp.arange(seq_len) >= seq_len - tail).astype(jnp.int32)[None]
    y = bjax.ssd_chunk_scan(x, dt, A, B, C, seq_idx=seq_idx, backend="pallas")
    last = y[:, -tail:]
    del y
    alone = bjax.ssd_chunk_scan(*(v[:, -tail:] for v in (x, dt)), A,
                                *(v[:, -tail:] for v in (B, C)), backend="pallas")
    ref, _ = oracles.ssd_scan(*(np.asarray(v[:, -tail:], np.float64) for v in (x, dt)), A,
                              *(np.asarray(v[:, -tail:], np.float64) for v in (B, C)))
    assert_close(last, ref, jnp.bfloat16, SCALE[jnp.dtype(jnp.bfloat16)])
    assert_close(alone, ref, jnp.bfloat16, SCALE[jnp.dtype(jnp.bfloat16)])


def test_constant_trip_count_loops_add_nothing():
    """The chunk kernels' loops over every block of a chunk (the float32 configuration,
    ``blocks.block_loop``) give bit-identical results to loops over the program's own
    range: the blocks across the diagonal are masked to exactly 0. bfloat16 inputs, so the
    compiled per-program loops are trustworthy on a GPU too; four 16-step blocks a chunk,
    a partial last chunk and segments."""
    interpret = KERNEL_BACKEND != "pallas"
    chunk = 64
    x, dt, A, B, C = problem(40, 1, 2 * chunk + 9, 4, 16, 2, 16, jnp.bfloat16)
    seg = jnp.repeat(jnp.arange(3, dtype=jnp.int32), jnp.array([50, 40, 47]),
                     total_repeat_length=x.shape[1])
    seg = jnp.pad(seg, (0, 3 * chunk - x.shape[1]), mode="edge")[None]
    dy = problem(41, 1, x.shape[1], 4, 16, 2, 16, jnp.bfloat16)[0]
    dt_p, a_cs = pk.time_terms(dt, A, chunk_size=chunk, softplus=False,
                               limit=(0.0, float("inf")), interpret=interpret)

    def outputs(constant):
        fwd = pk.SsdConfig(block_q=16, block_t=16, block_s=16, block_p=16, block_h=2,
                           constant_trip_count=constant)
        bwd = pkb.SsdBackwardConfig(block_q=16, block=16, block_p=16, block_h=2,
                                    constant_trip_count=constant)
        kw = dict(chunk_size=chunk, interpret=interpret)
        states, _ = pk.chunk_states(x, B, dt_p, a_cs, seg, config=fwd,
                                    states_dtype=jnp.float32, **kw)
        y = pk.chunk_scan(x, B, C, dt_p, a_cs, states.astype(jnp.bfloat16), seg,
                          config=fwd, **kw)
        ends, _, _ = pkb.state_grads(dy, C, a_cs, states, seg, config=bwd, **kw)
        return (y, *pkb.target_grads(x, dy, B, C, dt_p, a_cs, states, seg, config=bwd, **kw),
                *pkb.source_grads(x, dy, B, C, dt_p, a_cs, ends, seg, config=bwd, **kw))

    for own_range, every_block in zip(outputs(False), outputs(True)):
        np.testing.assert_array_equal(np.asarray(own_range.astype(jnp.float32)),
                                      np.asarray(every_block.astype(jnp.float32)))
