"""Causal depthwise convolution in plain ``jax.numpy`` (the ``"xla"`` backend).

The same sum as the kernels, in the same order (the bias, then the taps from the
oldest), in float32, with the activation from ``pallas_kernels.formulas.conv``; the
gradients are autodiff of it.
"""
import jax.numpy as jnp

from pallas_kernels.formulas.conv import activate


def history(x, initial_states, seq_idx, taps: int):
    """``(window, same)``: ``x`` float32 ``[b, l, d]`` with the ``taps - 1`` rows before it
    (``initial_states`` or zeros) in front, ``[b, l + taps - 1, d]``; and, with
    ``seq_idx``, ``same[j]`` ``[b, l]``: whether row ``t - (taps - 1) + j`` is in row
    ``t``'s sequence (the rows before the start belong to the first), else None."""
    batch, _, channels = x.shape
    before = (jnp.zeros((batch, taps - 1, channels), jnp.float32) if initial_states is None
              else initial_states.astype(jnp.float32))
    window = jnp.concatenate([before, x.astype(jnp.float32)], axis=1)
    if seq_idx is None:
        return window, None
    ids = jnp.concatenate([jnp.repeat(seq_idx[:, :1], taps - 1, axis=1), seq_idx], axis=1)
    length = x.shape[1]
    return window, [ids[:, j:j + length] == seq_idx for j in range(taps)]


def causal_conv1d(x, weight, bias, initial_states, seq_idx, activation):
    """``y [b, l, d]`` in x's dtype: ``act(bias + sum_j weight[:, j] x[t - (k - 1) + j])``."""
    taps, length = weight.shape[1], x.shape[1]
    window, same = history(x, initial_states, seq_idx, taps)
    w = weight.astype(jnp.float32)
    u = jnp.zeros(x.shape, jnp.float32) if bias is None else bias.astype(jnp.float32)
    for j in range(taps):
        rows = window[:, j:j + length]
        if same is not None:
            rows = jnp.where(same[j][..., None], rows, 0.0)
        u = u + w[:, j] * rows
    return activate(u, activation).astype(x.dtype)


def step(state, x, weight, bias, activation):
    """One token: ``(y [b, d]`` in x's dtype, ``new_state [b, k - 1, d])``."""
    window = jnp.concatenate([state.astype(jnp.float32), x[:, None].astype(jnp.float32)], axis=1)
    w = weight.astype(jnp.float32)
    u = jnp.zeros(x.shape, jnp.float32) if bias is None else bias.astype(jnp.float32)
    for j in range(weight.shape[1]):
        u = u + w[:, j] * window[:, j]
    y = activate(u, activation).astype(x.dtype)
    return y, jnp.concatenate([state[:, 1:], x[:, None].astype(state.dtype)], axis=1)
