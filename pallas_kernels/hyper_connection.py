"""mHC stream kernels over ``x [rows, n, C]`` (n residual streams of C channels).

* :func:`fused_forward` / :func:`fused_backward`: the fused static op (``bjax.hyper_connection``),
  ``out_i = sum_j M_ij x_j + s_post_i y`` with ``y = RMSNorm(sum_i s_pre_i x_i) * w``.
* :func:`mix` / :func:`mix_backward`: ``out_i = sum_j R_ij x_j + h_post_i f``, with
  per-row coefficients (``mhc_post``).
* :func:`aggregate` / :func:`aggregate_backward`: ``sum_i h_pre_i x_i`` per row (``mhc_pre``).
* :func:`project`, :func:`project_input_grad`, :func:`project_weight_grad`: ``x phi``
  over the flattened row and its sum of squares (dynamic coefficients), and the
  gradients of x and phi; the products on bfloat16 tensor cores over exact bfloat16
  pieces (``blocks.split_bf16``), so float32-exact, accumulated in float32.

Every kernel unrolls the ``n`` streams (``n`` is static): stream ``j`` is a
``[block_rows, block_cols]`` tile of ``x[:, j, :]``, so x is read once per pass
and the mixes are ``n^2`` fused multiply-adds per element. Sums over channels
that feed a per-row (or per-program) gradient are written as partial sums, one
per column tile (or row block), and reduced by the caller: no atomics, so every
result is deterministic. Math is float32.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.blocks import (bf16_pieces, columns, load, padded, pallas_call, rows_cols,
                                   split_bf16, split_dot)
from pallas_kernels.sinkhorn import SinkhornConfig
from pallas_kernels.sinkhorn import default_config as sinkhorn_default_config
from pallas_kernels.tiling import TileConfig, fit_tile, tile_search_space

# Elements a program holds across its streams (x tiles), and programs to launch at least.
_PROGRAM_ELEMENTS = 16384
_MIN_PROGRAMS = 264


def stream_config(rows: int, n: int, hidden: int, tiles_per_stream: int = 1) -> TileConfig:
    """``[block_rows, block_cols]`` per stream tile for kernels over ``(row blocks, column
    tiles)``, ``tiles_per_stream`` arrays of n streams live at once."""
    per_stream = max(128, _PROGRAM_ELEMENTS // (pl.next_power_of_2(n) * tiles_per_stream))
    return fit_tile(rows, hidden, tile_elements=per_stream, min_programs=_MIN_PROGRAMS)


def row_config(rows: int, n: int, hidden: int) -> TileConfig:
    """Tiles for the fused op's row kernels: a program owns whole rows, walking C in
    ``block_cols`` pieces (one piece when a row fits, so x is read once)."""
    per_stream = max(128, _PROGRAM_ELEMENTS // pl.next_power_of_2(n))
    block_cols = min(pl.next_power_of_2(hidden), per_stream)
    block_rows = min(pl.next_power_of_2(rows), max(1, per_stream // block_cols))
    while block_rows > 1 and pl.cdiv(rows, block_rows) < _MIN_PROGRAMS:
        block_rows //= 2
    cells = pl.next_power_of_2(n) * block_rows * block_cols
    # 8 warps on 16K-cell tiles: 84% of copy on an H200 (16 warps: 67%, 4: 82%).
    return TileConfig(block_rows, block_cols, 8 if cells >= 4096 else 4)


def _params(config: TileConfig, num_stages: int = 1):
    return plgpu.CompilerParams(num_warps=config.num_warps, num_stages=num_stages)


def _at(*index):
    """A ref index with static ints as int32 scalars (what the Pallas indexers take)."""
    return tuple(jnp.int32(i) if isinstance(i, int) else i for i in index)


class _Tile:
    """Row and column slices and masks of the ``[block_rows, block_cols]`` tile at
    ``(row_start, col_start)`` of a ``[rows, hidden]`` plane."""

    def __init__(self, rows, hidden, row_start, col_start, config):
        self.rows, self.row_mask = columns(rows, row_start, config.block_rows)
        self.cols, self.col_mask = columns(hidden, col_start, config.block_cols)
        self.mask = rows_cols(self.row_mask, self.col_mask)

    def streams(self, ref, n):
        """The n stream tiles of ``ref [rows, n, hidden]``, float32."""
        return [load(ref.at[_at(self.rows, j, self.cols)], self.mask).astype(jnp.float32)
                for j in range(n)]

    def plane(self, ref):
        """The tile of ``ref [rows, hidden]``, float32."""
        return load(ref.at[self.rows, self.cols], self.mask).astype(jnp.float32)

    def per_row(self, ref, *index):
        """``ref[rows, *index]`` as a ``[block_rows, 1]`` column, float32."""
        return load(ref.at[_at(self.rows, *index)], self.row_mask).astype(jnp.float32)[:, None]

    def store(self, ref, value, *index):
        """Stores ``value`` into ``ref[rows, *index, cols]``."""
        plgpu.store(ref.at[_at(self.rows, *index, self.cols)], value.astype(ref.dtype),
                    mask=self.mask)

    def store_per_row(self, ref, value, *index):
        """Stores a ``[block_rows]`` vector into ``ref[rows, *index]``."""
        plgpu.store(ref.at[_at(self.rows, *index)], value, mask=self.row_mask)


def _weighted_sum(weights, tiles):
    return functools.reduce(jnp.add, [w * t for w, t in zip(weights, tiles)])


def _program_tile(rows, hidden, config):
    return _Tile(rows, hidden, pl.program_id(0) * config.block_rows,
                 pl.program_id(1) * config.block_cols, config)


# ---------------------------------------------------------------- the fused static op

def _fused_forward_kernel(x_ref, w_ref, pre_ref, post_ref, mix_ref, out_ref, *, n, rows, hidden,
                          eps, config):
    pre = [pre_ref[_at(j)] for j in range(n)]
    post = [post_ref[_at(i)] for i in range(n)]
    mix = [[mix_ref[_at(i, j)] for j in range(n)] for i in range(n)]
    row_start = pl.program_id(0) * config.block_rows

    def tile_at(k):
        tile = _Tile(rows, hidden, row_start, k * config.block_cols, config)
        xs = tile.streams(x_ref, n)
        return tile, xs, _weighted_sum(pre, xs)

    def emit(tile, xs, agg, rstd):
        y = agg * rstd * load(w_ref.at[tile.cols], tile.col_mask).astype(jnp.float32)[None, :]
        for i in range(n):
            tile.store(out_ref, _weighted_sum(mix[i], xs) + post[i] * y, i)

    pieces = pl.cdiv(hidden, config.block_cols)
    if pieces == 1:  # a row fits: read x once
        tile, xs, agg = tile_at(0)
        emit(tile, xs, agg, jax.lax.rsqrt(jnp.sum(agg * agg, axis=1, keepdims=True) / hidden + eps))
        return

    def square_sum(k, acc):
        _, _, agg = tile_at(k)
        return acc + jnp.sum(agg * agg, axis=1, keepdims=True)

    total = jax.lax.fori_loop(jnp.int32(0), jnp.int32(pieces), square_sum,
                              jnp.zeros((config.block_rows, 1), jnp.float32))
    rstd = jax.lax.rsqrt(total / hidden + eps)

    def write(k, carry):
        emit(*tile_at(k), rstd)
        return carry

    jax.lax.fori_loop(jnp.int32(0), jnp.int32(pieces), write, 0)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def fused_forward(x, weight, s_pre, s_post, mix_matrix, *, eps: float, interpret: bool = False):
    """``out [rows, n, C]`` in x's dtype; ``s_pre``, ``s_post`` ``[n]`` and ``mix_matrix``
    ``[n, n]`` float32 (after their sigmoid / Sinkhorn)."""
    rows, n, hidden = x.shape
    config = row_config(rows, n, hidden)
    kernel = functools.partial(_fused_forward_kernel, n=n, rows=rows, hidden=hidden, eps=eps,
                               config=config)
    return pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(pl.cdiv(rows, config.block_rows),), compiler_params=_params(config),
        interpret=interpret, name="bjax_hyper_connection")(x, weight, s_pre, s_post, mix_matrix)


def _row_terms_kernel(x_ref, dout_ref, w_ref, pre_ref, post_ref, rstd_ref, slope_ref, *, n, rows,
                      hidden, eps, config):
    pre = [pre_ref[_at(j)] for j in range(n)]
    post = [post_ref[_at(i)] for i in range(n)]
    row_start = pl.program_id(0) * config.block_rows

    def piece(k, carry):
        squares, dot_g = carry
        tile = _Tile(rows, hidden, row_start, k * config.block_cols, config)
        agg = _weighted_sum(pre, tile.streams(x_ref, n))
        g = (_weighted_sum(post, tile.streams(dout_ref, n))
             * load(w_ref.at[tile.cols], tile.col_mask).astype(jnp.float32)[None, :])
        return squares + jnp.sum(agg * agg, axis=1), dot_g + jnp.sum(g * agg, axis=1)

    zeros = jnp.zeros((config.block_rows,), jnp.float32)
    squares, dot_g = jax.lax.fori_loop(jnp.int32(0), jnp.int32(pl.cdiv(hidden, config.block_cols)),
                                       piece, (zeros, zeros))
    rstd = jax.lax.rsqrt(squares / hidden + eps)
    tile = _Tile(rows, hidden, row_start, 0, config)
    tile.store_per_row(rstd_ref, rstd)
    tile.store_per_row(slope_ref, rstd * rstd * rstd * dot_g / hidden)


def _fused_grads_kernel(x_ref, dout_ref, w_ref, pre_ref, post_ref, mix_ref, rstd_ref, slope_ref,
                        dx_ref, dw_ref, stats_ref, *, n, rows, hidden, config):
    pre = [pre_ref[_at(j)] for j in range(n)]
    post = [post_ref[_at(i)] for i in range(n)]
    tile = _program_tile(rows, hidden, config)
    xs, douts = tile.streams(x_ref, n), tile.streams(dout_ref, n)
    w = load(w_ref.at[tile.cols], tile.col_mask).astype(jnp.float32)[None, :]
    rstd, slope = tile.per_row(rstd_ref), tile.per_row(slope_ref)
    agg, dy = _weighted_sum(pre, xs), _weighted_sum(post, douts)
    normed = agg * rstd
    dagg = rstd * w * dy - slope * agg  # RMSNorm's backward: slope = rstd^3 <g, agg> / C
    for j in range(n):
        column = [mix_ref[_at(i, j)] for i in range(n)]
        tile.store(dx_ref, _weighted_sum(column, douts) + pre[j] * dagg, j)
    plgpu.store(dw_ref.at[pl.program_id(0), tile.cols], jnp.sum(dy * normed, axis=0),
                mask=tile.col_mask)
    place = (pl.program_id(0), pl.program_id(1))
    for i in range(n):
        for j in range(n):
            stats_ref[_at(*place, i * n + j)] = jnp.sum(douts[i] * xs[j])
        stats_ref[_at(*place, n * n + i)] = jnp.sum(douts[i] * normed * w)
        stats_ref[_at(*place, n * n + n + i)] = jnp.sum(dagg * xs[i])


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def fused_backward(x, dout, weight, s_pre, s_post, mix_matrix, *, eps: float,
                   interpret: bool = False):
    """``(dx, dw, d_mix [n, n], d_s_post [n], d_s_pre [n])`` of :func:`fused_forward`
    (float32 but dx, in x's dtype)."""
    rows, n, hidden = x.shape
    rows_conf = row_config(rows, n, hidden)
    kernel = functools.partial(_row_terms_kernel, n=n, rows=rows, hidden=hidden, eps=eps,
                               config=rows_conf)
    row_vector = jax.ShapeDtypeStruct((rows,), jnp.float32)
    rstd, slope = pallas_call(
        kernel, out_shape=(row_vector, row_vector), grid=(pl.cdiv(rows, rows_conf.block_rows),),
        compiler_params=_params(rows_conf), interpret=interpret,
        name="bjax_hyper_connection_row_terms")(x, dout, weight, s_pre, s_post)
    config = stream_config(rows, n, hidden, tiles_per_stream=2)
    grid = (pl.cdiv(rows, config.block_rows), pl.cdiv(hidden, config.block_cols))
    kernel = functools.partial(_fused_grads_kernel, n=n, rows=rows, hidden=hidden, config=config)
    dx, dw, stats = pallas_call(
        kernel, out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype),
                           jax.ShapeDtypeStruct((grid[0], hidden), jnp.float32),
                           jax.ShapeDtypeStruct((*grid, n * n + 2 * n), jnp.float32)),
        grid=grid, compiler_params=_params(config), interpret=interpret,
        name="bjax_hyper_connection_grads")(x, dout, weight, s_pre, s_post, mix_matrix, rstd, slope)
    stats = jnp.sum(stats, axis=(0, 1))
    return (dx, jnp.sum(dw, axis=0), stats[:n * n].reshape(n, n), stats[n * n:n * n + n],
            stats[n * n + n:])


