"""Mamba-2 SSD (state-space duality) kernels: the chunked scan and the one-token step.

The recurrence, per batch row and head (``a_t = dt_t A``, ``x_t`` ``[p]``,
``B_t, C_t`` ``[n]``, state ``h`` ``[p, n]``):

    h_t = exp(a_t) h_{t-1} + dt_t x_t B_t^T,    y_t = h_t C_t  (+ D x_t, * silu(z_t)).

The chunked form cuts the sequence into chunks of ``Q`` steps. With ``a_cs``
the cumulative sum of ``a`` inside each chunk (inclusive) and ``S_c`` the state
entering chunk ``c``:

    y_t = exp(a_cs_t) C_t S_c^T                                   (inter-chunk)
        + sum_{s <= t in the chunk} (C_t . B_s) exp(a_cs_t - a_cs_s) dt_s x_s   (intra-chunk)
    S_{c+1} = exp(a_cs_end) S_c + sum_s exp(a_cs_end - a_cs_s) dt_s x_s B_s^T.

Packed sequences: ``seg`` numbers the segments (non-decreasing, 0 first); the
state is dropped wherever the segment changes, so every sum above runs over
pairs in one segment. The initial state belongs to segment 0.

Three kernels for the scan (and :func:`step` for one token):

* :func:`time_terms`: the processed ``dt`` and ``a_cs`` in float32,
  ``[b, h, chunks * Q]`` (``dt`` 0 past the sequence end).
* :func:`chunk_states`: one program per (batch row, head, block of ``p``) walks
  the sequence in pieces of ``block_q`` steps, carrying the float32 state in
  registers, and writes the state entering every chunk (``[b, chunks, h, p, n]``)
  and the final state. x is read once. With ``state_passing`` (long sequences of few
  heads, where such walks leave most of the GPU idle): :func:`chunk_local_states`, one
  program per chunk too, then ``state_passing.pass_states``.
* :func:`chunk_scan`: one program per (batch row, chunk, ``block_h`` heads of a group,
  block of ``block_t`` output steps, block of ``p``) adds the inter-chunk term from the stored state
  and the intra-chunk term by a loop over source blocks up to the diagonal.

Every exponent is masked before ``exp`` (``-inf`` where a pair does not count),
never after: no ``inf * 0``. Matmul operands are in the input dtype (float32
inputs: full float32 precision, no TF32) with float32 accumulation.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.blocks import (all_of, block_loop, columns, dot, load, padded, pallas_call,
                                   rows_cols)
from pallas_kernels.formulas.ssd import process_dt
from pallas_kernels.state_passing import chunk_decay, pass_states, wants_state_passing


@dataclasses.dataclass(frozen=True)
class SsdConfig:
    """Launch configuration of the chunked scan.

    Attributes:
      block_q: steps per piece in :func:`chunk_states` (divides the chunk size).
      block_t: output steps per :func:`chunk_scan` program (divides the chunk size).
      block_s: source steps per inner iteration of :func:`chunk_scan` (divides block_t).
      block_p: head_dim columns per program (a power of 2).
      block_h: heads per :func:`chunk_scan` program (of one group: they share
        each ``C_t . B_s`` block).
      state_warps, scan_warps: warps of each kernel's programs.
      num_stages: software-pipelining depth of the kernels' loops.
      constant_trip_count: :func:`chunk_scan`'s loop runs over every source block of
        the chunk, those past the diagonal masked (``blocks.block_loop``).
      state_passing: :func:`chunk_states` computes each chunk's state in parallel over the
        chunks and passes them along (``pallas_kernels.state_passing``) instead of
        walking the sequence with its matmuls.
      block_pass: rows of ``p`` a program of that pass.
      block_n: state columns per :func:`chunk_states` (or :func:`chunk_local_states`)
        program, capped at the padded state: a state's columns evolve apart
        (``S[:, j]`` reads only ``B[:, j]``), so narrower blocks give more programs,
        each with a smaller float32 state.
    """
    block_q: int
    block_t: int
    block_s: int
    block_p: int
    block_h: int = 1
    state_warps: int = 4
    scan_warps: int = 4
    num_stages: int = 2
    constant_trip_count: bool = False
    state_passing: bool = False
    block_pass: int = 16
    block_n: int = 256


def state_piece(chunk_size: int, state_dim: int, dtype) -> int:
    """Steps per piece of a walk over the chunks: 128, or 64 for float32 operands with a
    state padded to 256 (128 x 256 float32 tiles in two stages overflow an H200's
    shared memory, 232,448 bytes)."""
    wide = jnp.dtype(dtype).itemsize >= 4 and padded(state_dim) >= 256
    return min(chunk_size, 64 if wide else 128)


def default_config(chunk_size: int, head_dim: int, state_dim: int,
                   heads_per_group: int, dtype, batch_heads: int | None = None,
                   chunks: int = 1) -> SsdConfig:
    """Pieces of 128 steps for the state walk (:func:`state_piece`), 64-step output
    blocks, and per scan program:

    * head_dim up to 64: all of it, and two heads of a group where they divide the group
      (an H200 sweep: 0.31 ms against 0.40 for one head and 0.45 for four, at b=4,
      l=4096, h=64, p=64, n=128, chunk 256);
    * head_dim 128 in bfloat16: all of it, one head, 4 warps (on the H200 at batch
      16 x 512, h=32: 1.8-2.6x faster than two 64-column blocks of two heads on 8 warps
      at state 64 and 128, 1.0-1.1x at 256, with the same outputs bit for bit;
      BENCHMARKS.md);
    * otherwise 64-column blocks, two heads where they divide the group, 8 warps (other
      head_dims and dtypes have not been timed or checked on a GPU with whole blocks).

    The state kernels take states padded past 128 in blocks of 64 columns (on the H200:
    forward 1.53x faster at b=4, l=4096, h=32, p=128, n=256, and at 128K tokens of 64
    heads of 64 1.33x faster than passing whole states; no gain at state 128;
    BENCHMARKS.md), the whole state otherwise.

    Float32 inputs (``dtype``: x's) loop over a constant count of blocks
    (``blocks.block_loop``). With ``batch_heads`` (batch rows x heads) and ``chunks``
    given, the chunk states are passed along where their walks would be too few and too
    long (``state_passing.wants_state_passing``)."""
    block = min(chunk_size, 64)
    padded_p = max(16, pl.next_power_of_2(head_dim))
    block_h = 2 if heads_per_group % 2 == 0 else 1
    block_p, warps = min(padded_p, 64), 4 if padded_p <= 64 else 8
    if head_dim == 128 and jnp.dtype(dtype) == jnp.bfloat16:
        block_p, block_h, warps = 128, 1, 4
    block_n = 64 if padded(state_dim) > 128 else padded(state_dim)
    walks = None if batch_heads is None else batch_heads * pl.cdiv(head_dim, block_p) * (
        pl.cdiv(state_dim, block_n))
    return SsdConfig(block_q=state_piece(chunk_size, state_dim, dtype), block_t=block,
                     block_s=block, block_p=block_p, block_h=block_h, state_warps=4,
                     scan_warps=warps, num_stages=2,
                     constant_trip_count=jnp.dtype(dtype) == jnp.float32,
                     state_passing=walks is not None and wants_state_passing(walks, chunks),
                     block_n=block_n)


def search_space(chunk_size: int, head_dim: int, state_dim: int, heads_per_group: int,
                 dtype, batch_heads: int | None = None,
                 chunks: int = 1) -> tuple[SsdConfig, ...]:
    """The forward configurations the tuner tries (``bjax.tune``) around the heuristic:
    output (and source) blocks of 32, 64 or 128 steps, head_dim blocks of 32 to 128
    columns, 1, 2 or 4 heads a program (dividing the group), 4 or 8 warps; the state
    walk (or passing: ``batch_heads``, ``chunks`` as :func:`default_config`'s), stages
    and trip count as the heuristic's (``state_passing.passing_variants`` varies the
    walk)."""
    base = default_config(chunk_size, head_dim, state_dim, heads_per_group, dtype,
                          batch_heads, chunks)
    padded_p = max(16, pl.next_power_of_2(head_dim))
    space = []
    for block_t in (32, 64, 128):
        if chunk_size % block_t:
            continue
        for block_p in sorted({min(padded_p, p) for p in (32, 64, 128)}):
            for block_h in (1, 2, 4):
                if heads_per_group % block_h:
                    continue
                for warps in (4, 8):
                    space.append(dataclasses.replace(
                        base, block_t=block_t, block_s=block_t, block_p=block_p,
                        block_h=block_h, scan_warps=warps))
    return tuple(dict.fromkeys(space))


def state_block_variants(config, state_dim: int) -> tuple:
    """``config`` (the forward's :class:`SsdConfig` or the backward's) with its state
    kernels in blocks of 32, 64 or 128 state columns, or the whole padded state (those
    that fit the state): the tuner's candidates."""
    widths = dict.fromkeys(min(width, padded(state_dim)) for width in (32, 64, 128, 256))
    return tuple(dataclasses.replace(config, block_n=width) for width in widths)


def snapshot_dtype(x_dtype) -> jnp.dtype:
    """Dtype of the stored chunk states: bfloat16 for bfloat16 inputs (the operand of
    their matmul), float32 otherwise (float16's range is too narrow for a state)."""
    return jnp.dtype(jnp.bfloat16) if jnp.dtype(x_dtype) == jnp.bfloat16 else jnp.dtype(
        jnp.float32)


def segment_before(seg_ref, row, start):
    """Segment number of the step before ``start`` (0, the initial state's, for step 0)."""
    return jnp.where(start == 0, 0, seg_ref[row, jnp.maximum(start - 1, 0)])


def _time_kernel(*refs, seq_len, chunk, has_bias, softplus, limit):
    dt_ref, a_ref, *rest = refs
    bias_ref = rest.pop(0) if has_bias else None
    dt_out, acs_out = rest
    c, head, row = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    steps = pl.ds(c * chunk, chunk)
    in_seq = (c * chunk + jnp.arange(chunk, dtype=jnp.int32)) < seq_len
    dt = load(dt_ref.at[row, steps, head], in_seq)
    dt = process_dt(dt, bias_ref[head] if has_bias else None, softplus, limit)
    dt = jnp.where(in_seq, dt, 0.0)
    dt_out[row, head, steps] = dt
    acs_out[row, head, steps] = jnp.cumsum(dt * a_ref[head])


@functools.partial(jax.jit, static_argnames=("chunk_size", "softplus", "limit", "interpret"))
def time_terms(dt, a, bias=None, *, chunk_size: int, softplus: bool,
               limit: tuple[float, float], interpret: bool = False):
    """``(dt', a_cs)``, float32 ``[batch, heads, chunks * chunk_size]``: the processed
    step sizes (:func:`~pallas_kernels.formulas.ssd.process_dt`; 0 past seqlen) and the inclusive cumsum of
    ``dt' * a`` inside each chunk, from ``dt`` ``[batch, seqlen, heads]`` and
    float32 ``a``, ``bias`` ``[heads]``."""
    batch, seq_len, heads = dt.shape
    chunks = max(1, -(-seq_len // chunk_size))
    kernel = functools.partial(_time_kernel, seq_len=seq_len, chunk=chunk_size,
                               has_bias=bias is not None, softplus=softplus, limit=limit)
    out = jax.ShapeDtypeStruct((batch, heads, chunks * chunk_size), jnp.float32)
    return pallas_call(
        kernel,
        out_shape=(out, out),
        grid=(chunks, heads, batch),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="bjax_ssd_time_terms",
    )(*[v for v in (dt, a, bias) if v is not None])


def _weighted_outer(refs, place, start, a_end, seg_end, dims, config, dot_dtype):
    """``sum_s x_s^T (w_s B_s)`` over the ``block_q`` steps from ``start``, with
    ``w_s = dt_s exp(a_end - a_cs_s)``, 0 for steps outside segment ``seg_end`` (None:
    no segments): ``[block_p, padded n]`` float32."""
    x_ref, b_ref, dt_ref, acs_ref, seg_ref = refs
    row, head, group, (p_slice, p_mask), (n_slice, n_mask) = place
    seq_len, chunk = dims[:2]
    bq = config.block_q
    steps = pl.ds(start, bq)
    keep = jnp.full((bq,), True) if seg_end is None else seg_ref[row, steps] == seg_end
    weight = dt_ref[row, head, steps] * jnp.exp(
        jnp.where(keep, a_end - acs_ref[row, head, steps], -jnp.inf))
    in_seq = (start + jnp.arange(bq, dtype=jnp.int32)) < seq_len if seq_len % chunk else None
    x = load(x_ref.at[row, steps, head, p_slice], rows_cols(in_seq, p_mask))
    b = load(b_ref.at[row, steps, group, n_slice], rows_cols(in_seq, n_mask))
    bw = (b.astype(jnp.float32) * weight[:, None]).astype(dot_dtype)
    return dot(x.astype(dot_dtype), bw, contract=(0, 0))


def state_blocks(config, state_dim: int) -> tuple[int, int]:
    """``(columns, count)`` of a state kernel's blocks of the state: ``config.block_n``
    columns, capped at the padded state. ``config``: the forward's :class:`SsdConfig` or
    the backward's config (``pallas_kernels.ssd_backward``), which share ``block_p`` and
    ``block_n``."""
    width = min(config.block_n, padded(state_dim))
    return width, pl.cdiv(state_dim, width)


def state_tiles(config, head_dim: int, state_dim: int) -> int:
    """A state kernel's first grid axis: head_dim blocks (major) times state blocks."""
    return pl.cdiv(head_dim, config.block_p) * state_blocks(config, state_dim)[1]


def state_program(config, dims, head, row):
    """Where this state program works, from its tile (the first grid index, over
    :func:`state_tiles`): ``((row, head, its group, (p slice, mask), (n slice, mask)),
    the state block's width, the tile)``."""
    heads_per_group, head_dim, state_dim = dims[2:]
    width, count = state_blocks(config, state_dim)
    tile = pl.program_id(0)
    p_block, n_block = tile // count, tile % count
    place = (row, head, head // heads_per_group,
             columns(head_dim, p_block * config.block_p, config.block_p),
             columns(state_dim, n_block * width, width))
    return place, width, tile


def _state_kernel(*refs, dims, config: SsdConfig, has_seg, has_init, dot_dtype):
    x_ref, b_ref, dt_ref, acs_ref, *rest = refs
    seg_ref = rest.pop(0) if has_seg else None
    init_ref = rest.pop(0) if has_init else None
    states_ref, final_ref = rest
    bq, bp = config.block_q, config.block_p
    head, row = pl.program_id(1), pl.program_id(2)
    place, n_pad, _ = state_program(config, dims, head, row)
    (p_slice, p_mask), (n_slice, n_mask) = place[3:]
    pieces_per_chunk = dims[1] // bq
    num_pieces = states_ref.shape[1] * pieces_per_chunk

    if has_init:
        state = load(init_ref.at[row, head, p_slice, n_slice], rows_cols(p_mask, n_mask))
        state = state.astype(jnp.float32)
    else:
        state = jnp.zeros((bp, n_pad), jnp.float32)

    def body(i, state):
        start = i * bq
        first = i % pieces_per_chunk == 0
        # The state entering the chunk (written once, by the chunk's first piece).
        snapshot_mask = all_of(rows_cols(p_mask, n_mask),
                             jnp.full((bp, n_pad), first))
        plgpu.store(states_ref.at[row, i // pieces_per_chunk, head, p_slice, n_slice],
                    state.astype(states_ref.dtype), mask=snapshot_mask)
        a_end = acs_ref[row, head, start + bq - 1]
        a_before = jnp.where(first, 0.0, acs_ref[row, head, jnp.maximum(start - 1, 0)])
        carry, seg_end = jnp.bool_(True), None
        if has_seg:
            seg_end = seg_ref[row, start + bq - 1]
            carry = seg_end == segment_before(seg_ref, row, start)
        decay = jnp.exp(jnp.where(carry, a_end - a_before, -jnp.inf))
        return decay * state + _weighted_outer(
            (x_ref, b_ref, dt_ref, acs_ref, seg_ref), place, start, a_end, seg_end, dims,
            config, dot_dtype)

    state = jax.lax.fori_loop(jnp.int32(0), jnp.int32(num_pieces), body, state)
    plgpu.store(final_ref.at[row, head, p_slice, n_slice], state,
                mask=rows_cols(p_mask, n_mask))


def _local_state_kernel(*refs, dims, config: SsdConfig, has_seg, dot_dtype):
    x_ref, b_ref, dt_ref, acs_ref, *rest = refs
    seg_ref = rest.pop(0) if has_seg else None
    (local_ref,) = rest
    chunk = dims[1]
    head, c, row = (pl.program_id(i) for i in range(1, 4))
    place, block_n, _ = state_program(config, dims, head, row)
    (p_slice, p_mask), (n_slice, n_mask) = place[3:]
    end = c * chunk + chunk - 1
    a_end = acs_ref[row, head, end]
    seg_end = seg_ref[row, end] if has_seg else None

    def body(j, state):
        return state + _weighted_outer((x_ref, b_ref, dt_ref, acs_ref, seg_ref), place,
                                       c * chunk + j * config.block_q, a_end, seg_end, dims,
                                       config, dot_dtype)

    state = jax.lax.fori_loop(jnp.int32(0), jnp.int32(chunk // config.block_q), body,
                              jnp.zeros((config.block_p, block_n), jnp.float32))
    plgpu.store(local_ref.at[row, c, head, p_slice, n_slice], state,
                mask=rows_cols(p_mask, n_mask))


def _scan_kernel(*refs, dims, config: SsdConfig, has_seg, has_d, has_z, dot_dtype):
    x_ref, b_ref, c_ref, dt_ref, acs_ref, states_ref, *rest = refs
    seg_ref = rest.pop(0) if has_seg else None
    d_ref = rest.pop(0) if has_d else None
    z_ref = rest.pop(0) if has_z else None
    (y_ref,) = rest
    seq_len, chunk, heads_per_group, head_dim, state_dim = dims
    bt, bs, bp, bh = config.block_t, config.block_s, config.block_p, config.block_h
    n_pad = padded(state_dim)
    p_blocks = pl.cdiv(head_dim, bp)
    tile, head_block, c, row = (pl.program_id(i) for i in range(4))
    tb, pb = tile // p_blocks, tile % p_blocks
    heads = [head_block * bh + k for k in range(bh)]   # all in one group
    group = heads[0] // heads_per_group
    p_slice, p_mask = columns(head_dim, pb * bp, bp)
    n_slice, n_mask = columns(state_dim, 0, n_pad)
    t_start = c * chunk + tb * bt
    t_steps = pl.ds(t_start, bt)
    t_local = tb * bt + jnp.arange(bt, dtype=jnp.int32)
    t_in = (t_start + jnp.arange(bt, dtype=jnp.int32)) < seq_len if seq_len % chunk else None
    a_t = [acs_ref[row, h, t_steps] for h in heads]
    c_t = load(c_ref.at[row, t_steps, group, n_slice], rows_cols(t_in, n_mask))

    # Inter-chunk: exp(a_cs_t) C_t S_c^T, for steps still in the segment the chunk entered in.
    enters = jnp.full((bt,), True)
    if has_seg:
        seg_t = seg_ref[row, t_steps]
        enters = seg_t == segment_before(seg_ref, row, c * chunk)
    accs = []
    for h, a in zip(heads, a_t):
        state = load(states_ref.at[row, c, h, p_slice, n_slice], rows_cols(p_mask, n_mask))
        acc = dot(c_t.astype(states_ref.dtype), state, contract=(1, 1))
        accs.append(acc * jnp.exp(jnp.where(enters, a, -jnp.inf))[:, None])

    # Intra-chunk: source blocks up to the diagonal; C_t . B_s once for the block of heads.
    def body(j, accs):
        s_start = c * chunk + j * bs
        s_steps = pl.ds(s_start, bs)
        s_in = (s_start + jnp.arange(bs, dtype=jnp.int32)) < seq_len if seq_len % chunk else None
        b_s = load(b_ref.at[row, s_steps, group, n_slice], rows_cols(s_in, n_mask))
        pairs = t_local[:, None] >= (j * bs + jnp.arange(bs, dtype=jnp.int32))[None, :]
        if has_seg:
            pairs = pairs & (seg_t[:, None] == seg_ref[row, s_steps][None, :])
        scores = dot(c_t.astype(dot_dtype), b_s.astype(dot_dtype), contract=(1, 1))
        new = []
        for h, a, acc in zip(heads, a_t, accs):
            x_s = load(x_ref.at[row, s_steps, h, p_slice], rows_cols(s_in, p_mask))
            a_s = acs_ref[row, h, s_steps]
            dt_s = dt_ref[row, h, s_steps]
            decay = jnp.exp(jnp.where(pairs, a[:, None] - a_s[None, :], -jnp.inf))
            weights = (scores * decay * dt_s[None, :]).astype(dot_dtype)
            new.append(acc + dot(weights, x_s.astype(dot_dtype)))
        return tuple(new)

    accs = block_loop(jnp.int32(0), (tb + 1) * (bt // bs), chunk // bs, body, tuple(accs),
                      constant_trip_count=config.constant_trip_count)

    tile_mask = rows_cols(t_in, p_mask)
    for h, acc in zip(heads, accs):
        if has_d:
            x_t = load(x_ref.at[row, t_steps, h, p_slice], tile_mask)
            d = load(d_ref.at[h, p_slice], p_mask)
            acc = acc + x_t.astype(jnp.float32) * d.astype(jnp.float32)[None, :]
        if has_z:
            z = load(z_ref.at[row, t_steps, h, p_slice], tile_mask).astype(jnp.float32)
            acc = acc * z * jax.nn.sigmoid(z)
        plgpu.store(y_ref.at[row, t_steps, h, p_slice], acc.astype(y_ref.dtype), mask=tile_mask)


_STATIC = ("chunk_size", "config", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC + ("states_dtype",))
def chunk_states(x, b, dt, a_cs, seg=None, initial_states=None, *, chunk_size: int,
                 config: SsdConfig, interpret: bool = False, states_dtype=None):
    """States entering every chunk, and the final state: walked by one program per batch
    row, head, block of ``p`` and block of ``n`` (``config.block_n``), or with
    ``config.state_passing`` computed per chunk (:func:`chunk_local_states`) and passed
    along (``state_passing.pass_states``).

    Args:
      x: ``[batch, seqlen, heads, head_dim]``.
      b: ``[batch, seqlen, groups, state_dim]`` (head ``i`` reads group
        ``i // (heads // groups)``), x's dtype.
      dt, a_cs: float32 ``[batch, heads, chunks * chunk_size]``: processed step
        sizes (0 past seqlen) and their chunk-local inclusive cumsum times A.
      seg: optional int32 ``[batch, chunks * chunk_size]`` segment numbers.
      initial_states: optional float32 ``[batch, heads, head_dim, state_dim]``.

      states_dtype: dtype of the stored states (default :func:`snapshot_dtype`).

    Returns:
      ``(states [batch, chunks, heads, head_dim, state_dim]``,
      ``final [batch, heads, head_dim, state_dim]`` float32).
    """
    states_dtype = states_dtype or snapshot_dtype(x.dtype)
    if config.state_passing:
        local = chunk_local_states(x, b, dt, a_cs, seg, chunk_size=chunk_size, config=config,
                                   interpret=interpret)
        return pass_states(local, chunk_decay(a_cs, seg, chunk_size), initial_states,
                           block=config.block_pass, states_dtype=states_dtype,
                           interpret=interpret)
    batch, seq_len, heads, head_dim = x.shape
    groups, state_dim = b.shape[2:]
    chunks = dt.shape[-1] // chunk_size
    dims = (seq_len, chunk_size, heads // groups, head_dim, state_dim)
    kernel = functools.partial(_state_kernel, dims=dims, config=config,
                               has_seg=seg is not None, has_init=initial_states is not None,
                               dot_dtype=x.dtype)
    operands = [x, b, dt, a_cs] + [v for v in (seg, initial_states) if v is not None]
    return pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((batch, chunks, heads, head_dim, state_dim),
                                        states_dtype),
                   jax.ShapeDtypeStruct((batch, heads, head_dim, state_dim), jnp.float32)),
        grid=(state_tiles(config, head_dim, state_dim), heads, batch),
        compiler_params=plgpu.CompilerParams(num_warps=config.state_warps,
                                             num_stages=config.num_stages),
        interpret=interpret,
        name="bjax_ssd_chunk_states",
    )(*operands)


@functools.partial(jax.jit, static_argnames=_STATIC)
def chunk_local_states(x, b, dt, a_cs, seg=None, *, chunk_size: int, config: SsdConfig,
                       interpret: bool = False):
    """Each chunk's own end state (entering it from zero), float32
    ``[batch, chunks, heads, head_dim, state_dim]``: ``L_c = sum_s exp(a_cs_end - a_cs_s)
    dt_s x_s B_s^T`` over the chunk's steps in its last segment. One program per batch
    row, chunk, head and block of ``p`` and of ``n``; arguments as :func:`chunk_states`'."""
    batch, seq_len, heads, head_dim = x.shape
    groups, state_dim = b.shape[2:]
    chunks = dt.shape[-1] // chunk_size
    dims = (seq_len, chunk_size, heads // groups, head_dim, state_dim)
    kernel = functools.partial(_local_state_kernel, dims=dims, config=config,
                               has_seg=seg is not None, dot_dtype=x.dtype)
    return pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((batch, chunks, heads, head_dim, state_dim),
                                       jnp.float32),
        grid=(state_tiles(config, head_dim, state_dim), heads, chunks, batch),
        compiler_params=plgpu.CompilerParams(num_warps=config.state_warps,
                                             num_stages=config.num_stages),
        interpret=interpret,
        name="bjax_ssd_chunk_local_states",
    )(*[v for v in (x, b, dt, a_cs, seg) if v is not None])


@functools.partial(jax.jit, static_argnames=_STATIC)
def chunk_scan(x, b, c, dt, a_cs, states, seg=None, d=None, z=None, *, chunk_size: int,
               config: SsdConfig, interpret: bool = False):
    """``y [batch, seqlen, heads, head_dim]`` in x's dtype.

    ``c`` is shaped like ``b``; ``states`` comes from :func:`chunk_states`; ``d``
    is ``[heads, head_dim]`` (float32) and ``z`` shaped like ``x``, both optional.
    """
    batch, seq_len, heads, head_dim = x.shape
    groups, state_dim = b.shape[2:]
    chunks = dt.shape[-1] // chunk_size
    dims = (seq_len, chunk_size, heads // groups, head_dim, state_dim)
    kernel = functools.partial(_scan_kernel, dims=dims, config=config, has_seg=seg is not None,
                               has_d=d is not None, has_z=z is not None, dot_dtype=x.dtype)
    operands = [x, b, c, dt, a_cs, states] + [v for v in (seg, d, z) if v is not None]
    tiles = (chunk_size // config.block_t) * pl.cdiv(head_dim, config.block_p)
    return pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(tiles, heads // config.block_h, chunks, batch),
        compiler_params=plgpu.CompilerParams(num_warps=config.scan_warps,
                                             num_stages=config.num_stages),
        interpret=interpret,
        name="bjax_ssd_chunk_scan",
    )(*operands)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Launch configuration of :func:`step`: ``heads_per_program`` heads (a loop of
    ``num_stages`` software-pipeline stages) of ``block_p`` head_dim rows (whole state
    rows) per program, and warps."""
    block_p: int
    heads_per_program: int = 1
    num_warps: int = 8
    num_stages: int = 1


def step_config(heads: int, head_dim: int, state_dim: int) -> StepConfig:
    """About 4096 state cells per program, one head, 8 warps: the first or within 3% of it
    in four rounds of an H200 sweep over 1-8 heads a program (pipelined), 16-64 rows and
    2-16 warps at b=64, h=64, p=64, n=128 (BENCHMARKS.md)."""
    return StepConfig(min(pl.next_power_of_2(head_dim),
                          max(1, 4096 // pl.next_power_of_2(state_dim))))


def step_search_space(heads: int, head_dim: int, state_dim: int) -> tuple[StepConfig, ...]:
    """The step configs the tuner tries (``bjax.tune``): ``block_p`` rows of whole state
    rows holding 1024 to 16384 cells (fewer where head_dim is smaller), 1, 2 or 4 heads a
    program (dividing ``heads``; 2 pipeline stages with more than one), 4 or 8 warps."""
    width, tallest = pl.next_power_of_2(state_dim), pl.next_power_of_2(head_dim)
    smallest = min(1024, tallest * width)
    space, block_p = [], 1
    while block_p <= tallest and block_p * width <= 16384:
        if block_p * width >= smallest:
            space += [StepConfig(block_p, per_program, warps, 1 if per_program == 1 else 2)
                      for per_program in (1, 2, 4) if heads % per_program == 0
                      for warps in (4, 8)]
        block_p *= 2
    return tuple(space)


def _step_kernel(*refs, dims, has_bias, has_d, has_z, softplus, limit, config):
    state_ref, x_ref, dt_ref, a_ref, b_ref, c_ref, *rest = refs
    bias_ref = rest.pop(0) if has_bias else None
    d_ref = rest.pop(0) if has_d else None
    z_ref = rest.pop(0) if has_z else None
    y_ref, new_state_ref = rest
    heads_per_group, head_dim, state_dim = dims
    pb, head_block, row = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    p_slice, p_mask = columns(head_dim, pb * config.block_p, config.block_p)
    n_slice, n_mask = columns(state_dim, 0, pl.next_power_of_2(state_dim))
    tile_mask = rows_cols(p_mask, n_mask)

    def one_head(k, carry):
        head = head_block * config.heads_per_program + k
        group = head // heads_per_group
        dt = process_dt(dt_ref[row, head], bias_ref[head] if has_bias else None, softplus,
                        limit)
        x = load(x_ref.at[row, head, p_slice], p_mask).astype(jnp.float32)
        b = load(b_ref.at[row, group, n_slice], n_mask).astype(jnp.float32)
        c = load(c_ref.at[row, group, n_slice], n_mask).astype(jnp.float32)
        state = load(state_ref.at[row, head, p_slice, n_slice], tile_mask)
        state = jnp.exp(dt * a_ref[head]) * state + (dt * x)[:, None] * b[None, :]
        y = jnp.sum(state * c[None, :], axis=1)
        if has_d:
            y = y + load(d_ref.at[head, p_slice], p_mask) * x
        if has_z:
            z = load(z_ref.at[row, head, p_slice], p_mask).astype(jnp.float32)
            y = y * z * jax.nn.sigmoid(z)
        plgpu.store(new_state_ref.at[row, head, p_slice, n_slice], state, mask=tile_mask)
        plgpu.store(y_ref.at[row, head, p_slice], y.astype(y_ref.dtype), mask=p_mask)
        return carry

    if config.heads_per_program == 1:
        one_head(0, 0)
    else:  # a loop Triton can software-pipeline (num_stages): the next head's loads early
        jax.lax.fori_loop(jnp.int32(0), jnp.int32(config.heads_per_program), one_head, 0)


@functools.partial(jax.jit, static_argnames=("softplus", "limit", "config", "interpret"))
def step(state, x, dt, a, b, c, bias=None, d=None, z=None, *, softplus: bool,
         limit: tuple[float, float], config: StepConfig | None = None,
         interpret: bool = False):
    """One token: ``(y [batch, heads, head_dim], new_state)``, the state updated in place.

    ``state`` float32 ``[batch, heads, head_dim, state_dim]``; ``x``, ``z``
    ``[batch, heads, head_dim]``; ``dt`` ``[batch, heads]``; ``a``, ``bias``
    float32 ``[heads]``; ``b``, ``c`` ``[batch, groups, state_dim]``; ``d``
    float32 ``[heads, head_dim]``. ``config``: ``None`` for :func:`step_config`.
    """
    batch, heads, head_dim, state_dim = state.shape
    dims = (heads // b.shape[1], head_dim, state_dim)
    config = config or step_config(heads, head_dim, state_dim)
    kernel = functools.partial(_step_kernel, dims=dims, has_bias=bias is not None,
                               has_d=d is not None, has_z=z is not None, softplus=softplus,
                               limit=limit, config=config)
    operands = [state, x, dt, a, b, c] + [v for v in (bias, d, z) if v is not None]
    return pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype),
                   jax.ShapeDtypeStruct(state.shape, state.dtype)),
        grid=(pl.cdiv(head_dim, config.block_p), heads // config.heads_per_program, batch),
        input_output_aliases={0: 1},
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        interpret=interpret,
        name="bjax_ssd_step",
    )(*operands)
