"""Causal depthwise convolution's formulas: the activation and its derivative, on any
array (a kernel's tiles, or whole arrays in the XLA implementation)."""
import jax

ACTIVATIONS = (None, "silu")


def activate(u, activation: str | None):
    """``act(u)``: ``u`` (None) or ``u sigmoid(u)`` (``"silu"``)."""
    if activation is None:
        return u
    return u * jax.nn.sigmoid(u)


def activation_grad(u, dy, activation: str | None):
    """``dy act'(u)``: ``dy`` (None) or ``dy s (1 + u (1 - s))`` with ``s = sigmoid(u)``."""
    if activation is None:
        return dy
    s = jax.nn.sigmoid(u)
    return dy * (s * (1.0 + u * (1.0 - s)))