# ---------------------------------------------------------------- mhc_post: the stream mix

def _mix_kernel(x_ref, f_ref, post_ref, res_ref, out_ref, *, n, rows, hidden, transpose, config):
    tile = _program_tile(rows, hidden, config)
    xs, f = tile.streams(x_ref, n), tile.plane(f_ref)
    for i in range(n):
        weights = [tile.per_row(res_ref, j, i) if transpose else tile.per_row(res_ref, i, j)
                   for j in range(n)]
        tile.store(out_ref, _weighted_sum(weights, xs) + tile.per_row(post_ref, i) * f, i)


def mix_config(rows: int, n: int, hidden: int) -> TileConfig:
    """Tiles of :func:`mix`: ``[block_rows, block_cols]`` of each stream (:func:`stream_config`)."""
    return stream_config(rows, n, hidden)


def mix_backward_config(rows: int, n: int, hidden: int) -> TileConfig:
    """Tiles of :func:`mix_backward`: narrow ones, since the ``n^2 + n`` row sums per tile
    cost less (an H200 sweep: 4 x 256 on 4 warps, 17% faster than 2 x 1024)."""
    return fit_tile(rows, hidden, tile_elements=max(128, 4096 // pl.next_power_of_2(n)),
                    min_programs=_MIN_PROGRAMS, max_block_cols=256)


def mix_search_space(rows: int, n: int, hidden: int, *,
                     backward: bool = False) -> tuple[TileConfig, ...]:
    """The tiles the tuner tries (``bjax.tune``) for :func:`mix`: those of
    :func:`stream_search_space`, whose heuristic it shares; with ``backward``, for
    :func:`mix_backward`, the same up to 8192 cells (it holds x and dout)."""
    if not backward:
        return stream_search_space(rows, n, hidden)
    return tile_search_space(rows, hidden, min_elements=1024, max_elements=8192,
                             cell=pl.next_power_of_2(n))


@dataclasses.dataclass(frozen=True)
class MixConfig:
    """Tiles of ``mhc_post``'s forward and backward kernels; ``None``: that one's heuristic
    (:func:`mix_config`, :func:`mix_backward_config`)."""
    forward: TileConfig | None = None
    backward: TileConfig | None = None


@functools.partial(jax.jit, static_argnames=("transpose", "config", "interpret"))
def mix(x, f_out, h_post, h_res, *, transpose: bool, config: TileConfig | None = None,
        interpret: bool = False):
    """``out [rows, n, C]`` (x's dtype): ``sum_j R_ij x_j + h_post_i f_out`` per row, ``R`` =
    ``h_res [rows, n, n]`` or its transpose; tiles ``config`` (default :func:`mix_config`)."""
    rows, n, hidden = x.shape
    config = config or mix_config(rows, n, hidden)
    kernel = functools.partial(_mix_kernel, n=n, rows=rows, hidden=hidden, transpose=transpose,
                               config=config)
    return pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(pl.cdiv(rows, config.block_rows), pl.cdiv(hidden, config.block_cols)),
        compiler_params=_params(config), interpret=interpret,
        name="bjax_mhc_post")(x, f_out, h_post, h_res)


