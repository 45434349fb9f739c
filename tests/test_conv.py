"""causal_conv1d and causal_conv1d_step: every backend against the float64 oracle."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bjax
from pallas_kernels import conv as pallas_conv
from tests import oracles
from tests.conftest import BACKENDS, KERNEL_BACKEND, assert_close, random

# Relative norm error of the gradients: float32 sums of k products (plus act') cost a few
# float32 ulp; 16-bit: dy is rounded to x's dtype and dx and dweight are returned in
# theirs: a few roundings of 2^-8 (bf16) / 2^-11 (f16).
GRAD_BOUND = {jnp.dtype(jnp.float32): 1e-6, jnp.dtype(jnp.bfloat16): 4 * 2**-8,
              jnp.dtype(jnp.float16): 4 * 2**-11}


def problem(seed, batch, length, channels, taps, dtype, *, bias=True, initial_states=False,
            seq_idx=False):
    args = dict(x=random(seed, (batch, length, channels), dtype),
                weight=random(seed + 1, (channels, taps), dtype, scale=1.0))
    if bias:
        args["bias"] = random(seed + 2, (channels,), dtype)
    if initial_states:
        args["initial_states"] = random(seed + 3, (batch, taps - 1, channels), dtype)
    if seq_idx:   # sequences of random lengths, some of one row
        starts = np.random.default_rng((seed, 4)).random((batch, length)) < 0.2
        args["seq_idx"] = jnp.asarray(np.cumsum(starts, axis=1), jnp.int32)
    return args


def check_forward(args, backend, activation="silu", **options):
    y = bjax.causal_conv1d(**args, activation=activation, backend=backend, **options)
    ref = oracles.causal_conv1d(**args, activation=activation)
    assert y.dtype == args["x"].dtype and y.shape == args["x"].shape
    assert_close(y, ref, args["x"].dtype, scale=4)   # k products added in float32


# (seed, batch, length, channels, taps, dtype, features): lengths across pieces and lanes
# of the walk, channels not a multiple of the block, every tap count from 2 to 16.
FORWARD_CASES = [
    (0, 2, 37, 40, 4, jnp.float32, ("initial_states", "seq_idx")),
    (1, 1, 1, 7, 2, jnp.float32, ()),
    (2, 3, 70, 24, 3, jnp.bfloat16, ("seq_idx",)),
    (3, 2, 19, 130, 8, jnp.float16, ("initial_states",)),
    (4, 1, 45, 16, 16, jnp.float32, ("initial_states", "seq_idx")),
]


def case_id(case):
    return f"{case[1:5]}-{jnp.dtype(case[5]).name}-{'+'.join(case[6]) or 'plain'}"


def case_problem(case):
    seed, batch, length, channels, taps, dtype, features = case
    return problem(seed, batch, length, channels, taps, dtype, **{f: True for f in features})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", FORWARD_CASES, ids=case_id)
def test_forward(case, backend):
    seed, args = case[0], case_problem(case)
    check_forward(args, backend, activation="silu" if seed % 2 == 0 else None)


def test_forward_small_config_and_weight_dtype(backend=KERNEL_BACKEND):
    """A config whose pieces (6 rows, 3 a step) and channel blocks cut every boundary; a
    bf16 weight and float32 bias with float32 x."""
    args = problem(5, 2, 29, 20, 4, jnp.float32, initial_states=True, seq_idx=True)
    args["weight"] = args["weight"].astype(jnp.bfloat16)
    config = pallas_conv.ConvConfig(block_d=8, block_lanes=2, piece_len=6, unroll=3, num_warps=1)
    check_forward(args, backend, config=config)


def gradient_errors(args, backend, activation="silu", config=None) -> dict:
    """Relative norm error of every gradient against autodiff of the float64 oracle."""
    diff = {k: v for k, v in args.items() if k != "seq_idx"}
    static = {k: v for k, v in args.items() if k == "seq_idx"}
    dy = random(7, args["x"].shape, jnp.float64, scale=1.0)

    def loss(fn, diff):
        return jnp.sum(fn(**diff, **static, activation=activation).astype(jnp.float64) * dy)

    def mine(**a):
        return bjax.causal_conv1d(**a, backend=backend, config=config)
    got = jax.jit(jax.grad(lambda d: loss(mine, d)))(diff)
    want = jax.jit(jax.grad(lambda d: loss(oracles.causal_conv1d, d)))(
        {k: jnp.asarray(v, jnp.float64) for k, v in diff.items()})
    errors = {}
    for name in diff:
        assert got[name].dtype == diff[name].dtype, name
        out, ref = np.asarray(got[name], np.float64), np.asarray(want[name])
        assert np.isfinite(out).all(), name
        errors[name] = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    return errors


GRADIENT_CASES = [
    (10, 2, 37, 40, 4, jnp.float32, ("initial_states", "seq_idx")),
    (11, 1, 21, 9, 2, jnp.float32, ()),
    (12, 2, 30, 24, 8, jnp.bfloat16, ("initial_states",)),
    (13, 3, 17, 33, 3, jnp.float16, ("seq_idx",)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", GRADIENT_CASES, ids=case_id)
def test_gradients(case, backend):
    seed, args = case[0], case_problem(case)
    activation = "silu" if seed % 2 == 0 else None
    for name, error in gradient_errors(args, backend, activation).items():
        assert error <= GRAD_BOUND[jnp.dtype(case[5])], (name, error)


def test_gradients_small_config(backend=KERNEL_BACKEND):
    """Pieces shorter than the taps (2 rows, 8 taps): every row of dx is finished by
    rows of the next pieces' walk past their end."""
    args = problem(14, 2, 23, 12, 8, jnp.float32, initial_states=True, seq_idx=True)
    config = pallas_conv.ConvConfig(block_d=8, block_lanes=4, piece_len=2, unroll=1, num_warps=1)
    for name, error in gradient_errors(args, backend, config=config).items():
        assert error <= GRAD_BOUND[jnp.dtype(jnp.float32)], (name, error)


