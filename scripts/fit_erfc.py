"""Derive the coefficient tables of ``pallas_kernels/formulas/special.py``.

For z >= 0 we write erfc(z) = t * exp(-z^2) * S(t) with t = 1 / (1 + z / 2), so
t runs over (0, 1] and S is smooth there (S(0) = 1 / (2 sqrt(pi))). S is fitted
by Chebyshev interpolation in 40-digit arithmetic (mpmath); the series is cut
where its terms fall under the dtype's resolution:

* float32: converted to monomials in t (Horner, one FMA a term);
* 16-bit results (float32 math): the same, cut at 3e-6, which keeps the fit
  within 5e-6 relative, a hundredth of a float16 ulp;
* float64: kept as Chebyshev coefficients in x = 2 t - 1 (Clenshaw), since
  25 monomial terms would cancel badly.

Run ``python scripts/fit_erfc.py`` to print both tables (``pip install mpmath``).
"""
import mpmath as mp
import numpy as np

mp.mp.dps = 40
HALF_INV_SQRT_PI = 1 / (2 * mp.sqrt(mp.pi))


def s_of_t(t):
    if t == 0:
        return HALF_INV_SQRT_PI
    z = 2 * (1 / t - 1)
    return mp.erfc(z) * mp.exp(z * z) / t


def chebyshev_in_t(degree):
    """Coefficients c_j with S(t) ~ sum_j c_j T_j(2 t - 1)."""
    n = degree + 1
    nodes = [mp.cos(mp.pi * (k + mp.mpf(1) / 2) / n) for k in range(n)]
    values = [s_of_t((x + 1) / 2) for x in nodes]
    coeffs = [2 * mp.fsum(values[k] * mp.cos(mp.pi * j * (k + mp.mpf(1) / 2) / n)
                          for k in range(n)) / n for j in range(n)]
    coeffs[0] /= 2
    return coeffs


def truncate(coeffs, tol):
    return coeffs[: max(j for j, c in enumerate(coeffs) if abs(c) > tol) + 1]


def chebyshev_to_monomial_in_t(coeffs):
    """Exact (mpmath) conversion of sum c_j T_j(2t - 1) to sum a_k t^k."""
    poly = np.polynomial.Chebyshev([mp.mpf(c) for c in coeffs], domain=[0, 1])
    return [mp.mpf(a) for a in poly.convert(kind=np.polynomial.Polynomial).coef]


def max_relative_error(monomials, samples=4000):
    """max over t in (0, 1] of |sum a_k t^k / S(t) - 1|, coefficients rounded to float64."""
    coeffs = [mp.mpf(float(a)) for a in monomials]
    return max(abs(mp.polyval(coeffs[::-1], t) / s_of_t(t) - 1)
               for t in (mp.mpf(i) / samples for i in range(1, samples + 1)))


def print_table(name, coeffs):
    print(f"{name} = (")
    for c in coeffs:
        print(f"    {float(c)!r},")
    print(")")


def main():
    coeffs = chebyshev_in_t(45)
    for name, tol in (("_S_MONOMIAL_F32", 1e-8), ("_S_MONOMIAL_16BIT", 3e-6)):
        monomials = chebyshev_to_monomial_in_t(truncate(coeffs, tol))
        print(f"# max relative error {float(max_relative_error(monomials)):.3g}")
        print_table(name, monomials)
    print_table("_S_CHEBYSHEV_F64", truncate(coeffs, 1e-17))


if __name__ == "__main__":
    main()
