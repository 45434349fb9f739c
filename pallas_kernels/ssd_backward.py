"""Backward kernels of the Mamba-2 SSD chunk scan (``pallas_kernels.ssd`` has the forward).

Notation as in ``pallas_kernels.ssd``; ``dy`` is the cotangent of ``y`` before the
gate, ``S_c`` the state entering chunk ``c`` (recomputed by the forward's
``chunk_states``), ``G_c`` the gradient with respect to ``S_{c+1}``, the state at
the end of chunk ``c`` (``G_{last}`` is the cotangent of the final state). With
``e_t = exp(a_cs_t)`` (0 where step ``t`` left the segment the chunk entered in),
``w_s = dt_s exp(a_cs_end - a_cs_s)`` (0 for steps outside the chunk's last
segment) and ``L_ts = exp(a_cs_t - a_cs_s)`` for ``s <= t`` in one segment:

    grad S_c     = decay_c G_c + sum_t e_t dy_t C_t^T (+ any cotangent of S_c itself; walked backwards)
    dx_s         = dt_s y'_s + D dy_s,   y'_s = w_s / dt_s G_c B_s + sum_{t>=s} L_ts (C_t . B_s) dy_t
    dB_s         = w_s G_c^T x_s + dt_s sum_{t>=s} L_ts (dy_t . x_s) C_t   (summed over a group's heads)
    dC_t         = e_t S_c^T dy_t + sum_{s<=t} L_ts dt_s (dy_t . x_s) B_s  (likewise)
    d dt_s       = x_s . y'_s  (+ A times the gradient of a_s, below)

and the gradient of ``a_cs`` (the chunk-local cumulative sum of ``a = dt A``):
row sums minus column sums of ``P_ts = (dy_t . x_s)(C_t . B_s) L_ts dt_s``, plus
``dy_t . e_t C_t S_c^T``, minus ``q_s = w_s x_s . G_c B_s``, plus at the chunk's last
step ``sum_s q_s + decay_c <G_c, S_c>``. A reverse cumulative sum inside each chunk
turns it into the gradient of ``a``.

Three kernels, each writing every cell of its outputs once (no atomics: the
results are bit-identical from run to run):

* :func:`state_grads`: one program per (batch row, head, block of ``p``, block of ``n``)
  walks the chunks backwards and stores every ``G_c``, the initial state's gradient and
  ``decay_c <G_c, S_c>`` (per block of ``p`` and ``n``); with ``state_passing``, two kernels
  instead: :func:`chunk_output_grads` (each chunk's own term, parallel over the chunks)
  and ``state_passing.pass_states`` walking back through them.
* :func:`target_grads`: one program per (batch row, chunk, block of output steps,
  block of heads of a group): ``dC`` summed over its heads, and the row terms.
* :func:`source_grads`: one program per (batch row, chunk, block of source steps,
  block of heads): ``dx``, ``dB`` summed over its heads, ``x . y'``, the column
  terms and ``q``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.blocks import block_loop, columns, dot, load, padded, pallas_call, rows_cols
from pallas_kernels.ssd import (SsdConfig, segment_before, snapshot_dtype, state_piece,
                                state_program, state_tiles)
from pallas_kernels.state_passing import chunk_decay, pass_states, wants_state_passing


@dataclasses.dataclass(frozen=True)
class SsdBackwardConfig:
    """Launch configuration of the backward kernels.

    Attributes:
      block_q: steps per piece of :func:`state_grads`' walk (divides the chunk size).
      block: steps per block of :func:`target_grads` and :func:`source_grads`.
      block_p: head_dim columns per program (the chunk kernels return partial sums
        over head_dim, one per block).
      block_h: heads per program of the two chunk kernels (divides heads per group);
        their ``dB`` / ``dC`` come back summed over it, one slice per block of heads.
      source_block_h: heads per :func:`source_grads` program.
      num_warps, num_stages: of every kernel.
      constant_trip_count: the two chunk kernels' loops run over every block of the
        chunk, those on the far side of the diagonal masked (``blocks.block_loop``).
      state_passing: :func:`state_grads` computes each chunk's own term in parallel over
        the chunks (:func:`chunk_output_grads`) and passes the gradients back along the
        chunks (``pallas_kernels.state_passing``) instead of walking them with its
        matmuls.
      block_pass: rows of ``p`` a program of that pass.
      block_n: state columns per :func:`state_grads` (or :func:`chunk_output_grads`)
        program, capped at the padded state, as the forward's ``SsdConfig.block_n``:
        the gradient's columns evolve apart (``G[:, j]`` reads only ``C[:, j]``).
      shared_scores: the heads of a chunk-kernel program go through the chunk's other
        blocks together: each block of scores ``C_t B_s^T`` is computed once for them, and
        their weighted ``dy_t x_s^T`` terms are summed before one matmul with the group's
        ``B_s`` (``C_t``): two state-sized matmuls a pair of blocks in place of
        ``2 block_h``, with every head's carries live at once. Otherwise each head goes
        through them alone.
    """
    block_q: int
    block: int
    block_p: int
    block_h: int
    source_block_h: int = 1
    num_warps: int = 4
    num_stages: int = 2
    constant_trip_count: bool = False
    state_passing: bool = False
    block_pass: int = 16
    block_n: int = 256
    shared_scores: bool = False


def default_config(chunk_size: int, head_dim: int, state_dim: int,
                   heads_per_group: int, dtype, batch_heads: int | None = None,
                   chunks: int = 1) -> SsdBackwardConfig:
    """From an H200 sweep at b=4, l=4096, h=64, p=64, n=128, chunk 256: the state walk
    in 128-step pieces (0.19 ms; 0.21 in 64), 64-step blocks with two heads per
    target program (0.57 ms against 0.62 for one head and 0.82 for four), one head
    per source program (0.74 ms against 1.10 for two) and 4 warps. (Two heads per
    source program without pipelining ran at 0.85 ms but gave a wrong dB on that
    GPU at head_dim 80, state_dim 130 in float32, which every other configuration
    got right: not used.) Float32 inputs (``dtype``: x's) loop over a constant count of
    blocks and walk the state in :func:`pallas_kernels.ssd.state_piece` steps.

    16-bit inputs with a state padded past 128 take one head a target program on 8
    warps: the H200 tuner's best at b16 l512 h64 p64 n256 (groups 1 and 8, chunk 256
    and 128), 1.25-1.33x the two-head config's forward+backward (BENCHMARKS.md).

    With ``batch_heads`` (batch rows x heads) and ``chunks`` given, the state gradients
    are passed back along the chunks where their walks would be too few and too long, as
    the forward's states (``state_passing.wants_state_passing``): on an H200 at 128K
    tokens of 32 heads of 128, state 64, ``state_grads`` took 1.27 ms passed (16 rows a
    program) against 2.90 walked (BENCHMARKS.md).

    The state gradients keep whole states (``block_n``; unlike the forward's states): in
    blocks of 64 columns each block reads ``dy`` again, and ``state_grads`` took 0.98 ms
    against 0.45 at b=4, l=4096, h=32, p=128, n=256 on an H200 (0.52 against 0.26 at
    16 x 512 tokens of 64 heads of 64)."""
    wide_state = padded(state_dim) > 128 and jnp.dtype(dtype) != jnp.float32
    block_h = 2 if heads_per_group % 2 == 0 and not wide_state else 1
    block_p = min(padded(head_dim), 64)
    passing = batch_heads is not None and wants_state_passing(
        batch_heads * pl.cdiv(head_dim, block_p), chunks)
    return SsdBackwardConfig(block_q=state_piece(chunk_size, state_dim, dtype),
                             block=min(chunk_size, 64), block_p=block_p,
                             block_h=block_h, num_warps=8 if wide_state else 4,
                             constant_trip_count=jnp.dtype(dtype) == jnp.float32,
                             state_passing=passing, block_n=padded(state_dim))


def search_space(chunk_size: int, head_dim: int, state_dim: int, heads_per_group: int,
                 dtype, batch_heads: int | None = None,
                 chunks: int = 1) -> tuple[SsdBackwardConfig, ...]:
    """The backward configurations the tuner tries (``bjax.tune``) around the heuristic:
    blocks of 32 or 64 steps, head_dim blocks of 32 or 64 columns, 4 or 8 warps, and heads
    a program (dividing the group): 1 or 2 a target program and one a source program, each
    head through the chunk alone (see :func:`default_config`), or 2 or 4 a program of both
    kernels sharing the scores (``shared_scores``); the state gradients walked or passed
    as the heuristic's (``batch_heads``, ``chunks`` as :func:`default_config`'s;
    ``state_passing.passing_variants`` varies it)."""
    base = default_config(chunk_size, head_dim, state_dim, heads_per_group, dtype,
                          batch_heads, chunks)
    heads = ((1, 1, False), (2, 1, False), (2, 2, True), (4, 4, True))
    space = [dataclasses.replace(base, block=block, block_p=min(padded(head_dim), block_p),
                                 block_h=block_h, source_block_h=source_block_h,
                                 shared_scores=shared, num_warps=warps)
             for block in (32, 64) if chunk_size % block == 0
             for block_p in (32, 64)
             for block_h, source_block_h, shared in heads if heads_per_group % block_h == 0
             for warps in (4, 8)]
    return tuple(dict.fromkeys(space))


@dataclasses.dataclass(frozen=True)
class ChunkScanConfig:
    """The forward's and the backward's configurations of the chunked scan; ``None``: that
    one's heuristic (:func:`pallas_kernels.ssd.default_config`, :func:`default_config`)."""
    forward: SsdConfig | None = None
    backward: SsdBackwardConfig | None = None


