"""Gated activations in plain ``jax.numpy`` (the ``"xla"`` backend).

Works on the same ``[rows, 2 * cols]`` view as the kernels and evaluates the very
same elementwise formulas (``pallas_kernels.gated.gated_math``), so the two
backends differ only by rounding and fusion.
"""
import jax.numpy as jnp

from pallas_kernels.gated import compute_dtype, gated_math, normal_cdf_options


def gated_forward(x2, *, kind, gate, approximate):
    """``x2 [rows, 2 * cols] -> y [rows, cols]``."""
    cols = x2.shape[1] // 2
    dtype = compute_dtype(x2.dtype)
    first, second = x2[:, :cols].astype(dtype), x2[:, cols:].astype(dtype)
    y = gated_math(first, second, kind, gate, approximate, normal_cdf_options(x2.dtype))
    return y.astype(x2.dtype)


def gated_backward(dy2, x2, *, kind, gate, approximate):
    """``dy2 [rows, cols], x2 [rows, 2 * cols] -> dx2 [rows, 2 * cols]``."""
    cols = dy2.shape[1]
    dtype = compute_dtype(x2.dtype)
    first, second = x2[:, :cols].astype(dtype), x2[:, cols:].astype(dtype)
    d_first, d_second = gated_math(first, second, kind, gate, approximate,
                                   normal_cdf_options(x2.dtype), dy=dy2.astype(dtype))
    return jnp.concatenate([d_first, d_second], axis=1).astype(x2.dtype)
