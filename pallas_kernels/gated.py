"""Gated-activation kernels: forward ``y = f(a, b)`` and backward ``(da, db)``.

Every call works on a 2-D view ``x2 = [rows, 2 * cols]`` whose row ``r`` holds
``a`` in columns ``[0, cols)`` and ``b`` in ``[cols, 2 * cols)``: any split axis
of any array reduces to that by a free row-major reshape (``rows`` is the
product of the extents before the axis, ``cols`` half the extent along it times
the product of those after it). A program owns a ``[block_rows, block_cols]``
tile of ``y`` and reads the two matching tiles of ``x2``; tiles at the edges are
masked, so no extent needs to be a multiple of a block. Offsets are 64-bit
wherever an operand exceeds 2^32 bytes (the Triton lowering's rule), so size is
not capped by int32 indexing.

Math is in float32 (float64 for float64 inputs); values are stored in the
output's dtype.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.approx import approx_exp2_f32, approx_reciprocal_f32
from pallas_kernels.blocks import pallas_call, written_into
from pallas_kernels.formulas.gated import compute_dtype, gated_math, normal_cdf_options
from pallas_kernels.tiling import TileConfig, fit_tile, tile_search_space

# Programs to launch at least, so that small problems still fill a GPU
# (132 multiprocessors on an H100/H200, a few programs each).
_MIN_PROGRAMS = 512
# Elements of y per program for large problems.
_TILE_ELEMENTS = 2048


def default_config(rows: int, cols: int) -> TileConfig:
    """Tile of ``_TILE_ELEMENTS`` as wide as the rows allow, shrunk until the grid fills the GPU."""
    return fit_tile(rows, cols, tile_elements=_TILE_ELEMENTS, min_programs=_MIN_PROGRAMS)


def search_space(rows: int, cols: int) -> tuple[TileConfig, ...]:
    """The tiles the tuner tries (``bjax.tune``): :func:`pallas_kernels.tiling.tile_search_space`."""
    return tile_search_space(rows, cols)


def kernel_cdf_options(out_dtype, interpret: bool) -> dict:
    """:func:`normal_cdf_options`, with the GPU's approximate reciprocal and exp2 in
    compiled float32 kernels."""
    options = normal_cdf_options(out_dtype)
    if compute_dtype(out_dtype) == jnp.float32 and not interpret:
        options.update(reciprocal=approx_reciprocal_f32, exp2=approx_exp2_f32)
    return options


def _program_tile(rows, cols, config: TileConfig):
    """This program's rows, its columns in the first and second halves, and the
    in-bounds mask (None when the tiles divide the array)."""
    br, bc = config.block_rows, config.block_cols
    c0 = pl.program_id(0) * bc
    r0 = pl.program_id(1) * br
    mask = None
    if rows % br or cols % bc:
        in_rows = (r0 + jnp.arange(br)) < rows
        in_cols = (c0 + jnp.arange(bc)) < cols
        mask = in_rows[:, None] & in_cols[None, :]
    return pl.ds(r0, br), pl.ds(c0, bc), pl.ds(cols + c0, bc), mask


def _load(ref, rs, cs, mask, dtype):
    return plgpu.load(ref.at[rs, cs], mask=mask, other=0 if mask is not None else None).astype(dtype)


def _forward_kernel(x_ref, y_ref, *, rows, cols, kind, gate, approximate, config, interpret):
    rs, cs, cs_second, mask = _program_tile(rows, cols, config)
    dtype = compute_dtype(y_ref.dtype)
    first = _load(x_ref, rs, cs, mask, dtype)
    second = _load(x_ref, rs, cs_second, mask, dtype)
    y = gated_math(first, second, kind, gate, approximate,
                   kernel_cdf_options(y_ref.dtype, interpret))
    plgpu.store(y_ref.at[rs, cs], y.astype(y_ref.dtype), mask=mask)


def _backward_kernel(dy_ref, x_ref, dx_ref, *, rows, cols, kind, gate, approximate, config,
                     interpret):
    rs, cs, cs_second, mask = _program_tile(rows, cols, config)
    dtype = compute_dtype(dx_ref.dtype)
    dy = _load(dy_ref, rs, cs, mask, dtype)
    first = _load(x_ref, rs, cs, mask, dtype)
    second = _load(x_ref, rs, cs_second, mask, dtype)
    d_first, d_second = gated_math(first, second, kind, gate, approximate,
                                   kernel_cdf_options(dx_ref.dtype, interpret), dy=dy)
    plgpu.store(dx_ref.at[rs, cs], d_first.astype(dx_ref.dtype), mask=mask)
    plgpu.store(dx_ref.at[rs, cs_second], d_second.astype(dx_ref.dtype), mask=mask)


def _grid(rows, cols, config):
    # Column tiles vary fastest, so programs that run together stream along rows:
    # about 5% faster on an H200 than row tiles fastest (BENCHMARKS.md).
    return (pl.cdiv(cols, config.block_cols), pl.cdiv(rows, config.block_rows))


def _call(kernel, operands, out_like, grid, config, interpret, name, out):
    """pallas_call of ``kernel``; with ``out`` given, writes into it (aliased, in place)."""
    body, operands, aliases = written_into(kernel, operands, out)
    return pallas_call(
        body,
        out_shape=jax.ShapeDtypeStruct(out_like.shape, out_like.dtype),
        grid=grid,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1),
        interpret=interpret,
        name=name,
    )(*operands)


_STATIC = ("kind", "gate", "approximate", "config", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def gated_forward(x2, *, kind, gate, approximate, config: TileConfig, interpret=False, out=None):
    """``x2 [rows, 2 * cols] -> y [rows, cols]``; written into ``out`` if given (tests poison it)."""
    rows, cols = x2.shape[0], x2.shape[1] // 2
    kernel = functools.partial(_forward_kernel, rows=rows, cols=cols, kind=kind, gate=gate,
                               approximate=approximate, config=config, interpret=interpret)
    return _call(kernel, (x2,), jax.ShapeDtypeStruct((rows, cols), x2.dtype),
                 _grid(rows, cols, config), config, interpret, f"bjax_{kind}_forward", out)


@functools.partial(jax.jit, static_argnames=_STATIC)
def gated_backward(dy2, x2, *, kind, gate, approximate, config: TileConfig, interpret=False,
                   out=None):
    """``dy2 [rows, cols], x2 [rows, 2 * cols] -> dx2 [rows, 2 * cols]`` in one pass."""
    rows, cols = dy2.shape
    kernel = functools.partial(_backward_kernel, rows=rows, cols=cols, kind=kind, gate=gate,
                               approximate=approximate, config=config, interpret=interpret)
    return _call(kernel, (dy2, x2), x2, _grid(rows, cols, config), config, interpret,
                 f"bjax_{kind}_backward", out)