def _output_grad_sum(refs, place, width, c, dims, config, dot_dtype):
    """``sum_t e_t dy_t^T C_t`` over chunk ``c`` (``e_t = exp(a_cs_t)``, 0 for steps that
    left the segment the chunk entered in), plus the cotangent of the state entering
    ``c`` where one is given: ``[block_p, width]`` float32 (the program's state block)."""
    dy_ref, c_ref, acs_ref, seg_ref, dstates_ref = refs
    row, head, group, (p_slice, p_mask), (n_slice, n_mask) = place
    seq_len, chunk = dims[:2]
    bq = config.block_q
    seg_before = None if seg_ref is None else segment_before(seg_ref, row, c * chunk)

    def piece_body(j, local):
        start = c * chunk + j * bq
        steps = pl.ds(start, bq)
        in_seq = (start + jnp.arange(bq, dtype=jnp.int32)) < seq_len if seq_len % chunk \
            else None
        a = acs_ref[row, head, steps]
        if seg_ref is not None:
            a = jnp.where(seg_ref[row, steps] == seg_before, a, -jnp.inf)
        dy = load(dy_ref.at[row, steps, head, p_slice], rows_cols(in_seq, p_mask))
        c_t = load(c_ref.at[row, steps, group, n_slice], rows_cols(in_seq, n_mask))
        dy = (dy.astype(jnp.float32) * jnp.exp(a)[:, None]).astype(dot_dtype)
        return local + dot(dy, c_t.astype(dot_dtype), contract=(0, 0))

    local = jax.lax.fori_loop(jnp.int32(0), jnp.int32(chunk // bq), piece_body,
                              jnp.zeros((config.block_p, width), jnp.float32))
    if dstates_ref is not None:   # a cotangent of S_c itself (the states returned for varlen)
        local = local + load(dstates_ref.at[row, c, head, p_slice, n_slice],
                             rows_cols(p_mask, n_mask))
    return local


def _state_grad_kernel(*refs, dims, config, has_seg, has_dfinal, has_dstates, dot_dtype):
    dy_ref, c_ref, acs_ref, states_ref, *rest = refs
    seg_ref = rest.pop(0) if has_seg else None
    dfinal_ref = rest.pop(0) if has_dfinal else None
    dstates_ref = rest.pop(0) if has_dstates else None
    gends_ref, dinit_ref, carry_ref = rest
    chunk = dims[1]
    head, row = pl.program_id(1), pl.program_id(2)
    place, width, tile = state_program(config, dims, head, row)
    (p_slice, p_mask), (n_slice, n_mask) = place[3:]
    tile_mask = rows_cols(p_mask, n_mask)
    chunks = gends_ref.shape[1]
    if has_dfinal:
        grad = load(dfinal_ref.at[row, head, p_slice, n_slice], tile_mask).astype(jnp.float32)
    else:
        grad = jnp.zeros((config.block_p, width), jnp.float32)

    def chunk_body(i, grad):
        c = chunks - 1 - i
        plgpu.store(gends_ref.at[row, c, head, p_slice, n_slice], grad, mask=tile_mask)
        a_end = acs_ref[row, head, c * chunk + chunk - 1]
        decay = jnp.exp(a_end)
        if has_seg:
            seg_before = segment_before(seg_ref, row, c * chunk)
            decay = jnp.exp(jnp.where(seg_ref[row, c * chunk + chunk - 1] == seg_before,
                                      a_end, -jnp.inf))
        state = load(states_ref.at[row, c, head, p_slice, n_slice], tile_mask)
        carry_ref[row, head, c, tile] = decay * jnp.sum(grad * state.astype(jnp.float32))
        return decay * grad + _output_grad_sum(
            (dy_ref, c_ref, acs_ref, seg_ref, dstates_ref), place, width, c, dims, config,
            dot_dtype)

    grad = jax.lax.fori_loop(jnp.int32(0), jnp.int32(chunks), chunk_body, grad)
    plgpu.store(dinit_ref.at[row, head, p_slice, n_slice], grad, mask=tile_mask)


def _local_grad_kernel(*refs, dims, config, has_seg, has_dstates, dot_dtype):
    dy_ref, c_ref, acs_ref, *rest = refs
    seg_ref = rest.pop(0) if has_seg else None
    dstates_ref = rest.pop(0) if has_dstates else None
    (local_ref,) = rest
    head, c, row = (pl.program_id(i) for i in range(1, 4))
    place, width, _ = state_program(config, dims, head, row)
    (p_slice, p_mask), (n_slice, n_mask) = place[3:]
    local = _output_grad_sum((dy_ref, c_ref, acs_ref, seg_ref, dstates_ref), place, width, c,
                             dims, config, dot_dtype)
    plgpu.store(local_ref.at[row, c, head, p_slice, n_slice], local,
                mask=rows_cols(p_mask, n_mask))


class _Place(NamedTuple):
    """Where a :func:`target_grads` / :func:`source_grads` program works."""
    row: Any          # batch row
    chunk: Any        # chunk index
    block: Any        # block of steps inside the chunk
    p_block: Any      # block of head_dim
    first_head: Any   # the program's heads: first_head .. first_head + block_h - 1
    group: Any
    p: Any            # (pl.ds, mask) of its block of head_dim
    n: Any            # (pl.ds, mask) of the whole (padded) state_dim
    out_slice: Any    # its slice of the partial dB / dC sums


def _place(dims, block_p, block_h, slices) -> _Place:
    """The program's place in the grid ``(steps x p blocks, head blocks, chunks, batch)``;
    ``slices``: the partial-sum output's extent along its slice axis."""
    _, _, heads_per_group, head_dim, state_dim = dims
    tile, head_block, c, row = (pl.program_id(i) for i in range(4))
    p_blocks = pl.cdiv(head_dim, block_p)
    block, pb = tile // p_blocks, tile % p_blocks
    first_head = head_block * block_h
    p_columns = columns(head_dim, pb * block_p, block_p)
    n_columns = columns(state_dim, 0, padded(state_dim))
    return _Place(row, c, block, pb, first_head, first_head // heads_per_group, p_columns,
                  n_columns, pb * (slices // p_blocks) + head_block)


def _head_sets(first_head, block_h, shared):
    """The program's heads in the sets that go through the chunk's other blocks together:
    all ``block_h`` with ``shared_scores``, else one at a time (each yielded when the
    previous set is done)."""
    if shared:
        yield [first_head + k for k in range(block_h)]
    else:
        for k in range(block_h):
            yield [first_head + k]


def _block_rows(c, chunk, index, block, seq_len):
    start = c * chunk + index * block
    local = index * block + jnp.arange(block, dtype=jnp.int32)
    in_seq = (start + jnp.arange(block, dtype=jnp.int32)) < seq_len if seq_len % chunk else None
    return pl.ds(start, block), local, in_seq


def _target_kernel(*refs, dims, config, has_seg, dot_dtype):
    x_ref, dy_ref, b_ref, c_ref, dt_ref, acs_ref, states_ref, *rest = refs
    seg_ref = rest.pop(0) if has_seg else None
    dc_ref, r_ref = rest
    seq_len, chunk, _, _, state_dim = dims
    bk, bh = config.block, config.block_h
    place = _place(dims, config.block_p, bh, dc_ref.shape[2])
    row, c, tb, pb, group = place.row, place.chunk, place.block, place.p_block, place.group
    (p_slice, p_mask), (n_slice, n_mask) = place.p, place.n
    t_steps, t_local, t_in = _block_rows(c, chunk, tb, bk, seq_len)
    c_t = load(c_ref.at[row, t_steps, group, n_slice], rows_cols(t_in, n_mask))
    c_dot = c_t.astype(dot_dtype)
    state_dtype = snapshot_dtype(dot_dtype)
    enters, seg_t = None, None
    if has_seg:
        seg_t = seg_ref[row, t_steps]
        enters = seg_t == segment_before(seg_ref, row, c * chunk)

    def heads_body(heads):
        # dC's terms of ``heads`` summed; their row terms stored.
        a_t, dy_t, inter, dc = [], [], [], None
        for head in heads:
            a = acs_ref[row, head, t_steps]
            e_t = jnp.exp(a if enters is None else jnp.where(enters, a, -jnp.inf))
            dy = load(dy_ref.at[row, t_steps, head, p_slice], rows_cols(t_in, p_mask))
            state = load(states_ref.at[row, c, head, p_slice, n_slice],
                         rows_cols(p_mask, n_mask))
            term = e_t[:, None] * dot(dy.astype(state_dtype), state.astype(state_dtype))
            inter.append(jnp.sum(c_t.astype(jnp.float32) * term, axis=1))
            a_t.append(a)
            dy_t.append(dy)
            dc = term if dc is None else dc + term

        def source_body(j, carry):
            # The heads share the block's mask and scores C_t . B_s (computed with the
            # first), and one matmul with B_s for the sum of their weighted dy_t . x_s.
            dc, rows = carry
            s_steps, s_local, s_in = _block_rows(c, chunk, j, bk, seq_len)
            b_s = load(b_ref.at[row, s_steps, group, n_slice], rows_cols(s_in, n_mask))
            new_rows, gx_sum = [], None
            for k, (head, a, dy, head_rows) in enumerate(zip(heads, a_t, dy_t, rows)):
                x_s = load(x_ref.at[row, s_steps, head, p_slice], rows_cols(s_in, p_mask))
                if k == 0:
                    pairs = t_local[:, None] >= s_local[None, :]
                    if has_seg:
                        pairs = pairs & (seg_t[:, None] == seg_ref[row, s_steps][None, :])
                a_s = acs_ref[row, head, s_steps]
                weights = jnp.exp(jnp.where(pairs, a[:, None] - a_s[None, :], -jnp.inf)) \
                    * dt_ref[row, head, s_steps][None, :]
                if k == 0:
                    scores = dot(c_dot, b_s.astype(dot_dtype), contract=(1, 1))
                gx = dot(dy.astype(dot_dtype), x_s.astype(dot_dtype), contract=(1, 1)) * weights
                new_rows.append(head_rows + jnp.sum(gx * scores, axis=1))
                gx_sum = gx if gx_sum is None else gx_sum + gx
            return dc + dot(gx_sum.astype(dot_dtype), b_s.astype(dot_dtype)), tuple(new_rows)

        dc, rows = block_loop(jnp.int32(0), tb + 1, chunk // bk, source_body,
                              (dc, tuple(jnp.zeros((bk,), jnp.float32) for _ in heads)),
                              constant_trip_count=config.constant_trip_count)
        for head, head_rows, head_inter in zip(heads, rows, inter):
            r_ref[row, pb, head, t_steps] = head_rows + head_inter
        return dc

    dc = jnp.zeros((bk, padded(state_dim)), jnp.float32)
    for heads in _head_sets(place.first_head, bh, config.shared_scores):
        dc = dc + heads_body(heads)
    plgpu.store(dc_ref.at[row, t_steps, place.out_slice, n_slice], dc,
                mask=rows_cols(t_in, n_mask))


def _source_kernel(*refs, dims, config, has_seg, has_d, dot_dtype):
    x_ref, dy_ref, b_ref, c_ref, dt_ref, acs_ref, gends_ref, *rest = refs
    seg_ref = rest.pop(0) if has_seg else None
    d_ref = rest.pop(0) if has_d else None
    dx_ref, db_ref, colq_ref, q_ref, xy_ref = rest
    seq_len, chunk, _, _, state_dim = dims
    bk, bh = config.block, config.source_block_h
    place = _place(dims, config.block_p, bh, db_ref.shape[2])
    row, c, sb, pb, group = place.row, place.chunk, place.block, place.p_block, place.group
    (p_slice, p_mask), (n_slice, n_mask) = place.p, place.n
    s_steps, s_local, s_in = _block_rows(c, chunk, sb, bk, seq_len)
    b_s = load(b_ref.at[row, s_steps, group, n_slice], rows_cols(s_in, n_mask))
    b_dot = b_s.astype(dot_dtype)
    state_dtype = snapshot_dtype(dot_dtype)
    end = c * chunk + chunk - 1
    in_last_segment, seg_s = None, None
    if has_seg:
        seg_s = seg_ref[row, s_steps]
        in_last_segment = seg_s == seg_ref[row, end]

    def heads_body(heads):
        # dB's terms of ``heads`` summed; their dx and column terms stored.
        x_s, a_s, dt_s, to_end, gb, y_start, db = [], [], [], [], [], [], None
        for head in heads:
            x = load(x_ref.at[row, s_steps, head, p_slice], rows_cols(s_in, p_mask))
            a = acs_ref[row, head, s_steps]
            dt = dt_ref[row, head, s_steps]
            head_to_end = acs_ref[row, head, end] - a
            head_to_end = jnp.exp(head_to_end if in_last_segment is None
                                  else jnp.where(in_last_segment, head_to_end, -jnp.inf))
            grad = load(gends_ref.at[row, c, head, p_slice, n_slice], rows_cols(p_mask, n_mask))
            grad = grad.astype(state_dtype)
            head_gb = dot(b_s.astype(state_dtype), grad, contract=(1, 1))     # [bk, p]: G B_s
            y_start.append(head_to_end[:, None] * head_gb)
            term = (dt * head_to_end)[:, None] * dot(x.astype(state_dtype), grad)  # [bk, n]
            db = term if db is None else db + term
            x_s.append(x)
            a_s.append(a)
            dt_s.append(dt)
            to_end.append(head_to_end)
            gb.append(head_gb)

        def target_body(i, carry):
            # The heads share the block's mask and scores B_s . C_t (computed with the
            # first), and one matmul with C_t for the sum of their weighted x_s . dy_t.
            y_prime, db, cols = carry
            t_steps, t_local, t_in = _block_rows(c, chunk, i, bk, seq_len)
            c_t = load(c_ref.at[row, t_steps, group, n_slice], rows_cols(t_in, n_mask))
            new_y, new_cols, gx_sum = [], [], None
            for k, (head, x, a, dt, head_y, head_cols) in enumerate(
                    zip(heads, x_s, a_s, dt_s, y_prime, cols)):
                dy_t = load(dy_ref.at[row, t_steps, head, p_slice], rows_cols(t_in, p_mask))
                if k == 0:
                    pairs = t_local[None, :] >= s_local[:, None]               # [s, t]
                    if has_seg:
                        pairs = pairs & (seg_s[:, None] == seg_ref[row, t_steps][None, :])
                decay = jnp.exp(jnp.where(pairs, acs_ref[row, head, t_steps][None, :]
                                          - a[:, None], -jnp.inf))
                if k == 0:
                    scores = dot(b_dot, c_t.astype(dot_dtype), contract=(1, 1))
                gx = dot(x.astype(dot_dtype), dy_t.astype(dot_dtype), contract=(1, 1)) * decay
                new_y.append(head_y + dot((scores * decay).astype(dot_dtype),
                                          dy_t.astype(dot_dtype)))
                if len(heads) == 1:   # one head: dt scales the product's rows
                    db = db + dt[:, None] * dot(gx.astype(dot_dtype), c_t.astype(dot_dtype))
                else:
                    weighted = dt[:, None] * gx
                    gx_sum = weighted if gx_sum is None else gx_sum + weighted
                new_cols.append(head_cols + jnp.sum(gx * scores, axis=1) * dt)
            if gx_sum is not None:
                db = db + dot(gx_sum.astype(dot_dtype), c_t.astype(dot_dtype))
            return tuple(new_y), db, tuple(new_cols)

        y_prime, db, cols = block_loop(sb, jnp.int32(chunk // bk), chunk // bk, target_body,
                                       (tuple(y_start), db,
                                        tuple(jnp.zeros((bk,), jnp.float32) for _ in heads)),
                                       constant_trip_count=config.constant_trip_count)
        for head, x, dt, head_to_end, head_gb, head_y, head_cols in zip(
                heads, x_s, dt_s, to_end, gb, y_prime, cols):
            xf = x.astype(jnp.float32)
            q = dt * head_to_end * jnp.sum(xf * head_gb, axis=1)
            dx = dt[:, None] * head_y
            if has_d:
                dy_s = load(dy_ref.at[row, s_steps, head, p_slice], rows_cols(s_in, p_mask))
                dx = dx + load(d_ref.at[head, p_slice], p_mask)[None, :] \
                    * dy_s.astype(jnp.float32)
            plgpu.store(dx_ref.at[row, s_steps, head, p_slice], dx.astype(dx_ref.dtype),
                        mask=rows_cols(s_in, p_mask))
            colq_ref[row, pb, head, s_steps] = head_cols + q
            q_ref[row, pb, head, s_steps] = q
            xy_ref[row, pb, head, s_steps] = jnp.sum(xf * head_y, axis=1)
        return db

    db = jnp.zeros((bk, padded(state_dim)), jnp.float32)
    for heads in _head_sets(place.first_head, bh, config.shared_scores):
        db = db + heads_body(heads)
    plgpu.store(db_ref.at[row, s_steps, place.out_slice, n_slice], db,
                mask=rows_cols(s_in, n_mask))


_STATIC = ("chunk_size", "config", "interpret")


def _dims(x, b, chunk_size):
    _, seq_len, heads, head_dim = x.shape
    groups, state_dim = b.shape[2:]
    return (seq_len, chunk_size, heads // groups, head_dim, state_dim)


def _params(config, interpret):
    return dict(compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                                     num_stages=config.num_stages),
                interpret=interpret)


@functools.partial(jax.jit, static_argnames=_STATIC)
def state_grads(dy, c, a_cs, states, seg=None, dfinal=None, dstates=None, *, chunk_size: int,
                config: SsdBackwardConfig, interpret: bool = False):
    """``(G [batch, chunks, heads, head_dim, state_dim]`` float32 (gradient of the state
    at each chunk's end), ``d initial_states`` float32, ``decay_c <G_c, S_c>`` float32
    ``[batch, heads, chunks, tiles]``, one partial sum per block of ``p`` and of the state
    walked (sum over the last axis)).

    One program per batch row, head, block of ``p`` and block of ``n``
    (``config.block_n``) walks the chunks backwards; with ``config.state_passing``,
    :func:`chunk_output_grads` and a reverse pass instead.

    ``dy``: ``[batch, seqlen, heads, head_dim]`` (the cotangent before the gate);
    ``states``: the forward's states entering each chunk; ``dfinal``: the final
    state's cotangent or None; ``dstates``: float32 cotangents of the states entering
    each chunk (shaped like ``states``) or None.
    """
    if config.state_passing:
        local = chunk_output_grads(dy, c, a_cs, seg, dstates, chunk_size=chunk_size,
                                   config=config, interpret=interpret)
        return pass_states(local, chunk_decay(a_cs, seg, chunk_size), dfinal, states,
                           block=config.block_pass, reverse=True, interpret=interpret)
    batch, _, heads, head_dim = dy.shape
    chunks = a_cs.shape[-1] // chunk_size
    tiles = state_tiles(config, head_dim, c.shape[-1])
    kernel = functools.partial(_state_grad_kernel, dims=_dims(dy, c, chunk_size), config=config,
                               has_seg=seg is not None, has_dfinal=dfinal is not None,
                               has_dstates=dstates is not None, dot_dtype=dy.dtype)
    state = (batch, heads, head_dim, c.shape[-1])
    return pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((batch, chunks, *state[1:]), jnp.float32),
                   jax.ShapeDtypeStruct(state, jnp.float32),
                   jax.ShapeDtypeStruct((batch, heads, chunks, tiles), jnp.float32)),
        grid=(tiles, heads, batch),
        name="bjax_ssd_state_grads",
        **_params(config, interpret),
    )(*[v for v in (dy, c, a_cs, states, seg, dfinal, dstates) if v is not None])


@functools.partial(jax.jit, static_argnames=_STATIC)
def chunk_output_grads(dy, c, a_cs, seg=None, dstates=None, *, chunk_size: int,
                       config: SsdBackwardConfig, interpret: bool = False):
    """Each chunk's own term of the gradient of the state entering it, float32
    ``[batch, chunks, heads, head_dim, state_dim]``: ``sum_t e_t dy_t^T C_t`` over its
    steps (plus ``dstates``' chunk). One program per batch row, chunk, head, block of
    ``p`` and block of ``n``; arguments as :func:`state_grads`'."""
    batch, _, heads, head_dim = dy.shape
    chunks = a_cs.shape[-1] // chunk_size
    kernel = functools.partial(_local_grad_kernel, dims=_dims(dy, c, chunk_size), config=config,
                               has_seg=seg is not None, has_dstates=dstates is not None,
                               dot_dtype=dy.dtype)
    return pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((batch, chunks, heads, head_dim, c.shape[-1]),
                                       jnp.float32),
        grid=(state_tiles(config, head_dim, c.shape[-1]), heads, chunks, batch),
        name="bjax_ssd_chunk_output_grads",
        **_params(config, interpret),
    )(*[v for v in (dy, c, a_cs, seg, dstates) if v is not None])


@functools.partial(jax.jit, static_argnames=_STATIC)
def target_grads(x, dy, b, c, dt, a_cs, states, seg=None, *, chunk_size: int,
                 config: SsdBackwardConfig, interpret: bool = False):
    """``(dC`` float32 ``[batch, seqlen, p_blocks * heads / block_h, state_dim]`` (one
    slice per block of ``p`` and block of heads: sum the slices of a group), ``row
    terms`` float32 ``[batch, p_blocks, heads, T])`` (sum over the p blocks)."""
    batch, seq_len, heads, head_dim = x.shape
    state_dim = b.shape[-1]
    length = a_cs.shape[-1]
    p_blocks = pl.cdiv(head_dim, config.block_p)
    kernel = functools.partial(_target_kernel, dims=_dims(x, b, chunk_size), config=config,
                               has_seg=seg is not None, dot_dtype=x.dtype)
    return pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(
            (batch, seq_len, p_blocks * heads // config.block_h, state_dim), jnp.float32),
                   jax.ShapeDtypeStruct((batch, p_blocks, heads, length), jnp.float32)),
        grid=(chunk_size // config.block * p_blocks, heads // config.block_h,
              length // chunk_size, batch),
        name="bjax_ssd_target_grads",
        **_params(config, interpret),
    )(*[v for v in (x, dy, b, c, dt, a_cs, states, seg) if v is not None])


@functools.partial(jax.jit, static_argnames=_STATIC)
def source_grads(x, dy, b, c, dt, a_cs, gends, seg=None, d=None, *, chunk_size: int,
                 config: SsdBackwardConfig, interpret: bool = False):
    """``(dx`` in x's dtype, ``dB`` slices as :func:`target_grads`' ``dC``,
    ``column terms + q``, ``q``, ``x . y'`` (each float32 ``[batch, p_blocks, heads, T]``,
    to sum over the p blocks)).

    ``gends``: :func:`state_grads`' first output; ``d``: float32 ``[heads, head_dim]``.
    """
    batch, seq_len, heads, head_dim = x.shape
    state_dim = b.shape[-1]
    length = a_cs.shape[-1]
    p_blocks = pl.cdiv(head_dim, config.block_p)
    kernel = functools.partial(_source_kernel, dims=_dims(x, b, chunk_size), config=config,
                               has_seg=seg is not None, has_d=d is not None, dot_dtype=x.dtype)
    per_step = jax.ShapeDtypeStruct((batch, p_blocks, heads, length), jnp.float32)
    return pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype),
                   jax.ShapeDtypeStruct(
                       (batch, seq_len, p_blocks * heads // config.source_block_h, state_dim),
                       jnp.float32),
                   per_step, per_step, per_step),
        grid=(chunk_size // config.block * p_blocks, heads // config.source_block_h,
              length // chunk_size, batch),
        name="bjax_ssd_source_grads",
        **_params(config, interpret),
    )(*[v for v in (x, dy, b, c, dt, a_cs, gends, seg, d) if v is not None])