def _mix_backward_kernel(x_ref, f_ref, post_ref, res_ref, dout_ref, dx_ref, df_ref, stats_ref, *,
                         n, rows, hidden, transpose, config):
    tile = _program_tile(rows, hidden, config)
    xs, douts, f = tile.streams(x_ref, n), tile.streams(dout_ref, n), tile.plane(f_ref)
    column = pl.program_id(1)
    for j in range(n):
        weights = [tile.per_row(res_ref, j, i) if transpose else tile.per_row(res_ref, i, j)
                   for i in range(n)]
        tile.store(dx_ref, _weighted_sum(weights, douts), j)
    tile.store(df_ref, _weighted_sum([tile.per_row(post_ref, i) for i in range(n)], douts))
    for i in range(n):
        for j in range(n):
            cell = j * n + i if transpose else i * n + j
            tile.store_per_row(stats_ref, jnp.sum(douts[i] * xs[j], axis=1), column, cell)
        tile.store_per_row(stats_ref, jnp.sum(douts[i] * f, axis=1), column, n * n + i)


@functools.partial(jax.jit, static_argnames=("transpose", "config", "interpret"))
def mix_backward(x, f_out, h_post, h_res, dout, *, transpose: bool,
                 config: TileConfig | None = None, interpret: bool = False):
    """``(dx, df_out, dh_post [rows, n], dh_res [rows, n, n])`` of :func:`mix` (the
    coefficient gradients float32); tiles ``config`` (default :func:`mix_backward_config`)."""
    rows, n, hidden = x.shape
    config = config or mix_backward_config(rows, n, hidden)
    grid = (pl.cdiv(rows, config.block_rows), pl.cdiv(hidden, config.block_cols))
    kernel = functools.partial(_mix_backward_kernel, n=n, rows=rows, hidden=hidden,
                               transpose=transpose, config=config)
    dx, df, stats = pallas_call(
        kernel, out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype),
                           jax.ShapeDtypeStruct(f_out.shape, f_out.dtype),
                           jax.ShapeDtypeStruct((rows, grid[1], n * n + n), jnp.float32)),
        grid=grid, compiler_params=_params(config), interpret=interpret,
        name="bjax_mhc_post_backward")(x, f_out, h_post, h_res, dout)
    stats = jnp.sum(stats, axis=1)
    return dx, df, stats[:, n * n:], stats[:, :n * n].reshape(rows, n, n)


