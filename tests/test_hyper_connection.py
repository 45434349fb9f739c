"""mHC against float64 oracles: Sinkhorn (values, exact gradient vs finite differences),
the fused static op (HyperConnectionPlan), mhc_pre / mhc_post as the paper's layer, transforms, errors."""
import dataclasses
import math
import re
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bjax
from benchmarks import cases
from bjax.hyper_connection import (SINKHORN_INITS, SINKHORN_ORDERS, SinkhornInit,
                                   SinkhornOrder)
from pallas_kernels import hyper_connection as pallas_hc
from pallas_kernels.formulas import sinkhorn as sinkhorn_math
from pallas_kernels.tiling import TileConfig
from tests import oracles
from tests.conftest import BACKENDS, KERNEL_BACKEND, assert_close, jax_random_normal, random

X_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_ids = lambda d: jnp.dtype(d).name  # noqa: E731
# Float32 math over tens of Sinkhorn divisions and n-term sums: a few ulp of float32
# relative to the largest output (assert_close's bound), for 16-bit x the output's rounding.
SCALE = {jnp.dtype(jnp.float32): 8.0, jnp.dtype(jnp.bfloat16): 1.0, jnp.dtype(jnp.float16): 1.0}
# Gradients: float32 math against float64 autodiff, relative to each gradient's largest
# entry; 16-bit x adds the rounding of dx (half an ulp) and of x's products in f32.
GRAD_RTOL = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 2**-7,
             jnp.dtype(jnp.float16): 2**-10}


def normal(seed, shape, dtype=jnp.float32, std=1.0):
    return random(seed, shape, dtype, scale=std)


def assert_grad_close(out, ref, rtol, name):
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    assert out.shape == ref.shape, name
    assert np.isfinite(out).all(), f"{name}: non-finite gradient"
    err = np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30)
    assert err <= rtol, f"{name}: max error {err:.3g} relative to max |ref|, bound {rtol:.3g}"


# ---------------------------------------------------------------- Sinkhorn

# Every shape (padding, leading dims, n = 1 and 32) in the default order; every order at
# the largest shape: the schedule does not depend on the shape, nor the padding on it.
SINKHORN_CASES = ([(shape, "columns_first") for shape in [(4, 4), (3, 1, 1), (2, 5, 3, 3)]]
                  + [((7, 32, 32), order) for order in SINKHORN_ORDERS])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("init", SINKHORN_INITS)
@pytest.mark.parametrize("shape, order", SINKHORN_CASES,
                         ids=[f"{s}-{o}" for s, o in SINKHORN_CASES])
def test_sinkhorn_matches_oracle(shape, init, order, backend):
    logits = normal(0, shape, std=2.0)
    out = bjax.sinkhorn_knopp(logits, iters=20, eps=1e-5, init=init, order=order,
                              backend=backend)
    ref = oracles.sinkhorn(np.asarray(logits, np.float64), 20, 1e-5, init, order)
    assert out.shape == shape and out.dtype == jnp.float32
    assert_close(out, ref, jnp.float32, 8.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=_ids)
def test_sinkhorn_16bit_logits(dtype, backend):
    logits = normal(1, (3, 4, 4), dtype)
    out = bjax.sinkhorn_knopp(logits, iters=5, backend=backend)
    assert out.dtype == dtype
    assert_close(out, oracles.sinkhorn(np.asarray(logits, np.float64), 5, 1e-5), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("init", SINKHORN_INITS)
@pytest.mark.parametrize("std", [0.1, 1.0, 3.0])
def test_sinkhorn_gradient_matches_finite_differences(std, init, backend):
    """Central differences of the float64 oracle, cell by cell: the gradient of the finite
    iteration, where dropping the 1/sum factors is off by 4-100x."""
    n, iters, eps, h = 4, 20, 1e-5, 1e-6
    logits = normal(2, (n, n), std=std)
    cotangent = np.asarray(normal(3, (n, n)), np.float64)
    loss = lambda l: float(np.sum(np.asarray(  # noqa: E731
        oracles.sinkhorn(l, iters, eps, init)) * cotangent))
    base = np.asarray(logits, np.float64)
    fd = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            step = np.zeros((n, n))
            step[i, j] = h
            fd[i, j] = (loss(base + step) - loss(base - step)) / (2 * h)
    grad = jax.jit(jax.grad(lambda l: jnp.sum(bjax.sinkhorn_knopp(
        l, iters=iters, eps=eps, init=init, backend=backend) * cotangent)))(logits)
    # The oracle's differences carry ~1e-10 of cancellation; the f32 backward a few ulp
    # of the largest term it subtracts (G and sum(G * P) are O(|cotangent|)).
    scale = np.max(np.abs(cotangent))
    np.testing.assert_allclose(np.asarray(grad, np.float64), fd, rtol=0, atol=2e-5 * scale)
    assert np.max(np.abs(fd)) > 1e-3 * scale  # a gradient that is not ~0


@pytest.mark.parametrize("backend", BACKENDS)
# "deepseek": test_sinkhorn_mixed_scales checks its gradient, and the padding of n = 3
# and 8 does not depend on the order.
@pytest.mark.parametrize("order", ["columns_first", "rows_first"])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_sinkhorn_gradient_matches_autodiff(n, order, backend):
    logits = normal(4, (5, n, n), std=1.5)
    cotangent = normal(5, (5, n, n))
    for init in SINKHORN_INITS:
        grad = jax.grad(lambda l: jnp.sum(bjax.sinkhorn_knopp(
            l, iters=12, init=init, order=order, backend=backend) * cotangent))(logits)
        ref = jax.grad(lambda l: jnp.sum(oracles.sinkhorn(l, 12, 1e-5, init, order)
                                         * cotangent))(jnp.asarray(logits, jnp.float64))
        np.testing.assert_allclose(np.asarray(grad, np.float64), np.asarray(ref), rtol=0,
                                   atol=2e-5 * float(jnp.max(jnp.abs(cotangent))))


def test_sinkhorn_many_iterations_and_softmax_for_large_logits():
    logits = normal(6, (2, 4, 4), std=40.0)  # exp overflows; softmax does not
    for backend in BACKENDS:
        out = bjax.sinkhorn_knopp(logits, iters=1000, init="softmax", backend=backend)
        ref = oracles.sinkhorn(np.asarray(logits, np.float64), 1000, 1e-5, "softmax")
        assert_close(out, ref, jnp.float32, 8.0)


def sinkhorn_case(logits, init, order, backend, iters=20, eps=1e-5):
    """Values and the gradient of a random cotangent against the float64 oracle of the
    shifted formula, on the very logits given (rounded to their dtype)."""
    cotangent = normal(40, logits.shape)
    out, vjp = jax.vjp(lambda l: bjax.sinkhorn_knopp(l, iters=iters, eps=eps, init=init,
                                                     order=order, backend=backend), logits)
    logits64 = jnp.asarray(logits, jnp.float64)
    ref, ref_vjp = jax.vjp(lambda l: oracles.sinkhorn(l, iters, eps, init, order), logits64)
    assert_close(out, ref, logits.dtype, 8.0)
    (grad,), (ref_grad,) = vjp(cotangent.astype(out.dtype)), ref_vjp(
        jnp.asarray(cotangent, jnp.float64))
    assert_grad_close(grad, ref_grad, 2e-5 if logits.dtype == jnp.float32 else 2 ** -7,
                      "dlogits")
    return out


# Whole matrices far from 0: exp(L) alone overflows float32 from 89 up and underflows to
# a zero matrix from about -104 down; the shift by each matrix's maximum makes them the
# same problem as the logits near 0.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("init", SINKHORN_INITS)
@pytest.mark.parametrize("offset", [100.0, -100.0, 1e4, -1e4])
def test_sinkhorn_any_logit_scale(offset, init, backend):
    logits = normal(41, (3, 4, 4)) + offset
    out = sinkhorn_case(logits, init, "columns_first", backend)
    near_zero = sinkhorn_case(logits - offset, init, "columns_first", backend)
    # Doubly stochastic up to eps, and the same matrices as the logits without the offset
    # (those differ from logits - offset only by the rounding of the offset logits).
    np.testing.assert_allclose(np.asarray(out).sum(-1), 1.0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out).sum(-2), 1.0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out), np.asarray(near_zero), atol=5e-3 if abs(
        offset) > 1e3 else 1e-4)  # logits around 1e4 hold float32 steps of 2^-10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", SINKHORN_ORDERS)
