"""Sinkhorn-Knopp kernels on batches of small ``n x n`` matrices: forward and exact
backward (the formula and the steps: ``pallas_kernels.formulas.sinkhorn``).

Layout: a program owns ``block_count`` matrices as a ``[block_count, N, N]``
block, ``N`` = n rounded up to a power of two; padded cells hold ``-1e30``
(``P = 0``, finite) and are never stored.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.blocks import all_of, columns, load, pallas_call
from pallas_kernels.formulas.sinkhorn import (FLOOR, log_normalize, log_start, num_steps, schedule,
                                              start_grad, tied_cells)

_BLOCK_CELLS = 2048


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



def search_space(count: int, n: int) -> tuple[SinkhornConfig, ...]:
    """The configs the tuner tries (``bjax.tune``): power-of-2 matrices per program
    holding 256 to 8192 cells (fewer where ``count`` matrices hold fewer; one matrix
    where it alone holds more), 1 to 8 warps."""
    cells, most = pl.next_power_of_2(n) ** 2, pl.next_power_of_2(max(count, 1))
    smallest, largest = min(256, most * cells), max(8192, cells)
    return tuple(SinkhornConfig(block, warps)
                 for block in (2**i for i in range(most.bit_length()))
                 if smallest <= block * cells <= largest
                 for warps in (1, 2, 4, 8))


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
        logits = jnp.where(cells, logits, FLOOR)
    # The matrix maximum as two one-axis reductions (the same value as matrix_shift's).
    top = jnp.max(jnp.max(logits, axis=2, keepdims=True), axis=1, keepdims=True)
    return logits, jnp.maximum(top, FLOOR)


def _masked(u, cells):
    """``U`` with padded cells at -1e30 (``P = 0``: the softmax start's ``+ eps`` would make
    them eps)."""
    return u if cells is None else jnp.where(cells, u, FLOOR)


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
    return pallas_call(
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
