"""Sinkhorn-Knopp on batches of small ``n x n`` matrices: forward and exact backward.

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

Layout: a program owns ``block_count`` matrices as a ``[block_count, N, N]``
block, ``N`` = n rounded up to a power of two; padded cells hold ``-1e30``
(``P = 0``, finite) and are never stored.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.blocks import all_of, columns, load

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
_FLOOR = -1e30
_BLOCK_CELLS = 2048


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
    top = jax.lax.stop_gradient(jnp.maximum(jnp.max(u, axis=axis), _FLOOR))
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
    return jnp.maximum(jnp.max(logits, axis=(-2, -1), keepdims=True), _FLOOR)


@matrix_shift.defjvp
def _matrix_shift_jvp(primals, tangents):
    (logits,), (tangent,) = primals, tangents
    shift = matrix_shift(logits)
    ties = tied_cells(logits, shift).astype(logits.dtype)
    share = jnp.where(shift > _FLOOR, ties / _matrix_sum(ties), 0.0)
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


@dataclasses.dataclass(frozen=True)
class SinkhornConfig:
    """Matrices per program and warps."""
    block_count: int
    num_warps: int = 4


def default_config(count: int, n: int) -> SinkhornConfig:
    """About 2048 cells per program."""
    width = pl.next_power_of_2(n)
    return SinkhornConfig(max(1, min(pl.next_power_of_2(max(count, 1)),
                                     _BLOCK_CELLS // (width * width))))


def _place(count, n, block_count):
    """Slices and masks of a program's ``[block_count, N, N]`` block and ``[block_count, N]``
    vectors."""
    width = pl.next_power_of_2(n)
    m_slice, m_mask = columns(count, pl.program_id(0) * block_count, block_count)
    i_slice, i_mask = columns(n, 0, width)
    cells = all_of(None if m_mask is None else m_mask[:, None, None],
                   None if i_mask is None else i_mask[None, :, None],
                   None if i_mask is None else i_mask[None, None, :])
    vectors = all_of(None if m_mask is None else m_mask[:, None],
                     None if i_mask is None else i_mask[None, :])
    return m_slice, i_slice, cells, vectors


def _logits(logits_ref, m_slice, i_slice, cells):
    """The block's float32 logits (padded cells -1e30) and each matrix's shift."""
    logits = load(logits_ref.at[m_slice, i_slice, i_slice], cells).astype(jnp.float32)
    if cells is not None:
        logits = jnp.where(cells, logits, _FLOOR)
    # The matrix maximum as two one-axis reductions (the same value as matrix_shift's).
    top = jnp.max(jnp.max(logits, axis=2, keepdims=True), axis=1, keepdims=True)
    return logits, jnp.maximum(top, _FLOOR)


def _masked(u, cells):
    """``U`` with padded cells at -1e30 (``P = 0``: the softmax start's ``+ eps`` would make
    them eps)."""
    return u if cells is None else jnp.where(cells, u, _FLOOR)


def _steps(order, iters):
    """``(lead, pair, rounds)`` with block axes (matrix, row i, column j)."""
    lead, pair, rounds = schedule(order, iters)
    return tuple(3 + a for a in lead), tuple(3 + a for a in pair), rounds


def _forward_kernel(logits_ref, out_ref, *scales_ref, n, count, iters, eps, init, order,
                    block_count):
    m_slice, i_slice, cells, vectors = _place(count, n, block_count)
    logits, shift = _logits(logits_ref, m_slice, i_slice, cells)
    u = _masked(log_start(logits, shift, init, eps), cells)
    lead, pair, rounds = _steps(order, iters)

    def step(u, slot, axis):
        u, d = log_normalize(u, axis, eps)
        if scales_ref:
            plgpu.store(scales_ref[0].at[m_slice, jnp.int32(slot), i_slice], d, mask=vectors)
        return u

    for slot, axis in enumerate(lead):
        u = step(u, slot, axis)

    def round_(k, u):
        for j, axis in enumerate(pair):
            u = step(u, len(lead) + 2 * k + j, axis)
        return u

    u = jax.lax.fori_loop(jnp.int32(0), jnp.int32(rounds), round_, u)
    plgpu.store(out_ref.at[m_slice, i_slice, i_slice], jnp.exp(u), mask=cells)


def _backward_kernel(logits_ref, scales_ref, grad_ref, dlogits_ref, *, n, count, iters,
                     eps, init, order, block_count):
    m_slice, i_slice, cells, vectors = _place(count, n, block_count)
    logits, shift = _logits(logits_ref, m_slice, i_slice, cells)
    u0 = _masked(log_start(logits, shift, init, eps), cells)
    lead, pair, rounds = _steps(order, iters)
    # U at the end, rebuilt from U_0 and the stored D_s (no log of the float32 output,
    # which may have flushed to 0).
    u_end = u0
    for slot, axis in enumerate(lead):
        u_end = u_end - jnp.expand_dims(_scale(scales_ref, m_slice, slot, i_slice, vectors),
                                        axis)

    def replay(k, u):
        for j, axis in enumerate(pair):
            u = u - jnp.expand_dims(_scale(scales_ref, m_slice, len(lead) + 2 * k + j, i_slice,
                                           vectors), axis)
        return u

    u_end = jax.lax.fori_loop(jnp.int32(0), jnp.int32(rounds), replay, u_end)
    g = load(grad_ref.at[m_slice, i_slice, i_slice], cells).astype(jnp.float32)
    g = g * jnp.exp(u_end)

    def unstep(carry, slot, axis):
        u, g = carry
        g = g - jnp.exp(u) * jnp.sum(g, axis=axis, keepdims=True)
        return u + jnp.expand_dims(_scale(scales_ref, m_slice, slot, i_slice, vectors), axis), g

    def round_(k, carry):
        r = rounds - 1 - k
        for j, axis in reversed(list(enumerate(pair))):
            carry = unstep(carry, len(lead) + 2 * r + j, axis)
        return carry

    carry = jax.lax.fori_loop(jnp.int32(0), jnp.int32(rounds), round_, (u_end, g))
    for slot, axis in reversed(list(enumerate(lead))):
        carry = unstep(carry, slot, axis)
    dlogits = start_grad(logits, shift, tied_cells(logits, shift), u0, carry[1], init)
    plgpu.store(dlogits_ref.at[m_slice, i_slice, i_slice],
                dlogits.astype(dlogits_ref.dtype), mask=cells)


def _scale(scales_ref, m_slice, slot, i_slice, vectors):
    """The stored ``D`` of step ``slot`` (0 in padded cells)."""
    return load(scales_ref.at[m_slice, jnp.int32(slot), i_slice], vectors)


def _call(kernel, operands, out_shape, count, config, interpret, name):
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(pl.cdiv(count, config.block_count),),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1),
        interpret=interpret, name=name)(*operands)


@functools.partial(jax.jit, static_argnames=("iters", "eps", "init", "order", "with_scales",
                                             "config", "interpret"))
def sinkhorn(logits, *, iters: int, eps: float, init: str, order: str, with_scales: bool = False,
             config: SinkhornConfig | None = None, interpret: bool = False):
    """``M [count, n, n]`` float32 (and, ``with_scales``, each step's
    ``D = log(sum + eps)``, ``[count, steps, n]`` float32, which the backward needs);
    ``config``: ``None`` for :func:`default_config`."""
    count, n, _ = logits.shape
    config = config or default_config(count, n)
    kernel = functools.partial(_forward_kernel, n=n, count=count, iters=iters, eps=eps,
                               init=init, order=order, block_count=config.block_count)
    out_shape = [jax.ShapeDtypeStruct((count, n, n), jnp.float32)]
    if with_scales:
        out_shape.append(jax.ShapeDtypeStruct((count, num_steps(order, iters), n),
                                              jnp.float32))
    outs = _call(kernel, [logits], out_shape, count, config, interpret, "bjax_sinkhorn")
    return tuple(outs) if with_scales else outs[0]


@functools.partial(jax.jit, static_argnames=("iters", "eps", "init", "order", "config",
                                             "interpret"))
def sinkhorn_backward(logits, scales, grad, *, iters: int, eps: float, init: str,
                      order: str, config: SinkhornConfig | None = None, interpret: bool = False):
    """``dL [count, n, n]`` in logits' dtype from ``grad = dLoss/dM`` and the forward's
    ``scales`` (each step's ``D``); ``config`` as in :func:`sinkhorn`."""
    count, n, _ = logits.shape
    config = config or default_config(count, n)
    kernel = functools.partial(_backward_kernel, n=n, count=count, iters=iters, eps=eps,
                               init=init, order=order, block_count=config.block_count)
    return _call(kernel, [logits, scales, grad],
                 jax.ShapeDtypeStruct(logits.shape, logits.dtype), count, config, interpret,
                 "bjax_sinkhorn_backward")
