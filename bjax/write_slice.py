"""write_slice: ``dest[p_0 : p_0 + W_0, ..., p_{N-1} : p_{N-1} + W_{N-1}] = source``, in place.

The window has the shape of ``source`` (``W_d = source.shape[d]``) and starts at
``p_d = start[d]`` on axis d. Each start is

* a Python int: static, checked at trace time (``0 <= p_d <= dest.shape[d] - W_d``);
* an integer scalar array (traced inside ``jit``): the position of a KV-cache
  append in a decode loop;
* on an axis other than 0, an integer vector of length ``dest.shape[0]``:
  row ``r`` of ``dest`` along axis 0 takes its own position ``start[d][r]``
  (ragged batches, each sequence appending at its own length).

Out-of-range positions never clamp: a row of the window (an index along axis
0) whose positions do not fit is left unwritten, and ``dest`` keeps its bytes
there; with a scalar start out of range no row is written. Under
``jax.experimental.checkify`` such a call reports the axis, the value and the
row. Writes are bit-exact for every dtype (NaN payloads, -0.0, float8
specials), and bytes outside the window are unchanged.

When ``dest`` is donated to the enclosing ``jit`` (``donate_argnums``), no copy
of ``dest`` is made: the call reads and writes only the window.

Sharded programs: every axis the window covers whole from a static 0 (batch, heads
and head_dim of a KV-cache append) is split, ``dest``, ``source`` and per-row
positions alike, and each device writes its own shard with no collective; an axis
where the window sits at a position stays whole (:func:`sharding_rules`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from bjax import _checks, _op, _partition
from bjax.errors import UnsupportedError
from bjax.tune.cache import problem_key
from bjax.xla import write_slice as xla_write_slice
from pallas_kernels import write_slice as pallas_write_slice

_OP = "write_slice"
SCALAR, PER_ROW = "scalar", "per_row"
_NIBBLE_DTYPES = (jnp.int4, jnp.uint4)
_DTYPES = (
    jnp.bool_, jnp.int4, jnp.uint4, jnp.int8, jnp.uint8, jnp.int16, jnp.uint16, jnp.int32,
    jnp.uint32, jnp.int64, jnp.uint64, jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.float8_e4m3,
    jnp.float8_e3m4, jnp.float8_e4m3fnuz, jnp.float8_e5m2fnuz, jnp.float8_e4m3b11fnuz,
    jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64, jnp.complex64, jnp.complex128,
)
# Index arithmetic in the kernel is int32 on each axis.
_MAX_KERNEL_EXTENT = 2**31 - 1
# Largest window written by dynamic_update_slice rather than the kernel (see route).
_DUS_MAX_WINDOW_BYTES = 2**20


@dataclasses.dataclass(frozen=True)
class KernelView:
    """The problem as the kernel sees it: unsigned-integer bits, adjacent axes merged.

    Axes are merged into the next one when that one is covered whole at a
    static 0 (the window is then contiguous across them); the merged start is
    the first axis's start times ``scales``. int4 / uint4 are viewed as uint8
    pairs along the innermost axis.
    """
    bits_dtype: np.dtype
    packed: bool
    dest_shape: tuple[int, ...]
    window_shape: tuple[int, ...]
    axes: tuple[pallas_write_slice.AxisStart, ...]
    config: pallas_write_slice.TileConfig


@dataclasses.dataclass(frozen=True)
class WriteSliceDescriptor:
    """Static facts of one write_slice call (hashable; the custom_vjp's static argument).

    Attributes:
      dest_shape: shape of ``dest`` (and of the result).
      source_shape: shape of ``source``: the window's extent on each axis.
      dtype: dtype of both.
      starts: per axis, the static start (int), ``"scalar"`` (a traced integer)
        or ``"per_row"`` (a vector over the rows of ``dest``).
    """
    dest_shape: tuple[int, ...]
    source_shape: tuple[int, ...]
    dtype: np.dtype
    starts: tuple[int | str, ...]

    @classmethod
    def from_args(cls, dest, source, start):
        """Validates the call; returns the descriptor and the traced starts, in axis order."""
        dest_shape = tuple(int(d) for d in dest.shape)
        source_shape = tuple(int(d) for d in source.shape)
        rank = len(dest_shape)
        _op.check(rank >= 1, _OP, "dest", "an array of rank >= 1", "rank 0")
        _op.check(len(source_shape) == rank, _OP, "source", f"of dest's rank {rank}",
                  f"rank {len(source_shape)} (source.shape={source_shape}, "
                  f"dest.shape={dest_shape})")
        dtype = jnp.dtype(dest.dtype)
        _op.check(jnp.dtype(source.dtype) == dtype, _OP, "source.dtype",
                  f"dest's dtype {dtype.name} (no implicit casting)", jnp.dtype(source.dtype).name)
        _op.check(dtype in [jnp.dtype(d) for d in _DTYPES], _OP, "dest.dtype",
                  "bool, an integer, float8, float or complex dtype", dtype.name, UnsupportedError)
        for d, (extent, window) in enumerate(zip(dest_shape, source_shape)):
            _op.check(window <= extent, _OP, f"source.shape[{d}]",
                      f"<= dest.shape[{d}] = {extent} (the window must fit)", window)
        _op.check(isinstance(start, (tuple, list)), _OP, "start",
                  f"a tuple or list with one entry per axis of dest ({rank})", repr(start))
        _op.check(len(start) == rank, _OP, "start", f"one entry per axis of dest ({rank})",
                  f"{len(start)} entries")
        kinds, traced = [], []
        for d, entry in enumerate(start):
            kind = _start_kind(entry, d, dest_shape, source_shape)
            kinds.append(kind)
            if not isinstance(kind, int):
                traced.append(entry)
        return cls(dest_shape, source_shape, dtype, tuple(kinds)), tuple(traced)

    @property
    def empty(self) -> bool:
        return 0 in self.source_shape

    @property
    def whole(self) -> bool:
        """The window is all of ``dest`` (the result is ``source``)."""
        return self.source_shape == self.dest_shape and all(s == 0 for s in self.starts)

    @property
    def per_row(self) -> bool:
        return PER_ROW in self.starts

    @property
    def traced_axes(self) -> tuple[int, ...]:
        """Axes whose start is traced, in the order of the traced starts."""
        return tuple(d for d, kind in enumerate(self.starts) if not isinstance(kind, int))

    def high(self, d: int) -> int:
        """Largest start on axis ``d`` at which the window fits."""
        return self.dest_shape[d] - self.source_shape[d]

    def route(self, backend: str, configured: bool = False) -> str:
        """``"noop"``, ``"whole"``, ``"dus"`` (one guarded lax.dynamic_update_slice),
        ``"rows"`` (a loop of them, a row each) or ``"kernel"`` (Pallas).

        The XLA backend, and dtypes the kernel cannot view as bits: ``"dus"``, or
        ``"rows"`` for per-row positions (in place on every backend). Pallas, one
        position for a window of at most ``_DUS_MAX_WINDOW_BYTES``: ``"dus"`` too,
        since there a launch costs more than the copy and XLA fuses the position
        arithmetic into the update (BENCHMARKS.md), unless the caller ``configured``
        the kernel. Everything else: the kernel, which the ``"interpret"`` backend
        always runs.
        """
        if self.empty:
            return "noop"
        if self.whole:
            return "whole"
        if backend == "xla" or self.kernel_view() is None:
            return "rows" if self.per_row else "dus"
        small = math.prod(self.source_shape) * self.dtype.itemsize <= _DUS_MAX_WINDOW_BYTES
        if backend == "pallas" and small and not self.per_row and not configured:
            return "dus"
        return "kernel"

    def full(self, d: int) -> bool:
        """Axis ``d`` is covered whole, from a static 0."""
        return self.starts[d] == 0 and self.source_shape[d] == self.dest_shape[d]

    def kernel_view(self) -> KernelView | None:
        """How the Pallas kernel runs this call; None where it does not (then the lax updates)."""
        dtype = self.dtype
        packed = dtype in [jnp.dtype(d) for d in _NIBBLE_DTYPES]
        if not packed and xla_write_slice.uint_of_width(dtype) is None:
            return None  # bool, complex: no bit-cast view in JAX
        dest, window = list(self.dest_shape), list(self.source_shape)
        if packed:
            last = self.starts[-1]
            if not (isinstance(last, int) and last % 2 == 0 and window[-1] % 2 == 0
                    and dest[-1] % 2 == 0):
                return None  # odd nibble windows: the lax updates handle them
            dest[-1], window[-1] = dest[-1] // 2, window[-1] // 2
        if max(dest) > _MAX_KERNEL_EXTENT:
            return None
        groups = [[len(dest) - 1]]
        for d in range(len(dest) - 2, -1, -1):
            merged = dest[d] * math.prod(dest[a] for a in groups[0])
            if (self.full(groups[0][0]) and not (d == 0 and self.per_row)
                    and merged <= _MAX_KERNEL_EXTENT):
                groups[0].insert(0, d)
            else:
                groups.insert(0, [d])
        dest_c, window_c, axes = [], [], []
        for group in groups:
            first, scale = group[0], math.prod(dest[a] for a in group[1:])
            dest_c.append(dest[first] * scale)
            window_c.append(window[first] * scale)
            kind = self.starts[first]
            if isinstance(kind, int):
                static = kind * scale // (2 if packed and first == len(dest) - 1 else 1)
                axes.append(pallas_write_slice.AxisStart(static=static))
            else:
                axes.append(pallas_write_slice.AxisStart(
                    operand=self.traced_axes.index(first), per_row=kind == PER_ROW, scale=scale,
                    high=self.high(first)))
        if len(groups) == 1:
            dest_c, window_c = [1, *dest_c], [1, *window_c]
            axes.insert(0, pallas_write_slice.AxisStart(static=0))
        config = pallas_write_slice.default_config(tuple(window_c), self.per_row)
        bits = jnp.dtype(jnp.uint8) if packed else xla_write_slice.uint_of_width(dtype)
        return KernelView(bits, packed, tuple(dest_c), tuple(window_c), tuple(axes), config)


def _start_kind(entry, d, dest_shape, source_shape):
    extent, window = dest_shape[d], source_shape[d]
    name = f"start[{d}]"
    if isinstance(entry, (bool, np.bool_)):
        _op.fail(_OP, name, "an integer (a Python int or an integer array)", repr(entry))
    if isinstance(entry, (int, np.integer)):
        _op.check(0 <= entry <= extent - window, _OP, name,
                  f"in [0, {extent - window}] so that the window of extent {window} fits "
                  f"dest.shape[{d}] = {extent}", int(entry))
        return int(entry)
    if not (hasattr(entry, "shape") and hasattr(entry, "dtype")):
        _op.fail(_OP, name, "an integer (a Python int or an integer array)",
                 f"{entry!r} of type {type(entry).__name__}")
    dtype = jnp.dtype(entry.dtype)
    _op.check(jnp.issubdtype(dtype, jnp.integer), _OP, name, "an integer (a Python int or an "
              "integer array)", f"an array of dtype {dtype.name}")
    shape = tuple(entry.shape)
    if shape == ():
        return SCALAR
    if d == 0:
        _op.fail(_OP, name, "a scalar (per-row position vectors are for axes other than 0)",
                 f"an array of shape {shape}")
    _op.check(shape == (dest_shape[0],), _OP, name,
              f"a scalar or a vector of length dest.shape[0] = {dest_shape[0]}",
              f"an array of shape {shape}")
    return PER_ROW


def _in_range(values, high: int):
    """0 <= values <= high, without overflowing narrow or unsigned integer dtypes."""
    info = jnp.iinfo(values.dtype)
    ok = values >= 0 if info.min < 0 else jnp.ones(values.shape, bool)
    return ok & (values <= high) if high < info.max else ok


def _row_table(desc: WriteSliceDescriptor, traced):
    """int32 ``[W_0, N + 1]``: row i's start on every axis (axis 0: ``p_0 + i``) and
    whether it is written; also, per traced axis, its values and in-range flags (for checks)."""
    rows = desc.source_shape[0]
    traced = iter(traced)
    columns, written, reports = [], jnp.ones((rows,), bool), []
    first_row = None
    for d, kind in enumerate(desc.starts):
        high = desc.high(d)
        if isinstance(kind, int):
            column = jnp.full((rows,), kind, jnp.int32)
        else:
            values = jnp.asarray(next(traced))
            if kind == PER_ROW:
                values = lax.dynamic_slice_in_dim(values, first_row, rows)
            values = jnp.broadcast_to(values, (rows,))
            ok = _in_range(values, high)
            reports.append((d, values, ok))
            written = written & ok
            column = jnp.where(ok, values, 0).astype(jnp.int32)
        if d == 0:
            # Rows of dest that the window covers, for indexing per-row vectors.
            first_row = jnp.clip(column[0], 0, high)
            column = column + jnp.arange(rows, dtype=jnp.int32)
        columns.append(column)
    return jnp.stack([*columns, written.astype(jnp.int32)], axis=1), reports


def _with_range_reports(desc: WriteSliceDescriptor, traced, reports):
    """``traced``, each start carrying its range check, which checkify reports."""
    return tuple(
        _checks.report_unless(
            jnp.asarray(values_in), ok, values,
            f"write_slice: start[{d}] = {{value}} (window row {{row}}) is out of range "
            f"[0, {desc.high(d)}] for a window of extent {desc.source_shape[d]} on an axis of "
            f"extent {desc.dest_shape[d]}; that row was left unchanged")
        for values_in, (d, values, ok) in zip(traced, reports))


def _to_bits(x, view: KernelView):
    if view.packed:
        x = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    return lax.bitcast_convert_type(x, view.bits_dtype)


def _from_bits(bits, view: KernelView, desc: WriteSliceDescriptor):
    if view.packed:  # uint8 [..., D / 2] -> int4 [..., D / 2, 2]
        bits = bits.reshape(*desc.dest_shape[:-1], desc.dest_shape[-1] // 2)
    return lax.bitcast_convert_type(bits, desc.dtype).reshape(desc.dest_shape)


def _kernel_positions(desc: WriteSliceDescriptor, traced):
    """Traced starts as the kernel's int32 position operands (``[1]`` or ``[D_0]``).

    Values are clipped into ``[-1, high + 1]`` before narrowing, so that no
    out-of-range position wraps around into range.
    """
    positions = []
    for values, d in zip(traced, desc.traced_axes):
        high = desc.high(d)
        if values.dtype != jnp.int32:
            info = jnp.iinfo(values.dtype)
            values = jnp.clip(values, -1 if info.min < 0 else None,
                              high + 1 if high + 1 <= info.max else None).astype(jnp.int32)
        positions.append(values.reshape(-1))
    return tuple(positions)


def _write_impl(dest, source, table, traced, desc: WriteSliceDescriptor, choice: _op.Choice):
    route = desc.route(choice.backend, configured=choice.config is not None)
    if route == "whole":
        return source
    if route in ("dus", "rows"):
        write = xla_write_slice.write_window if route == "dus" else xla_write_slice.write_rows
        return write(dest, source, table)
    view = desc.kernel_view()
    out = pallas_write_slice.write_window(
        _to_bits(dest, view).reshape(view.dest_shape),
        _to_bits(source, view).reshape(view.window_shape),
        _kernel_positions(desc, traced), axes=view.axes,
        config=choice.config_for(desc, lambda: view.config), interpret=choice.interpret)
    return _from_bits(out, view, desc)


def sharding_rules(desc: WriteSliceDescriptor) -> tuple[_partition.ShardingRule, ...]:
    """The forward's and the backward's rules: an axis the window covers whole from a static
    0 splits (dest, source and a per-row vector along axis 0 alike); every other axis, where
    the window sits at a position, stays whole."""
    rank = len(desc.dest_shape)
    dest = tuple(f"a{d}" for d in range(rank))
    window = tuple(dest[d] if desc.full(d) else f"w{d}" for d in range(rank))
    replicated = frozenset(f for d in range(rank) if not desc.full(d) for f in (dest[d],
                                                                               window[d]))
    traced = tuple(() if desc.starts[d] == SCALAR else (dest[0],) for d in desc.traced_axes)
    return (_partition.ShardingRule((dest, window, *traced), (dest,), replicated),
            _partition.ShardingRule((dest, *traced), (dest, window), replicated))


def _local(desc: WriteSliceDescriptor, dest_shape) -> WriteSliceDescriptor:
    """``desc`` for a shard of ``dest_shape`` (only axes the window covers whole split)."""
    dest_shape = tuple(dest_shape)
    source_shape = tuple(dest_shape[d] if desc.full(d) else desc.source_shape[d]
                         for d in range(len(dest_shape)))
    return dataclasses.replace(desc, dest_shape=dest_shape, source_shape=source_shape)


def _forward_kernel(desc, choice, dest, source, *traced):
    local = _local(desc, dest.shape)
    table, _ = _row_table(local, traced)
    return _write_impl(dest, source, table, traced, local, choice)


def _backward_kernel(desc, choice, dy, *traced):
    local = _local(desc, dy.shape)
    table, _ = _row_table(local, traced)
    d_source = xla_write_slice.read_rows(dy, local.source_shape, table)
    d_dest = _write_impl(dy, jnp.zeros(local.source_shape, dy.dtype), table, traced, local,
                         choice)
    return d_dest, d_source


def _call(desc: WriteSliceDescriptor, choice: _op.Choice, which: int):
    """The forward (0: ``dest, source, *traced -> out``) or backward (1: ``dy, *traced ->
    (d dest, d source)``), partitioned by :func:`sharding_rules` on every implementation
    (XLA's own partitioning of the row loop gathers). Under ``vmap``: one more leading axis, scalar
    starts becoming per-row vectors over it, or, where a start is per-row already, a
    sequential map."""
    kernel = functools.partial((_forward_kernel, _backward_kernel)[which], desc, choice)

    def batched(axis_size, in_batched, *operands):
        del in_batched
        traced = operands[2 - which:]
        if desc.per_row:
            return jax.lax.map(lambda ops: _call(desc, choice, which)(*ops), operands)
        starts = (0, *(PER_ROW if isinstance(kind, str) else kind for kind in desc.starts))
        wider = dataclasses.replace(desc, dest_shape=(axis_size, *desc.dest_shape),
                                    source_shape=(axis_size, *desc.source_shape),
                                    starts=starts)
        return _call(wider, choice, which)(*operands[:2 - which], *traced)

    rules = choice.implementation.sharding_rules(desc)
    return _partition.kernel_call(kernel, rules[which], batched, single_result=which == 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _write(dest, source, traced, desc: WriteSliceDescriptor, choice: _op.Choice):
    return _call(desc, choice, 0)(dest, source, *traced)


def _write_fwd(dest, source, traced, desc, choice):
    return _write(dest, source, traced, desc, choice), traced


def _write_bwd(desc, choice, traced, dy):
    d_dest, d_source = _call(desc, choice, 1)(dy, *traced)
    return d_dest, d_source, None


_write.defvjp(_write_fwd, _write_bwd)


def _check_config(desc: WriteSliceDescriptor, config: pallas_write_slice.TileConfig) -> None:
    """Launchable (the kernel masks partial tiles), one row high where each row of a 2-d
    view has its own position."""
    _op.check_launch(config, _OP)
    view = desc.kernel_view()
    if view is not None and desc.per_row and len(view.window_shape) == 2:
        _op.check(config.block_rows == 1, _OP, "config.block_rows",
                  "1 (per-row positions: each program row has its own start)",
                  config.block_rows)


def tuning_key(desc: WriteSliceDescriptor) -> str:
    """The problem's key in the tuning cache: shapes, dtype and the starts (static values,
    or ``scalar`` / ``per_row``), which fix the kernel's view of the window."""
    def joined(values, sep):
        return sep.join(map(str, values))
    return problem_key(dest=joined(desc.dest_shape, "x"), window=joined(desc.source_shape, "x"),
                       dtype=desc.dtype.name, starts=joined(desc.starts, "/"))


def _default_config(desc: WriteSliceDescriptor):
    view = desc.kernel_view()
    return None if view is None else view.config


IMPLEMENTATIONS = (
    _op.Implementation(
        "pallas_triton", ("pallas", "interpret"), kernel=lambda desc: "bjax_write_slice",
        config_type=pallas_write_slice.TileConfig, default_config=_default_config,
        check_config=_check_config, sharding_rules=sharding_rules, tuning_key=tuning_key),
    _op.Implementation("xla", ("xla",), kernel=lambda desc: "lax.dynamic_update_slice (guarded)",
                       sharding_rules=sharding_rules),
)
"""write_slice's implementation table, in order of preference. Both are partitioned by
:func:`sharding_rules` (XLA's own partitioning of the per-row loop gathers)."""


def _prepare(dest, source, start, backend, config):
    desc, traced = WriteSliceDescriptor.from_args(dest, source, start)
    choice = _op.select(IMPLEMENTATIONS, desc, backend, config, op=_OP)
    if config is not None:
        route = desc.route(choice.backend, configured=True)
        _op.check(route == "kernel", _OP, "config",
                  "None for this call, which the kernel does not run", f"a config, and the "
                  f"call runs {route!r} (WriteSliceDescriptor.route)", UnsupportedError)
    return desc, traced, choice


def write_slice(dest: ArrayLike, source: ArrayLike, start: Sequence[int | ArrayLike], *,
                backend: _op.Backend = None,
                config: pallas_write_slice.TileConfig | None = None) -> jax.Array:
    """``dest`` with the window at ``start`` replaced by ``source`` (see the module doc).

    Args:
      dest: array of rank >= 1, any dtype: bool, (u)int4/8/16/32/64, float8,
        float16, bfloat16, float32, float64, complex64, complex128.
      source: the window's values; same rank and dtype as ``dest``,
        ``source.shape[d] <= dest.shape[d]``.
      start: one entry per axis: a Python int, an integer scalar array, or (axes
        other than 0) an integer vector of length ``dest.shape[0]`` with a
        position per row of ``dest``.
      backend: ``None`` (``$BJAX_BACKEND``, else the first of :data:`IMPLEMENTATIONS`
        that runs here: Pallas on CUDA GPUs, XLA elsewhere), ``"pallas"``,
        ``"interpret"`` or ``"xla"``. The Pallas implementation hands windows of at
        most 1 MiB at one position, and dtypes with no bit view (bool, complex), to
        ``lax.dynamic_update_slice`` (:meth:`WriteSliceDescriptor.route`).
      config: the kernel's tile over the window's last two (merged) axes; the kernel
        then runs every window it can (small ones too). ``None``: the heuristic.

    Returns:
      The updated array (``dest``'s buffer when donated). Rows whose positions
      are out of range are left as they were (never clamped).

    Gradients: ``d dest = dy`` outside the written window and 0 inside;
    ``d source = dy`` over the window (0 for rows left unwritten).

    Raises:
      InvalidProblemError: rank 0, rank or dtype mismatch, a window larger than
        dest, a wrong number of starts, a static start out of range, a
        non-integer start, a per-row vector on axis 0 or of the wrong length.
        ``config`` not a ``TileConfig`` or not launchable.
      UnsupportedError: a dtype outside the list above; ``backend="pallas"``
        without a CUDA GPU; ``config`` for a call the kernel cannot run (bool and
        complex dtypes, odd int4 windows, empty or whole windows).
    """
    dest, source = jnp.asarray(dest), jnp.asarray(source)
    desc, traced, choice = _prepare(dest, source, start, backend, config)
    if desc.empty:
        return dest
    _, reports = _row_table(desc, traced)
    return _write(dest, source, _with_range_reports(desc, traced, reports), desc, choice)


_PRECISION = _op.PrecisionGuarantee(
    math_precision="none (bit copy)", accumulator=None, deterministic=True,
    bit_stable_on_same_hardware=True,
    notes="bit-exact: the window holds source's bytes; every other byte is unchanged")


@_op.register_planner(write_slice)
def _plan_write_slice(dest, source, start, *, backend=None, config=None):
    desc, _, choice = _prepare(dest, source, start, backend, config)
    route = desc.route(choice.backend, configured=config is not None)
    kernel = {"noop": "none (empty window)", "whole": "none (source replaces dest)",
              "dus": "lax.dynamic_update_slice (guarded)",
              "rows": "lax.dynamic_update_slice per row (guarded, in a loop)",
              "kernel": "bjax_write_slice"}[route]
    return _op.Plan.of(_OP, desc, choice, _PRECISION, kernel=kernel,
                       configured=route == "kernel")
