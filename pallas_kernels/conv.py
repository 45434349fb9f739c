"""Causal depthwise convolution kernels: forward, backward and the one-token step.

Channels last: ``x`` ``[b, l, d]``, taps ``w`` ``[k, d]`` (float32, the op's weight
transposed), ``bias`` ``[d]`` float32. With ``t' = t - (k - 1) + j``:

    u[t] = bias + sum_j w[j] x[t'],     y[t] = act(u[t]),

where a row ``t' < 0`` reads ``init[k - 1 + t']`` (zeros without it) and, with packed
sequences, a row of another sequence than ``t``'s (``seq[t'] != seq[t]``) reads zero;
the rows before the start belong to the first sequence. The backward, with
``du = dy act'(u)``:

    dx[s] = sum_j w[j] du[s + (k - 1) - j],   dw[j] = sum_t du[t] x[t'],   dbias = sum_t du[t]

(each term where both rows are in one sequence), and ``dinit`` is ``dx`` of the rows
before the start.

* :func:`forward` and :func:`backward`: a tile cannot shift its rows, and ``dx[s]``
  needs ``du`` of the ``k - 1`` rows after ``s``. So one program walks ``lanes`` pieces
  of ``piece`` rows side by side, ``unroll`` rows of each a step (their loads issued
  together), carrying the last ``k - 1`` rows of ``x`` (and, backward, of pending
  ``dx``) in registers: every row is read once and ``act'`` evaluated once a row. Each
  piece starts from the ``k - 1`` rows before it; the backward runs ``k - 1`` rows past
  its end (recomputing ``du`` there) to finish its last rows. ``dw`` and ``dbias`` come
  out per program, summed by the caller.
* :func:`step`: one token into a ``[b, k - 1, d]`` state, written in place.

Math in float32; results in the dtypes of the arrays they belong to.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.blocks import all_of, load, pallas_call, written_into
from pallas_kernels.formulas.conv import activate, activation_grad

# Programs to launch at least, so that small problems still fill a GPU.
_MIN_PROGRAMS = 512


@dataclasses.dataclass(frozen=True)
class ConvConfig:
    """Launch configuration of the convolution kernels.

    A program walks ``block_lanes`` pieces of ``piece_len`` rows side by side, over
    ``block_d`` channels, ``unroll`` rows of every lane a step.

    Attributes:
      block_d: channels per program (the step kernel's too).
      block_lanes: pieces of the sequence a program walks side by side.
      piece_len: rows of each piece, a multiple of ``unroll`` (more rows: less
        recomputation past each piece's end in the backward, fewer programs).
      unroll: rows of every lane loaded together at each step of the walk.
      num_warps: warps per program.
    """
    block_d: int = 128
    block_lanes: int = 2
    piece_len: int = 64
    unroll: int = 8
    num_warps: int = 4


def default_config(batch: int, length: int, channels: int) -> ConvConfig:
    """128 channels and 2 lanes a program, 8 rows a step, pieces of 64 rows shortened (to
    8) until the grid fills the GPU or a piece covers a short sequence (BENCHMARKS.md)."""
    block_d = min(128, pl.next_power_of_2(max(channels, 1)))
    lanes, piece = 2, 64
    programs = batch * pl.cdiv(channels, block_d)
    while piece > 8 and (programs * pl.cdiv(length, lanes * piece) < _MIN_PROGRAMS
                         or lanes * piece // 2 >= length):
        piece //= 2
    return ConvConfig(block_d, lanes, piece, unroll=8, num_warps=4)


def search_space(batch: int, length: int, channels: int) -> tuple[ConvConfig, ...]:
    """The configurations the tuner tries (``bjax.tune``): 128-512 channels (no wider
    than ``channels`` rounds up to), 1-2 lanes, pieces of 32-128 rows (no longer than the
    sequence needs), 8 rows a step, 4 or 8 warps."""
    del batch
    widest = pl.next_power_of_2(max(channels, 1))
    longest = max(8, pl.next_power_of_2(max(length, 1)))
    return tuple(ConvConfig(block_d, lanes, piece, unroll=min(8, piece), num_warps=warps)
                 for block_d in (128, 256, 512) if block_d <= max(128, widest)
                 for lanes in (1, 2)
                 for piece in (32, 64, 128) if piece <= max(32, longest)
                 for warps in (4, 8))



def step_search_space(channels: int) -> tuple[ConvConfig, ...]:
    """The step kernel's configurations the tuner tries (``bjax.tune``; it reads only
    ``block_d`` and ``num_warps``): 64-1024 channels a program (no wider than
    ``channels`` rounds up to), 1 to 8 warps."""
    widest = max(64, pl.next_power_of_2(max(channels, 1)))
    return tuple(ConvConfig(block_d, num_warps=warps)
                 for block_d in (64, 128, 256, 512, 1024) if block_d <= widest
                 for warps in (1, 2, 4, 8))

def _tap(ref, j, cols, col_mask):
    """Row ``j`` of a ``[k, d]`` (or, ``j`` None, a ``[d]``) ref at ``cols``, float32."""
    index = (cols,) if j is None else (jnp.int32(j), cols)
    return load(ref.at[index], col_mask).astype(jnp.float32)


class _Rows:
    """Row access to ``[b, l, d]`` arrays (``x`` with its initial rows and sequence ids,
    ``dy``, ``dx``) for program ``batch`` and channels ``cols`` (an int32 vector). Rows are
    int32 vectors; any of them may lie before the start or past the end.

    Every access indexes with integer arrays, never ``pl.ds``: a row vector is not a
    contiguous range (the backward's lanes), and the interpreter takes arrays alone.
    Masked-out stores aim past the end, where the interpreter drops them."""

    def __init__(self, x_ref, init_ref, seq_ref, batch, cols, col_mask, taps):
        self.x_ref, self.init_ref, self.seq_ref = x_ref, init_ref, seq_ref
        self.batch, self.cols, self.col_mask, self.taps = batch, cols, col_mask, taps
        self.length = x_ref.shape[1]

    def mask(self, rows_ok):
        return all_of(rows_ok[:, None], None if self.col_mask is None else self.col_mask[None, :])

    def _at(self, ref, index):
        return ref.at[self.batch, index[:, None], self.cols[None, :]]

    def read(self, ref, rows):
        """``ref[batch, rows, cols]`` in float32, zero outside ``[0, l)``."""
        ok = (rows >= 0) & (rows < self.length)
        index = jnp.where(ok, rows, 0)
        return load(self._at(ref, index), self.mask(ok)).astype(jnp.float32)

    def write(self, ref, rows, ok, value):
        """``ref[batch, rows, cols] = value`` where ``ok`` (rows in ``[0, ref.shape[1])``)."""
        index = jnp.where(ok, rows, ref.shape[1])
        plgpu.store(self._at(ref, index), value.astype(ref.dtype), mask=self.mask(ok))

    def x(self, rows):
        """``x`` at ``rows``; rows before the start from the initial rows (or zero)."""
        value = self.read(self.x_ref, rows)
        if self.init_ref is None:
            return value
        before = rows < 0
        index = jnp.where(before, rows + self.taps - 1, 0)
        return value + load(self._at(self.init_ref, index),
                            self.mask(before)).astype(jnp.float32)

    def seq(self, rows):
        """Sequence ids of ``rows`` (rows before the start: the first row's), or None."""
        if self.seq_ref is None:
            return None
        return self.seq_ref[self.batch, jnp.clip(rows, 0, self.length - 1)]


def _same(seq_a, seq_b):
    """Where two rows are in one sequence, as a ``[rows, 1]`` mask (None: always)."""
    return None if seq_a is None else (seq_a == seq_b)[:, None]


def _keep(value, same):
    return value if same is None else jnp.where(same, value, 0.0)


def _operands(refs, has_init, has_seq):
    """``(x, w, bias, init or None, seq or None, rest)`` from a kernel's refs."""
    x_ref, w_ref, bias_ref, *rest = refs
    init_ref = rest.pop(0) if has_init else None
    seq_ref = rest.pop(0) if has_seq else None
    return x_ref, w_ref, bias_ref, init_ref, seq_ref, rest


def _program_cols(channels, config):
    """This program's channels (int32 vector) and their mask (None: all in range)."""
    cols = pl.program_id(0) * config.block_d + jnp.arange(config.block_d, dtype=jnp.int32)
    return cols, (cols < channels) if channels % config.block_d else None


def _lane_starts(config):
    """First row of each of this program's lanes (int32 ``[lanes]``)."""
    lanes, piece = config.block_lanes, config.piece_len
    return pl.program_id(1) * (lanes * piece) + jnp.arange(lanes, dtype=jnp.int32) * piece


def _window(rows, starts, taps):
    """The ``k - 1`` rows before each lane's start (oldest first) and their sequence ids
    (``[]`` without seq_idx)."""
    before = [starts - (taps - 1) + m for m in range(taps - 1)]
    return [rows.x(r) for r in before], [] if rows.seq_ref is None else [rows.seq(r)
                                                                          for r in before]


def _sources(window, window_seq, x_t, seq_t):
    """The ``k`` rows row ``t`` reads (oldest first, rows of other sequences zeroed) and
    their masks (None: same sequence)."""
    same = ([_same(s, seq_t) for s in window_seq] if seq_t is not None
            else [None] * len(window)) + [None]
    return [_keep(v, m) for v, m in zip(window, same)] + [x_t], same


def _shifted(window, window_seq, x_t, seq_t):
    """The window one row on."""
    return [*window[1:], x_t], (window_seq if seq_t is None else [*window_seq[1:], seq_t])


def _walk(steps, first, config, starts, load_row, row_step, carry):
    """``steps`` steps of ``config.unroll`` rows of every lane from row ``first`` of the
    piece: a step's loads (``load_row(t)``) are issued together, then ``row_step(t,
    loaded, carry) -> carry`` runs row by row."""
    def body(i, carry):
        t0 = starts + first + i * config.unroll
        loaded = [load_row(t0 + r) for r in range(config.unroll)]
        for r in range(config.unroll):
            carry = row_step(t0 + r, loaded[r], carry)
        return carry
    return jax.lax.fori_loop(0, steps, body, carry)


def _forward_kernel(*refs, has_init, has_seq, activation, config):
    x_ref, w_ref, bias_ref, init_ref, seq_ref, (y_ref,) = _operands(refs, has_init, has_seq)
    taps, (_, length, channels) = w_ref.shape[0], x_ref.shape
    cols, col_mask = _program_cols(channels, config)
    rows = _Rows(x_ref, init_ref, seq_ref, pl.program_id(2), cols, col_mask, taps)
    starts = _lane_starts(config)
    w = [_tap(w_ref, j, cols, col_mask)[None, :] for j in range(taps)]
    bias = _tap(bias_ref, None, cols, col_mask)[None, :]

    def row_step(t, loaded, carry):
        (window, window_seq), (x_t, seq_t) = carry, loaded
        u = bias
        for tap, source in zip(w, _sources(window, window_seq, x_t, seq_t)[0]):
            u = u + tap * source
        rows.write(y_ref, t, (t < starts + config.piece_len) & (t < length),
                   activate(u, activation))
        return _shifted(window, window_seq, x_t, seq_t)

    _walk(config.piece_len // config.unroll, 0, config, starts,
          lambda t: (rows.x(t), rows.seq(t)), row_step, _window(rows, starts, taps))


def _backward_kernel(*refs, has_init, has_seq, activation, config):
    x_ref, w_ref, bias_ref, init_ref, seq_ref, rest = _operands(refs, has_init, has_seq)
    dy_ref, dx_ref, dw_ref, dbias_ref, *dinit_ref = rest
    taps, (_, length, channels) = w_ref.shape[0], x_ref.shape
    cols, col_mask = _program_cols(channels, config)
    rows = _Rows(x_ref, init_ref, seq_ref, pl.program_id(2), cols, col_mask, taps)
    starts, piece = _lane_starts(config), config.piece_len
    w = [_tap(w_ref, j, cols, col_mask)[None, :] for j in range(taps)]
    bias = _tap(bias_ref, None, cols, col_mask)[None, :]
    zeros = jnp.zeros((config.block_lanes, config.block_d), jnp.float32)

    def store_finished(row, value):
        """Row ``row`` of dx (those of this piece) or of dinit (before the start)."""
        rows.write(dx_ref, row, (row >= starts) & (row < starts + piece) & (row < length),
                   value)
        if dinit_ref:
            rows.write(dinit_ref[0], row + taps - 1, (row < 0) & (starts == 0), value)

    def row_step(t, loaded, carry, accumulate):
        (window, window_seq, pending, dw, dbias), (x_t, seq_t, dy_t) = carry, loaded
        sources, same = _sources(window, window_seq, x_t, seq_t)
        u = bias
        for tap, source in zip(w, sources):
            u = u + tap * source
        du = activation_grad(u, dy_t, activation)
        if accumulate:
            dw = [acc + du * source for acc, source in zip(dw, sources)]
            dbias = dbias + du
        pending = [p + _keep(tap * du, m) for p, tap, m in zip([*pending, zeros], w, same)]
        store_finished(t - (taps - 1), pending[0])
        return (*_shifted(window, window_seq, x_t, seq_t), pending[1:], dw, dbias)

    def load_row(t):
        return rows.x(t), rows.seq(t), rows.read(dy_ref, t)

    carry = (*_window(rows, starts, taps), [zeros] * (taps - 1), [zeros] * taps, zeros)
    carry = _walk(piece // config.unroll, 0, config, starts, load_row,
                  functools.partial(row_step, accumulate=True), carry)
    # Past the piece's end: du of the next k - 1 rows finishes its last rows of dx.
    carry = _walk(pl.cdiv(taps - 1, config.unroll), piece, config, starts, load_row,
                  functools.partial(row_step, accumulate=False), carry)
    dw, dbias = carry[3], carry[4]
    program = pl.program_id(2) * pl.num_programs(1) + pl.program_id(1)
    for j in range(taps):
        plgpu.store(dw_ref.at[program, jnp.int32(j), cols], dw[j].sum(axis=0), mask=col_mask)
    plgpu.store(dbias_ref.at[program, cols], dbias.sum(axis=0), mask=col_mask)


def _params(config):
    return plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1)


def _optional(init, seq):
    return tuple(v for v in (init, None if seq is None else seq.astype(jnp.int32))
                 if v is not None)


def _grid(batch, length, channels, config):
    per_program = config.block_lanes * config.piece_len
    return (pl.cdiv(channels, config.block_d), pl.cdiv(length, per_program), batch)


_STATIC = ("activation", "config", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def forward(x, w, bias, init, seq, *, activation, config: ConvConfig, interpret=False,
            out=None):
    """``y [b, l, d]`` in x's dtype (module doc); ``init`` ``[b, k - 1, d]`` and ``seq``
    ``[b, l]`` may be None; written into ``out`` if given."""
    batch, length, channels = x.shape
    kernel = functools.partial(_forward_kernel, has_init=init is not None,
                               has_seq=seq is not None, activation=activation, config=config)
    kernel, operands, aliases = written_into(kernel, (x, w, bias, *_optional(init, seq)), out)
    return pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=_grid(batch, length, channels, config),
        input_output_aliases=aliases, compiler_params=_params(config), interpret=interpret,
        name="bjax_causal_conv1d_forward")(*operands)


@functools.partial(jax.jit, static_argnames=_STATIC)
def backward(x, w, bias, init, seq, dy, *, activation, config: ConvConfig, interpret=False,
             out=None):
    """``(dx [b, l, d]`` in x's dtype, ``dw [k, d]``, ``dbias [d]`` (float32), ``dinit``
    in init's dtype, or None without init); dx written into ``out`` if given."""
    batch, length, channels = x.shape
    taps = w.shape[0]
    grid = _grid(batch, length, channels, config)
    programs = grid[1] * batch
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype),
              jax.ShapeDtypeStruct((programs, taps, channels), jnp.float32),
              jax.ShapeDtypeStruct((programs, channels), jnp.float32)]
    if init is not None:
        shapes.append(jax.ShapeDtypeStruct(init.shape, init.dtype))
    kernel = functools.partial(_backward_kernel, has_init=init is not None,
                               has_seq=seq is not None, activation=activation, config=config)
    kernel, operands, aliases = written_into(kernel, (x, w, bias, *_optional(init, seq), dy),
                                             out)
    dx, dw, dbias, *dinit = pallas_call(
        kernel, out_shape=tuple(shapes), grid=grid, input_output_aliases=aliases,
        compiler_params=_params(config), interpret=interpret,
        name="bjax_causal_conv1d_backward")(*operands)
    return dx, dw.sum(axis=0), dbias.sum(axis=0), (dinit[0] if dinit else None)


