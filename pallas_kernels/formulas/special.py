"""The normal CDF from ``exp`` and polynomials (the Triton lowering has no ``erf``).

The exact GELU needs ``Phi``; kernels and the XLA implementation both take it from here.

For z >= 0, ``erfc(z) = t * exp(-z^2) * S(t)`` with ``t = 1 / (1 + z / 2)``; S is
smooth on t in (0, 1] and is fitted by Chebyshev interpolation
(``scripts/fit_erfc.py`` derives both tables below), so the lower tail
``Phi(-|x|) = erfc(|x| / sqrt(2)) / 2`` keeps its *relative* accuracy however
small it gets (an ``erf``-based ``(1 + erf(x / sqrt 2)) / 2`` loses all of it
below x ~ -5 in float32).

Accuracy (``tests/test_special.py`` checks it against a float64 oracle; the
bound was measured against 30-digit mpmath over |x| <= 38): at most
``4 * max(1, x^2 / 2)`` ulp in float32 and float64, i.e. within a few ulp for
|x| <= 2, growing in the far tail where the rounding of the exponent's argument
``x^2 / 2`` dominates (as it does for every ``exp``). Results that will be
stored in a 16-bit type use a shorter float32 fit, within 5e-6 relative (one
percent of a float16 ulp), which keeps the kernels that need it at the memory
bound. Compiled GPU kernels may pass the hardware's ``rcp.approx`` and
``ex2.approx`` (``pallas_kernels.approx``); the
bound is then ``6 * max(1, x^2 / 2)`` ulp (``tests/test_special.py`` measures it
on the GPU).
"""
import jax.numpy as jnp

# S(t) ~ sum_k a_k t^k (Horner): float32 resolution, and 5e-6 for 16-bit results.
_S_MONOMIAL_F32 = (
    0.28209479506443325, 0.2820937767893866, 0.24688387983347085, 0.17532407538298134,
    0.09341474850022932, -0.05905091001373058, 0.13185004020666097, -0.45456371821245134,
    0.4933857418905704, -0.23460549064072853, 0.04317306592910111,
)
_S_MONOMIAL_16BIT = (
    0.28209608520881846, 0.28193942841321434, 0.24979631307812714, 0.15603335529535783,
    0.14361120674337485, -0.06914768965154355, -0.08891160022085397, 0.04458448195997709,
)
# S(t) ~ sum_j c_j T_j(2 t - 1), float64 resolution (Clenshaw).
_S_CHEBYSHEV_F64 = (
    0.5770337386164697, 0.3554369212704985, 0.06509515882878653, 0.003671142395836639,
    -0.0011128447433526325, -0.0001607582991537808, 3.278031574173137e-05,
    5.442441645505016e-06, -1.5154665553171482e-06, -1.4297608181169865e-07,
    8.234608827419493e-08, -1.2962846852306563e-09, -4.154721631015199e-09,
    6.347058278362811e-10, 1.4320822712256225e-10, -6.160390105204585e-11,
    2.0612138554721698e-12, 3.5714931488477042e-12, -8.586422843251796e-13,
    -6.14560021379063e-14, 7.418725748596617e-14, -1.2895042755032325e-14,
    -2.358726385710632e-15, 1.5729349381685912e-15, -2.2782966239546465e-16,
    -6.31233045075643e-17, 3.5916763531814925e-17,
)
_INV_SQRT2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
_HALF_LOG2_E = 0.7213475204444817


def _s_of_t(t, for_16bit_output):
    if t.dtype == jnp.float64:
        u = 2.0 * t - 1.0
        b1 = jnp.zeros_like(t)
        b2 = jnp.zeros_like(t)
        for c in _S_CHEBYSHEV_F64[:0:-1]:
            b1, b2 = 2.0 * u * b1 - b2 + c, b1
        return u * b1 - b2 + _S_CHEBYSHEV_F64[0]
    table = _S_MONOMIAL_16BIT if for_16bit_output else _S_MONOMIAL_F32
    acc = jnp.full_like(t, table[-1])
    for a in table[-2::-1]:
        acc = acc * t + a
    return acc


def normal_cdf_and_pdf(x, *, for_16bit_output=False, reciprocal=None, exp2=None):
    """(Phi(x), phi(x)), sharing one exponential; Phi(x) = erfc(-x / sqrt 2) / 2.

    Args:
      x: float32 or float64 array.
      for_16bit_output: float32 ``x`` whose results will be rounded to a 16-bit
        type: use the shorter fit (5e-6 relative).
      reciprocal: optional ``u -> 1 / u`` for u >= 1
        (``pallas_kernels.approx.approx_reciprocal_f32``); ``None`` divides.
      exp2: optional ``u -> 2^u`` for u <= 0 (``pallas_kernels.approx.approx_exp2_f32``);
        ``None`` uses ``exp``.
    """
    ax = jnp.abs(x)
    gauss = jnp.exp(-0.5 * ax * ax) if exp2 is None else exp2(-_HALF_LOG2_E * (ax * ax))
    denominator = 1.0 + (0.5 * _INV_SQRT2) * ax
    t = 1.0 / denominator if reciprocal is None else reciprocal(denominator)
    lower_tail = 0.5 * t * _s_of_t(t, for_16bit_output) * gauss  # Phi(-|x|)
    return jnp.where(x < 0, lower_tail, 1.0 - lower_tail), _INV_SQRT_2PI * gauss


def normal_cdf(x, **options):
    """Phi(x), accurate in both tails: see :func:`normal_cdf_and_pdf` for ``options``."""
    return normal_cdf_and_pdf(x, **options)[0]
