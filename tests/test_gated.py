"""Gated activations: every backend against the float64 oracle, gradients, transforms, errors."""
import functools
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

import bjax
from bjax._op import cuda_available
from pallas_kernels import gated as kernels
from tests import oracles
from tests.conftest import FLOAT_DTYPES, KERNEL_BACKEND, assert_close, random

# (kind, approximate): the four kinds plus GeGLU's tanh form.
VARIANTS = [("glu", False), ("reglu", False), ("swiglu", False), ("geglu", False), ("geglu", True)]
VARIANT_IDS = ["glu", "reglu", "swiglu", "geglu", "geglu_tanh"]
# (shape, axis): odd extents, rank 4 with a middle split, an axis-0 split, rank 1.
SHAPES = [((3, 10), -1), ((2, 5, 2, 7), 2), ((6, 3), 0), ((14,), 0)]


# Every kind, gate and dtype on the first shape; every shape for every kind and gate in
# float32. Shapes exercise the split axis and the tiling, the same for every dtype.
FORWARD_CASES = [pytest.param(kind, approximate, gate, dtype, shape, axis,
                              id=f"{kind_id}-{gate}-{jnp.dtype(dtype).name}-{shape}")
                 for (kind, approximate), kind_id in zip(VARIANTS, VARIANT_IDS)
                 for gate in ("second", "first") for dtype in FLOAT_DTYPES
                 for shape, axis in SHAPES
                 if (shape, axis) == SHAPES[0] or dtype == jnp.float32]