# ---------------------------------------------------------------- mhc_pre: aggregate, projection

def _aggregate_kernel(x_ref, pre_ref, out_ref, *, n, rows, hidden, config):
    tile = _program_tile(rows, hidden, config)
    tile.store(out_ref, _weighted_sum([tile.per_row(pre_ref, i) for i in range(n)],
                                      tile.streams(x_ref, n)))


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def aggregate(x, h_pre, *, config: TileConfig | None = None, interpret: bool = False):
    """``sum_i h_pre[:, i] x[:, i, :]``: ``[rows, C]`` in x's dtype; tiles ``config``
    (default :func:`stream_config`)."""
    rows, n, hidden = x.shape
    config = config or stream_config(rows, n, hidden)
    kernel = functools.partial(_aggregate_kernel, n=n, rows=rows, hidden=hidden, config=config)
    return pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((rows, hidden), x.dtype),
        grid=(pl.cdiv(rows, config.block_rows), pl.cdiv(hidden, config.block_cols)),
        compiler_params=_params(config), interpret=interpret, name="bjax_mhc_pre")(x, h_pre)


def _aggregate_backward_kernel(x_ref, pre_ref, dout_ref, *out_refs, n, rows, hidden, with_dx,
                               config):
    stats_ref = out_refs[-1]
    tile = _program_tile(rows, hidden, config)
    xs, dout = tile.streams(x_ref, n), tile.plane(dout_ref)
    for i in range(n):
        if with_dx:
            tile.store(out_refs[0], tile.per_row(pre_ref, i) * dout, i)
        tile.store_per_row(stats_ref, jnp.sum(dout * xs[i], axis=1), pl.program_id(1), i)


