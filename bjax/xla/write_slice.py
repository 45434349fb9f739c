"""Window write and read in plain ``jax.lax`` (the ``"xla"`` backend, and the backward).

Both take the row table of ``bjax.write_slice``: ``positions`` int32
``[W_0, N + 1]``, where row ``i`` holds the window position of index ``i``
along axis 0 on every axis (column 0 is ``p_0 + i``) and, in column N, whether
that row is written (rows not written hold in-range positions).

Writes are guarded ``dynamic_update_slice`` only, which XLA performs in place on a
donated ``dest`` whatever its dtype: the whole window when every row shares one
position (:func:`write_window`), else one row at a time in a loop
(:func:`write_rows`). Floats under 32 bits are moved as unsigned bits, since XLA
may carry them in float32 and canonicalise NaN payloads (a same-width view, which
makes no copy). The backward's :func:`read_rows` gathers with ``FILL_OR_DROP``,
sending unwritten rows off the end (read as 0).
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


def _narrow(dtype) -> bool:
    """Types XLA may not move as they are: floats under 32 bits (which it may widen to
    float32, canonicalising NaN payloads) and 4-bit integers (which it may unpack)."""
    dtype = jnp.dtype(dtype)
    return dtype in _NIBBLE_DTYPES or (jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4)


def _guarded_update(dest, update, position):
    """``dest`` with ``update`` at ``position[:-1]`` if ``position[-1]``, else unchanged.

    Types XLA moves as they are select between the update and the current window, an
    in-place update as fast as a bare ``dynamic_update_slice``. For narrow types that
    read would make XLA copy ``dest`` first, so they update under a ``cond``, floats
    through a same-width unsigned view."""
    written = position[-1] != 0
    start = tuple(position[d] for d in range(dest.ndim))
    if not _narrow(dest.dtype):
        current = lax.dynamic_slice(dest, start, update.shape)
        return lax.dynamic_update_slice(dest, jnp.where(written, update, current), start)
    bits = uint_of_width(dest.dtype)

    def write(dest):
        if bits is None:
            return lax.dynamic_update_slice(dest, update, start)
        out = lax.dynamic_update_slice(lax.bitcast_convert_type(dest, bits),
                                       lax.bitcast_convert_type(update, bits), start)
        return lax.bitcast_convert_type(out, dest.dtype)

    return lax.cond(written, write, lambda dest: dest, dest)


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
