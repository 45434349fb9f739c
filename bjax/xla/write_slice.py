"""Window write and read in plain ``jax.lax`` (the ``"xla"`` backend, and the backward).

Both take the row table of ``bjax.write_slice``: ``positions`` int32
``[W_0, N + 1]``, where row ``i`` holds the window position of index ``i``
along axis 0 on every axis (column 0 is ``p_0 + i``) and, in column N, whether
that row is written. A scatter (gather) with one index per row and
``FILL_OR_DROP`` skips (zero-fills) rows whose index is out of bounds, which is
where unwritten rows are sent. :func:`write_window` does the same with
``dynamic_update_slice`` when one position serves the whole window (small
windows on the Pallas backend), writing the window's own bytes back when the
position is out of range. XLA updates ``dest`` in place when it is donated.
"""
import jax.numpy as jnp
from jax import lax


def _row_indices(positions, dest_shape):
    """[W_0, N] indices; rows not written point one past axis 0 (dropped)."""
    written = positions[:, -1:] != 0
    off_the_end = jnp.zeros_like(positions[:, :-1]).at[:, 0].set(dest_shape[0])
    return jnp.where(written, positions[:, :-1], off_the_end)


def _dimension_numbers(rank, gather: bool):
    window_dims = tuple(range(1, rank))
    if gather:
        return lax.GatherDimensionNumbers(offset_dims=window_dims, collapsed_slice_dims=(0,),
                                          start_index_map=tuple(range(rank)))
    return lax.ScatterDimensionNumbers(update_window_dims=window_dims, inserted_window_dims=(0,),
                                       scatter_dims_to_operand_dims=tuple(range(rank)))


def write_rows(dest, source, positions):
    """``dest`` with row ``i`` of the window, ``source[i]``, written where the table says."""
    return lax.scatter(dest, _row_indices(positions, dest.shape), source,
                       _dimension_numbers(dest.ndim, gather=False), indices_are_sorted=False,
                       unique_indices=True, mode=lax.GatherScatterMode.FILL_OR_DROP)


def read_rows(array, window_shape, positions):
    """The window of ``array`` (shape ``window_shape``); rows not written read as 0."""
    return lax.gather(array, _row_indices(positions, array.shape),
                      _dimension_numbers(array.ndim, gather=True), (1, *window_shape[1:]),
                      indices_are_sorted=False, unique_indices=True,
                      mode=lax.GatherScatterMode.FILL_OR_DROP, fill_value=0)


def write_window(dest, source, positions):
    """Like :func:`write_rows` when every row shares one position (``positions[0]``)."""
    written = positions[0, -1] != 0
    start = tuple(jnp.where(written, p, 0) for p in positions[0, :-1])
    current = lax.dynamic_slice(dest, start, source.shape)
    return lax.dynamic_update_slice(dest, jnp.where(written, source, current), start)
