"""Two-dimensional tiles for kernels that stream rows of an array, one tile a program."""
from __future__ import annotations

import dataclasses

from jax.experimental import pallas as pl

# Widest tile: 1024 columns keep a row's loads long and coalesced.
_MAX_BLOCK_COLS = 1024
_MIN_BLOCK_COLS = 128


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Launch configuration: the ``[block_rows, block_cols]`` tile one program owns, and its warps."""
    block_rows: int
    block_cols: int
    num_warps: int


def tile_search_space(rows: int, cols: int, *, min_elements: int = 512,
                      max_elements: int = 8192, cell: int = 1,
                      min_block_cols: int = _MIN_BLOCK_COLS,
                      max_block_cols: int = _MAX_BLOCK_COLS,
                      warps: tuple[int, ...] = (4, 8)) -> tuple[TileConfig, ...]:
    """Tiles to tune over: power-of-2 blocks of ``min_block_cols`` to ``max_block_cols``
    columns (no wider than ``cols`` rounds up to) holding ``min_elements`` to
    ``max_elements`` elements (``cell`` per row and column; fewer where ``[rows, cols]``
    is smaller), with each of ``warps``."""
    widest = min(pl.next_power_of_2(max(cols, 1)), max_block_cols)
    tallest = pl.next_power_of_2(max(rows, 1))
    smallest = min(min_elements, tallest * widest * cell)
    space = []
    block_cols = min(min_block_cols, widest)
    while block_cols <= widest:
        block_rows = 1
        while block_rows <= tallest and block_rows * block_cols * cell <= max_elements:
            if block_rows * block_cols * cell >= smallest:
                space += [TileConfig(block_rows, block_cols, w) for w in warps]
            block_rows *= 2
        block_cols *= 2
    return tuple(space)


def fit_tile(rows: int, cols: int, *, tile_elements: int, min_programs: int, outer: int = 1,
             max_block_rows: int | None = None, min_block_cols: int = _MIN_BLOCK_COLS,
             max_block_cols: int = _MAX_BLOCK_COLS) -> TileConfig:
    """A tile of about ``tile_elements`` as wide as the rows allow, shrunk (rows first,
    then columns, down to ``min_block_cols``) until ``outer`` times the tiles of
    ``[rows, cols]`` reach ``min_programs``."""
    block_cols = min(pl.next_power_of_2(max(cols, 1)), max_block_cols)
    block_rows = min(pl.next_power_of_2(max(rows, 1)), max(1, tile_elements // block_cols))
    if max_block_rows is not None:
        block_rows = min(block_rows, max_block_rows)

    def programs():
        return outer * pl.cdiv(rows, block_rows) * pl.cdiv(cols, block_cols)

    while block_rows > 1 and programs() < min_programs:
        block_rows //= 2
    while block_cols > min_block_cols and programs() < min_programs:
        block_cols //= 2
    num_warps = 8 if block_rows * block_cols >= 4096 else 4
    return TileConfig(block_rows, block_cols, num_warps)
