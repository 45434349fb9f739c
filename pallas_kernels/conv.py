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

* :func:`forward`: one program per ``[block_l, block_d]`` tile of ``y`` reads ``k``
  row-shifted tiles of ``x`` (one from memory, the rest from cache).
* :func:`backward`: a tile cannot shift its rows, and ``dx[s]`` needs ``du`` of the
  ``k - 1`` rows after ``s``. One program walks ``lanes`` pieces of ``piece`` rows side
  by side, one row of each a step, carrying the last ``k - 1`` rows of ``x`` and of
  pending ``dx`` in registers, so that ``act'`` is evaluated once a row; each piece
  runs ``k - 1`` rows past its end (recomputing ``du`` there) to finish its last rows.
  ``dw`` and ``dbias`` come out per program, summed by the caller.
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

from pallas_kernels.blocks import all_of, load, pallas_call
from pallas_kernels.formulas.conv import activate, activation_grad

# Programs to launch at least, so that small problems still fill a GPU.
_MIN_PROGRAMS = 512


@dataclasses.dataclass(frozen=True)
class ConvConfig:
    """Launch configuration of the convolution kernels.

    Attributes:
      block_l: forward: rows of ``y`` per program.
      block_d: channels per program (forward, backward and step).
      block_lanes: backward: pieces of the sequence a program walks side by side.
      piece_len: backward: rows of each piece (more rows: less recomputation past
        each piece's end, fewer programs).
      num_warps: warps per program.
    """
    block_l: int = 16
    block_d: int = 256
    block_lanes: int = 4
    piece_len: int = 64
    num_warps: int = 4


