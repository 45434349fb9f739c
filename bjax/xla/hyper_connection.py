"""Pure ``jax.numpy`` mHC (the ``"xla"`` backend): float32 math, any device.

The formulas are those of ``bjax.hyper_connection``'s module doc; gradients come
from autodiff of these functions (the Sinkhorn loop is a fixed-count
``fori_loop``, so its reverse pass is exact).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.formulas import sinkhorn as sk

_HIGHEST = jax.lax.Precision.HIGHEST
_F32 = jnp.float32


def sinkhorn(logits, *, iters: int, eps: float, init: str, order: str):
    """Sinkhorn-Knopp of ``logits [..., n, n]``, float32 out: ``pallas_kernels.formulas.sinkhorn``'s
    formula and log-domain steps, differentiated by autodiff."""
    logits = logits.astype(_F32)
    u = sk.log_start(logits, sk.matrix_shift(logits), init, eps)
    lead, pair, rounds = sk.schedule(order, iters)
    for axis in lead:
        u = sk.log_normalize(u, axis, eps)[0]

    def round_(_, u):
        for axis in pair:
            u = sk.log_normalize(u, axis, eps)[0]
        return u

    return jnp.exp(jax.lax.fori_loop(0, rounds, round_, u))


def rms_normalize(v, eps: float):
    """``v / sqrt(mean(v^2, -1) + eps)`` over the last axis (float32)."""
    return v * jax.lax.rsqrt(jnp.mean(v * v, axis=-1, keepdims=True) + eps)


def fused_coefficients(h_pre, h_post, h_res, *, sinkhorn):
    """The fused static op's ``(sigmoid(h_pre), 2 sigmoid(h_post), sinkhorn(h_res))``, float32."""
    return (jax.nn.sigmoid(h_pre.astype(_F32)), 2 * jax.nn.sigmoid(h_post.astype(_F32)),
            sinkhorn(h_res))


def hyper_connection(x, weight, h_pre, h_post, h_res, *, iters: int, eps: float, order: str):
    """The fused static op (``bjax.hyper_connection``) on ``x [B, n, C]``; ``out`` in x's dtype."""
    s_pre, s_post, mix = fused_coefficients(h_pre, h_post, h_res, sinkhorn=functools.partial(
        sinkhorn, iters=iters, eps=eps, init="exp", order=order))
    xf = x.astype(_F32)
    agg = jnp.einsum("i,bic->bc", s_pre, xf, precision=_HIGHEST)
    y = rms_normalize(agg, eps) * weight.astype(_F32)
    out = (jnp.einsum("ij,bjc->bic", mix, xf, precision=_HIGHEST)
           + s_post[:, None] * y[:, None, :])
    return out.astype(x.dtype)


def mhc_coefficients(h_tilde, n: int, *, sinkhorn, pre_eps: float, post_scale: float):
    """``(h_pre [..., n], h_post [..., n], h_res [..., n, n])`` from ``H~ [..., n^2 + 2n]``
    laid out ``[pre | post | res (row-major)]``; ``sinkhorn`` maps ``[..., n, n]`` logits
    to the mixing matrices."""
    h_pre = jax.nn.sigmoid(h_tilde[..., :n]) + pre_eps
    h_post = post_scale * jax.nn.sigmoid(h_tilde[..., n:2 * n])
    h_res = sinkhorn(h_tilde[..., 2 * n:].reshape(*h_tilde.shape[:-1], n, n))
    return h_pre, h_post, h_res


def coefficient_scale(alpha, n: int):
    """``alpha [3]`` spread over the ``n^2 + 2n`` columns of ``H~``."""
    return jnp.repeat(alpha.astype(_F32), jnp.array([n, n, n * n]), total_repeat_length=n * n + 2 * n)


def dynamic_h_tilde(proj, squares, alpha, bias, *, n: int, flat: int, rmsnorm_eps: float):
    """``H~ = alpha * (RMSNorm(vec x) phi) + bias`` from ``proj = vec(x) phi [..., n^2 + 2n]``
    and ``squares = sum(vec(x)^2) [...]`` over ``flat = n C`` values (RMSNorm scales a
    token by one number, so it is applied after the projection)."""
    rstd = jax.lax.rsqrt(squares / flat + rmsnorm_eps)[..., None]
    return coefficient_scale(alpha, n) * rstd * proj + bias.astype(_F32)


def mhc_pre(x, phi, alpha, bias, *, rmsnorm_eps: float, sinkhorn, pre_eps: float,
            post_scale: float):
    """``(layer_input [..., C] in x's dtype, h_post [..., n], h_res [..., n, n])``; static H
    (``bias`` alone) when ``phi`` is None."""
    n, hidden = x.shape[-2:]
    xf = x.astype(_F32)
    if phi is None:
        h_tilde = jnp.broadcast_to(bias.astype(_F32), (*x.shape[:-2], bias.shape[0]))
    else:
        flat = xf.reshape(*x.shape[:-2], n * hidden)
        proj = jnp.einsum("...k,kj->...j", flat, phi.astype(_F32), precision=_HIGHEST)
        h_tilde = dynamic_h_tilde(proj, jnp.sum(flat * flat, axis=-1), alpha, bias, n=n,
                                  flat=n * hidden, rmsnorm_eps=rmsnorm_eps)
    h_pre, h_post, h_res = mhc_coefficients(h_tilde, n, sinkhorn=sinkhorn, pre_eps=pre_eps,
                                            post_scale=post_scale)
    layer_input = jnp.einsum("...i,...ic->...c", h_pre, xf, precision=_HIGHEST)
    return layer_input.astype(x.dtype), h_post, h_res


def mhc_post(x, f_out, h_post, h_res, *, transpose_res: bool):
    """``x_next[..., i, c] = sum_j R[..., i, j] x[..., j, c] + h_post[..., i] f_out[..., c]``,
    ``R = h_res`` (or its transpose); in x's dtype."""
    res = jnp.swapaxes(h_res, -1, -2) if transpose_res else h_res
    out = (jnp.einsum("...ij,...jc->...ic", res.astype(_F32), x.astype(_F32), precision=_HIGHEST)
           + h_post.astype(_F32)[..., :, None] * f_out.astype(_F32)[..., None, :])
    return out.astype(x.dtype)
