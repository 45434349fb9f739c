"""Window write and read in plain ``jax.lax`` (the ``"xla"`` backend, and the backward).

Both take the row table of ``bjax.write_slice``: ``positions`` int32
``[W_0, N + 1]``, where row ``i`` holds the window position of index ``i``
along axis 0 on every axis (column 0 is ``p_0 + i``) and, in column N, whether
that row is written.

Writes are ``dynamic_update_slice`` only, under a ``cond`` on the written flag,
which XLA performs in place on a donated ``dest`` whatever its dtype: the whole
window when every row shares one position (:func:`write_window`), else one row
at a time in a loop (:func:`write_rows`). Floats are updated through an
unsigned-integer view of the same width: XLA may carry narrow floats in float32,
which would canonicalise NaN payloads. A view of the same width is free; XLA makes
no copy of ``dest``. The backward's :func:`read_rows` gathers with
``FILL_OR_DROP``, sending unwritten rows off the end (read as 0).
"""
import jax.numpy as jnp
from jax import lax

_NIBBLE_DTYPES = (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4))


def uint_of_width(dtype):
    """The unsigned integer dtype ``lax.bitcast_convert_type`` can view ``dtype`` as, or None
    (bool, complex and 4-bit types have none of their own width)."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.complexfloating) or dtype in _NIBBLE_DTYPES:
        return None
    return jnp.dtype(f"uint{8 * dtype.itemsize}")


def _guarded_update(dest, update, position):
    """``dest`` with ``update`` at ``position[:-1]`` if ``position[-1]``, else unchanged
    (a ``cond``: reading the current window to select against it would make XLA copy
    ``dest`` first)."""
    start = tuple(position[d] for d in range(dest.ndim))
    bits = uint_of_width(dest.dtype) if jnp.issubdtype(dest.dtype, jnp.floating) else None

    def write(dest):
        if bits is None:
            return lax.dynamic_update_slice(dest, update, start)
        out = lax.dynamic_update_slice(lax.bitcast_convert_type(dest, bits),
                                       lax.bitcast_convert_type(update, bits), start)
        return lax.bitcast_convert_type(out, dest.dtype)

    return lax.cond(position[-1] != 0, write, lambda dest: dest, dest)


def write_window(dest, source, positions):
    """``dest`` with the window ``source`` written at row 0's position (every row shares it)."""
    return _guarded_update(dest, source, positions[0])


def write_rows(dest, source, positions):
    """``dest`` with row ``i`` of the window, ``source[i]``, written where the table says."""
    def row(i, dest):
        return _guarded_update(dest, lax.dynamic_slice_in_dim(source, i, 1), positions[i])
    return lax.fori_loop(0, source.shape[0], row, dest)


def _row_indices(positions, dest_shape):
    """[W_0, N] indices; rows not written point one past axis 0 (dropped)."""
    written = positions[:, -1:] != 0
    off_the_end = jnp.zeros_like(positions[:, :-1]).at[:, 0].set(dest_shape[0])
    return jnp.where(written, positions[:, :-1], off_the_end)


def read_rows(array, window_shape, positions):
    """The window of ``array`` (shape ``window_shape``); rows not written read as 0."""
    rank = array.ndim
    dimension_numbers = lax.GatherDimensionNumbers(
        offset_dims=tuple(range(1, rank)), collapsed_slice_dims=(0,),
        start_index_map=tuple(range(rank)))
    return lax.gather(array, _row_indices(positions, array.shape), dimension_numbers,
                      (1, *window_shape[1:]), indices_are_sorted=False, unique_indices=True,
                      mode=lax.GatherScatterMode.FILL_OR_DROP, fill_value=0)