def test_sinkhorn_mixed_scales(order, backend):
    """Rows (and, in a second matrix, columns) of one matrix 30 apart, down to 90 below the
    largest entry (exp of that is under float32's normal range), and matrices at +-1e4 in
    the same call. Such rows grow by about 1/eps per normalisation, as in the oracle."""
    noise = normal(42, (4, 4, 4))
    steps = jnp.array([0.0, 30.0, 60.0, 90.0], jnp.float32)
    logits = jnp.stack([noise[0] + steps[:, None], noise[1] + steps[None, :],
                        noise[2] + 1e4, noise[3] - 1e4])
    out = sinkhorn_case(logits, "exp", order, backend)
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("init", SINKHORN_INITS)
def test_sinkhorn_bfloat16_large_logits(init, backend):
    """bfloat16 logits at +-100 and +-1e4 (where bfloat16 steps by 64, so many cells tie
    for the maximum and share its gradient term)."""
    noise = normal(43, (4, 4, 4), std=40.0)
    logits = (noise + jnp.array([100.0, -100.0, 1e4, -1e4])[:, None, None]).astype(
        jnp.bfloat16)
    sinkhorn_case(logits, init, "columns_first", backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hyper_connection_large_h_res(backend):
    x, weight, h_pre, h_post, _ = hc_problem(44, 3, 4, 40, jnp.float32)
    for value in (95.0, -200.0):
        h_res = jnp.full((4, 4), value) + jnp.eye(4)
        out = bjax.hyper_connection(x, weight, h_pre, h_post, h_res, backend=backend)
        ref = oracles.hyper_connection(x, weight, h_pre, h_post, h_res, 20, 1e-5)
        assert_close(out, ref, jnp.float32, SCALE[jnp.dtype(jnp.float32)])


# ---------------------------------------------------------------- the fused static op

def hc_problem(seed, batch, n, hidden, dtype):
    k = seed * 10
    return (normal(k, (batch, n, hidden), dtype), normal(k + 1, (hidden,)),
            normal(k + 2, (n,)), normal(k + 3, (n,)), normal(k + 4, (n, n)))


def _params(cases):
    return [pytest.param(shape, dtype, backend, id=f"{shape}-{jnp.dtype(dtype).name}-{backend}")
            for shape, dtype, backends in cases for backend in backends]


# Small shapes in every dtype; n = 32, the kernels' stream cap, in float32 (unrolling the
# streams does not depend on the dtype, which the other shapes cover); the long rows (one
# tile of 4 x 4096, and two passes over C = 17000) in float32 and bfloat16, the two
# storage widths, on the kernels only: the XLA formula has no tiles, so there they would
# run the code of the small cases again.
HC_CASES = ([(shape, dtype, BACKENDS) for shape in [(5, 4, 40), (1, 1, 1), (3, 7, 130)]
             for dtype in X_DTYPES]
            + [((2, 32, 16), jnp.float32, BACKENDS)]
            + [(shape, dtype, (KERNEL_BACKEND,)) for shape in [(9, 4, 4096), (2, 3, 17000)]
               for dtype in (jnp.float32, jnp.bfloat16)])


@pytest.mark.parametrize("shape, dtype, backend", _params(HC_CASES))
def test_hyper_connection_matches_oracle(shape, dtype, backend):
    args = hc_problem(1, *shape, dtype)
    out = jax.jit(lambda *a: bjax.hyper_connection(*a, sinkhorn_iters=20, eps=1e-5,
                                                   backend=backend))(*args)
    ref = oracles.hyper_connection(*(np.asarray(a, np.float64) for a in args), 20, 1e-5)
    assert out.shape == shape and out.dtype == dtype
    assert_close(out, ref, dtype, SCALE[jnp.dtype(dtype)])


def hc_gradients(args, backend, order="columns_first", iters=20):
    cotangent = normal(99, args[0].shape)

    def loss(fn, *a):
        return jnp.sum(fn(*a).astype(cotangent.dtype) * cotangent)

    mine = jax.jit(jax.grad(lambda *a: loss(lambda *b: bjax.hyper_connection(
        *b, sinkhorn_iters=iters, sinkhorn_order=order, backend=backend), *a),
        argnums=range(5)))(*args)
    ref = jax.jit(jax.grad(lambda *a: jnp.sum(oracles.hyper_connection(*a, iters, 1e-5, order)
                                              * cotangent.astype(jnp.float64)),
                           argnums=range(5)))(*(a.astype(jnp.float64) for a in args))
    return mine, ref


# Every small shape in float32 and every dtype at (3, 7, 130): shapes exercise the tiling,
# the same for every dtype, and dtypes the rounding, the same for every shape.
GRAD_CASES = ([(shape, jnp.float32, BACKENDS) for shape in [(5, 4, 40), (1, 2, 3)]]
              + [((3, 7, 130), dtype, BACKENDS) for dtype in X_DTYPES]
              + [((2, 3, 17000), dtype, (KERNEL_BACKEND,)) for dtype in (jnp.float32,
                                                                        jnp.bfloat16)])


@pytest.mark.parametrize("shape, dtype, backend", _params(GRAD_CASES))
def test_hyper_connection_gradients(shape, dtype, backend):
    # n = 1 or C = 1 are left to the forward test: RMSNorm is scale-invariant, so there
    # the gradient of h_pre (and for C = 1 of x) is 0 up to the cancellation of O(1) terms.
    args = hc_problem(2, *shape, dtype)
    mine, ref = hc_gradients(args, backend)
    for name, a, g, r in zip(("x", "rmsnorm_weight", "h_pre", "h_post", "h_res"), args, mine,
                             ref):
        assert g.dtype == a.dtype, name
        assert_grad_close(g, r, GRAD_RTOL[jnp.dtype(dtype)], name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hyper_connection_rows_first_and_few_iterations(backend):
    args = hc_problem(3, 4, 4, 64, jnp.float32)
    out = bjax.hyper_connection(*args, sinkhorn_iters=1, sinkhorn_order="rows_first",
                                backend=backend)
    ref = oracles.hyper_connection(*(np.asarray(a, np.float64) for a in args), 1, 1e-5,
                                   "rows_first")
    assert_close(out, ref, jnp.float32, SCALE[jnp.dtype(jnp.float32)])
    mine, ref = hc_gradients(args, backend, "rows_first", iters=1)
    for g, r in zip(mine, ref):
        assert_grad_close(g, r, GRAD_RTOL[jnp.dtype(jnp.float32)], "rows_first")


# ---------------------------------------------------------------- mhc_pre / mhc_post

def layer_problem(seed, lead, n, hidden, dtype, dynamic):
    count = n * n + 2 * n
    k = seed * 10
    x = normal(k, (*lead, n, hidden), dtype)
    bias = normal(k + 1, (count,))
    phi = normal(k + 2, (n * hidden, count), std=0.5) if dynamic else None
    alpha = jnp.array([0.8, 0.6, 1.3], jnp.float32) if dynamic else None
    return x, bias, phi, alpha


def sublayer(u):
    return jnp.tanh(u) * 1.5


def run_layer(x, bias, phi, alpha, backend, x_post=None, pre_config=None, **options):
    post_options = {"transpose_res": options.pop("transpose_res", False)}
    layer_input, h_post, h_res = bjax.mhc_pre(x, bias=bias, phi=phi, alpha=alpha,
                                              backend=backend, config=pre_config, **options)
    f_out = sublayer(layer_input.astype(jnp.float32)).astype(x.dtype)
    x_post = x if x_post is None else x_post
    return bjax.mhc_post(x_post, f_out, h_post, h_res, backend=backend, **post_options), \
        layer_input, h_post, h_res


def oracle_layer(x, bias, phi, alpha, x_dtype=None, x_post=None, **options):
    """The float64 layer; the sublayer sees layer_input rounded to x's dtype and its output
    is rounded to it, as in :func:`run_layer` (rounding passes cotangents through)."""
    n, hidden = x.shape[-2:]
    dtype = x_dtype or x.dtype

    def rounded_sublayer(u):
        return sublayer(u.astype(dtype).astype(jnp.float64)).astype(dtype).astype(jnp.float64)

    defaults = dict(rmsnorm_eps=1e-6, iters=20, sinkhorn_eps=1e-5)
    renamed = {"sinkhorn_iters": "iters", "sinkhorn_init": "init", "sinkhorn_order": "order"}
    defaults.update({renamed.get(k, k): v for k, v in options.items()})
    as64 = lambda a: None if a is None else jnp.asarray(a, jnp.float64)  # noqa: E731
    outs = oracles.mhc_layer(as64(x).reshape(-1, n, hidden), rounded_sublayer, as64(bias),
                             as64(phi),
                             as64(alpha), x_post=None if x_post is None else
                             as64(x_post).reshape(-1, n, hidden), **defaults)
    lead = x.shape[:-2]
    return (outs[0].reshape(x.shape), outs[1].reshape(*lead, hidden),
            outs[2].reshape(*lead, n), outs[3].reshape(*lead, n, n))


LAYER_OPTIONS = [
    {},
    {"sinkhorn_init": "softmax", "sinkhorn_order": "rows_first", "pre_eps": 1e-2,
     "post_scale": 1.5, "transpose_res": True, "sinkhorn_iters": 10},
]


# Every option set in float32, and the 16-bit dtypes with dynamic H (every kernel runs
# there): the options choose code paths, the same in every dtype, and the dtype the
# rounding, the same for every option set.
LAYER_CASES = ([pytest.param(jnp.float32, dynamic, options, id=f"float32-{d_id}-{o_id}")
                for dynamic, d_id in ((False, "static"), (True, "dynamic"))
                for options, o_id in zip(LAYER_OPTIONS, ("paper", "deepseek-style"))]
               + [pytest.param(dtype, True, options, id=f"{_ids(dtype)}-dynamic-{o_id}")
                  for dtype in X_DTYPES[1:]
                  for options, o_id in zip(LAYER_OPTIONS, ("paper", "deepseek-style"))])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, dynamic, options", LAYER_CASES)
def test_mhc_layer_matches_oracle(dtype, dynamic, options, backend):
    x, bias, phi, alpha = layer_problem(4, (2, 3), 4, 72, dtype, dynamic)
    outs = jax.jit(lambda *a: run_layer(*a, backend, **options))(x, bias, phi, alpha)
    refs = oracle_layer(x, bias, phi, alpha, **options)
    for name, out, ref in zip(("x_next", "layer_input", "h_post", "h_res"), outs, refs):
        out_dtype = dtype if name in ("x_next", "layer_input") else jnp.float32
        assert out.shape == ref.shape and out.dtype == out_dtype, name
        # x_next passes through the sublayer in x's dtype: one more rounding of f_out.
        assert_close(out, ref, out_dtype, SCALE[jnp.dtype(out_dtype)]
                     * (2 if name == "x_next" else 1))


# Kernel backend only: these shapes exercise the kernels' tiles and stream unrolling; the
# XLA formula has neither, and test_mhc_layer_matches_oracle runs it.
@pytest.mark.parametrize("shape", [((1,), 1, 1), ((5,), 3, 130), ((2, 2), 32, 16),
                                   ((70,), 4, 300)], ids=str)
def test_mhc_layer_shapes(shape, backend=KERNEL_BACKEND):
    lead, n, hidden = shape
    x, bias, phi, alpha = layer_problem(5, lead, n, hidden, jnp.float32, True)
    outs = run_layer(x, bias, phi, alpha, backend)
    for out, ref in zip(outs, oracle_layer(x, bias, phi, alpha)):
        assert_close(out, ref, jnp.float32, 2 * SCALE[jnp.dtype(jnp.float32)])


def _projection_configs(rows, flat, width, dtype):
    """The heuristic's projection config and variants of it: one split, a split per
    step, the most splits that leave one without a step, column blocks narrower than
    the stacked pieces, the smallest row block, and 128 x 128 tiles on 2 stages."""
    base = pallas_hc.projection_config(rows, flat, width, dtype)
    steps = -(-flat // base.block_cols)
    variants = [base, dataclasses.replace(base, splits=1),
                dataclasses.replace(base, splits=steps),
                dataclasses.replace(base, splits=steps - 1),
                dataclasses.replace(base, block_rows=16, block_width=min(width, 32)),
                dataclasses.replace(base, block_rows=128, block_cols=128, num_warps=8,
                                    num_stages=2)]
    return list(dict.fromkeys(variants))


# The projection's tiles and split of the row, over x dtypes, counts whose stacked pieces
# need padding (n = 3: 15 x 3 -> 64) or several column blocks (n = 8: 80 x 3 -> 256), a
# flattened row that is not a multiple of the tile, and rows that are not either.
@pytest.mark.parametrize("dtype", X_DTYPES, ids=_ids)
@pytest.mark.parametrize("rows, n, hidden", [(37, 4, 300), (130, 3, 64), (9, 8, 40)], ids=str)
def test_projection_configs_match_oracle(rows, n, hidden, dtype):
    count = n * n + 2 * n
    x = normal(40, (rows, n * hidden), dtype)
    phi = normal(41, (n * hidden, count), std=0.05)
    x64, phi64 = (np.asarray(a.astype(jnp.float32), np.float64) for a in (x, phi))
    width = pallas_hc.stacked_phi_pieces(phi).shape[1]
    for config in _projection_configs(rows, n * hidden, width, dtype):
        proj, squares = pallas_hc.project(x, phi, config=config,
                                          interpret=KERNEL_BACKEND == "interpret")
        # float32-exact products summed in float32 over n C terms: a few ulp of float32.
        assert_close(proj, x64 @ phi64, jnp.float32, SCALE[jnp.dtype(jnp.float32)])
        assert_close(squares, np.sum(x64 * x64, axis=1), jnp.float32)


# The benchmarked widths, on the GPU only: hundreds of steps along the row, split across
# programs. A bfloat16 x taken to the tensor cores as loaded summed rows wrong there
# (differently from run to run), and right at the sizes above; so two calls.
@pytest.mark.skipif(KERNEL_BACKEND != "pallas", reason="GPU-sized problems")
@pytest.mark.parametrize("shape", cases.MHC_LAYER_SHAPES, ids=str)
def test_projection_at_benchmarked_widths(shape):
    x, phi, _, _ = cases.mhc_layer_inputs(shape)
    x_flat = x.reshape(shape[0], -1)
    x64, phi64 = np.asarray(x_flat, np.float64), np.asarray(phi, np.float64)
    for _ in range(2):
        proj, squares = pallas_hc.project(x_flat, phi)
        # float32-exact products summed in float32 over n C terms: a few ulp of float32.
        assert_close(proj, x64 @ phi64, jnp.float32, SCALE[jnp.dtype(jnp.float32)])
        assert_close(squares, np.sum(x64 * x64, axis=1), jnp.float32)


# Many token chunks and phi tiles (1000 tokens: 27 chunks of 10 tiles), as at the
# benchmarked widths, where the layer tests' few tokens make one chunk.
@pytest.mark.parametrize("dtype", X_DTYPES, ids=_ids)
def test_projection_weight_grad_matches_oracle(dtype):
    rows, flat, count = 1000, 4 * 300, 24
    x = normal(42, (rows, flat), dtype)
    dproj = normal(43, (rows, count))
    got = pallas_hc.project_weight_grad(x, dproj, interpret=KERNEL_BACKEND == "interpret")
    x64, d64 = (np.asarray(a.astype(jnp.float32), np.float64) for a in (x, dproj))
    # float32-exact products summed in float32 over 1000 tokens: a few ulp of float32.
    assert_close(got, x64.T @ d64, jnp.float32, SCALE[jnp.dtype(jnp.float32)])


def layer_gradients(x, bias, phi, alpha, backend, pre_config=None, **options):
    cotangents = [normal(90 + i, s) for i, s in enumerate(
        (x.shape, x.shape[:-2] + x.shape[-1:], x.shape[:-1], x.shape[:-2] + x.shape[-2:-1] * 2))]
    # x enters mhc_pre and mhc_post as two arguments: each op's dx is rounded to x's
    # dtype on its own, and their sum would round once more.
    dynamic = phi is not None
    argnums = (0, 1, 2, 3, 4) if dynamic else (0, 1, 4)

    def loss(outs):
        return sum(jnp.sum(o.astype(jnp.float64 if o.dtype == jnp.float64 else jnp.float32)
                           * c.astype(o.dtype if o.dtype == jnp.float64 else jnp.float32))
                   for o, c in zip(outs, cotangents))

    mine = jax.jit(jax.grad(lambda x, b, p, a, x_post: loss(run_layer(
        x, b, p, a, backend, x_post=x_post, pre_config=pre_config, **options)),
        argnums=argnums))(x, bias, phi, alpha, x)
    as64 = lambda a: None if a is None else a.astype(jnp.float64)  # noqa: E731
    def oracle_loss(x64, b, p, a, x_post):
        x_next, layer_input, h_post, h_res = oracle_layer(x64, b, p, a, x_dtype=x.dtype,
                                                          x_post=x_post, **options)
        # x_next and layer_input are outputs in x's dtype: their cotangents arrive rounded.
        rounded = [o.astype(x.dtype).astype(jnp.float64) for o in (x_next, layer_input)]
        return loss((*rounded, h_post, h_res))

    ref = jax.grad(oracle_loss, argnums=argnums)(*map(as64, (x, bias, phi, alpha, x)))
    return mine, ref


# DeepSeek-style options with dynamic H: test_deepseek_presets_match_deepseek_formula
# checks the gradients of every weight under those options.
LAYER_GRADIENT_CASES = [pytest.param(False, LAYER_OPTIONS[0], id="static-paper"),
                        pytest.param(False, LAYER_OPTIONS[1], id="static-deepseek-style"),
                        pytest.param(True, LAYER_OPTIONS[0], id="dynamic-paper")]


# Each case in float32; the 16-bit dtypes with dynamic H, whose backward runs every
# gradient kernel (the rounding does not depend on the case).
LAYER_GRADIENT_PARAMS = ([pytest.param(jnp.float32, *case.values, id=f"float32-{case.id}")
                          for case in LAYER_GRADIENT_CASES]
                         + [pytest.param(dtype, *LAYER_GRADIENT_CASES[2].values,
                                         id=f"{_ids(dtype)}-{LAYER_GRADIENT_CASES[2].id}")
                            for dtype in X_DTYPES[1:]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, dynamic, options", LAYER_GRADIENT_PARAMS)
def test_mhc_layer_gradients(dtype, dynamic, options, backend):
    x, bias, phi, alpha = layer_problem(6, (3, 5), 4, 48, dtype, dynamic)
    mine, ref = layer_gradients(x, bias, phi, alpha, backend, **options)
    names = ("x", "bias", "phi", "alpha", "x_post") if dynamic else ("x", "bias", "x_post")
    for name, g, r in zip(names, mine, ref):
        assert_grad_close(g, r, GRAD_RTOL[jnp.dtype(dtype)], name)


def check_mhc_pre(backend, config=None, dtype=jnp.float32):
    """The layer with dynamic H (mhc_pre with ``config``): every output and gradient
    against float64, on 15 tokens of 4 streams of 48 channels."""
    x, bias, phi, alpha = layer_problem(6, (3, 5), 4, 48, dtype, True)
    outs = jax.jit(lambda *a: run_layer(*a, backend, pre_config=config))(x, bias, phi, alpha)
    for name, out, ref in zip(("x_next", "layer_input", "h_post", "h_res"), outs,
                              oracle_layer(x, bias, phi, alpha)):
        out_dtype = dtype if name in ("x_next", "layer_input") else jnp.float32
        # As test_mhc_layer_matches_oracle: x_next rounds f_out once more.
        assert_close(out, ref, out_dtype, SCALE[jnp.dtype(out_dtype)]
                     * (2 if name == "x_next" else 1))
    mine, ref = layer_gradients(x, bias, phi, alpha, backend, pre_config=config)
    for name, g, r in zip(("x", "bias", "phi", "alpha", "x_post"), mine, ref):
        assert_grad_close(g, r, GRAD_RTOL[jnp.dtype(dtype)], name)


# The inputs that exposed the ties below.
def _tied_layer_of_3x5_tokens():
    return (jax_random_normal(60, (3, 5, 4, 48)), jax_random_normal(61, (24,)),
            jax_random_normal(62, (192, 24), scale=0.5), jnp.array([0.8, 0.6, 1.3], jnp.float32))


def _tied_layer_of_16_tokens():
    k = jax.random.split(jax.random.key(9), 4)
    return (jax.random.normal(k[0], (16, 4, 48), jnp.float32),
            jax.random.normal(k[1], (24,), jnp.float32),
            jax.random.normal(k[2], (192, 24), jnp.float32) / math.sqrt(192),
            jax.random.normal(k[3], (3,), jnp.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("problem", [_tied_layer_of_3x5_tokens, _tied_layer_of_16_tokens],
                         ids=["3x5-tokens", "16-tokens"])
def test_mixing_matrix_gradient_through_dynamic_h(problem, backend):
    """d <c, h_res> / dx (a random cotangent c) with H computed from x. The derivative of
    the Sinkhorn's shift (the matrix maximum) compares the logits with it; XLA's CPU
    compiler recomputed the logits inside that comparison's fusion with differently
    contracted multiply-adds, and for two tokens of each problem no cell compared equal (JAX's rule for a maximum then divides
    by a tie count of 0: a NaN gradient). The first problem hit the XLA backend; the
    second the kernels run by the interpreter, which fuses them into the program."""
    x, bias, phi, alpha = problem()
    # Not all ones: the sum of a doubly stochastic matrix hardly depends on the logits.
    cotangent = jax_random_normal(7, (*x.shape[:-2], 4, 4))
    mine = jax.jit(jax.grad(lambda x: jnp.sum(cotangent * bjax.mhc_pre(
        x, bias=bias, phi=phi, alpha=alpha, backend=backend)[2])))(x)
    ref = jax.jit(jax.grad(lambda x64: jnp.sum(
        cotangent * oracle_layer(x64, bias, phi, alpha)[3])))(x.astype(jnp.float64))
    assert_grad_close(mine, ref, GRAD_RTOL[jnp.dtype(jnp.float32)], "x")


def test_matrix_shift_derivative_is_jax_rule_for_a_maximum():
    """Ties share the derivative equally, as for jnp.max; a matrix of -inf (shift at the
    floor) has none."""
    logits = jnp.array([[[1.0, 3.0, 3.0], [0.0, 3.0, 2.0], [-1.0, 0.0, 1.0]],
                        [[0.5, -2.0, 0.0], [1.0, 0.0, -1.0], [0.0, 0.0, 0.0]]])
    mine = jax.jacobian(lambda v: sinkhorn_math.matrix_shift(v).ravel())(logits)
    jax_rule = jax.jacobian(lambda v: jnp.max(v, axis=(-2, -1)))(logits)
    np.testing.assert_array_equal(np.asarray(mine), np.asarray(jax_rule))
    floor = jax.grad(lambda v: jnp.sum(sinkhorn_math.matrix_shift(v)))(
        jnp.full((1, 2, 2), -jnp.inf))
    np.testing.assert_array_equal(np.asarray(floor), 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=_ids)
def test_deepseek_presets_match_deepseek_formula(dtype, backend):
    """The presets with DeepSeek's weights (fn, scale, base, norm weight) against a float64
    oracle written in DeepSeek's own terms: values and the gradients of every weight."""
    tokens, n, hidden = 6, 4, 64
    x = normal(60, (tokens, n, hidden), dtype)
    fn = normal(61, (n * (n + 2), n * hidden), std=1 / math.sqrt(n * hidden))
    scale, base, w = normal(62, (3,)), normal(63, (n * (n + 2),)), 1 + normal(64, (n * hidden,))
    f_weight = normal(65, (hidden,))

    def sublayer(u):
        return jnp.tanh(u * f_weight)

    def mine(x, fn, scale, base):
        layer_input, h_post, h_res = bjax.mhc_pre(x, phi=(fn * w[None, :]).T, alpha=scale,
                                                  bias=base, backend=backend,
                                                  **bjax.DEEPSEEK_MHC_PRE)
        f_out = sublayer(layer_input.astype(jnp.float32)).astype(x.dtype)
        out = bjax.mhc_post(x, f_out, h_post, h_res, backend=backend, **bjax.DEEPSEEK_MHC_POST)
        return out, layer_input, h_post, h_res

    def theirs(x, fn, scale, base):
        rounded = lambda u: sublayer(u.astype(dtype).astype(jnp.float64)).astype(  # noqa: E731
            dtype).astype(jnp.float64)
        return oracles.deepseek_mhc_layer(x, fn, scale, base, w, rounded)

    args = (x, fn, scale, base)
    outs = jax.jit(mine)(*args)
    refs = theirs(*(a.astype(jnp.float64) for a in args))
    for name, out, ref in zip(("x_next", "layer_input", "h_post", "h_res"), outs, refs):
        out_dtype = dtype if name in ("x_next", "layer_input") else jnp.float32
        assert_close(out, ref, out_dtype, SCALE[jnp.dtype(out_dtype)]
                     * (2 if name == "x_next" else 1))
    cotangent = normal(66, x.shape)
    loss = lambda f: lambda *a: jnp.sum(f(*a)[0].astype(cotangent.dtype) * cotangent)  # noqa: E731
    grads = jax.jit(jax.grad(loss(mine), argnums=(0, 1, 2, 3)))(*args)
    ref_grads = jax.jit(jax.grad(lambda *a: jnp.sum(theirs(*a)[0] * cotangent),
                                 argnums=(0, 1, 2, 3)))(*(a.astype(jnp.float64) for a in args))
    for name, g, r in zip(("x", "fn", "scale", "base"), grads, ref_grads):
        assert_grad_close(g, r, GRAD_RTOL[jnp.dtype(dtype)], name)


def check_mhc_post(backend, config=None):
    """mhc_post's output and the gradient of every argument, both mixes (h_res and its
    transpose), against float64, on 6 tokens of 3 streams of 50 channels."""
    x = normal(7, (6, 3, 50))
    f_out, h_post, h_res = normal(8, (6, 50)), normal(9, (6, 3)), normal(10, (6, 3, 3))
    cotangent = normal(11, x.shape)
    for transpose in (False, True):
        def mine(*a):
            return bjax.mhc_post(*a, transpose_res=transpose, backend=backend, config=config)

        def oracle(x, f, hp, hr):
            r = jnp.swapaxes(hr, 1, 2) if transpose else hr
            return (r[:, :, :, None] * x[:, None]).sum(2) + hp[:, :, None] * f[:, None, :]
        args64 = [a.astype(jnp.float64) for a in (x, f_out, h_post, h_res)]
        assert_close(jax.jit(mine)(x, f_out, h_post, h_res), oracle(*args64), jnp.float32)
        grads = jax.jit(jax.grad(lambda *a: jnp.sum(mine(*a) * cotangent), argnums=range(4)))(
            x, f_out, h_post, h_res)
        ref = jax.jit(jax.grad(lambda *a: jnp.sum(oracle(*a) * cotangent), argnums=range(4)))(
            *args64)
        for name, g, r in zip(("x", "f_out", "h_post", "h_res"), grads, ref):
            assert_grad_close(g, r, GRAD_RTOL[jnp.dtype(jnp.float32)], name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mhc_post_gradients_of_every_argument(backend):
    check_mhc_post(backend)


# ---------------------------------------------------------------- transforms, determinism

@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_checkpoint_and_determinism(backend):
    x, bias, phi, alpha = layer_problem(12, (4,), 4, 40, jnp.bfloat16, True)
    step = jax.jit(jax.grad(jax.checkpoint(lambda x, phi: sum(
        jnp.sum(o.astype(jnp.float32)) for o in run_layer(x, bias, phi, alpha, backend))),
        argnums=(0, 1)))
    first, second = step(x, phi), step(x, phi)
    for a, b in zip(first, second):
        assert np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    # vmap over a leading axis equals the op on the stacked tokens.
    mapped = jax.vmap(lambda x: run_layer(x, bias, phi, alpha, backend)[0])(x[:, None])
    np.testing.assert_array_equal(np.asarray(mapped[:, 0], np.float32),
                                  np.asarray(run_layer(x, bias, phi, alpha, backend)[0],
                                             np.float32))
    args = hc_problem(13, 3, 4, 32, jnp.float32)
    batched = jax.vmap(lambda x: bjax.hyper_connection(x, *args[1:], backend=backend))(
        jnp.stack([args[0], 2 * args[0]]))
    alone = np.asarray(bjax.hyper_connection(2 * args[0], *args[1:], backend=backend))
    # Float32 rounding relative to the output's scale: on a GPU, XLA may compile the batched
    # and the single matmuls to different GEMM algorithms (another summation order), and
    # outputs near 0 come out of cancelling sums (on an H200: 3e-8 apart at 0.016, in
    # outputs of order 1).
    np.testing.assert_allclose(batched[1], alone, rtol=1e-6, atol=1e-6 * np.abs(alone).max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens(backend):
    x, bias, phi, alpha = layer_problem(14, (0,), 4, 8, jnp.float32, True)
    outs = run_layer(x, bias, phi, alpha, backend)
    assert [o.shape for o in outs] == [(0, 4, 8), (0, 8), (0, 4), (0, 4, 4)]
    assert bjax.sinkhorn_knopp(jnp.zeros((0, 3, 3)), backend=backend).shape == (0, 3, 3)


def test_plan():
    x = jax.ShapeDtypeStruct((16, 4, 64), jnp.bfloat16)
    count = jax.ShapeDtypeStruct((24,), jnp.float32)
    p = bjax.plan(bjax.mhc_pre, x, bias=count, phi=jax.ShapeDtypeStruct((256, 24), jnp.float32),
                  alpha=jax.ShapeDtypeStruct((3,), jnp.float32), backend="interpret")
    assert p.descriptor.dynamic and "bjax_mhc_projection" in p.kernel
    assert p.precision.deterministic


# ---------------------------------------------------------------- errors

F32 = jnp.float32
_X = jnp.ones((2, 4, 8), F32)
_PRE_KWARGS = dict(bias=jnp.ones((24,), F32), phi=jnp.ones((32, 24), F32),
                   alpha=jnp.ones((3,), F32))
_POST_ARGS = (_X, jnp.ones((2, 8), F32), jnp.ones((2, 4), F32), jnp.ones((2, 4, 4), F32))
_W, _V, _M = jnp.ones((8,), F32), jnp.ones((4,), F32), jnp.ones((4, 4), F32)
_BIAS, _PHI, _ALPHA = jnp.ones((24,), F32), jnp.ones((32, 24), F32), jnp.ones((3,), F32)

ERRORS = [
    (lambda: bjax.sinkhorn_knopp(jnp.ones((3, 4), F32)), bjax.InvalidProblemError,
     "logits must be an array [..., n, n]"),
    (lambda: bjax.sinkhorn_knopp(jnp.ones((4,), F32)), bjax.InvalidProblemError, "logits must be"),
    (lambda: bjax.sinkhorn_knopp(_M, iters=0), bjax.InvalidProblemError,
     "iters must be an int in [1, 1000]; got 0"),
    (lambda: bjax.sinkhorn_knopp(_M, iters=1001), bjax.InvalidProblemError, "iters must be"),
    (lambda: bjax.sinkhorn_knopp(_M, iters=2.0), bjax.InvalidProblemError, "iters must be"),
    (lambda: bjax.sinkhorn_knopp(_M, eps=0.0), bjax.InvalidProblemError,
     "eps must be a finite float in (0, 1); got 0.0"),
    (lambda: bjax.sinkhorn_knopp(_M, eps=float("nan")), bjax.InvalidProblemError, "eps must be"),
    (lambda: bjax.sinkhorn_knopp(_M, eps=1.0), bjax.InvalidProblemError, "eps must be"),
    (lambda: bjax.sinkhorn_knopp(_M, init="log"), bjax.InvalidProblemError,
     "init must be one of 'exp', 'softmax'"),
    (lambda: bjax.sinkhorn_knopp(_M, order="cols"), bjax.InvalidProblemError,
     "order must be one of 'columns_first', 'rows_first'"),
    (lambda: bjax.sinkhorn_knopp(jnp.ones((4, 4), jnp.int32)), bjax.UnsupportedError,
     "logits.dtype must be a float dtype; got int32"),
    (lambda: bjax.sinkhorn_knopp(jnp.ones((129, 129), F32), backend="interpret"),
     bjax.UnsupportedError, "n must be <= 128 on the Pallas kernels"),
    (lambda: bjax.hyper_connection(jnp.ones((4, 8), F32), _W, _V, _V, _M), bjax.InvalidProblemError,
     "x_expanded must be an array [B, n, C] of rank 3"),
    (lambda: bjax.hyper_connection(jnp.ones((0, 4, 8), F32), _W, _V, _V, _M),
     bjax.InvalidProblemError, r"x_expanded.shape\[0\] \(batch\) must be >= 1; got 0"),
    (lambda: bjax.hyper_connection(jnp.ones((2, 4, 0), F32), jnp.ones((0,), F32), _V, _V, _M),
     bjax.InvalidProblemError, "n >= 1 streams of C >= 1 channels"),
    (lambda: bjax.hyper_connection(_X.astype(jnp.int8), _W, _V, _V, _M), bjax.UnsupportedError,
     "x_expanded.dtype must be float32, bfloat16 or float16; got int8"),
    (lambda: bjax.hyper_connection(_X, jnp.ones((7,), F32), _V, _V, _M), bjax.InvalidProblemError,
     r"rmsnorm_weight.shape must be \(8,\); got \(7,\)"),
    (lambda: bjax.hyper_connection(_X, _W, jnp.ones((3,), F32), _V, _M), bjax.InvalidProblemError,
     r"h_pre.shape must be \(4,\)"),
    (lambda: bjax.hyper_connection(_X, _W, _V, jnp.ones((4, 1), F32), _M), bjax.InvalidProblemError,
     r"h_post.shape must be \(4,\)"),
    (lambda: bjax.hyper_connection(_X, _W, _V, _V, jnp.ones((4, 3), F32)), bjax.InvalidProblemError,
     r"h_res.shape must be \(4, 4\)"),
    (lambda: bjax.hyper_connection(_X, _W, _V, _V, _M.astype(jnp.int32)),
     bjax.UnsupportedError, "h_res.dtype must be a float dtype"),
    (lambda: bjax.hyper_connection(_X, _W, _V, _V, _M, sinkhorn_iters=0),
     bjax.InvalidProblemError, r"sinkhorn_iters must be an int in \[1, 1000\]"),
    (lambda: bjax.hyper_connection(_X, _W, _V, _V, _M, eps=2.0), bjax.InvalidProblemError,
     r"eps must be a finite float in \(0, 1\); got 2.0"),
    (lambda: bjax.hyper_connection(_X, _W, _V, _V, _M, sinkhorn_order="x"),
     bjax.InvalidProblemError, "sinkhorn_order must be one of"),
    (lambda: bjax.hyper_connection(jnp.ones((1, 33, 2), F32), jnp.ones((2,), F32), jnp.ones((33,), F32),
                                   jnp.ones((33,), F32), jnp.ones((33, 33), F32), backend="interpret"),
     bjax.UnsupportedError, r"n \(streams\) must be <= 32 on the Pallas kernels"),
    (lambda: bjax.mhc_pre(jnp.ones((2, 33, 2), F32), bias=jnp.ones((33 * 35,), F32),
                          backend="interpret"), bjax.UnsupportedError,
     r"mhc_pre: n \(streams\) must be <= 32 on the Pallas kernels"),
    (lambda: bjax.mhc_post(jnp.ones((2, 33, 2), F32), jnp.ones((2, 2), F32),
                           jnp.ones((2, 33), F32), jnp.ones((2, 33, 33), F32), backend="interpret"),
     bjax.UnsupportedError, r"mhc_post: n \(streams\) must be <= 32 on the Pallas kernels"),
    (lambda: bjax.mhc_pre(_X, bias=None), bjax.InvalidProblemError,
     r"bias must be an array \[24\] \(n\^2 \+ 2n\); got None"),
    (lambda: bjax.mhc_pre(_X, bias=jnp.ones((20,), F32)), bjax.InvalidProblemError,
     r"bias.shape must be \(24,\); got \(20,\)"),
    (lambda: bjax.mhc_pre(jnp.ones((8,), F32), bias=_BIAS), bjax.InvalidProblemError,
     r"x must be an array \[..., n, C\] of rank >= 2"),
    (lambda: bjax.mhc_pre(_X, bias=_BIAS, alpha=_ALPHA), bjax.InvalidProblemError,
     "alpha must be None when phi is None"),
    (lambda: bjax.mhc_pre(_X, bias=_BIAS, phi=_PHI), bjax.InvalidProblemError,
     r"alpha must be an array \[3\] when phi is given; got None"),
    (lambda: bjax.mhc_pre(_X, bias=_BIAS, phi=jnp.ones((8, 24), F32), alpha=_ALPHA),
     bjax.InvalidProblemError, r"phi.shape must be \(32, 24\); got \(8, 24\)"),
    (lambda: bjax.mhc_pre(_X, bias=_BIAS, phi=_PHI, alpha=jnp.ones((1,), F32)),
     bjax.InvalidProblemError, r"alpha.shape must be \(3,\)"),
    (lambda: bjax.mhc_pre(_X, bias=_BIAS, rmsnorm_eps=-1.0), bjax.InvalidProblemError,
     "rmsnorm_eps must be a finite float in"),
    (lambda: bjax.mhc_pre(_X, bias=_BIAS, sinkhorn_eps=0), bjax.InvalidProblemError,
     "sinkhorn_eps must be a finite float in"),
    (lambda: bjax.mhc_pre(_X, bias=_BIAS, sinkhorn_iters=True), bjax.InvalidProblemError,
     "sinkhorn_iters must be an int"),
    (lambda: bjax.mhc_pre(_X, bias=_BIAS, sinkhorn_init="uniform"), bjax.InvalidProblemError,
     "sinkhorn_init must be one of 'exp', 'softmax'"),
    (lambda: bjax.mhc_pre(_X, bias=_BIAS, pre_eps=-0.1), bjax.InvalidProblemError,
     "pre_eps must be a finite float >= 0; got -0.1"),
    (lambda: bjax.mhc_pre(_X, bias=_BIAS, post_scale=float("inf")), bjax.InvalidProblemError,
     "post_scale must be a finite float; got inf"),
    (lambda: bjax.mhc_pre(_X.astype(jnp.int32), bias=_BIAS), bjax.UnsupportedError,
     "x.dtype must be float32, bfloat16 or float16"),
    (lambda: bjax.mhc_post(_X, jnp.ones((2, 7), F32), jnp.ones((2, 4), F32), jnp.ones((2, 4, 4), F32)),
     bjax.InvalidProblemError, r"f_out.shape must be \(2, 8\)"),
    (lambda: bjax.mhc_post(_X, jnp.ones((2, 8), jnp.bfloat16), jnp.ones((2, 4), F32),
                           jnp.ones((2, 4, 4), F32)), bjax.InvalidProblemError,
     "f_out.dtype must be float32 \\(x's\\); got bfloat16"),
    (lambda: bjax.mhc_post(_X, jnp.ones((2, 8), F32), jnp.ones((4,), F32), jnp.ones((2, 4, 4), F32)),
     bjax.InvalidProblemError, r"h_post.shape must be \(2, 4\)"),
    (lambda: bjax.mhc_post(_X, jnp.ones((2, 8), F32), jnp.ones((2, 4), F32), jnp.ones((4, 4), F32)),
     bjax.InvalidProblemError, r"h_res.shape must be \(2, 4, 4\)"),
    (lambda: bjax.mhc_post(_X, jnp.ones((2, 8), F32), jnp.ones((2, 4), F32), jnp.ones((2, 4, 4), F32),
                           transpose_res=1), bjax.InvalidProblemError,
     "transpose_res must be a bool; got 1"),
    (lambda: bjax.mhc_post(*_POST_ARGS, backend="interpret", config=TileConfig(2, 64, 4)),
     bjax.InvalidProblemError, "mhc_post: config must be MixConfig (pallas_triton), or None"),
    (lambda: bjax.mhc_post(*_POST_ARGS, backend="interpret",
                           config=pallas_hc.MixConfig(backward="tiles")),
     bjax.InvalidProblemError, "mhc_post: config.backward must be a TileConfig or None; got 'tiles'"),
    (lambda: bjax.mhc_post(*_POST_ARGS, backend="interpret",
                           config=pallas_hc.MixConfig(TileConfig(3, 64, 4))),
     bjax.InvalidProblemError, "mhc_post: config.forward.block_rows must be a power of 2; got 3"),
    (lambda: bjax.mhc_post(*_POST_ARGS, backend="xla", config=pallas_hc.MixConfig()),
     bjax.UnsupportedError, "mhc_post: config must be None for xla, which takes no config"),
    (lambda: bjax.mhc_pre(_X, **_PRE_KWARGS, backend="interpret", config=pallas_hc.MixConfig()),
     bjax.InvalidProblemError, "mhc_pre: config must be MosaicPreConfig (pallas_mosaic) or "
     "PreConfig (pallas_triton), or None"),
    (lambda: bjax.mhc_pre(_X, **_PRE_KWARGS, backend="interpret", config=pallas_hc.PreConfig(
        projection=pallas_hc.ProjectionConfig(64, 64, 256, 1, 4, 2))),
     bjax.InvalidProblemError, "mhc_pre: config.projection.block_width must be <= 128 (phi's "
     "three pieces side by side, padded); got 256"),
    (lambda: bjax.mhc_pre(_X, **_PRE_KWARGS, backend="interpret", config=pallas_hc.PreConfig(
        projection=pallas_hc.ProjectionConfig(64, 64, 64, 0, 4, 2))),
     bjax.InvalidProblemError, "mhc_pre: config.projection.splits must be >= 1; got 0"),
    (lambda: bjax.mhc_pre(_X, **_PRE_KWARGS, backend="interpret", config=pallas_hc.PreConfig(
        input_grad=TileConfig(64, 48, 4))),
     bjax.InvalidProblemError, "mhc_pre: config.input_grad.block_cols must be a power of 2"),
    (lambda: bjax.mhc_pre(_X, **_PRE_KWARGS, backend="interpret",
                          config=pallas_hc.PreConfig(sinkhorn=TileConfig(1, 2, 4))),
     bjax.InvalidProblemError, "mhc_pre: config.sinkhorn must be a SinkhornConfig or None"),
    (lambda: bjax.mhc_pre(_X, **_PRE_KWARGS, backend="xla", config=pallas_hc.PreConfig()),
     bjax.UnsupportedError, "mhc_pre: config must be None for xla, which takes no config"),
]


@pytest.mark.parametrize("call, error, message", ERRORS,
                         ids=[f"{i}-{e[2][:40]}" for i, e in enumerate(ERRORS)])
def test_errors(call, error, message):
    with pytest.raises(error, match=message if "\\" in message else re.escape(message)):
        call()


def test_errors_raise_at_trace_time():
    with pytest.raises(bjax.InvalidProblemError):
        jax.eval_shape(lambda x: bjax.mhc_pre(x, bias=jnp.ones((5,), F32)), _X)
    assert KERNEL_BACKEND in ("pallas", "interpret")


def test_literal_types_name_every_option():
    """The type hints offer exactly the options the ops accept."""
    assert typing.get_args(SinkhornInit) == SINKHORN_INITS
    assert typing.get_args(SinkhornOrder) == SINKHORN_ORDERS
