"""Attention with a KV cache: ``attend`` (out and log-sum-exp), the ``KVCache`` module,
shared-prefix (cascade) decoding, and a causal self-attention block.

Shapes: queries ``q [b, t, num_heads, head_dim]``; keys and values
``[b, s, num_kv_heads, head_dim]`` (grouped-query attention: ``num_heads`` a multiple of
``num_kv_heads``, query head ``i`` reading kv head ``i // (num_heads / num_kv_heads)``).
Scores, softmax and the weighted sum run in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from bjax import _op
from bjax.cascade import merge_state
from bjax.write_slice import write_slice


def attend(q, k, v, *, kv_lengths=None, q_positions=None, scale: float | None = None):
    """Softmax attention that also returns the log-sum-exp of the scores.

    Query ``i`` of row ``r`` sees key ``j`` when ``j < kv_lengths[r]`` and, with
    ``q_positions``, ``j <= q_positions[r, i]`` (causal). With ``s_j = scale <q, k_j>``
    over the visible keys: ``out = sum_j e^{s_j} v_j / sum_j e^{s_j}`` and
    ``lse = log sum_j e^{s_j}`` (natural log: ``merge_state(..., lse_base="e")``).
    A query that sees no key gets ``out = 0`` and ``lse = -inf`` (an empty state).

    Args:
      q: ``[b, t, num_heads, head_dim]``.
      k, v: ``[b, s, num_kv_heads, head_dim]``, or ``[s, num_kv_heads, head_dim]`` shared
        by every row (a prefix common to the batch: its keys are read once for all rows).
      kv_lengths: optional integer ``[b]``; ``None``: all ``s`` keys.
      q_positions: optional integer ``[b, t]``, the queries' positions among the keys;
        ``None``: no causal mask.
      scale: ``1 / sqrt(head_dim)`` by default.

    Returns:
      ``(out [b, t, num_heads, head_dim]`` in q's dtype, ``lse [b, t, num_heads]``
      float32, float64 for float64 q).

    Raises:
      InvalidProblemError: mismatched ranks, extents or dtypes of q, k and v;
        ``kv_lengths`` or ``q_positions`` not integer arrays of the shapes above.
    """
    b, t, heads, head_dim = _check_qkv(q, k, v, "attend")
    for name, value, shape in (("kv_lengths", kv_lengths, (b,)),
                               ("q_positions", q_positions, (b, t))):
        if value is not None:
            value = jnp.asarray(value)
            _op.check(value.shape == shape and jnp.issubdtype(value.dtype, jnp.integer),
                      "attend", name, f"an integer array of shape {shape}",
                      f"{value.dtype.name}{list(value.shape)}")
    shared = k.ndim == 3
    groups = heads // k.shape[-2]
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    scale = head_dim ** -0.5 if scale is None else scale
    if k.shape[-3] == 0:                            # no keys: every query's state is empty
        return jnp.zeros_like(q), jnp.full((b, t, heads), -jnp.inf, dtype)
    qg = q.astype(dtype).reshape(b, t, k.shape[-2], groups, head_dim)
    scores = jnp.einsum("btkgd,skd->bkgts" if shared else "btkgd,bskd->bkgts", qg,
                        k.astype(dtype), precision="highest") * scale
    visible = _visible(b, t, k.shape[-3], kv_lengths, q_positions)    # [b, t, s]
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    peak = jnp.where(jnp.isfinite(peak), peak, 0)
    weights = jnp.exp(scores - peak)
    total = jnp.sum(weights, axis=-1)
    nonempty = total > 0
    total = jnp.where(nonempty, total, 1)           # no 0/0 (nor its gradient) for empty rows
    out = jnp.einsum("bkgts,skd->btkgd" if shared else "bkgts,bskd->btkgd", weights,
                     v.astype(dtype), precision="highest")
    out = out / jnp.moveaxis(total, -1, 1)[..., None]
    lse = jnp.where(nonempty, peak[..., 0] + jnp.log(total), -jnp.inf)
    return (out.reshape(q.shape).astype(q.dtype),
            jnp.moveaxis(lse, -1, 1).reshape(b, t, heads))


def _visible(b, t, s, kv_lengths, q_positions):
    """bool ``[b, t, s]``: which key each query sees."""
    keys = jnp.arange(s)
    visible = jnp.ones((b, t, s), bool)
    if kv_lengths is not None:
        visible &= keys < jnp.asarray(kv_lengths)[:, None, None]
    if q_positions is not None:
        visible &= keys <= jnp.asarray(q_positions)[..., None]
    return visible


def _check_qkv(q, k, v, op):
    _op.check(q.ndim == 4, op, "q", "[b, t, num_heads, head_dim]", f"shape {q.shape}")
    _op.check(k.ndim in (3, 4) and k.shape == v.shape, op, "k, v",
              "the same shape, [b, s, num_kv_heads, head_dim] or [s, num_kv_heads, head_dim]",
              f"k.shape={k.shape}, v.shape={v.shape}")
    b, t, heads, head_dim = q.shape
    _op.check(k.shape[-1] == head_dim, op, "k.shape[-1]", f"q's head_dim {head_dim}",
              k.shape[-1])
    _op.check(k.ndim == 3 or k.shape[0] == b, op, "k.shape[0]", f"q's batch {b}", k.shape[0])
    kv_heads = k.shape[-2]
    _op.check(kv_heads > 0 and heads % kv_heads == 0, op, "k.shape[-2]",
              f"a divisor of q's num_heads {heads}", kv_heads)
    _op.check(q.dtype == k.dtype == v.dtype, op, "q, k, v dtypes", "one dtype",
              f"{q.dtype.name}, {k.dtype.name}, {v.dtype.name}")
    return b, t, heads, head_dim


class KVCache(nnx.Module):
    """Keys and values of ``batch`` sequences, each at its own length.

    ``k, v [batch, max_len, num_kv_heads, head_dim]`` and ``lengths`` int32 ``[batch]``
    are ``nnx.Cache`` variables. :meth:`append` writes the new tokens of every row at that
    row's length with :func:`bjax.write_slice`: passed to an ``nnx.jit`` function that
    donates the cache (``donate_argnums``), the compiled program updates ``k`` and ``v`` in
    place, touching only the appended tokens.

    A row appended past ``max_len`` keeps its bytes (write_slice never clamps; under
    ``jax.experimental.checkify`` the write reports the row) and its length then exceeds
    ``max_len``: :meth:`attend` returns NaN for it rather than attention over a cache that
    lost tokens.
    """

    def __init__(self, batch: int, max_len: int, num_kv_heads: int, head_dim: int, *,
                 dtype=jnp.float32, backend: str | None = None):
        shape = (batch, max_len, num_kv_heads, head_dim)
        self.k = nnx.Cache(jnp.zeros(shape, dtype))
        self.v = nnx.Cache(jnp.zeros(shape, dtype))
        self.lengths = nnx.Cache(jnp.zeros((batch,), jnp.int32))
        self.backend = backend

    @property
    def max_len(self) -> int:
        return self.k[...].shape[1]

    def append(self, k_new, v_new):
        """Writes ``k_new, v_new [batch, t, num_kv_heads, head_dim]`` after each row's
        tokens and adds ``t`` to every length.

        Raises:
          InvalidProblemError: ``k_new`` or ``v_new`` not of the cache's batch, heads,
            head_dim and dtype, or ``t > max_len``.
        """
        for name, new in (("k_new", k_new), ("v_new", v_new)):
            cache = self.k[...]
            _op.check(new.ndim == 4 and new.shape[0] == cache.shape[0]
                      and new.shape[2:] == cache.shape[2:] and new.shape[1] <= self.max_len,
                      "KVCache.append", f"{name}.shape",
                      f"[{cache.shape[0]}, t <= {self.max_len}, {cache.shape[2]}, "
                      f"{cache.shape[3]}]", new.shape)
            _op.check(new.dtype == cache.dtype, "KVCache.append", f"{name}.dtype",
                      f"the cache's {cache.dtype.name}", new.dtype.name)
        start = (0, self.lengths[...], 0, 0)
        self.k[...] = write_slice(self.k[...], k_new, start, backend=self.backend)
        self.v[...] = write_slice(self.v[...], v_new, start, backend=self.backend)
        self.lengths[...] = self.lengths[...] + k_new.shape[1]

    def attend(self, q, *, causal: bool = True, scale: float | None = None):
        """:func:`attend` of ``q [batch, t, num_heads, head_dim]`` over each row's tokens;
        ``causal``: the queries are the last ``t`` tokens appended, each seeing the tokens
        up to itself. Returns ``(out, lse)``."""
        lengths = self.lengths[...]
        t = q.shape[1]
        positions = lengths[:, None] - t + jnp.arange(t) if causal else None
        out, lse = attend(q, self.k[...], self.v[...], kv_lengths=lengths,
                          q_positions=positions, scale=scale)
        lost = (lengths > self.max_len)[:, None, None]
        return jnp.where(lost[..., None], jnp.nan, out), jnp.where(lost, jnp.nan, lse)


def cascade_attention(q, prefix_k, prefix_v, suffix: KVCache, *, causal: bool = True,
                      scale: float | None = None, backend: str | None = None):
    """Attention over a prefix shared by the batch followed by each row's own suffix.

    The prefix's state is computed once for the batch (its keys read once, every row's
    queries against them), the suffix's from each row's cache, and the two merged with
    :func:`bjax.merge_state` (FlashInfer's cascade inference). The result equals
    :func:`attend` over ``concat(prefix, suffix[:length])`` per row; a row with an empty
    suffix gets the prefix's state bit for bit.

    Args:
      q: ``[b, t, num_heads, head_dim]``, the suffix's last ``t`` tokens.
      prefix_k, prefix_v: ``[p, num_kv_heads, head_dim]``, one copy for the batch.
      suffix: the per-row tokens after the prefix.
      causal: as :meth:`KVCache.attend` (the prefix is wholly visible either way).
      scale: ``1 / sqrt(head_dim)`` by default.
      backend: the merge's bjax backend.

    Returns:
      ``(out [b, t, num_heads, head_dim], lse [b, t, num_heads])``.
    """
    _op.check(prefix_k.ndim == 3, "cascade_attention", "prefix_k",
              "[p, num_kv_heads, head_dim] (one copy for the batch)", f"shape {prefix_k.shape}")
    out_prefix, lse_prefix = attend(q, prefix_k, prefix_v, scale=scale)
    out_suffix, lse_suffix = suffix.attend(q, causal=causal, scale=scale)
    rows = (-1, *q.shape[2:])
    out, lse = merge_state(out_prefix.reshape(rows), lse_prefix.reshape(rows[:-1]),
                           out_suffix.reshape(rows), lse_suffix.reshape(rows[:-1]),
                           lse_base="e", backend=backend)
    return out.reshape(q.shape), lse.reshape(q.shape[:-1])


class CausalSelfAttention(nnx.Module):
    """Multi-head (grouped-query) causal self-attention with an optional KV cache.

    ``x [b, l, hidden] -> y [b, l, hidden]``: projections to ``num_heads`` queries and
    ``num_kv_heads`` keys and values of ``head_dim``, :func:`attend` with the causal mask,
    and the out-projection. There is no positional encoding: in a hybrid model the
    recurrent (Mamba-2) blocks carry position.

    Args:
      hidden_size, num_heads: widths; ``num_kv_heads`` defaults to ``num_heads`` and
        ``head_dim`` to ``hidden_size // num_heads``.
      use_bias, dtype, param_dtype: as ``nnx.Linear``.
      backend: the bjax backend of the cache's writes.
      rngs: ``nnx.Rngs`` for the initialisers.
    """

    def __init__(self, hidden_size: int, num_heads: int, *, num_kv_heads: int | None = None,
                 head_dim: int | None = None, use_bias: bool = False, dtype=None,
                 param_dtype=jnp.float32, backend: str | None = None, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.head_dim = hidden_size // num_heads if head_dim is None else head_dim
        _op.check(num_heads % self.num_kv_heads == 0, "CausalSelfAttention", "num_kv_heads",
                  f"a divisor of num_heads {num_heads}", self.num_kv_heads)
        self.backend = backend
        linear = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.LinearGeneral(hidden_size, (num_heads, self.head_dim), **linear)
        self.kv_proj = nnx.LinearGeneral(hidden_size, (2, self.num_kv_heads, self.head_dim),
                                         **linear)
        self.o_proj = nnx.LinearGeneral((num_heads, self.head_dim), hidden_size, axis=(-2, -1),
                                        **linear)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` sequences of up to ``max_len`` tokens."""
        return KVCache(batch, max_len, self.num_kv_heads, self.head_dim, dtype=dtype,
                       backend=self.backend)

    def __call__(self, x, *, cache: KVCache | None = None):
        """``x [b, l, hidden] -> y``; with ``cache``, the tokens are appended to it and
        attend to everything before them too, and the call returns ``(y, cache)``."""
        q = self.q_proj(x)
        kv = self.kv_proj(x)
        k, v = kv[..., 0, :, :], kv[..., 1, :, :]
        if cache is None:
            positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
            out, _ = attend(q, k, v, q_positions=positions)
            return self.o_proj(out)
        dtype = cache.k[...].dtype
        cache.append(k.astype(dtype), v.astype(dtype))
        out, _ = cache.attend(q.astype(dtype))
        return self.o_proj(out.astype(q.dtype)), cache

    def step(self, x_t, cache: KVCache):
        """One token per sequence: ``x_t [b, hidden] -> (y_t [b, hidden], cache)``."""
        y, cache = self(x_t[:, None], cache=cache)
        return y[:, 0], cache
