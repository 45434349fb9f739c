"""MHCBlock: Manifold-Constrained Hyper-Connections around any sublayer, and the helpers
that open and close the ``n`` residual streams of a model."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from bjax import _op
from bjax.hyper_connection import DEEPSEEK_MHC_POST, DEEPSEEK_MHC_PRE, mhc_post, mhc_pre

PRESETS = {"paper": ({}, {}), "deepseek": (dict(DEEPSEEK_MHC_PRE), dict(DEEPSEEK_MHC_POST))}
"""``preset -> (mhc_pre options, mhc_post options)``: ``"paper"``, bjax's defaults (exp
start, columns first, 20 iterations, ``h_post = 2 sigmoid``); ``"deepseek"``, DeepSeek's
released kernels (:data:`bjax.DEEPSEEK_MHC_PRE`, :data:`bjax.DEEPSEEK_MHC_POST`)."""


def expand_streams(h, n: int):
    """``h [..., C] -> [..., n, C]``: every stream starts as the embedding (the bottom of
    an mHC model)."""
    return jnp.broadcast_to(h[..., None, :], (*h.shape[:-1], n, h.shape[-1]))


def reduce_streams(x):
    """``x [..., n, C] -> [..., C]``: the streams summed (the top of an mHC model, before
    the final norm)."""
    return jnp.sum(x, axis=-2, dtype=jnp.float32).astype(x.dtype)


class MHCBlock(nnx.Module):
    """``x_next = H_res x + H_post^T F(H_pre x)`` on ``n`` residual streams ``x [..., n, C]``.

    :func:`bjax.mhc_pre` gives the sublayer's input ``sum_i h_pre_i x_i``, the sublayer ``F``
    maps it ``[..., C] -> [..., C]``, and :func:`bjax.mhc_post` mixes the streams with the
    doubly stochastic ``h_res`` and adds ``h_post_i F``. The coefficients come from ``bias``
    alone (static H) or, with ``dynamic``, from ``alpha * (RMSNorm(vec x) phi) + bias`` per
    token.

    Initialisation (a choice; the paper leaves it to the model): ``bias`` is 0 for the
    pre and post logits and ``res_diagonal`` on the diagonal of the res logits (0 off it),
    so that ``h_res`` starts near the identity (each stream keeps most of itself); ``phi``
    is normal with standard deviation ``phi_scale / sqrt(n C)`` and ``alpha`` is
    ``alpha_init``, so the dynamic part starts small.

    Args:
      sublayer: ``F``, any callable ``[..., C] -> [..., C]`` (an nnx module is a submodule).
      n, hidden: streams and channels.
      dynamic: dynamic H (``phi``, ``alpha``) or static (``bias`` alone).
      preset: ``"paper"`` or ``"deepseek"`` (:data:`PRESETS`).
      res_diagonal, phi_scale, alpha_init: the initialisation above.
      param_dtype: the parameters' dtype; backend: bjax's backend for the mHC ops.
      rngs: ``nnx.Rngs`` for ``phi``.

    Raises:
      InvalidProblemError: an unknown ``preset``.
    """

    def __init__(self, sublayer: Callable, n: int, hidden: int, *, dynamic: bool = True,
                 preset: str = "paper", res_diagonal: float = 4.0, phi_scale: float = 0.02,
                 alpha_init: float = 0.01, param_dtype=jnp.float32, backend: str | None = None,
                 rngs: nnx.Rngs):
        _op.check_choice(preset, tuple(PRESETS), "MHCBlock", "preset")
        self.sublayer, self.n, self.backend = sublayer, n, backend
        self.pre_options, self.post_options = PRESETS[preset]
        count = n * n + 2 * n
        res = res_diagonal * jnp.eye(n, dtype=param_dtype).reshape(-1)
        self.bias = nnx.Param(jnp.concatenate([jnp.zeros((2 * n,), param_dtype), res]))
        if dynamic:
            std = phi_scale / (n * hidden) ** 0.5
            self.phi = nnx.Param(std * jax.random.normal(rngs.params(), (n * hidden, count),
                                                         param_dtype))
            self.alpha = nnx.Param(jnp.full((3,), alpha_init, param_dtype))
        else:
            self.phi = self.alpha = None

    def __call__(self, x, *args, **kwargs):
        """``x [..., n, C] -> x_next [..., n, C]`` in x's dtype.

        Further arguments go to the sublayer after its input. A sublayer that returns a
        tuple ``(f, aux)`` (a mixer and its decode cache) makes the block return
        ``(x_next, aux)``.
        """
        dynamic = {} if self.phi is None else dict(phi=self.phi[...], alpha=self.alpha[...])
        layer_input, h_post, h_res = mhc_pre(x, bias=self.bias[...], backend=self.backend,
                                             **dynamic, **self.pre_options)
        f_out = self.sublayer(layer_input, *args, **kwargs)
        has_aux = isinstance(f_out, tuple)
        f_out, aux = f_out if has_aux else (f_out, None)
        x_next = mhc_post(x, f_out.astype(x.dtype), h_post, h_res, backend=self.backend,
                          **self.post_options)
        return (x_next, aux) if has_aux else x_next