@functools.partial(jax.jit, static_argnames=("with_dx", "config", "interpret"))
def aggregate_backward(x, h_pre, dout, *, with_dx: bool, config: TileConfig | None = None,
                       interpret: bool = False):
    """``dh_pre [rows, n]`` float32 of :func:`aggregate`, after ``dx`` (x's dtype) when
    ``with_dx``; tiles ``config`` (default :func:`stream_config`)."""
    rows, n, hidden = x.shape
    config = config or stream_config(rows, n, hidden)
    grid = (pl.cdiv(rows, config.block_rows), pl.cdiv(hidden, config.block_cols))
    kernel = functools.partial(_aggregate_backward_kernel, n=n, rows=rows, hidden=hidden,
                               with_dx=with_dx, config=config)
    out_shape = [jax.ShapeDtypeStruct((rows, grid[1], n), jnp.float32)]
    if with_dx:
        out_shape.insert(0, jax.ShapeDtypeStruct(x.shape, x.dtype))
    outs = pallas_call(kernel, out_shape=out_shape, grid=grid, compiler_params=_params(config),
                          interpret=interpret, name="bjax_mhc_pre_backward")(x, h_pre, dout)
    dh_pre = jnp.sum(outs[-1], axis=1)
    return (outs[0], dh_pre) if with_dx else dh_pre


# Shared memory a software-pipelined loop may fill (an H100 or H200 has 227 KiB).
_PIPELINE_BYTES = 180 * 1024
# Programs of the projection: 4 for each of an H200's 132 SMs.
_PROJECTION_PROGRAMS = 528


