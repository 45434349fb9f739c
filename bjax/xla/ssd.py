"""Mamba-2 SSD in plain ``jax.numpy`` (the ``"xla"`` backend), and the segment
numbers every backend derives from ``seq_idx``.

The chunked algorithm of ``pallas_kernels.ssd`` written with einsums over whole
arrays: intra-chunk ``(C B^T) * decay`` products, per-chunk states, a scan over
chunks, and the inter-chunk term. Matmul operands stay in the input dtype
(float32: full precision) with float32 accumulation; everything else is float32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.formulas.ssd import process_dt


def _pad_time(x, length, axis=1, mode="constant"):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad, mode=mode)


def time_terms(dt, a, bias, *, chunk_size, softplus, limit):
    """``(dt', a_cs)`` as ``pallas_kernels.ssd.time_terms``, in jnp."""
    batch, seq_len, heads = dt.shape
    chunks = max(1, -(-seq_len // chunk_size))
    dt = _pad_time(process_dt(dt, bias, softplus, limit), chunks * chunk_size)
    dt = jnp.transpose(dt, (0, 2, 1))
    a_cs = jnp.cumsum((dt * a[None, :, None]).reshape(batch, heads, chunks, chunk_size), axis=-1)
    return dt, a_cs.reshape(dt.shape)


def segments(seq_idx, length):
    """int32 ``[batch, length]`` segment numbers from ``seq_idx`` ``[batch, seqlen]``: 0
    first, +1 wherever seq_idx changes, the last one repeated past seqlen."""
    changes = (seq_idx[:, 1:] != seq_idx[:, :-1]).astype(jnp.int32)
    seg = jnp.concatenate([jnp.zeros((seq_idx.shape[0], 1), jnp.int32),
                           jnp.cumsum(changes, axis=1)], axis=1)
    return _pad_time(seg, length, mode="edge")


def _einsum(spec, *operands):
    precision = jax.lax.Precision.HIGHEST if operands[0].dtype == jnp.float32 else None
    return jnp.einsum(spec, *operands, precision=precision, preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def chunk_scan(x, b, c, dt, a_cs, seg=None, d=None, z=None, initial_states=None, *,
               chunk_size: int):
    """``(y, final_states, states)``: arguments as ``pallas_kernels.ssd.chunk_states`` /
    ``chunk_scan`` (``d`` float32 ``[heads, head_dim]``, ``initial_states`` float32 or None);
    ``states`` float32 ``[batch, chunks, heads, head_dim, state_dim]``, the state entering
    each chunk (XLA drops it where the caller does not use it)."""
    batch, seq_len, heads, head_dim = x.shape
    groups, state_dim = b.shape[2:]
    reps = heads // groups
    length = dt.shape[-1]
    chunks = length // chunk_size
    q = chunk_size

    def chunked(v):  # [batch, seqlen, ...] -> [batch, chunks, q, ...], zero past seqlen
        return _pad_time(v, length).reshape(batch, chunks, q, *v.shape[2:])

    xc = chunked(x).reshape(batch, chunks, q, groups, reps, head_dim)
    bc, cc = chunked(b), chunked(c)
    # [batch, groups, reps, chunks, q]
    a_c = a_cs.reshape(batch, groups, reps, chunks, q)
    dt_c = dt.reshape(batch, groups, reps, chunks, q)
    if seg is None:
        seg_c = jnp.zeros((batch, chunks, q), jnp.int32)
        seg_before = jnp.zeros((batch, chunks), jnp.int32)
    else:
        seg_c = seg.reshape(batch, chunks, q)
        seg_before = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), seg_c[:, :-1, -1]], 1)
    seg_end = seg_c[:, :, -1]
    group_seg = lambda v: v[:, None, None]  # noqa: E731  [batch, ...] -> [batch, 1, 1, ...]

    # Intra-chunk: y_t += sum_{s <= t} (C_t . B_s) exp(a_t - a_s) dt_s x_s, same segment.
    pairs = (jnp.tril(jnp.ones((q, q), bool))
             & (seg_c[..., :, None] == seg_c[..., None, :]))            # [batch, chunks, q, q]
    exponent = a_c[..., :, None] - a_c[..., None, :]                    # [b, g, r, c, q, q]
    decay = jnp.exp(jnp.where(group_seg(pairs), exponent, -jnp.inf))
    scores = _einsum("bcqgn,bcsgn->bgcqs", cc, bc)                      # [b, g, c, q, q]
    weights = (scores[:, :, None] * decay * dt_c[..., None, :]).astype(x.dtype)
    y = _einsum("bgrcqs,bcsgrp->bcqgrp", weights, xc)

    # Chunk states: sum_s exp(a_end - a_s) dt_s x_s B_s^T over the chunk's last segment.
    to_end = jnp.where(group_seg(seg_c == seg_end[..., None]), a_c[..., -1:] - a_c, -jnp.inf)
    bw = (bc.astype(jnp.float32)[:, :, :, :, None, :]
          * jnp.transpose(dt_c * jnp.exp(to_end), (0, 3, 4, 1, 2))[..., None]).astype(x.dtype)
    contributions = _einsum("bcsgrn,bcsgrp->cbgrpn", bw, xc)           # [c, b, g, r, p, n]
    carry = jnp.where(group_seg(seg_end == seg_before), a_c[..., -1], -jnp.inf)
    carry = jnp.transpose(jnp.exp(carry), (3, 0, 1, 2))                 # [c, b, g, r]
    if initial_states is None:  # zeros like the inputs: inside shard_map, varying as they are
        start = jnp.zeros_like(contributions[0], jnp.float32)
    else:
        start = initial_states.reshape(batch, groups, reps, head_dim, state_dim)

    def step(state, inputs):
        decay_c, contribution = inputs
        return decay_c[..., None, None] * state + contribution, state

    final, entering = jax.lax.scan(step, start, (carry, contributions))  # entering: [c, ...]

    # Inter-chunk: y_t += exp(a_t) C_t S_c^T, for steps in the segment the chunk entered in.
    enters = group_seg(seg_c == seg_before[..., None])
    scale = jnp.exp(jnp.where(enters, a_c, -jnp.inf))                   # [b, g, r, c, q]
    state_dtype = jnp.bfloat16 if x.dtype == jnp.bfloat16 else jnp.float32
    y_off = _einsum("bcqgn,cbgrpn->bcqgrp", cc.astype(state_dtype), entering.astype(state_dtype))
    y = y + y_off * jnp.transpose(scale, (0, 3, 4, 1, 2))[..., None]
    y = y.reshape(batch, length, heads, head_dim)[:, :seq_len]
    if d is not None:
        y = y + x.astype(jnp.float32) * d
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    entering = jnp.moveaxis(entering, 0, 1).reshape(batch, chunks, heads, head_dim, state_dim)
    return y.astype(x.dtype), final.reshape(batch, heads, head_dim, state_dim), entering


def step(state, x, dt, a, b, c, bias=None, d=None, z=None, *, softplus, limit):
    """One token: ``(y, new_state)``; arguments as ``pallas_kernels.ssd.step``."""
    heads = state.shape[1]
    reps = heads // b.shape[1]
    dt = process_dt(dt, bias, softplus, limit)                          # [batch, heads]
    b = jnp.repeat(b.astype(jnp.float32), reps, axis=1)                 # [batch, heads, n]
    c = jnp.repeat(c.astype(jnp.float32), reps, axis=1)
    xf = x.astype(jnp.float32)
    new_state = (jnp.exp(dt * a)[..., None, None] * state
                 + (dt[..., None] * xf)[..., None] * b[:, :, None, :])
    y = jnp.einsum("bhpn,bhn->bhp", new_state, c, precision=jax.lax.Precision.HIGHEST)
    if d is not None:
        y = y + d * xf
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y.astype(x.dtype), new_state
