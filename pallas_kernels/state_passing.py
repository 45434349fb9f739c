"""Passing chunk states along a sequence: the serial half of a chunked linear recurrence.

A chunked scan splits the walk of its ``[p, n]`` state through the sequence in two. A
kernel parallel over the chunks computes each chunk's own contribution ``L_c`` (the
state it would end with, entering from zero); :func:`pass_states` then walks the
chunks in order with one cheap elementwise update a chunk,

    S_0 = initial,    S_{c+1} = decay_c S_c + L_c,

in parallel over blocks of the state's rows, heads and batch rows: far more programs
than a walk that carries the matmuls along (one per batch row, head and block of
``p``), which leaves most of a GPU idle on a long sequence of few heads. Walked in
reverse (``S_C`` given, ``S_c = decay_c S_{c+1} + L_c``), the same kernel passes a
backward's state gradients.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.blocks import columns, load, padded, pallas_call, rows_cols

PASS_WARPS = 4
SMS = 132   # an H200's streaming multiprocessors


def wants_state_passing(walks: int, chunks: int) -> bool:
    """Pass the chunk states along rather than walk them where the walks (one program per
    batch row, head and block of head_dim) number fewer than the GPU's multiprocessors
    and go through at least 32 chunks. On an H200 (BENCHMARKS.md): 128K tokens of 32
    heads of 128 (32 walks of 512 chunks), forward 2.14 ms against the walk's 3.10; 4 x
    4096 tokens of 32 heads (128 walks of 16 chunks) about even (1.07 against 1.11); 256
    walks and more (4 x 4096 tokens of 64 heads, 2 x 8192 of 128) 1.2-1.4x slower. The
    backward's state gradients at the first shape: 1.27 ms passed against 2.90 walked."""
    return walks < SMS and chunks >= 32


PASS_BLOCKS = (8, 16, 32)   # rows of p a pass program, as the tuner tries them


def passing_variants(config) -> tuple:
    """``config`` (an SSD kernel config with ``state_passing`` and ``block_pass``) walking
    its states, and passing them along in each of :data:`PASS_BLOCKS` rows a program: the
    tuner's candidates (``bjax.tune``)."""
    return (dataclasses.replace(config, state_passing=False),) + tuple(
        dataclasses.replace(config, state_passing=True, block_pass=rows) for rows in PASS_BLOCKS)


def chunk_decay(a_cs, seg, chunk_size: int):
    """``exp(a_cs)`` at every chunk's last step, float32 ``[batch, heads, chunks]``: the
    factor a state crossing the whole chunk decays by; 0 where the chunk starts a new
    segment (``seg``, int32 ``[batch, chunks * chunk_size]``, non-decreasing, or None),
    which drops the state carried into it.

    ``a_cs``: float32 ``[batch, heads, chunks * chunk_size]``, the cumulative sum of
    ``dt A`` inside each chunk.
    """
    batch, heads, length = a_cs.shape
    chunks = length // chunk_size
    a_end = a_cs.reshape(batch, heads, chunks, chunk_size)[..., -1]
    if seg is None:
        return jnp.exp(a_end)
    seg_end = seg.reshape(batch, chunks, chunk_size)[..., -1]
    seg_before = jnp.pad(seg_end[:, :-1], ((0, 0), (1, 0)))   # the initial state's: 0
    carries = (seg_end == seg_before)[:, None, :]
    return jnp.exp(jnp.where(carries, a_end, -jnp.inf))


def _pass_kernel(*refs, block, reverse, has_init, has_dot):
    local_ref, decay_ref, *rest = refs
    init_ref = rest.pop(0) if has_init else None
    dot_ref = rest.pop(0) if has_dot else None
    states_ref, last_ref, *dots = rest
    chunks, _, rows, width = local_ref.shape[1:]
    rb, head, row = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    p_slice, p_mask = columns(rows, rb * block, block)
    n_slice, n_mask = columns(width, 0, padded(width))
    tile_mask = rows_cols(p_mask, n_mask)
    if has_init:
        state = load(init_ref.at[row, head, p_slice, n_slice], tile_mask).astype(jnp.float32)
    else:
        state = jnp.zeros((block, padded(width)), jnp.float32)

    def body(i, state):
        c = chunks - 1 - i if reverse else i
        view = (row, c, head, p_slice, n_slice)
        local = load(local_ref.at[view], tile_mask)
        plgpu.store(states_ref.at[view], state.astype(states_ref.dtype), mask=tile_mask)
        decay = decay_ref[row, head, c]
        if has_dot:
            other = load(dot_ref.at[view], tile_mask).astype(jnp.float32)
            dots[0][row, head, c, rb] = decay * jnp.sum(state * other)
        return decay * state + local.astype(jnp.float32)

    state = jax.lax.fori_loop(jnp.int32(0), jnp.int32(chunks), body, state)
    plgpu.store(last_ref.at[row, head, p_slice, n_slice], state, mask=tile_mask)


@functools.partial(jax.jit, static_argnames=("block", "reverse", "states_dtype", "interpret"))
def pass_states(local, decay, initial=None, dot_with=None, *, block: int, reverse: bool = False,
                states_dtype=jnp.float32, interpret: bool = False):
    """Walk the chunks: the state entering each one and the last state.

    Args:
      local: ``[batch, chunks, heads, p, n]`` (float32): each chunk's own contribution
        ``L_c``.
      decay: float32 ``[batch, heads, chunks]`` (:func:`chunk_decay`).
      initial: optional float32 ``[batch, heads, p, n]``: the state before the first
        chunk walked (the last with ``reverse``); zeros if None.
      dot_with: optional ``[batch, chunks, heads, p, n]``: also return
        ``decay_c <S_c, dot_with_c>`` (a backward's carry terms).
      block: rows of ``p`` a program (a power of 2).
      reverse: walk from the last chunk to the first (``S_c = decay_c S_{c+1} + L_c``).
      states_dtype: dtype of the stored states, a buffer apart from ``local`` (written
        in place of it, the float32 pass ran several times slower on an H200).

    Returns:
      ``(states [batch, chunks, heads, p, n]`` in ``states_dtype``, the state entering
      chunk ``c`` (leaving it with ``reverse``), ``last [batch, heads, p, n]``
      float32)``, and with ``dot_with`` the carry terms, float32
      ``[batch, heads, chunks, cdiv(p, block)]`` (sum over the last axis).
    """
    batch, chunks, heads, rows, width = local.shape
    row_blocks = pl.cdiv(rows, block)
    kernel = functools.partial(_pass_kernel, block=block, reverse=reverse,
                               has_init=initial is not None, has_dot=dot_with is not None)
    out_shape = [jax.ShapeDtypeStruct(local.shape, states_dtype),
                 jax.ShapeDtypeStruct((batch, heads, rows, width), jnp.float32)]
    if dot_with is not None:
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, chunks, row_blocks), jnp.float32))
    return pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=(row_blocks, heads, batch),
        compiler_params=plgpu.CompilerParams(num_warps=PASS_WARPS, num_stages=1),
        interpret=interpret,
        name="bjax_ssd_pass_states",
    )(*[v for v in (local, decay, initial, dot_with) if v is not None])