@pytest.mark.parametrize("kind, approximate, gate, dtype, shape, axis", FORWARD_CASES)
def test_forward_matches_oracle(backend, kind, approximate, gate, dtype, shape, axis):
    x = random(1, shape, dtype)
    y = bjax.gated_activation(x, kind, axis=axis, gate=gate, approximate=approximate,
                              backend=backend)
    assert y.dtype == x.dtype
    ref = oracles.gated_activation(np.asarray(x, np.float64), kind, axis, gate,
                                   approximate)
    assert_close(y, ref, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("gate", ["second", "first"])
@pytest.mark.parametrize("kind,approximate", VARIANTS, ids=VARIANT_IDS)
def test_gradient_matches_oracle(backend, kind, approximate, gate, dtype):
    shape, axis = (2, 5, 6, 7), 2
    x = random(2, shape, dtype)
    fn = functools.partial(bjax.gated_activation, kind=kind, axis=axis, gate=gate,
                           approximate=approximate, backend=backend)
    y, vjp = jax.vjp(fn, x)
    dy = random(3, y.shape, dtype)
    (dx,) = vjp(dy)
    assert dx.dtype == x.dtype
    ref = oracles.gated_activation_grad(np.asarray(x, np.float64),
                                        np.asarray(dy, np.float64), kind, axis, gate,
                                        approximate)
    # dx multiplies dy, a half and act'(.): three rounded factors at the output dtype.
    assert_close(dx, ref, dtype, scale=2.0)


@pytest.mark.parametrize("gate", ["second", "first"])
@pytest.mark.parametrize("kind,approximate", VARIANTS, ids=VARIANT_IDS)
def test_check_grads_float64(backend, kind, approximate, gate):
    x = random(4, (3, 8), jnp.float64)
    fn = functools.partial(bjax.gated_activation, kind=kind, gate=gate, approximate=approximate,
                           backend=backend)
    check_grads(fn, (x,), order=1, modes=["rev"])


def test_reglu_derivative_at_zero_is_zero(backend):
    # GatedActivationBackwardPlan's rule: d/db relu(b) = (b > 0), so 0 at b == 0.
    x = jnp.array([[1.5, -2.0, 0.0, 0.0]], jnp.float32)  # a = [1.5, -2], b = [0, 0]
    dx = jax.grad(lambda x: bjax.reglu(x, backend=backend).sum())(x)
    np.testing.assert_array_equal(np.asarray(dx), [[0.0, 0.0, 0.0, 0.0]])


KERNEL_CASES = [  # (rows, cols, config): several tiles, both edges cut, and exact tiling.
    (5, 13, kernels.TileConfig(2, 8, 4)),
    (7, 3, kernels.TileConfig(4, 4, 4)),
    (8, 32, kernels.TileConfig(4, 16, 4)),
    (3, 1500, kernels.default_config(3, 1500)),
]


@pytest.mark.parametrize("rows,cols,config", KERNEL_CASES, ids=str)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_write_every_cell(rows, cols, config, dtype):
    """Outputs start NaN-poisoned (aliased in place); every cell must be overwritten."""
    interpret = KERNEL_BACKEND == "interpret"
    x2 = random(5, (rows, 2 * cols), dtype)
    dy2 = random(6, (rows, cols), dtype)
    opts = dict(kind="swiglu", gate="second", approximate=False, config=config,
                interpret=interpret)
    y2 = kernels.gated_forward(x2, out=jnp.full((rows, cols), jnp.nan, dtype), **opts)
    dx2 = kernels.gated_backward(dy2, x2, out=jnp.full((rows, 2 * cols), jnp.nan, dtype), **opts)
    x64 = np.asarray(x2, np.float64)
    assert_close(y2, oracles.gated_activation(x64, "swiglu", axis=1), dtype)
    assert_close(dx2, oracles.gated_activation_grad(
        x64, np.asarray(dy2, np.float64), "swiglu", axis=1), dtype, scale=2.0)


@pytest.mark.parametrize("shape,axis", [((0, 4), -1), ((3, 0), -1), ((2, 0, 3), 0)], ids=str)
def test_empty_arrays(backend, shape, axis):
    x = jnp.ones(shape, jnp.float32)
    y, vjp = jax.vjp(lambda x: bjax.swiglu(x, axis=axis, backend=backend), x)
    out_shape = list(shape)
    out_shape[axis] //= 2
    assert y.shape == tuple(out_shape)
    assert vjp(y)[0].shape == shape


def test_deterministic(backend):
    x = random(7, (33, 2 * 77), jnp.bfloat16)
    fn = jax.jit(jax.value_and_grad(lambda x: bjax.geglu(x, backend=backend)
                                    .astype(jnp.float32).sum()))
    (v1, g1), (v2, g2) = fn(x), fn(x)
    assert np.asarray(v1).tobytes() == np.asarray(v2).tobytes()
    assert np.asarray(g1).tobytes() == np.asarray(g2).tobytes()


# ---------------------------------------------------------------- transformations


def _ref_swiglu(x, axis=-1):
    return oracles.gated_activation(np.asarray(x, np.float64), "swiglu", axis)


def test_jit_and_grad_of_jit(backend):
    x = random(8, (4, 6), jnp.float32)
    f = jax.jit(lambda x: bjax.swiglu(x, backend=backend))
    assert_close(f(x), _ref_swiglu(x), jnp.float32)
    g = jax.jit(jax.grad(lambda x: f(x).sum()))(x)
    ref = oracles.gated_activation_grad(np.asarray(x, np.float64), np.ones((4, 3)), "swiglu")
    assert_close(g, ref, jnp.float32, scale=2.0)


@pytest.mark.parametrize("in_axes,out_axes", [(0, 0), (1, 0), (2, 1)])
def test_vmap(backend, in_axes, out_axes):
    x = random(9, (3, 4, 6), jnp.float32)
    f = jax.vmap(lambda x: bjax.swiglu(x, axis=-1, backend=backend), in_axes=in_axes,
                 out_axes=out_axes)
    y = f(x)
    per_example = [_ref_swiglu(np.take(np.asarray(x), i, axis=in_axes))
                   for i in range(x.shape[in_axes])]
    assert_close(y, np.stack(per_example, axis=out_axes), jnp.float32)


def test_vmap_of_grad(backend):
    x = random(10, (5, 2, 8), jnp.float32)
    g = jax.vmap(jax.grad(lambda x: bjax.glu(x, backend=backend).sum()))(x)
    ref = oracles.gated_activation_grad(np.asarray(x, np.float64), np.ones((5, 2, 4)), "glu")
    assert_close(g, ref, jnp.float32, scale=2.0)


def test_checkpoint(backend):
    x = random(11, (4, 10), jnp.float32)
    f = jax.checkpoint(lambda x: jnp.sin(bjax.geglu(x, backend=backend)).sum())
    g = jax.grad(f)(x)
    g_ref = jax.grad(lambda x: jnp.sin(bjax.geglu(x, backend=backend)).sum())(x)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(g_ref))


