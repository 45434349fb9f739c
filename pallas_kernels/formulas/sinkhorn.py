"""Sinkhorn-Knopp's formula and its steps on ``log P``, forward and backward, on any
arrays: the kernels' blocks or the XLA implementation's whole batches.

The formula, for logits ``L [count, n, n]``:

    P_0 = exp(L - max L)               (init "exp"; the max over the matrix)
    P_0 = softmax_rows(L) + eps        (init "softmax")
    then the steps of the schedule (:data:`SCHEDULES`), each P <- P / (sum_a P + eps)
    with the sum along axis a broadcast back.

Shifting by the matrix's maximum makes the largest entry 1 at any logit scale, so
``eps`` guards sums measured against it (without eps the result would not depend
on the shift at all). A row or column whose entries are all far below eps grows
by about 1/eps per normalisation until its sum reaches 1.

Every step runs on ``U = log P`` in float32: ``U <- U - D`` with
``D = logaddexp(logsumexp_a U, log eps)``. Entries far below the largest (by more
than float32's ~87 of exponent range) keep their value and their gradient, where
``exp`` would flush them to 0. ``P = exp(U)`` is formed at the end.

Backward: with ``g`` the gradient with respect to ``U_s`` and ``P_s = exp(U_s)``,
one step back is ``g <- g - P_s * sum_a g`` and ``U_{s-1} = U_s + D_s``. The
forward run for a gradient stores every ``D_s`` (``[count, steps, n]``) and the
backward walks the steps in reverse from the last iterate (no assumption of
convergence), then through the start (:func:`start_grad`).
"""
import math

import jax
import jax.numpy as jnp

INITS = ("exp", "softmax")
# A step normalises columns (sums over the row index, axis -2) or rows (axis -1).
COLUMNS, ROWS = -2, -1
# order -> (steps done once first, the pair of steps each later round does). Each of
# ``iters`` iterations is one round, except that DeepSeek's schedule spends its first
# iteration on the single column step: 2 iters - 1 steps, ending with columns.
SCHEDULES = {
    "columns_first": ((), (COLUMNS, ROWS)),
    "rows_first": ((), (ROWS, COLUMNS)),
    "deepseek": ((COLUMNS,), (ROWS, COLUMNS)),
}
# Floor of every maximum taken: a line or matrix of -inf logits stays finite (P = 0).
FLOOR = -1e30


def schedule(order: str, iters: int):
    """``(lead, pair, rounds)``: the ``lead`` steps, then ``rounds`` times the ``pair``."""
    lead, pair = SCHEDULES[order]
    return lead, pair, iters - len(lead)


def num_steps(order: str, iters: int) -> int:
    lead, pair, rounds = schedule(order, iters)
    return len(lead) + len(pair) * rounds


def _logaddexp(a, b):
    top = jnp.maximum(a, b)
    return top + jnp.log1p(jnp.exp(-jnp.abs(a - b)))


def _logsumexp(u, axis: int):
    """``log sum_axis exp(u)`` (axis dropped), stable; the max is a constant of the math."""
    top = jax.lax.stop_gradient(jnp.maximum(jnp.max(u, axis=axis), FLOOR))
    return top + jnp.log(jnp.sum(jnp.exp(u - jnp.expand_dims(top, axis)), axis=axis))


def log_normalize(u, axis: int, eps: float):
    """One step on ``U = log P``: ``(U - D, D)``, ``D = log(sum_axis P + eps)`` (axis
    dropped)."""
    d = _logaddexp(_logsumexp(u, axis), math.log(eps))
    return u - jnp.expand_dims(d, axis), d


@jax.custom_jvp
def matrix_shift(logits):
    """Each matrix's maximum (keepdims, floored at -1e30): the ``exp`` start's shift. Its
    derivative is shared equally by :func:`tied_cells` (JAX's rule for a maximum)."""
    return jnp.maximum(jnp.max(logits, axis=(-2, -1), keepdims=True), FLOOR)


@matrix_shift.defjvp
def _matrix_shift_jvp(primals, tangents):
    (logits,), (tangent,) = primals, tangents
    shift = matrix_shift(logits)
    ties = tied_cells(logits, shift).astype(logits.dtype)
    share = jnp.where(shift > FLOOR, ties / _matrix_sum(ties), 0.0)
    return shift, _matrix_sum(tangent * share)


def tied_cells(logits, shift):
    """Cells of each matrix of ``logits [..., n, n]`` holding its maximum ``shift``, the
    first of them (row-major, from argmax reductions) always among them: a compiler may
    recompute the logits for the comparison with multiply-adds contracted differently
    (XLA's CPU fusions; the Pallas interpreter fuses kernels into the program around
    them), so that no cell compares equal and a tie count of 0 would divide the
    maximum's derivative. Used by :func:`matrix_shift` and the backward kernel alike."""
    rows_axis, columns_axis = logits.ndim - 2, logits.ndim - 1
    first_row = jax.lax.argmax(jnp.max(logits, axis=columns_axis), rows_axis, jnp.int32)
    column_of_row = jax.lax.argmax(logits, columns_axis, jnp.int32)        # [..., n]
    rows = jax.lax.broadcasted_iota(jnp.int32, column_of_row.shape, rows_axis)
    first_column = jnp.sum(jnp.where(rows == first_row[..., None], column_of_row, 0),
                           axis=rows_axis)
    i = jax.lax.broadcasted_iota(jnp.int32, logits.shape, rows_axis)
    j = jax.lax.broadcasted_iota(jnp.int32, logits.shape, columns_axis)
    first = (i == first_row[..., None, None]) & (j == first_column[..., None, None])
    return (logits == shift) | first


def log_start(logits, shift, init: str, eps: float):
    """``U_0 = log P_0`` from float32 ``logits [..., n, n]``: ``L - shift`` (``shift``:
    :func:`matrix_shift`) or ``log(softmax_rows(L) + eps)``."""
    if init == "exp":
        return logits - shift
    log_softmax = logits - jnp.expand_dims(_logsumexp(logits, -1), -1)
    return _logaddexp(log_softmax, math.log(eps))


def start_grad(logits, shift, is_max, u0, g0, init: str):
    """``dLoss/dL`` from ``g0 = dLoss/dU_0``. For ``exp``, ``U_0 = L - max L``: ``g0`` less
    ``sum(g0)`` shared equally by the cells holding the maximum (``is_max``; JAX's rule
    for the derivative of a max). For ``softmax``, ``U_0 = logaddexp(log S, log eps)``."""
    if init == "exp":
        total = _matrix_sum(g0)
        share = total / _matrix_sum(is_max.astype(jnp.float32))
        return g0 - jnp.where(is_max, share, 0.0)
    log_softmax = logits - jnp.expand_dims(_logsumexp(logits, -1), -1)
    s = jnp.exp(log_softmax)
    g_log_softmax = g0 * jnp.exp(log_softmax - u0)          # dU_0/dlog S = S / (S + eps)
    return g_log_softmax - s * jnp.sum(g_log_softmax, axis=-1, keepdims=True)


def _matrix_sum(v):
    return jnp.sum(jnp.sum(v, axis=-1, keepdims=True), axis=-2, keepdims=True)
