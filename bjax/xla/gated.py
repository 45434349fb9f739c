"""Gated activations in plain ``jax.numpy`` (the ``"xla"`` backend).

Works on ``x`` as given, split along ``axis`` (no reshape, so XLA partitions it
along every other axis as the caller sharded them), and evaluates the very same
elementwise formulas as the kernels (``pallas_kernels.formulas.gated.gated_math``): the two
backends differ only by rounding and fusion.
"""
import jax.numpy as jnp

from pallas_kernels.formulas.gated import compute_dtype, gated_math, normal_cdf_options


def gated_forward(x, *, axis, kind, gate, approximate):
    """``x [..., 2 h, ...] -> y [..., h, ...]`` (halves along ``axis``)."""
    dtype = compute_dtype(x.dtype)
    first, second = (v.astype(dtype) for v in jnp.split(x, 2, axis=axis))
    y = gated_math(first, second, kind, gate, approximate, normal_cdf_options(x.dtype))
    return y.astype(x.dtype)


def gated_backward(dy, x, *, axis, kind, gate, approximate):
    """``dy [..., h, ...], x [..., 2 h, ...] -> dx [..., 2 h, ...]``."""
    dtype = compute_dtype(x.dtype)
    first, second = (v.astype(dtype) for v in jnp.split(x, 2, axis=axis))
    d_first, d_second = gated_math(first, second, kind, gate, approximate,
                                   normal_cdf_options(x.dtype), dy=dy.astype(dtype))
    return jnp.concatenate([d_first, d_second], axis=axis).astype(x.dtype)