def test_inside_scan(backend):
    w = random(12, (8, 8), jnp.float32, scale=0.3)
    x0 = random(13, (2, 4), jnp.float32)

    def step(h, _):
        h = bjax.swiglu(jnp.concatenate([h, h], -1) @ w, backend=backend)
        return h, h.sum()

    def loss(w_):
        nonlocal w
        w = w_
        return lax.scan(step, x0, None, length=3)[1].sum()

    g = jax.grad(loss)(w)
    assert g.shape == w.shape and np.isfinite(np.asarray(g)).all()


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("call,error,message", [
    (lambda: bjax.swiglu(jnp.ones((3, 5))), bjax.InvalidProblemError,
     r"x.shape\[1\] \(the extent along axis\) must be even.*got 5"),
    (lambda: bjax.swiglu(jnp.ones((3, 4)), axis=2), bjax.InvalidProblemError,
     r"axis must be in \[-2, 2\).*got 2"),
    (lambda: bjax.swiglu(jnp.ones((3, 4)), axis=-3), bjax.InvalidProblemError,
     r"axis must be in \[-2, 2\).*got -3"),
    (lambda: bjax.swiglu(jnp.ones((3, 4)), axis=1.0), bjax.InvalidProblemError,
     r"axis must be a Python int; got 1.0"),
    (lambda: bjax.swiglu(jnp.float32(1.0)), bjax.InvalidProblemError,
     r"x must be an array of rank >= 1.*got rank 0"),
    (lambda: bjax.gated_activation(jnp.ones((2, 4)), "gelu"), bjax.InvalidProblemError,
     r"kind must be one of 'glu', 'reglu', 'swiglu', 'geglu'; got 'gelu'"),
    (lambda: bjax.swiglu(jnp.ones((2, 4)), gate="left"), bjax.InvalidProblemError,
     r"gate must be one of 'second', 'first'; got 'left'"),
    (lambda: bjax.swiglu(jnp.ones((2, 4)), approximate=True), bjax.InvalidProblemError,
     r"approximate must be False unless kind='geglu'"),
    (lambda: bjax.swiglu(jnp.ones((2, 4), jnp.int32)), bjax.UnsupportedError,
     r"x.dtype must be float32, float16, bfloat16 or float64; got int32"),
    (lambda: bjax.swiglu(jnp.ones((2, 4), jnp.bool_)), bjax.UnsupportedError,
     r"x.dtype must be .*; got bool"),
    (lambda: bjax.swiglu(jnp.ones((2, 4), jnp.complex64)), bjax.UnsupportedError,
     r"x.dtype must be .*; got complex64"),
    (lambda: bjax.swiglu(jnp.ones((2, 4)), backend="cuda"), bjax.InvalidProblemError,
     r"backend must be one of 'pallas', 'interpret', 'xla' \(or None\); got 'cuda'"),
])
def test_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_errors_raise_at_trace_time():
    # Under jit nothing is compiled: the error comes from tracing.
    with pytest.raises(bjax.InvalidProblemError, match="must be even"):
        jax.jit(bjax.swiglu).lower(jax.ShapeDtypeStruct((2, 3), jnp.float32))


def test_float64_requires_x64():
    x = jax.ShapeDtypeStruct((2, 4), jnp.float64)
    jax.config.update("jax_enable_x64", False)
    try:
        with pytest.raises(bjax.UnsupportedError, match="float64 only with jax_enable_x64 on"):
            bjax.plan(bjax.swiglu, x)
    finally:
        jax.config.update("jax_enable_x64", True)


@pytest.mark.skipif(cuda_available(), reason="a CUDA GPU is present")
def test_pallas_without_cuda_is_unsupported():
    with pytest.raises(bjax.UnsupportedError, match="'pallas' only where a CUDA GPU is present"):
        bjax.swiglu(jnp.ones((2, 4)), backend="pallas")


def test_backend_from_environment():
    x = jax.ShapeDtypeStruct((2, 4), jnp.float32)
    with mock.patch.dict(os.environ, {"BJAX_BACKEND": "interpret"}):
        assert bjax.plan(bjax.swiglu, x).backend == "interpret"
        assert bjax.plan(bjax.swiglu, x, backend="xla").backend == "xla"
    with mock.patch.dict(os.environ, {"BJAX_BACKEND": "tpu"}):
        with pytest.raises(bjax.InvalidProblemError, match=r"\$BJAX_BACKEND must be one of"):
            bjax.plan(bjax.swiglu, x)
    with mock.patch.dict(os.environ, {"BJAX_BACKEND": ""}):
        expected = "pallas" if cuda_available() else "xla"
        assert bjax.plan(bjax.swiglu, x).backend == expected


# ---------------------------------------------------------------- plan


def test_plan_describes_the_call_without_running_it():
    x = jax.ShapeDtypeStruct((8, 28), jnp.bfloat16)
    p = bjax.plan(bjax.gated_activation, x, "geglu", gate="first", backend="interpret")
    assert p.op == "gated_activation" and p.backend == "interpret"
    assert p.kernel == "bjax_geglu_forward"
    assert p.descriptor == bjax.GatedActivationDescriptor(
        "geglu", "first", False, (8, 28), jnp.dtype(jnp.bfloat16), 1)
    assert p.descriptor.out_shape == (8, 14)
    assert isinstance(p.block_config, kernels.TileConfig)
    assert p.precision.math_precision == "float32" and p.precision.deterministic
    assert p.precision.bit_stable_on_same_hardware and p.precision.accumulator is None
    assert bjax.plan(bjax.swiglu, x, backend="xla").block_config is None
    assert hash(p.descriptor) == hash(bjax.plan(bjax.geglu, x, gate="first",
                                                backend="xla").descriptor)


def test_plan_raises_the_op_errors():
    with pytest.raises(bjax.InvalidProblemError, match="must be even"):
        bjax.plan(bjax.glu, jax.ShapeDtypeStruct((3, 5), jnp.float32))
    with pytest.raises(bjax.InvalidProblemError, match="plan: op must be a bjax op"):
        bjax.plan(jnp.sin, jnp.ones(3))
