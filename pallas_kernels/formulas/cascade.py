"""The merge of partial attention states and its gradient, on any arrays: the kernels'
tiles or the XLA implementation's whole arrays (see ``bjax.cascade`` for the formula)."""
import functools
import math

import jax.numpy as jnp

BASES = (2, "e")


def compute_dtype(v_dtype) -> jnp.dtype:
    return jnp.dtype(jnp.float64) if jnp.dtype(v_dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def _lse_functions(base):
    """``(b^x, log_b x, ln b)`` for base 2 or e."""
    if base == 2:
        return jnp.exp2, jnp.log2, math.log(2.0)
    return jnp.exp, jnp.log, 1.0


def _empty(s):
    return jnp.abs(s) == jnp.inf


def _weights(load_s, num_states, base):
    """``(s_k list, m, w_k list, W)``; ``m = -inf`` where every state is empty.
    ``load_s(k)``: s_k in the math dtype."""
    exp_b, _, _ = _lse_functions(base)
    s = [load_s(k) for k in range(num_states)]
    m = jnp.full_like(s[0], -jnp.inf)
    for s_k in s:
        m = jnp.where(_empty(s_k), m, jnp.maximum(m, s_k))
    weights = [jnp.where(_empty(s_k), 0, exp_b(s_k - m)) for s_k in s]
    return s, m, weights, functools.reduce(jnp.add, weights)


def merge_math(load_s, load_v, num_states: int, base):
    """Merged ``(v, s)`` of states ``k < num_states`` in the math dtype.

    ``load_s(k)`` gives ``s_k`` with any shape, ``load_v(k)`` ``v_k`` with one
    more (last) axis. Used by the kernels on tiles and by the XLA backend on
    whole arrays.
    """
    _, log_b, _ = _lse_functions(base)
    s, m, weights, total = _weights(load_s, num_states, base)
    acc = None
    for k, (s_k, w) in enumerate(zip(s, weights)):
        v_k = load_v(k)
        # Starting from -0.0 (-0.0 + x == x for every x), a lone non-empty state
        # comes back bit for bit; empty states are skipped, never multiplied.
        acc = jnp.full_like(v_k, -0.0) if acc is None else acc
        acc = jnp.where(_empty(s_k)[..., None], acc, acc + w[..., None] * v_k)
    all_empty = m == -jnp.inf
    v = jnp.where(all_empty[..., None], 0, acc * (1 / total)[..., None])
    s = jnp.where(all_empty, -jnp.inf, jnp.where(total == 1, m, m + log_b(total)))
    return v, s


def merge_grad_math(load_s, load_v, dv, ds, num_states: int, base, keep_first=None):
    """``(p_k, ds_k)`` for every state: ``dv_k = p_k[..., None] * dv`` (0 for empty states).

    ``keep_first`` (bool, broadcasting against ``ds``) marks rows where the merge
    returned state 0 unchanged (``merge_state``'s mask off): there the gradient
    passes to state 0 whole and to no other.
    """
    _, _, ln_b = _lse_functions(base)
    s, _, weights, total = _weights(load_s, num_states, base)
    inverse = jnp.where(total == 0, 0, 1 / total)
    p = [w * inverse for w in weights]
    # An empty state's v may hold anything: keep it out of the dot products.
    g = [jnp.sum(dv * jnp.where(_empty(s_k)[..., None], 0, load_v(k)), axis=-1)
         for k, s_k in enumerate(s)]
    g_mean = functools.reduce(jnp.add, [p_k * g_k for p_k, g_k in zip(p, g)])
    d_s = [jnp.where(_empty(s_k), 0, p_k * (ds + ln_b * (g_k - g_mean)))
           for s_k, p_k, g_k in zip(s, p, g)]
    if keep_first is not None:
        p = [jnp.where(keep_first, 1 if k == 0 else 0, p_k) for k, p_k in enumerate(p)]
        d_s = [jnp.where(keep_first, ds if k == 0 else 0, d) for k, d in enumerate(d_s)]
    return p, d_s
