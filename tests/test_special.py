"""The normal CDF/PDF used inside kernels, against float64 libm (math.erfc)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bjax._op import cuda_available
from pallas_kernels.approx import approx_exp2_f32, approx_reciprocal_f32
from pallas_kernels.formulas.special import normal_cdf, normal_cdf_and_pdf


def normal_pdf(x, **options):
    return normal_cdf_and_pdf(x, **options)[1]


_X = np.concatenate([np.linspace(-37, 37, 7401), np.geomspace(1e-30, 1, 61),
                     -np.geomspace(1e-30, 1, 61)])


def _cdf_oracle(x):
    # Phi(x) = erfc(-x / sqrt 2) / 2. libm's erfc is within ~1 ulp; the division
    # of x by sqrt 2 adds a relative error of about x^2 ulp (float64).
    return np.array([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in x.astype(np.float64)])


def _pdf_oracle(x):
    return np.array([math.exp(-0.5 * v * v) / math.sqrt(2 * math.pi) for v in x.astype(np.float64)])


def _errors_in_ulps(x, out, ref, dtype):
    """|out - ref| in ulps of ``dtype`` at ``ref``, and the ``x`` they belong to, over
    normal results (subnormal results have coarser ulps)."""
    out = np.asarray(out).astype(np.float64)
    normal = ref > np.finfo(dtype).tiny * 2**10
    ulps = np.abs(out - ref)[normal] / np.spacing(ref[normal].astype(dtype)).astype(np.float64)
    return ulps, x[normal].astype(np.float64)


@pytest.mark.parametrize("fn,oracle", [(normal_cdf, _cdf_oracle), (normal_pdf, _pdf_oracle)],
                         ids=["cdf", "pdf"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_within_documented_ulps(fn, oracle, dtype):
    x = _X.astype(dtype)
    ulps, x = _errors_in_ulps(x, jax.jit(fn)(jnp.asarray(x)), oracle(x), dtype)
    # Documented: 4 max(1, x^2/2) ulp; for float64 the oracle's own error (x^2 ulp,
    # see _cdf_oracle) is added.
    bound = 4 * np.maximum(1, x**2 / 2) + (x**2 + 1 if dtype == np.float64 else 0)
    assert np.all(ulps <= bound), (x[ulps > bound], ulps[ulps > bound])


def test_16bit_output_fit_within_documented_relative_error():
    x = _X.astype(np.float32)
    ref = _cdf_oracle(x)
    out = np.asarray(jax.jit(lambda v: normal_cdf(v, for_16bit_output=True))(jnp.asarray(x)))
    ulps, xs = _errors_in_ulps(x, out, ref, np.float32)
    # Documented: 5e-6 relative for the fit, plus the float32 bound of the exponential.
    relative = ulps * 2.0**-23
    bound = 5e-6 + 4 * np.maximum(1, xs**2 / 2) * 2.0**-23
    assert np.all(relative <= bound), (xs[relative > bound], relative[relative > bound])
    # Far below half an ulp of float16 (2^-11) and bfloat16 (2^-8) at moderate |x|.
    assert np.max(relative[np.abs(xs) <= 4]) < 2.0**-11 / 50


def test_special_values():
    x = jnp.array([-jnp.inf, -40.0, 0.0, 40.0, jnp.inf, jnp.nan], jnp.float32)
    for options in ({}, {"for_16bit_output": True}):
        cdf = np.asarray(normal_cdf(x, **options))
        np.testing.assert_array_equal(cdf[[0, 1, 3, 4]], [0.0, 0.0, 1.0, 1.0])
        assert np.isnan(cdf[5])
        # Exact at 0 with the float32 fit; the 16-bit fit is within its 5e-6.
        assert abs(cdf[2] - 0.5) <= (0.0 if not options else 0.5 * 5e-6)
        np.testing.assert_array_equal(np.asarray(normal_pdf(x, **options))[[0, 1, 3, 4]], [0.0] * 4)


@pytest.mark.skipif(not cuda_available(), reason="the approximations run in compiled GPU kernels")
@pytest.mark.parametrize("fn,oracle", [(normal_cdf, _cdf_oracle), (normal_pdf, _pdf_oracle)],
                         ids=["cdf", "pdf"])
def test_with_hardware_approximations_in_a_kernel(fn, oracle):
    from jax.experimental import pallas as pl

    def kernel(x_ref, o_ref):
        o_ref[...] = fn(x_ref[...], reciprocal=approx_reciprocal_f32, exp2=approx_exp2_f32)

    x = np.linspace(-37, 37, 8192).astype(np.float32)
    out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(jnp.asarray(x))
    ulps, xs = _errors_in_ulps(x, out, oracle(x), np.float32)
    scaled = ulps / np.maximum(1, xs**2 / 2)
    print(f"worst: {scaled.max():.2f} max(1, x^2/2) ulp")
    # Documented: 6 max(1, x^2/2) ulp (rcp.approx adds 1 ulp, ex2.approx 2 and a
    # rounding of its argument).
    assert np.all(scaled <= 6), (xs[scaled > 6], ulps[scaled > 6])