def test_every_cell_written(backend=KERNEL_BACKEND):
    """y and dx written over NaN-filled buffers: no NaN survives."""
    args = problem(15, 2, 37, 40, 4, jnp.float32, initial_states=True, seq_idx=True)
    interpret = backend == "interpret"
    config = pallas_conv.ConvConfig(block_d=16, block_lanes=2, piece_len=6, unroll=3)
    w, b = args["weight"].astype(jnp.float32).T, args["bias"]
    poison = jnp.full(args["x"].shape, jnp.nan, jnp.float32)
    operands = (args["x"], w, b, args["initial_states"], args["seq_idx"])
    y = pallas_conv.forward(*operands, activation="silu", config=config, interpret=interpret,
                            out=poison)
    dx, *_ = pallas_conv.backward(*operands, y, activation="silu", config=config,
                                  interpret=interpret, out=poison)
    assert not np.isnan(np.asarray(y)).any() and not np.isnan(np.asarray(dx)).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_final_states_and_steps_continue_the_sequence(backend):
    """Prefill of a part (short of k - 1 rows too), then one step a token, equals the
    whole sequence; the state after the steps equals the whole call's final_states."""
    args = problem(16, 2, 12, 24, 4, jnp.bfloat16, initial_states=True)
    args["initial_states"] = args["initial_states"].astype(jnp.float32)
    whole, whole_final = bjax.causal_conv1d(**args, activation="silu", backend=backend,
                                            return_final_states=True)
    x = args.pop("x")
    for prefix in (2, 7):
        y, state = bjax.causal_conv1d(x[:, :prefix], **args, activation="silu", backend=backend,
                                      return_final_states=True)
        assert state.dtype == jnp.float32
        ys = [y]
        for t in range(prefix, x.shape[1]):
            y_t, state = bjax.causal_conv1d_step(state, x[:, t], args["weight"], args["bias"],
                                                 activation="silu", backend=backend)
            ys.append(y_t[:, None])
        np.testing.assert_array_equal(np.asarray(jnp.concatenate(ys, axis=1), np.float32),
                                      np.asarray(whole, np.float32))
        np.testing.assert_array_equal(np.asarray(state), np.asarray(whole_final))


