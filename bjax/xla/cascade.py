"""Cascade merge in plain ``jax.numpy`` (the ``"xla"`` backend), on whole arrays.

The formulas are the kernels' own (``pallas_kernels.formulas.cascade.merge_math`` and
``merge_grad_math``), evaluated with the states as separate arrays, which XLA
fuses into one pass.
"""
import jax.numpy as jnp

from pallas_kernels.formulas.cascade import compute_dtype, merge_grad_math, merge_math


def _pair(v_a, s_a, v_b, s_b):
    dtype = compute_dtype(v_a.dtype)
    vs, ss = (v_a, v_b), (s_a, s_b)
    return (lambda k: vs[k].astype(dtype)), (lambda k: ss[k].astype(dtype))


def merge_pair(v_a, s_a, v_b, s_b, mask=None, *, base, in_place=False):
    """``(v, s)`` of two states; rows where ``mask`` (bool ``[seq_len]``) is False keep a.

    ``in_place`` is XLA's to decide: it writes over donated inputs by itself.
    """
    del in_place
    load_v, load_s = _pair(v_a, s_a, v_b, s_b)
    v, s = merge_math(load_s, load_v, 2, base)
    v, s = v.astype(v_a.dtype), s.astype(s_a.dtype)
    if mask is None:
        return v, s
    return jnp.where(mask[:, None, None], v, v_a), jnp.where(mask[:, None], s, s_a)


def merge_pair_backward(v_a, s_a, v_b, s_b, mask, dv, ds, *, base):
    """``(dv_a, ds_a, dv_b, ds_b)`` for cotangents ``(dv, ds)``."""
    load_v, load_s = _pair(v_a, s_a, v_b, s_b)
    dtype = compute_dtype(v_a.dtype)
    dv, ds = dv.astype(dtype), ds.astype(dtype)
    keep_a = None if mask is None else ~mask[:, None]
    p, d_s = merge_grad_math(load_s, load_v, dv, ds, 2, base, keep_first=keep_a)
    return ((p[0][..., None] * dv).astype(v_a.dtype), d_s[0].astype(s_a.dtype),
            (p[1][..., None] * dv).astype(v_b.dtype), d_s[1].astype(s_b.dtype))


def _many(v, s):
    dtype = compute_dtype(v.dtype)
    return (lambda k: v[:, k].astype(dtype)), (lambda k: s[:, k].astype(dtype))


def merge_many(v, s, *, base):
    """``v [seq_len, K, num_heads, head_dim], s [seq_len, K, num_heads] -> (v, s)`` merged."""
    load_v, load_s = _many(v, s)
    merged_v, merged_s = merge_math(load_s, load_v, v.shape[1], base)
    return merged_v.astype(v.dtype), merged_s.astype(s.dtype)


def merge_many_backward(v, s, dv, ds, *, base):
    """``(dv_states, ds_states)`` for cotangents ``(dv, ds)``."""
    load_v, load_s = _many(v, s)
    dtype = compute_dtype(v.dtype)
    dv = dv.astype(dtype)
    p, d_s = merge_grad_math(load_s, load_v, dv, ds.astype(dtype), v.shape[1], base)
    return (jnp.stack([p_k[..., None] * dv for p_k in p], axis=1).astype(v.dtype),
            jnp.stack(d_s, axis=1).astype(s.dtype))