def _step_kernel(state_ref, x_ref, w_ref, bias_ref, y_ref, new_state_ref, *, activation,
                 config):
    taps, channels = w_ref.shape[0], x_ref.shape[1]
    cols, col_mask = _program_cols(channels, config)
    batch = pl.program_id(1)
    history = [load(state_ref.at[batch, jnp.int32(j), cols], col_mask) for j in range(taps - 1)]
    x_t = load(x_ref.at[batch, cols], col_mask)
    u = _tap(bias_ref, None, cols, col_mask)
    for j, value in enumerate([*history, x_t]):
        u = u + _tap(w_ref, j, cols, col_mask) * value.astype(jnp.float32)
    plgpu.store(y_ref.at[batch, cols], activate(u, activation).astype(y_ref.dtype),
                mask=col_mask)
    for j, value in enumerate([*history[1:], x_t]):
        plgpu.store(new_state_ref.at[batch, jnp.int32(j), cols],
                    value.astype(new_state_ref.dtype), mask=col_mask)


@functools.partial(jax.jit, static_argnames=_STATIC)
def step(state, x, w, bias, *, activation, config: ConvConfig, interpret=False):
    """``(y [b, d]`` in x's dtype, ``new_state [b, k - 1, d])``: the state written in place
    (aliased to the result; donated by the caller, no copy)."""
    batch, channels = x.shape
    kernel = functools.partial(_step_kernel, activation=activation, config=config)
    return pallas_call(
        kernel, out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype),
                           jax.ShapeDtypeStruct(state.shape, state.dtype)),
        grid=(pl.cdiv(channels, config.block_d), batch), input_output_aliases={0: 1},
        compiler_params=_params(config), interpret=interpret,
        name="bjax_causal_conv1d_step")(state, x, w, bias)