def test_final_states_of_packed_sequences():
    """With seq_idx, final_states keeps only the last sequence's rows."""
    x = jnp.arange(1, 13, dtype=jnp.float32).reshape(1, 6, 2)
    weight = jnp.ones((2, 4), jnp.float32)
    _, final = bjax.causal_conv1d(x, weight, seq_idx=jnp.array([[0, 0, 0, 0, 1, 1]]),
                                  return_final_states=True, backend="xla")
    np.testing.assert_array_equal(np.asarray(final[0]), [[0, 0], [9, 10], [11, 12]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_gradients(backend):
    args = problem(17, 3, 4, 20, 4, jnp.float32)
    state, x = args["x"][:, 1:], args["x"][:, 0]

    def loss(fn, state, x, weight, bias):
        y, new = fn(state, x, weight, bias)
        return jnp.sum(jnp.sin(y.astype(jnp.float64))) + jnp.sum(new.astype(jnp.float64) ** 2)

    def oracle(state, x, weight, bias):
        window = jnp.concatenate([state, x[:, None]], axis=1)
        y = oracles.causal_conv1d(window, weight, bias, activation="silu")[:, -1]
        return y, window[:, 1:]
    grads = jax.grad(lambda *a: loss(lambda *b: bjax.causal_conv1d_step(
        *b, activation="silu", backend=backend), *a), argnums=(0, 1, 2, 3))(
        state, x, args["weight"], args["bias"])
    want = jax.grad(lambda *a: loss(oracle, *a), argnums=(0, 1, 2, 3))(
        *(jnp.asarray(v, jnp.float64) for v in (state, x, args["weight"], args["bias"])))
    for got, ref in zip(grads, want):
        assert np.linalg.norm(np.asarray(got, np.float64) - ref) <= 1e-6 * np.linalg.norm(ref)


@pytest.mark.skipif(KERNEL_BACKEND != "pallas", reason="the interpreter copies its operands")
def test_step_in_place():
    """Donated, the state is updated in place: no temporary of its size."""
    state = jnp.zeros((64, 3, 4096), jnp.bfloat16)
    x = jnp.ones((64, 4096), jnp.bfloat16)
    weight = jnp.ones((4096, 4), jnp.bfloat16)
    step = jax.jit(lambda s, x: bjax.causal_conv1d_step(s, x, weight)[::-1], donate_argnums=0)
    compiled = step.lower(state, x).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < state.nbytes


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    for shape in ((0, 5, 8), (2, 0, 8), (2, 5, 0)):
        x = jnp.ones(shape, jnp.float32)
        weight = jnp.ones((shape[2], 3), jnp.float32)

        def f(x, weight):
            return bjax.causal_conv1d(x, weight, backend=backend, return_final_states=True)
        (y, final), vjp = jax.vjp(f, x, weight)
        assert y.shape == shape and final.shape == (shape[0], 2, shape[2])
        dx, dw = vjp((y, final))
        assert dx.shape == shape and dw.shape == weight.shape
    y, state = bjax.causal_conv1d_step(jnp.ones((0, 2, 8), jnp.float32),
                                       jnp.ones((0, 8), jnp.float32),
                                       jnp.ones((8, 3), jnp.float32), backend=backend)
    assert y.shape == (0, 8) and state.shape == (0, 2, 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_checkpoint_and_scan(backend):
    args = problem(18, 2, 11, 16, 4, jnp.float32)
    x, weight, bias = args["x"], args["weight"], args["bias"]

    def conv(x, weight):
        return bjax.causal_conv1d(x, weight, bias, activation="silu", backend=backend)
    stacked = jnp.stack([x, 2 * x])
    np.testing.assert_allclose(jax.vmap(conv, in_axes=(0, None))(stacked, weight),
                               jnp.stack([conv(x, weight), conv(2 * x, weight)]), rtol=1e-6,
                               atol=1e-6)
    per_example = jax.vmap(jax.grad(lambda x, w: conv(x[None], w).sum(), argnums=1))(x, jnp.stack(
        [weight, weight]))
    np.testing.assert_allclose(per_example.sum(0), jax.grad(lambda w: conv(x, w).sum())(weight),
                               rtol=1e-5, atol=1e-5)
    grad = jax.grad(lambda w: jax.checkpoint(conv)(x, w).sum())(weight)
    np.testing.assert_allclose(grad, jax.grad(lambda w: conv(x, w).sum())(weight), rtol=1e-6)

    def decode(state, x_t):
        y, state = bjax.causal_conv1d_step(state, x_t, weight, bias, activation="silu",
                                           backend=backend)
        return state, y
    _, ys = jax.lax.scan(decode, jnp.zeros((2, 3, 16), jnp.float32), jnp.moveaxis(x, 1, 0))
    np.testing.assert_allclose(jnp.moveaxis(ys, 0, 1), conv(x, weight), rtol=1e-6, atol=1e-6)


def test_plan():
    args = problem(0, 4, 2048, 5376, 4, jnp.bfloat16)
    p = bjax.plan(bjax.causal_conv1d, **args, backend="interpret")
    assert p.kernel == "bjax_causal_conv1d_forward + bjax_causal_conv1d_backward"
    assert p.block_config == pallas_conv.default_config(4, 2048, 5376)
    assert p.config_source == "heuristic" and p.descriptor.taps == 4
    assert bjax.plan(bjax.causal_conv1d, **args, backend="xla").block_config is None
    wide = dict(args, weight=jnp.ones((5376, 17), jnp.bfloat16))
    assert bjax.plan(bjax.causal_conv1d, **wide).implementation == "xla"
    p = bjax.plan(bjax.causal_conv1d_step, args["x"][:, :3], args["x"][:, 0], args["weight"],
                  backend="interpret")
    assert p.kernel == "bjax_causal_conv1d_step"


# ---------------------------------------------------------------------------- errors

def _good():
    return problem(0, 2, 8, 6, 4, jnp.float32, initial_states=True, seq_idx=True)


ERRORS = [
    (dict(x=jnp.ones((2, 8), jnp.float32)), bjax.InvalidProblemError, r"x must be an array \[b, l, d\]"),
    (dict(x=jnp.ones((2, 8, 6), jnp.int32)), bjax.UnsupportedError, "x.dtype must be float32"),
    (dict(weight=jnp.ones((5, 4), jnp.float32)), bjax.InvalidProblemError, r"weight.shape must be \(d, k\) = \(6, k\)"),
    (dict(weight=jnp.ones((6, 4, 1), jnp.float32)), bjax.InvalidProblemError, "weight.shape must be"),
    (dict(weight=jnp.ones((6, 1), jnp.float32)), bjax.InvalidProblemError, r"weight.shape\[1\] \(the taps k\) must be at least 2"),
    (dict(weight=jnp.ones((6, 17), jnp.float32), initial_states=None, backend=KERNEL_BACKEND), bjax.UnsupportedError, r"weight.shape\[1\] \(the taps k\) must be at most 16"),
    (dict(weight=jnp.ones((6, 4), jnp.int8)), bjax.UnsupportedError, "weight.dtype must be"),
    (dict(bias=jnp.ones((5,), jnp.float32)), bjax.InvalidProblemError, r"bias.shape must be \(6,\)"),
    (dict(bias=jnp.ones((6,), jnp.int32)), bjax.UnsupportedError, "bias.dtype must be"),
    (dict(activation="relu"), bjax.InvalidProblemError, "activation must be None or 'silu'"),
    (dict(activation=True), bjax.InvalidProblemError, "activation must be None or 'silu'"),
    (dict(initial_states=jnp.ones((2, 4, 6), jnp.float32)), bjax.InvalidProblemError, r"initial_states.shape must be \(2, 3, 6\)"),
    (dict(initial_states=jnp.ones((2, 3, 6), jnp.bfloat16)), bjax.InvalidProblemError, "initial_states.dtype must be x's dtype"),
    (dict(seq_idx=jnp.ones((2, 7), jnp.int32)), bjax.InvalidProblemError, r"seq_idx.shape must be \(2, 8\)"),
    (dict(seq_idx=jnp.ones((2, 8), jnp.float32)), bjax.InvalidProblemError, "seq_idx.dtype must be an integer dtype"),
    (dict(return_final_states=1), bjax.InvalidProblemError, "return_final_states must be a bool"),
    (dict(config=pallas_conv.ConvConfig(block_d=6)), bjax.InvalidProblemError, "config.block_d must be a power of 2"),
    (dict(config=pallas_conv.ConvConfig(piece_len=12, unroll=8)), bjax.InvalidProblemError, "config.piece_len must be a multiple of config.unroll"),
    (dict(config=pallas_conv.ConvConfig(), backend="xla"), bjax.UnsupportedError, "config must be None for xla"),
    (dict(backend="cuda"), bjax.InvalidProblemError, "backend must be one of"),
]


@pytest.mark.parametrize("change,error,message", ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_errors(change, error, message):
    args = {"backend": KERNEL_BACKEND, **_good(), **change}
    x = args.pop("x")
    with pytest.raises(error, match="causal_conv1d: " + message) as info:
        jax.jit(lambda x: bjax.causal_conv1d(x, **args))(x)
    assert "got" in str(info.value)


STEP_ERRORS = [
    (dict(x=jnp.ones((2, 8, 6), jnp.float32)), bjax.InvalidProblemError, r"x must be an array \[b, d\]"),
    (dict(conv_state=jnp.ones((2, 4, 6), jnp.float32)), bjax.InvalidProblemError, r"conv_state.shape must be \(2, 3, 6\)"),
    (dict(conv_state=jnp.ones((2, 3, 6), jnp.float16)), bjax.InvalidProblemError, "conv_state.dtype must be x's dtype"),
    (dict(weight=jnp.ones((6,), jnp.float32)), bjax.InvalidProblemError, "weight.shape must be"),
    (dict(activation="gelu"), bjax.InvalidProblemError, "activation must be None or 'silu'"),
]


@pytest.mark.parametrize("change,error,message", STEP_ERRORS,
                         ids=[str(i) for i in range(len(STEP_ERRORS))])
def test_step_errors(change, error, message):
    good = _good()
    args = {"conv_state": good["initial_states"], "x": good["x"][:, 0],
            "weight": good["weight"], "bias": good["bias"], "backend": KERNEL_BACKEND, **change}
    state = args.pop("conv_state")
    with pytest.raises(error, match="causal_conv1d_step: " + message) as info:
        jax.jit(lambda s: bjax.causal_conv1d_step(s, **args))(state)
    assert "got" in str(info.value)