def weight_grad_config(rows: int, flat: int, width: int) -> TileConfig:
    """Tiles of :func:`project_weight_grad`: ``block_rows`` tokens a step (unpipelined: the
    fastest in the H200 sweep) by ``block_cols`` rows of phi."""
    block_cols = min(128, max(16, pl.next_power_of_2(flat)), max(16, 4096 // width))
    return TileConfig(min(32, max(16, pl.next_power_of_2(rows))), block_cols, 4)


@dataclasses.dataclass(frozen=True)
class ProjectionConfig:
    """Launch configuration of :func:`project`: a program owns ``block_rows`` rows and
    ``block_width`` of phi's stacked piece columns, and sums ``block_cols`` of the
    flattened row a step over its share of the row (one of ``splits``), in a loop of
    ``num_stages`` software-pipeline stages."""
    block_rows: int
    block_cols: int
    block_width: int
    splits: int
    num_warps: int
    num_stages: int


def projection_config(rows: int, flat: int, width: int, dtype) -> ProjectionConfig:
    """:class:`ProjectionConfig` for ``x_flat [rows, flat]`` of ``dtype`` against ``width``
    stacked columns: 64 x 64 tiles of x against up to 256 columns, 3 pipeline stages, and
    the row split until ``_PROJECTION_PROGRAMS`` run (DeepSeek-V3's 8192 x 4 x 7168 has 128
    row blocks). An H200 sweep at 8192 x 4 x 7168 and 16384 x 4 x 2560 bf16 put these tiles
    first, with x taken as loaded (withdrawn since, see :func:`project`); with the round
    trip, at 8192 x 4 x 7168, 0.30 ms against 0.37 for 128-row tiles and 10 splits
    (BENCHMARKS.md, mHC). No wider sweep of the round trip yet."""
    block_width = min(width, 256)
    block_rows = min(64, max(16, pl.next_power_of_2(rows)))
    block_cols = 64
    programs = pl.cdiv(rows, block_rows) * (width // block_width)
    steps = pl.cdiv(flat, block_cols)
    splits = max(1, min(steps, pl.cdiv(_PROJECTION_PROGRAMS, programs)))
    itemsize = jnp.dtype(dtype).itemsize
    stage_bytes = block_rows * block_cols * itemsize + block_cols * block_width * 2
    return ProjectionConfig(block_rows, block_cols, block_width, splits,
                            8 if block_rows * block_width >= 16384 else 4,
                            max(1, min(3, _PIPELINE_BYTES // stage_bytes)))


@dataclasses.dataclass(frozen=True)
class PreConfig:
    """Launch configurations of ``mhc_pre``'s kernels; ``None``: that one's heuristic.

    Attributes:
      projection: :func:`project` (dynamic H), :func:`projection_config`.
      aggregate: :func:`aggregate`, :func:`stream_config`.
      aggregate_backward: :func:`aggregate_backward`, :func:`stream_config`.
      input_grad: :func:`project_input_grad` (dynamic H), :func:`input_grad_config`.
      weight_grad: :func:`project_weight_grad` (dynamic H), :func:`weight_grad_config`.
      sinkhorn: the Sinkhorn kernels of the coefficients; ``None``: ``sinkhorn_knopp``'s
        tuned entry for those matrices (``bjax.tune sinkhorn_knopp``), else
        :func:`pallas_kernels.sinkhorn.default_config`.
    """
    projection: ProjectionConfig | None = None
    aggregate: TileConfig | None = None
    aggregate_backward: TileConfig | None = None
    input_grad: TileConfig | None = None
    weight_grad: TileConfig | None = None
    sinkhorn: SinkhornConfig | None = None


def pre_config(rows: int, n: int, hidden: int, count: int, dtype) -> PreConfig:
    """Every heuristic of ``mhc_pre``'s kernels for ``x [rows, n, hidden]`` of ``dtype``
    and ``count`` coefficients (the projection's fields only matter with dynamic H)."""
    stream = stream_config(rows, n, hidden)
    width = stacked_width(count)
    return PreConfig(projection_config(rows, n * hidden, width, dtype), stream, stream,
                     input_grad_config(rows, hidden),
                     weight_grad_config(rows, n * hidden, max(16, pl.next_power_of_2(count))),
                     sinkhorn_default_config(rows, n))


def projection_search_space(rows: int, flat: int, width: int, dtype) -> tuple:
    """The projection configs the tuner tries: 64 or 128 rows by 64 or 128 columns, the
    heuristic's split count and twice it, 4 or 8 warps, 2 or 3 stages."""
    base = projection_config(rows, flat, width, dtype)
    return tuple(dataclasses.replace(base, block_rows=block_rows, block_cols=block_cols,
                                     splits=splits, num_warps=warps, num_stages=stages)
                 for block_rows in (64, 128) for block_cols in (64, 128)
                 for splits in dict.fromkeys((base.splits, 2 * base.splits))
                 for warps in (4, 8) for stages in (2, 3))


def stream_search_space(rows: int, n: int, hidden: int) -> tuple[TileConfig, ...]:
    """Tiles the tuner tries for :func:`aggregate` and :func:`aggregate_backward` (all n
    streams of a tile live at once): 1024 to 16384 cells over the streams, 4 or 8 warps."""
    return tile_search_space(rows, hidden, min_elements=1024, max_elements=16384,
                             cell=pl.next_power_of_2(n))


def input_grad_search_space(rows: int, hidden: int) -> tuple[TileConfig, ...]:
    """Tiles the tuner tries for :func:`project_input_grad` (one stream at a time): 1024 to
    16384 elements, up to 256 columns, 4 or 8 warps."""
    return tile_search_space(rows, hidden, min_elements=1024, max_elements=16384,
                             max_block_cols=256)


def weight_grad_search_space() -> tuple[TileConfig, ...]:
    """Tiles the tuner tries for :func:`project_weight_grad`: 16 to 64 tokens a step by 32
    to 128 rows of phi, 4 or 8 warps."""
    return tuple(TileConfig(block_rows, block_cols, warps) for block_rows in (16, 32, 64)
                 for block_cols in (32, 64, 128) for warps in (4, 8))


def _project_kernel(x_ref, phi_ref, proj_ref, squares_ref, *, rows, flat, steps_per_split,
                    config):
    row_slice, row_mask = columns(rows, pl.program_id(0) * config.block_rows, config.block_rows)
    outs = pl.ds(pl.program_id(1) * config.block_width, config.block_width)
    split = pl.program_id(2)

    # Every split walks steps_per_split steps, those past the row masked (see block_loop).
    # x reaches the tensor cores through split_bf16's float32 round trip even when it is
    # bfloat16: taken as loaded, it made the H200 (JAX 0.11.2, 2 or more pipeline stages)
    # sum 0.3-4% of rows wrong, differently from run to run, at 8192 x 4 x 7168 and
    # 16384 x 4 x 2560, with or without a split row (BENCHMARKS.md, mHC).
    def piece(i, carry):
        acc, squares = carry
        col_start = (split * steps_per_split + i) * config.block_cols
        cols = pl.ds(col_start, config.block_cols)
        col_mask = col_start + jnp.arange(config.block_cols, dtype=jnp.int32) < flat
        x = load(x_ref.at[row_slice, cols], rows_cols(row_mask, col_mask))
        phi = load(phi_ref.at[cols, outs], rows_cols(col_mask, None))
        x32 = x.astype(jnp.float32)
        return (acc + split_dot(split_bf16(x, bf16_pieces(x_ref.dtype)), [phi]),
                squares + x32 * x32)

    # The squares summed cell by cell, reduced over the columns once at the end (faster
    # than a row sum each step).
    acc, squares = jax.lax.fori_loop(
        jnp.int32(0), jnp.int32(steps_per_split), piece,
        (jnp.zeros((config.block_rows, config.block_width), jnp.float32),
         jnp.zeros((config.block_rows, config.block_cols), jnp.float32)))
    plgpu.store(proj_ref.at[_at(split, row_slice, outs)], acc, mask=rows_cols(row_mask, None))

    @pl.when(pl.program_id(1) == 0)  # the squares once, by the first column block
    def _():
        plgpu.store(squares_ref.at[_at(row_slice, split)], jnp.sum(squares, axis=1),
                    mask=row_mask)


def _phi_pieces(phi):
    """float32 ``phi`` as three bfloat16 pieces ``[3, n C, count]`` (exact)."""
    return jnp.stack(split_bf16(phi, 3))


def stacked_phi_pieces(phi):
    """float32 ``phi [n C, count]`` as its three exact bfloat16 pieces side by side,
    ``[n C, width]``: piece ``p`` in columns ``p count .. (p + 1) count - 1``, zeros up to
    a power-of-2 ``width``: one tensor-core product a step instead of three narrow ones
    (as fast on the H200, and a single accumulator)."""
    stacked = jnp.concatenate(split_bf16(phi, 3), axis=1)
    return jnp.pad(stacked, ((0, 0), (0, stacked_width(phi.shape[1]) - stacked.shape[1])))


def stacked_width(count: int) -> int:
    """Columns of :func:`stacked_phi_pieces` for ``count`` columns of phi."""
    return padded(3 * count)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def project(x_flat, phi, *, config: ProjectionConfig | None = None, interpret: bool = False):
    """``(x_flat @ phi [rows, count], sum(x_flat^2, -1) [rows])``, float32, for
    ``x_flat [rows, n C]`` and float32 ``phi [n C, count]``. The products run on bfloat16
    tensor cores over exact bfloat16 pieces of both operands: float32-exact products,
    float32 accumulation, each of phi's pieces and each split of the row
    (:class:`ProjectionConfig`) summed apart, then added in a fixed order."""
    rows, flat = x_flat.shape
    count = phi.shape[1]
    phi_pieces = stacked_phi_pieces(phi)
    width = phi_pieces.shape[1]
    config = config or projection_config(rows, flat, width, x_flat.dtype)
    steps = pl.cdiv(flat, config.block_cols)
    steps_per_split = pl.cdiv(steps, config.splits)
    splits = pl.cdiv(steps, steps_per_split)  # none left without a step
    kernel = functools.partial(_project_kernel, rows=rows, flat=flat,
                               steps_per_split=steps_per_split, config=config)
    proj, squares = pallas_call(
        kernel, out_shape=(jax.ShapeDtypeStruct((splits, rows, width), jnp.float32),
                           jax.ShapeDtypeStruct((rows, splits), jnp.float32)),
        grid=(pl.cdiv(rows, config.block_rows), width // config.block_width, splits),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        interpret=interpret, name="bjax_mhc_projection")(x_flat, phi_pieces)
    proj = jnp.sum(proj, axis=0)
    return sum(proj[:, p * count:(p + 1) * count] for p in range(3)), jnp.sum(squares, axis=1)


def _input_grad_kernel(x_ref, pre_ref, dout_ref, dproj_ref, phi_ref, scale_ref, dx_ref, *, n,
                       rows, hidden, width, count, config):
    tile = _program_tile(rows, hidden, config)
    outs, outs_mask = columns(count, 0, width)
    dout = tile.plane(dout_ref)
    dproj = load(dproj_ref.at[tile.rows, outs], rows_cols(tile.row_mask, outs_mask))
    # One piece more than dx's dtype holds; products of pieces i + j < pieces kept
    # (the dropped ones are below dx's rounding).
    pieces = bf16_pieces(dx_ref.dtype) + 1
    dproj_parts = split_bf16(dproj, pieces)
    x_scale = tile.per_row(scale_ref)
    for i in range(n):
        phi_rows = pl.ds(i * hidden + tile.cols.start, config.block_cols)
        phi = [load(phi_ref.at[_at(p, phi_rows, outs)], rows_cols(tile.col_mask, outs_mask))
               for p in range(phi_ref.shape[0])]
        x = load(x_ref.at[_at(tile.rows, i, tile.cols)], tile.mask).astype(jnp.float32)
        tile.store(dx_ref, tile.per_row(pre_ref, i) * dout
                   + split_dot(dproj_parts, phi, (1, 1), order=pieces) + x_scale * x, i)


def input_grad_config(rows: int, hidden: int) -> TileConfig:
    """Tiles of :func:`project_input_grad`: 64 x 128, 4 warps (an H200 sweep: 2.2x faster
    than 16 x 256 on 8 warps), fewer rows where the tokens are few."""
    config = fit_tile(rows, hidden, tile_elements=8192, min_programs=_MIN_PROGRAMS,
                      max_block_cols=128)
    return TileConfig(config.block_rows, config.block_cols, 4)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def project_input_grad(x, h_pre, dout, dproj, phi, x_scale, *, config: TileConfig | None = None,
                       interpret: bool = False):
    """``dx [rows, n, C]`` (x's dtype) of ``aggregate(x, h_pre)`` and of the dynamic
    coefficients: ``h_pre_i dout + (dproj phi^T)_i + x_scale x_i``, with ``dproj [rows,
    count]`` the gradient of ``x_flat phi`` and ``x_scale [rows]`` that of the sum of
    squares, times 2; tiles ``config`` (default :func:`input_grad_config`)."""
    rows, n, hidden = x.shape
    count = phi.shape[1]
    width = max(16, pl.next_power_of_2(count))
    config = config or input_grad_config(rows, hidden)
    kernel = functools.partial(_input_grad_kernel, n=n, rows=rows, hidden=hidden, width=width,
                               count=count, config=config)
    return pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(pl.cdiv(rows, config.block_rows), pl.cdiv(hidden, config.block_cols)),
        compiler_params=_params(config), interpret=interpret,
        name="bjax_mhc_pre_input_grad")(x, h_pre, dout, dproj, _phi_pieces(phi), x_scale)


def _weight_grad_kernel(x_ref, dproj_ref, out_ref, *, rows, flat, width, count, chunk, config):
    outs, outs_mask = columns(count, 0, width)
    col_start = pl.program_id(0) * config.block_cols
    first_row = pl.program_id(1) * chunk

    def piece(k, acc):
        tile = _Tile(rows, flat, first_row + k * config.block_rows, col_start, config)
        x = load(x_ref.at[tile.rows, tile.cols], tile.mask)
        dproj = load(dproj_ref.at[tile.rows, outs], rows_cols(tile.row_mask, outs_mask))
        pieces = bf16_pieces(x_ref.dtype)
        return acc + split_dot(split_bf16(x, pieces), split_bf16(dproj, 3), (0, 0),
                               order=max(3, pieces))

    acc = jax.lax.fori_loop(jnp.int32(0), jnp.int32(chunk // config.block_rows), piece,
                            jnp.zeros((config.block_cols, width), jnp.float32))
    cols, col_mask = columns(flat, col_start, config.block_cols)
    plgpu.store(out_ref.at[pl.program_id(1), cols, outs], acc,
                mask=rows_cols(col_mask, outs_mask))


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def project_weight_grad(x_flat, dproj, *, config: TileConfig | None = None,
                        interpret: bool = False):
    """``x_flat^T dproj [n C, count]`` float32: the gradient of ``phi`` in
    :func:`project`. Programs own ``block_cols`` rows of phi and a chunk of tokens, walked
    ``block_rows`` tokens a step; the chunks' partial sums are reduced after. Tiles
    ``config`` (default :func:`weight_grad_config`)."""
    rows, flat = x_flat.shape
    count = dproj.shape[1]
    width = max(16, pl.next_power_of_2(count))
    config = config or weight_grad_config(rows, flat, width)
    tiles = pl.cdiv(flat, config.block_cols)
    chunks = max(1, min(pl.cdiv(rows, config.block_rows), pl.cdiv(_MIN_PROGRAMS, tiles)))
    chunk = pl.cdiv(pl.cdiv(rows, chunks), config.block_rows) * config.block_rows
    chunks = pl.cdiv(rows, chunk)
    kernel = functools.partial(_weight_grad_kernel, rows=rows, flat=flat, width=width,
                               count=count, chunk=chunk, config=config)
    partial = pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((chunks, flat, count), jnp.float32),
        grid=(tiles, chunks), compiler_params=_params(config), interpret=interpret,
        name="bjax_mhc_projection_weight_grad")(x_flat, dproj)
    return jnp.sum(partial, axis=0)
