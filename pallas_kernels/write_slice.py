"""Window write kernel: ``dest[p_0 : p_0 + W_0, ..., p_{K-1} : p_{K-1} + W_{K-1}] = source``.

The kernel copies bits: callers pass unsigned-integer views of any dtype of
1, 2, 4 or 8 bytes. ``dest`` is aliased to the output, so only the window is
read and written; every other byte keeps the value it had (in place when the
enclosing ``jit`` donates ``dest``).

Layout. ``dest`` has rank K >= 2 and ``source`` (the window) the same rank.
A program owns a ``[block_rows, block_cols]`` tile of the window's last two
axes at one index of its leading K - 2 axes; edge tiles are masked.

Positions. ``positions`` is an int32 table ``[T, K + 1]``: row ``t`` holds the
window's start on every axis and, in column K, 1 if the window is written (0
leaves ``dest`` untouched). T = 1 applies one position to the whole window;
T = W_0 gives each index along axis 0 its own row of positions (ragged
appends). With T > 1 and K = 2, tiles are one row high so that a tile never
mixes rows.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


@dataclasses.dataclass(frozen=True)
class WindowConfig:
    """Launch configuration: window tile owned by one program, and its warps."""
    block_rows: int
    block_cols: int
    num_warps: int


# Elements of the window per program, and programs to launch at least.
_TILE_ELEMENTS = 4096
_MIN_PROGRAMS = 256


def default_config(window_shape: tuple[int, ...], per_row: bool) -> WindowConfig:
    """Tile over the window's last two axes, shrunk until the grid has enough programs."""
    rows, cols = window_shape[-2], window_shape[-1]
    outer = math.prod(window_shape[:-2])
    block_cols = min(pl.next_power_of_2(max(cols, 1)), 1024)
    block_rows = 1 if per_row and len(window_shape) == 2 else min(
        pl.next_power_of_2(max(rows, 1)), max(1, _TILE_ELEMENTS // block_cols))

    def programs():
        return outer * pl.cdiv(rows, block_rows) * pl.cdiv(cols, block_cols)

    while block_rows > 1 and programs() < _MIN_PROGRAMS:
        block_rows //= 2
    while block_cols > 128 and programs() < _MIN_PROGRAMS:
        block_cols //= 2
    num_warps = 8 if block_rows * block_cols >= 4096 else 4
    return WindowConfig(block_rows, block_cols, num_warps)


def _window_kernel(positions_ref, source_ref, _, dest_ref, *, window, per_row, config):
    rank = len(window)
    br, bc = config.block_rows, config.block_cols
    # Index of this program along the leading K - 2 axes (row-major).
    leading, rest = [], pl.program_id(2)
    for extent in reversed(window[:-2]):
        leading.insert(0, rest % extent)
        rest = rest // extent
    r0 = pl.program_id(1) * br
    c0 = pl.program_id(0) * bc
    table_row = (leading[0] if rank > 2 else r0) if per_row else 0
    start = [positions_ref[table_row, d] for d in range(rank)]
    written = positions_ref[table_row, rank] != 0

    in_rows = (r0 + jnp.arange(br)) < window[-2]
    in_cols = (c0 + jnp.arange(bc)) < window[-1]
    mask = in_rows[:, None] & in_cols[None, :] & written
    source_tile = source_ref.at[(*leading, pl.ds(r0, br), pl.ds(c0, bc))]
    dest_tile = dest_ref.at[(*(s + i for s, i in zip(start, leading)),
                             pl.ds(start[-2] + r0, br), pl.ds(start[-1] + c0, bc))]
    plgpu.store(dest_tile, plgpu.load(source_tile, mask=mask, other=0), mask=mask)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def write_window(dest, source, positions, *, config: WindowConfig, interpret: bool = False):
    """``dest`` with the window at ``positions`` replaced by ``source`` (see module doc).

    Args:
      dest: ``[D_0, ..., D_{K-1}]``, K >= 2, an unsigned integer dtype.
      source: ``[W_0, ..., W_{K-1}]``, same dtype; every ``W_d >= 1``.
      positions: int32 ``[T, K + 1]``, T = 1 or W_0; starts must fit (``0 <=
        p_d <= D_d - W_d``) on rows whose column K is nonzero.
      config: tiles and warps (:func:`default_config`).
    """
    window = tuple(source.shape)
    per_row = positions.shape[0] > 1
    assert not (per_row and len(window) == 2 and config.block_rows != 1), config
    kernel = functools.partial(_window_kernel, window=window, per_row=per_row, config=config)
    grid = (pl.cdiv(window[-1], config.block_cols), pl.cdiv(window[-2], config.block_rows),
            math.prod(window[:-2]))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(dest.shape, dest.dtype),
        grid=grid,
        input_output_aliases={2: 0},
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1),
        interpret=interpret,
        name="bjax_write_slice",
    )(positions, source, dest)
