"""Gated activations' formulas: ``act(u)``, ``act'(u)`` and the gated product and its
gradient, on any array (a kernel's tiles, or whole arrays in the XLA implementation)."""
import jax
import jax.numpy as jnp

from pallas_kernels.formulas.special import normal_cdf_and_pdf

_SQRT_2_OVER_PI = 0.7978845608028654
_GELU_TANH_CUBIC = 0.044715


def compute_dtype(dtype) -> jnp.dtype:
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def normal_cdf_options(out_dtype) -> dict:
    """Keyword options of ``normal_cdf_and_pdf`` for results stored as ``out_dtype``: the
    shorter fit for 16-bit outputs (compiled kernels add the GPU's approximations)."""
    return {"for_16bit_output": jnp.dtype(out_dtype).itemsize == 2}


def _activation(u, kind: str, approximate: bool, cdf_options: dict):
    """act(u) and act'(u) for the gate input ``u`` (``cdf_options``: see :func:`normal_cdf_options`)."""
    if kind == "glu":
        s = jax.nn.sigmoid(u)
        return s, s * (1.0 - s)
    if kind == "reglu":
        positive = u > 0
        return jnp.where(positive, u, 0.0), positive.astype(u.dtype)
    if kind == "swiglu":
        s = jax.nn.sigmoid(u)
        return u * s, s * (1.0 + u * (1.0 - s))
    if kind == "geglu" and approximate:
        inner = _SQRT_2_OVER_PI * (u + _GELU_TANH_CUBIC * u * u * u)
        th = jnp.tanh(inner)
        d_inner = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_CUBIC * u * u)
        return 0.5 * u * (1.0 + th), 0.5 * (1.0 + th) + 0.5 * u * (1.0 - th * th) * d_inner
    if kind == "geglu":
        cdf, pdf = normal_cdf_and_pdf(u, **cdf_options)
        return u * cdf, cdf + u * pdf
    raise ValueError(kind)


def gated_math(first, second, kind: str, gate: str, approximate: bool, cdf_options: dict,
               dy=None):
    """``y`` (``dy is None``) or ``(d first, d second)`` from the two halves.

    ``gate="second"``: y = first * act(second); ``gate="first"``: y = act(first) * second.
    """
    value, gate_in = (first, second) if gate == "second" else (second, first)
    act, d_act = _activation(gate_in, kind, approximate, cdf_options)
    if dy is None:
        return value * act
    d_value, d_gate_in = dy * act, dy * value * d_act
    return (d_value, d_gate_in) if gate == "second" else (d_gate_in, d_value)
