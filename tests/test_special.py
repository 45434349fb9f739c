"""The normal CDF/PDF used inside kernels, against float64 libm (math.erfc)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.special import normal_cdf, normal_cdf_and_pdf

def normal_pdf(x):
    return normal_cdf_and_pdf(x)[1]


_X = np.concatenate([np.linspace(-37, 37, 7401), np.geomspace(1e-30, 1, 61),
                     -np.geomspace(1e-30, 1, 61)])


def _cdf_oracle(x):
    # Phi(x) = erfc(-x / sqrt 2) / 2. libm's erfc is within ~1 ulp; the division
    # of x by sqrt 2 adds a relative error of about x^2 ulp (float64).
    return np.array([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in x.astype(np.float64)])


def _pdf_oracle(x):
    return np.array([math.exp(-0.5 * v * v) / math.sqrt(2 * math.pi) for v in x.astype(np.float64)])


@pytest.mark.parametrize("fn,oracle", [(normal_cdf, _cdf_oracle), (normal_pdf, _pdf_oracle)],
                         ids=["cdf", "pdf"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_within_documented_ulps(fn, oracle, dtype):
    x = _X.astype(dtype)
    ref = oracle(x)
    out = np.asarray(jax.jit(fn)(jnp.asarray(x))).astype(np.float64)
    normal = ref > np.finfo(dtype).tiny * 2**10  # subnormal results have coarser ulps
    ulps = np.abs(out - ref)[normal] / np.spacing(ref[normal].astype(dtype)).astype(np.float64)
    # Documented: 4 max(1, x^2/2) ulp; for float64 the oracle's own error (x^2 ulp,
    # see _cdf_oracle) is added.
    x2 = x[normal].astype(np.float64) ** 2
    bound = 4 * np.maximum(1, x2 / 2) + (x2 + 1 if dtype == np.float64 else 0)
    assert np.all(ulps <= bound), (x[normal][ulps > bound], ulps[ulps > bound])


def test_special_values():
    x = jnp.array([-jnp.inf, -40.0, 0.0, 40.0, jnp.inf, jnp.nan], jnp.float32)
    np.testing.assert_array_equal(np.asarray(normal_cdf(x))[:5], [0.0, 0.0, 0.5, 1.0, 1.0])
    assert np.isnan(np.asarray(normal_cdf(x))[5])
    np.testing.assert_array_equal(np.asarray(normal_pdf(x))[[0, 1, 3, 4]], [0.0] * 4)


@pytest.mark.skipif(not __import__("bjax._op", fromlist=["x"]).cuda_available(),
                    reason="rcp.approx runs in compiled GPU kernels only")
def test_cdf_with_hardware_reciprocal_in_a_kernel():
    from jax.experimental import pallas as pl

    from pallas_kernels.gated import approx_reciprocal_f32

    def kernel(x_ref, o_ref):
        o_ref[...] = normal_cdf(x_ref[...], reciprocal=approx_reciprocal_f32)

    x = np.linspace(-37, 37, 8192).astype(np.float32)
    out = np.asarray(pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(
        jnp.asarray(x))).astype(np.float64)
    ref = _cdf_oracle(x)
    normal = ref > np.finfo(np.float32).tiny * 2**10
    ulps = np.abs(out - ref)[normal] / np.spacing(ref[normal].astype(np.float32))
    # One more ulp than the division allows (rcp.approx is within 1 ulp).
    assert np.all(ulps <= 5 * np.maximum(1, x[normal].astype(np.float64) ** 2 / 2))
