"""Window write kernel: ``dest[p_0 : p_0 + W_0, ..., p_{K-1} : p_{K-1} + W_{K-1}] = source``.

The kernel copies bits: callers pass unsigned-integer views of any dtype of
1, 2, 4 or 8 bytes. ``dest`` is aliased to the output, so only the window is
read and written; every other byte keeps the value it had (in place when the
enclosing ``jit`` donates ``dest``).

Layout. ``dest`` has rank K >= 2 and ``source`` (the window) the same rank.
A program owns a ``[block_rows, block_cols]`` tile of the window's last two
axes at one index of its leading K - 2 axes; edge tiles are masked.

Positions. Each axis of the view has an :class:`AxisStart`: a static start,
or an int32 position operand (shape ``[1]``, or ``[D_0]`` with one position
per row of ``dest`` along axis 0) whose value ``v`` starts the window at ``v *
scale`` and is valid when ``0 <= v <= high``. A program whose positions are not
all valid writes nothing, so out-of-range positions leave ``dest`` untouched.
With per-row positions and K = 2, tiles are one row high so that a tile never
mixes rows. Everything happens in one kernel launch: inside a decode loop the
cost of an append is this kernel alone.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.blocks import pallas_call
from pallas_kernels.tiling import TileConfig, fit_tile, tile_search_space


@dataclasses.dataclass(frozen=True)
class AxisStart:
    """Where the window starts on one axis: ``static``, or position operand ``operand``
    (per row of ``dest`` if ``per_row``) times ``scale``, valid in ``[0, high]``."""
    static: int | None = None
    operand: int | None = None
    per_row: bool = False
    scale: int = 1
    high: int = 0


# Elements of the window per program, and programs to launch at least.
_TILE_ELEMENTS = 4096
_MIN_PROGRAMS = 256


def default_config(window_shape: tuple[int, ...], per_row: bool) -> TileConfig:
    """Tile over the window's last two axes (one row high for per-row positions on a
    2-d view), shrunk until the grid has enough programs."""
    return fit_tile(window_shape[-2], window_shape[-1], tile_elements=_TILE_ELEMENTS,
                    min_programs=_MIN_PROGRAMS, outer=math.prod(window_shape[:-2]),
                    max_block_rows=1 if per_row and len(window_shape) == 2 else None)



def search_space(window_shape: tuple[int, ...], per_row: bool) -> tuple[TileConfig, ...]:
    """The tiles the tuner tries (``bjax.tune``): over the window's last two axes, 1024 to
    16384 elements (one row high for per-row positions on a 2-d view), 4 or 8 warps."""
    rows = 1 if per_row and len(window_shape) == 2 else window_shape[-2]
    return tile_search_space(rows, window_shape[-1], min_elements=1024, max_elements=16384)

def _window_kernel(*refs, window, axes, config):
    *position_refs, source_ref, _, dest_ref = refs
    rank = len(window)
    br, bc = config.block_rows, config.block_cols
    # Index of this program along the leading K - 2 axes (row-major).
    leading, rest = [], pl.program_id(2)
    for extent in reversed(window[:-2]):
        leading.insert(0, rest % extent)
        rest = rest // extent
    r0 = pl.program_id(1) * br
    c0 = pl.program_id(0) * bc
    window_row = leading[0] if rank > 2 else r0  # index along axis 0 (per-row tables)

    start, written = [], True
    for axis in axes:
        if axis.static is not None:
            start.append(axis.static)
            continue
        ref = position_refs[axis.operand]
        if axis.per_row:
            dest_row = jnp.clip(start[0] + window_row, 0, ref.shape[0] - 1)
            value = ref[dest_row]
        else:
            value = ref[0]
        written = written & (value >= 0) & (value <= axis.high)
        start.append(value * axis.scale)

    in_rows = (r0 + jnp.arange(br)) < window[-2]
    in_cols = (c0 + jnp.arange(bc)) < window[-1]
    mask = in_rows[:, None] & in_cols[None, :] & written
    source_tile = source_ref.at[(*leading, pl.ds(r0, br), pl.ds(c0, bc))]
    dest_tile = dest_ref.at[(*(s + i for s, i in zip(start, leading)),
                             pl.ds(start[-2] + r0, br), pl.ds(start[-1] + c0, bc))]
    plgpu.store(dest_tile, plgpu.load(source_tile, mask=mask, other=0), mask=mask)


@functools.partial(jax.jit, static_argnames=("axes", "config", "interpret"))
def write_window(dest, source, positions, *, axes: tuple[AxisStart, ...], config: TileConfig,
                 interpret: bool = False):
    """``dest`` with the window at the given starts replaced by ``source`` (see module doc).

    Args:
      dest: ``[D_0, ..., D_{K-1}]``, K >= 2, an unsigned integer dtype.
      source: ``[W_0, ..., W_{K-1}]``, same dtype; every ``W_d >= 1``.
      positions: tuple of int32 position operands, ``[1]`` or ``[D_0]`` each.
      axes: one :class:`AxisStart` per axis; axis 0's is not per-row.
      config: tiles and warps (:func:`default_config`).
    """
    window = tuple(source.shape)
    per_row = any(axis.per_row for axis in axes)
    assert not (per_row and len(window) == 2 and config.block_rows != 1), config
    kernel = functools.partial(_window_kernel, window=window, axes=axes, config=config)
    grid = (pl.cdiv(window[-1], config.block_cols), pl.cdiv(window[-2], config.block_rows),
            math.prod(window[:-2]))
    return pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(dest.shape, dest.dtype),
        grid=grid,
        input_output_aliases={len(positions) + 1: 0},
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1),
        interpret=interpret,
        name="bjax_write_slice",
    )(*positions, source, dest)