def default_config(batch: int, length: int, channels: int) -> ConvConfig:
    """Tiles of 4096 elements forward, 1024 lanes x channels backward, 256 channels wide
    when the channels allow, shrunk along the sequence until the grid fills the GPU."""
    block_d = min(256, pl.next_power_of_2(max(channels, 1)))
    block_l = max(1, 4096 // block_d)
    lanes, piece = max(1, 1024 // block_d), 64
    grid_d = batch * pl.cdiv(channels, block_d)
    while block_l > 1 and grid_d * pl.cdiv(length, block_l) < _MIN_PROGRAMS:
        block_l //= 2
    while piece > 8 and grid_d * pl.cdiv(length, lanes * piece) < _MIN_PROGRAMS:
        piece //= 2
    block_l = min(block_l, pl.next_power_of_2(max(length, 1)))
    return ConvConfig(block_l, block_d, lanes, piece, num_warps=4)


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


def _forward_kernel(*refs, has_init, has_seq, activation, config):
    x_ref, w_ref, bias_ref, init_ref, seq_ref, (y_ref,) = _operands(refs, has_init, has_seq)
    taps, (_, length, channels) = w_ref.shape[0], x_ref.shape
    cols, col_mask = _program_cols(channels, config)
    batch = pl.program_id(2)
    rows = _Rows(x_ref, init_ref, seq_ref, batch, cols, col_mask, taps)
    t = pl.program_id(1) * config.block_l + jnp.arange(config.block_l, dtype=jnp.int32)
    seq_t = rows.seq(t)
    u = jnp.broadcast_to(_tap(bias_ref, None, cols, col_mask)[None, :],
                         (config.block_l, config.block_d))
    for j in range(taps):
        source = t - (taps - 1) + j
        tap = _tap(w_ref, j, cols, col_mask)[None, :]
        u = u + tap * _keep(rows.x(source), _same(rows.seq(source), seq_t))
    rows.write(y_ref, t, t < length, activate(u, activation))


def _backward_kernel(*refs, has_init, has_seq, activation, config):
    x_ref, w_ref, bias_ref, init_ref, seq_ref, rest = _operands(refs, has_init, has_seq)
    dy_ref, dx_ref, dw_ref, dbias_ref, *dinit_ref = rest
    taps, (_, length, channels) = w_ref.shape[0], x_ref.shape
    cols, col_mask = _program_cols(channels, config)
    batch = pl.program_id(2)
    rows = _Rows(x_ref, init_ref, seq_ref, batch, cols, col_mask, taps)
    lanes, piece = config.block_lanes, config.piece_len
    starts = pl.program_id(1) * (lanes * piece) + jnp.arange(lanes, dtype=jnp.int32) * piece
    w = [_tap(w_ref, j, cols, col_mask)[None, :] for j in range(taps)]
    bias = _tap(bias_ref, None, cols, col_mask)[None, :]
    zeros = jnp.zeros((lanes, config.block_d), jnp.float32)

    def store_finished(row, value):
        """Row ``row`` of dx (those of this piece) or of dinit (before the start)."""
        rows.write(dx_ref, row, (row >= starts) & (row < starts + piece) & (row < length),
                   value)
        if dinit_ref:
            rows.write(dinit_ref[0], row + taps - 1, (row < 0) & (starts == 0), value)

    def step(i, carry, accumulate):
        window, window_seq, pending, dw, dbias = carry
        t = starts + i
        x_t, seq_t = rows.x(t), rows.seq(t)
        same = ([_same(s, seq_t) for s in window_seq] if seq_t is not None
                else [None] * (taps - 1)) + [None]
        sources = [_keep(v, m) for v, m in zip(window, same)] + [x_t]
        u = bias
        for tap, source in zip(w, sources):
            u = u + tap * source
        du = activation_grad(u, rows.read(dy_ref, t), activation)
        if accumulate:
            dw = [acc + du * source for acc, source in zip(dw, sources)]
            dbias = dbias + du
        pending = [p + _keep(tap * du, m) for p, tap, m in zip([*pending, zeros], w, same)]
        store_finished(t - (taps - 1), pending[0])
        window_seq = window_seq if seq_t is None else [*window_seq[1:], seq_t]
        return [*window[1:], x_t], window_seq, pending[1:], dw, dbias

    first = [starts - (taps - 1) + m for m in range(taps - 1)]
    window = [rows.x(r) for r in first]
    window_seq = [] if seq_ref is None else [rows.seq(r) for r in first]
    carry = (window, window_seq, [zeros] * (taps - 1), [zeros] * taps, zeros)
    carry = jax.lax.fori_loop(0, piece, functools.partial(step, accumulate=True), carry)
    carry = jax.lax.fori_loop(piece, piece + taps - 1, functools.partial(step, accumulate=False),
                              carry)
    _, _, _, dw, dbias = carry
    program = pl.program_id(2) * pl.num_programs(1) + pl.program_id(1)
    for j in range(taps):
        plgpu.store(dw_ref.at[program, jnp.int32(j), cols], dw[j].sum(axis=0), mask=col_mask)
    plgpu.store(dbias_ref.at[program, cols], dbias.sum(axis=0), mask=col_mask)


def _params(config):
    return plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1)


def _with_out(kernel, operands, out, results: int):
    """``(kernel, operands, aliases)``; with ``out`` given, the first result is written
    into it (aliased, in place: tests poison it)."""
    if out is None:
        return kernel, operands, {}

    def body(*refs):   # skip the aliased input
        inputs, outputs = refs[:len(operands)], refs[len(operands) + 1:]
        return kernel(*inputs, *outputs)
    return body, (*operands, out), {len(operands): 0}


def _optional(init, seq):
    return tuple(v for v in (init, None if seq is None else seq.astype(jnp.int32))
                 if v is not None)


_STATIC = ("activation", "config", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def forward(x, w, bias, init, seq, *, activation, config: ConvConfig, interpret=False,
            out=None):
    """``y [b, l, d]`` in x's dtype (module doc); ``init`` ``[b, k - 1, d]`` and ``seq``
    ``[b, l]`` may be None; written into ``out`` if given."""
    batch, length, channels = x.shape
    kernel = functools.partial(_forward_kernel, has_init=init is not None,
                               has_seq=seq is not None, activation=activation, config=config)
    kernel, operands, aliases = _with_out(kernel, (x, w, bias, *_optional(init, seq)), out, 1)
    return pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(pl.cdiv(channels, config.block_d), pl.cdiv(length, config.block_l), batch),
        input_output_aliases=aliases, compiler_params=_params(config), interpret=interpret,
        name="bjax_causal_conv1d_forward")(*operands)


@functools.partial(jax.jit, static_argnames=_STATIC)
def backward(x, w, bias, init, seq, dy, *, activation, config: ConvConfig, interpret=False,
             out=None):
    """``(dx [b, l, d]`` in x's dtype, ``dw [k, d]``, ``dbias [d]`` (float32), ``dinit``
    in init's dtype, or None without init); dx written into ``out`` if given."""
    batch, length, channels = x.shape
    taps = w.shape[0]
    per_program = config.block_lanes * config.piece_len
    grid = (pl.cdiv(channels, config.block_d), pl.cdiv(length, per_program), batch)
    programs = grid[1] * batch
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype),
              jax.ShapeDtypeStruct((programs, taps, channels), jnp.float32),
              jax.ShapeDtypeStruct((programs, channels), jnp.float32)]
    if init is not None:
        shapes.append(jax.ShapeDtypeStruct(init.shape, init.dtype))
    kernel = functools.partial(_backward_kernel, has_init=init is not None,
                               has_seq=seq is not None, activation=activation, config=config)
    kernel, operands, aliases = _with_out(kernel, (x, w, bias, *_optional(init, seq), dy), out,
                                          len(shapes))
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
