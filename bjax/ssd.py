"""Mamba-2 SSD: ``ssd_chunk_scan`` (a whole sequence, chunked) and ``ssd_step`` (one token).

Per batch row and head, with ``dt' = clip(softplus?(dt + dt_bias), *dt_limit)``:

    h_t = exp(dt'_t A) h_{t-1} + dt'_t x_t B_t^T        (state h: [head_dim, state_dim])
    y_t = h_t C_t + D x_t,   then  y_t *= silu(z_t)  when z is given.

``B`` and ``C`` come in ``groups``; head ``i`` reads group ``i // (heads // groups)``.
With ``seq_idx`` (packed sequences) the state restarts from 0 wherever
``seq_idx`` changes along the sequence; ``initial_states`` seeds the first
segment only. mamba_ssm's ``cu_seqlens`` (sequences packed along one row) sets the
segments the same way, and ``return_varlen_states`` returns each sequence's final state
(``bjax._varlen``). ``dt'``, every cumulative sum and every state are float32; matmul
operands stay in the input dtype (float32 inputs: full float32) with float32
accumulation; ``y`` comes back in x's dtype.

Gradients (``custom_vjp``): every input of ``ssd_chunk_scan`` and the cotangent of
its final state, from Pallas backward kernels that recompute the chunk states
(``pallas_kernels.ssd_backward``; the residuals are the inputs alone); ``ssd_step``
through its jnp formula.

Sharded programs (``ssd_chunk_scan``, ``ssd_step``): the kernels run on each device's
shard, split along the batch and along the heads together with their groups (a mesh
axis on the heads must divide ``groups``, as dB and dC sum over a group's heads;
otherwise the heads are gathered). The sequence, head_dim and state_dim stay whole. The only
collective is the all-reduce of the gradients of ``A``, ``D`` and ``dt_bias`` over
the devices that split the batch (:func:`sharding_rules`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from bjax import _op, _partition, _varlen
from bjax.errors import UnsupportedError
from bjax.tune.cache import problem_key
from bjax.xla import ssd as xla_ssd
from pallas_kernels import ssd as pallas_ssd
from pallas_kernels.formulas import ssd as formulas_ssd
from pallas_kernels import ssd_backward as pallas_ssd_backward

_FLOATS = ("float32", "float16", "bfloat16")
_PARAM_FLOATS = ("float64", "float32", "float16", "bfloat16")
CHUNK_SIZES = tuple(2**k for k in range(4, 11))   # 16 ... 1024
MAX_DIM = 256


def _limit_rule(limit, op) -> tuple[float, float]:
    ok = (isinstance(limit, (tuple, list)) and len(limit) == 2
          and all(isinstance(v, (int, float, np.integer, np.floating))
                  and not isinstance(v, (bool, np.bool_)) for v in limit))
    ok = ok and not any(math.isnan(v) for v in limit) and 0 <= limit[0] <= limit[1]
    _op.check(ok, op, "dt_limit", "a pair (low, high) of numbers with 0 <= low <= high",
              repr(limit))
    return float(limit[0]), float(limit[1])


def _dim_rule(extent, name, op):
    _op.check(extent >= 1, op, name, ">= 1", extent)


def _kernel_dims_rule(desc, op) -> None:
    """The Pallas kernels hold heads, head_dim and state_dim of at most :data:`MAX_DIM`
    (the XLA implementation has no limit)."""
    for extent, name in ((desc.heads, "x.shape[-2] (heads)"),
                         (desc.head_dim, "x.shape[-1] (head_dim)"),
                         (desc.state_dim, "B.shape[-1] (state_dim)")):
        _op.check(extent <= MAX_DIM, op, name, f"<= {MAX_DIM} for the Pallas kernels", extent,
                  UnsupportedError)


@dataclasses.dataclass(frozen=True)
class SsdOptions:
    """The options ``ssd_chunk_scan`` and ``ssd_step`` share (static, hashable).

    Attributes:
      d_shape: ``None``, ``"h"`` (D ``[heads]``) or ``"hp"`` (D ``[heads, head_dim]``).
      has_z, has_dt_bias: whether z / dt_bias were given.
      dt_softplus: softplus on ``dt + dt_bias``.
      dt_limit: ``(low, high)`` clamp of the processed step size.
    """
    d_shape: str | None
    has_z: bool
    has_dt_bias: bool
    dt_softplus: bool
    dt_limit: tuple[float, float]

    @classmethod
    def check(cls, x_dtype, p_shape, D, z, dt_bias, dt_softplus, dt_limit, op):
        """Validates the shared options against ``x`` of shape ``p_shape``
        (``[..., heads, head_dim]``)."""
        heads, head_dim = p_shape[-2:]
        d_shape = None
        if D is not None:
            _op.check(tuple(D.shape) in ((heads,), (heads, head_dim)), op, "D.shape",
                      f"({heads},) or ({heads}, {head_dim}) ([heads] or [heads, head_dim])",
                      tuple(D.shape))
            _op.check_dtype(D, "D", _PARAM_FLOATS, op)
            d_shape = "h" if D.ndim == 1 else "hp"
        if z is not None:
            _op.check_shape(z, "z", p_shape, "(x's shape)", op)
            _op.check(z.dtype == x_dtype, op, "z.dtype", f"{jnp.dtype(x_dtype).name} (x's dtype)",
                      _op.dtype_name(z))
        if dt_bias is not None:
            _op.check_shape(dt_bias, "dt_bias", (heads,), "[heads]", op)
            _op.check_dtype(dt_bias, "dt_bias", _PARAM_FLOATS, op)
        _op.check_bool(dt_softplus, op, "dt_softplus")
        return cls(d_shape, z is not None, dt_bias is not None, bool(dt_softplus),
                   _limit_rule(dt_limit, op))


def _check_x_b_c(x, B, C, b_layout, op):
    """Shared rules for x / B / C; returns the number of groups."""
    _op.check_dtype(x, "x", _FLOATS, op)
    heads, head_dim = x.shape[-2:]
    _dim_rule(heads, "x.shape[-2] (heads)", op)
    _dim_rule(head_dim, "x.shape[-1] (head_dim)", op)
    _op.check(B.ndim == x.ndim, op, "B", f"an array of rank {x.ndim} {b_layout}",
              f"shape {tuple(B.shape)}")
    _op.check_shape(B, "B", (*x.shape[:-2], *B.shape[-2:]),
                    f"{b_layout} (leading axes as x's)", op)
    groups, state_dim = B.shape[-2:]
    _op.check(groups >= 1 and heads % groups == 0, op, "B.shape[-2] (groups)",
              f"a divisor of heads = {heads}", groups)
    _dim_rule(state_dim, "B.shape[-1] (state_dim)", op)
    _op.check_shape(C, "C", B.shape, "(B's shape)", op)
    for name, v in (("B", B), ("C", C)):
        _op.check(v.dtype == x.dtype, op, f"{name}.dtype", f"{_op.dtype_name(x)} (x's dtype)",
                  _op.dtype_name(v))
    return groups


@dataclasses.dataclass(frozen=True)
class SsdChunkScanDescriptor:
    """Static facts of one ``ssd_chunk_scan`` call (hashable; the custom_vjp's static argument).

    Attributes:
      batch, seq_len, heads, head_dim, groups, state_dim, chunk_size: extents.
      dtype: dtype of x, B, C, z and y.
      options: the :class:`SsdOptions`.
      has_initial_states, return_final_states: as passed.
      has_seq_idx: segments are given (``seq_idx``, or derived from ``cu_seqlens``).
      num_seqs: the packed sequences of ``cu_seqlens`` (0 without it).
      return_varlen_states: as passed; the kernels then also return the float32 state
        entering every chunk, from which each sequence's final state is derived.
    """
    batch: int
    seq_len: int
    heads: int
    head_dim: int
    groups: int
    state_dim: int
    chunk_size: int
    dtype: np.dtype
    options: SsdOptions
    has_initial_states: bool
    has_seq_idx: bool
    return_final_states: bool
    num_seqs: int = 0
    return_varlen_states: bool = False

    @property
    def chunks(self) -> int:
        return max(1, -(-self.seq_len // self.chunk_size))

    @property
    def kernel_config(self) -> pallas_ssd.SsdConfig:
        return pallas_ssd.default_config(self.chunk_size, self.head_dim, self.state_dim,
                                         self.heads // self.groups, self.dtype,
                                         batch_heads=self.batch * self.heads,
                                         chunks=self.chunks)

    @property
    def backward_config(self) -> pallas_ssd_backward.SsdBackwardConfig:
        return pallas_ssd_backward.default_config(self.chunk_size, self.head_dim,
                                                  self.state_dim, self.heads // self.groups,
                                                  self.dtype,
                                                  batch_heads=self.batch * self.heads,
                                                  chunks=self.chunks)

    @classmethod
    def from_args(cls, x, dt, A, B, C, *, chunk_size, D, z, dt_bias, dt_softplus, dt_limit,
                  initial_states, seq_idx, return_final_states, cu_seqlens=None,
                  return_varlen_states=False):
        """Validates an ``ssd_chunk_scan`` call; raises naming the argument."""
        op = "ssd_chunk_scan"
        _op.check(x.ndim == 4, op, "x", "an array of rank 4 [batch, seqlen, heads, head_dim]",
                  f"shape {tuple(x.shape)}")
        batch, seq_len, heads, head_dim = map(int, x.shape)
        groups = _check_x_b_c(x, B, C, "[batch, seqlen, groups, state_dim]", op)
        _op.check_shape(dt, "dt", (batch, seq_len, heads), "[batch, seqlen, heads]", op)
        _op.check_dtype(dt, "dt", _FLOATS, op)
        _op.check_shape(A, "A", (heads,), "[heads]", op)
        _op.check_dtype(A, "A", _PARAM_FLOATS, op)
        _op.check(type(chunk_size) is int and chunk_size in CHUNK_SIZES, op, "chunk_size",
                  f"a power of two from {CHUNK_SIZES[0]} to {CHUNK_SIZES[-1]}", repr(chunk_size))
        options = SsdOptions.check(x.dtype, x.shape, D, z, dt_bias, dt_softplus, dt_limit, op)
        if initial_states is not None:
            _op.check_shape(initial_states, "initial_states",
                        (batch, heads, head_dim, int(B.shape[-1])),
                        "[batch, heads, head_dim, state_dim]", op)
            _op.check_dtype(initial_states, "initial_states", _PARAM_FLOATS, op)
        if seq_idx is not None:
            _op.check_shape(seq_idx, "seq_idx", (batch, seq_len), "[batch, seqlen]", op)
            _op.check(jnp.issubdtype(seq_idx.dtype, jnp.integer), op, "seq_idx.dtype",
                      "an integer dtype", _op.dtype_name(seq_idx))
        _op.check_bool(return_final_states, op, "return_final_states")
        num_seqs = _varlen.check(cu_seqlens, return_varlen_states, seq_idx, batch, op)
        return cls(batch, seq_len, heads, head_dim, groups, int(B.shape[-1]), chunk_size,
                   jnp.dtype(x.dtype), options, initial_states is not None,
                   seq_idx is not None or cu_seqlens is not None, bool(return_final_states),
                   num_seqs, bool(return_varlen_states))


@dataclasses.dataclass(frozen=True)
class SsdStepDescriptor:
    """Static facts of one ``ssd_step`` call."""
    batch: int
    heads: int
    head_dim: int
    groups: int
    state_dim: int
    dtype: np.dtype
    options: SsdOptions

    @classmethod
    def from_args(cls, state, x, dt, A, B, C, *, D, z, dt_bias, dt_softplus, dt_limit):
        """Validates an ``ssd_step`` call; raises naming the argument."""
        op = "ssd_step"
        _op.check(x.ndim == 3, op, "x", "an array of rank 3 [batch, heads, head_dim]",
                  f"shape {tuple(x.shape)}")
        batch, heads, head_dim = map(int, x.shape)
        groups = _check_x_b_c(x, B, C, "[batch, groups, state_dim]", op)
        state_dim = int(B.shape[-1])
        _op.check_shape(state, "state", (batch, heads, head_dim, state_dim),
                    "[batch, heads, head_dim, state_dim]", op)
        _op.check(state.dtype == jnp.float32, op, "state.dtype", "float32", _op.dtype_name(state))
        _op.check_shape(dt, "dt", (batch, heads), "[batch, heads]", op)
        _op.check_dtype(dt, "dt", _FLOATS, op)
        _op.check_shape(A, "A", (heads,), "[heads]", op)
        _op.check_dtype(A, "A", _PARAM_FLOATS, op)
        options = SsdOptions.check(x.dtype, x.shape, D, z, dt_bias, dt_softplus, dt_limit, op)
        return cls(batch, heads, head_dim, groups, state_dim, jnp.dtype(x.dtype), options)


class _Inputs(NamedTuple):
    """What the scan's forward and backward both derive from the arguments: float32
    parameters (``d`` as ``[heads, head_dim]``), segment numbers, and the step sizes and
    chunk cumsums (``dt_p``, ``a_cs``) from the implementation's own time-terms code."""
    a: Any
    bias: Any
    d: Any
    init: Any
    seg: Any
    dt_p: Any
    a_cs: Any


def _params(A, D, dt_bias, head_dim):
    """A, dt_bias as float32 [heads]; D as float32 [heads, head_dim] (or None)."""
    a = A.astype(jnp.float32)
    bias = None if dt_bias is None else dt_bias.astype(jnp.float32)
    d = None
    if D is not None:
        d = D.astype(jnp.float32)
        d = jnp.broadcast_to(d[:, None] if d.ndim == 1 else d, (A.shape[0], head_dim))
    return a, bias, d


def _scan_inputs(dt, A, D, dt_bias, initial_states, seq_idx, desc: SsdChunkScanDescriptor,
                 choice: _op.Choice) -> _Inputs:
    a, bias, d = _params(A, D, dt_bias, desc.head_dim)
    init = None if initial_states is None else initial_states.astype(jnp.float32)
    seg = None if seq_idx is None else xla_ssd.segments(seq_idx, desc.chunks * desc.chunk_size)
    time_args = {"chunk_size": desc.chunk_size, "softplus": desc.options.dt_softplus,
                 "limit": desc.options.dt_limit}
    if choice.on_xla:
        dt_p, a_cs = xla_ssd.time_terms(dt, a, bias, **time_args)
    else:
        dt_p, a_cs = pallas_ssd.time_terms(dt, a, bias, interpret=choice.interpret,
                                           **time_args)
    return _Inputs(a, bias, d, init, seg, dt_p, a_cs)


def _configs(desc: SsdChunkScanDescriptor, choice: _op.Choice):
    """The forward's and the backward's configurations for ``desc`` (a device's shard):
    the caller's, else the heuristics."""
    given = choice.config_for(desc, pallas_ssd_backward.ChunkScanConfig)
    return given.forward or desc.kernel_config, given.backward or desc.backward_config


def _kernel_args(desc: SsdChunkScanDescriptor, choice: _op.Choice, backward=False) -> dict:
    return {"chunk_size": desc.chunk_size, "interpret": choice.interpret,
            "config": _configs(desc, choice)[backward]}


def _scan_forward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx,
                  desc: SsdChunkScanDescriptor, choice: _op.Choice):
    """``(y, final_states)``, and with ``return_varlen_states`` the float32 states entering
    every chunk ``[batch, chunks, heads, head_dim, state_dim]``."""
    if desc.seq_len == 0 or desc.batch == 0:
        final = (jnp.zeros((desc.batch, desc.heads, desc.head_dim, desc.state_dim))
                 if initial_states is None else initial_states).astype(jnp.float32)
        return (jnp.zeros(x.shape, x.dtype), final) + (
            (final[:, None],) if desc.return_varlen_states else ())
    i = _scan_inputs(dt, A, D, dt_bias, initial_states, seq_idx, desc, choice)
    if choice.on_xla:
        y, final, states = xla_ssd.chunk_scan(x, B, C, i.dt_p, i.a_cs, i.seg, i.d, z, i.init,
                                              chunk_size=desc.chunk_size)
    else:
        kernel_args = _kernel_args(desc, choice)
        snapshot = pallas_ssd.snapshot_dtype(x.dtype)
        states, final = pallas_ssd.chunk_states(
            x, B, i.dt_p, i.a_cs, i.seg, i.init, **kernel_args,
            states_dtype=jnp.float32 if desc.return_varlen_states else snapshot)
        y = pallas_ssd.chunk_scan(x, B, C, i.dt_p, i.a_cs, states.astype(snapshot), i.seg, i.d,
                                  z, **kernel_args)
    return (y, final, states) if desc.return_varlen_states else (y, final)


def _silu_and_grad(z):
    sig = jax.nn.sigmoid(z)
    return z * sig, sig * (1 + z * (1 - sig))


def _scan_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, dy, dfinal,
                   dstates, desc: SsdChunkScanDescriptor, choice: _op.Choice):
    """Gradients of ``(y, final_states[, the states entering the chunks])`` with respect to
    ``x ... initial_states`` from the Pallas backward kernels (``pallas_kernels.ssd_backward``); those of ``A``, ``D`` and
    ``dt_bias`` per batch row (a leading batch axis, for the caller to sum)."""
    i = _scan_inputs(dt, A, D, dt_bias, initial_states, seq_idx, desc, choice)
    forward_args = _kernel_args(desc, choice)
    states, _ = pallas_ssd.chunk_states(x, B, i.dt_p, i.a_cs, i.seg, i.init,
                                        states_dtype=jnp.float32, **forward_args)
    dy = dy.astype(jnp.float32)
    dz = None
    if z is not None:
        y_pre = pallas_ssd.chunk_scan(x, B, C, i.dt_p, i.a_cs,
                                      states.astype(pallas_ssd.snapshot_dtype(x.dtype)), i.seg,
                                      i.d, **forward_args)
        silu, silu_grad = _silu_and_grad(z.astype(jnp.float32))
        dz = (dy * y_pre.astype(jnp.float32) * silu_grad).astype(z.dtype)
        dy = dy * silu
    dy_pre = dy.astype(x.dtype)
    backward_args = _kernel_args(desc, choice, backward=True)
    ends, d_init, carry = pallas_ssd_backward.state_grads(
        dy_pre, C, i.a_cs, states, i.seg, dfinal.astype(jnp.float32),
        None if dstates is None else dstates.astype(jnp.float32), **backward_args)
    dc_parts, rows = pallas_ssd_backward.target_grads(x, dy_pre, B, C, i.dt_p, i.a_cs, states,
                                                      i.seg, **backward_args)
    dx, db_parts, cols, q, x_dot_y = pallas_ssd_backward.source_grads(
        x, dy_pre, B, C, i.dt_p, i.a_cs, ends, i.seg, i.d, **backward_args)

    # Gradient of the chunk-local cumsum a_cs, then of a = dt' A (reverse cumsum per chunk).
    rows, cols, q, x_dot_y = (v.sum(1) for v in (rows, cols, q, x_dot_y))  # over p blocks
    shape = (desc.batch, desc.heads, desc.chunks, desc.chunk_size)
    d_acs = (rows - cols).reshape(shape)
    d_acs = d_acs.at[..., -1].add(q.reshape(shape).sum(-1) + carry.sum(-1))
    d_a = jnp.flip(jnp.cumsum(jnp.flip(d_acs, -1), -1), -1).reshape(i.dt_p.shape)
    d_dtp = x_dot_y + i.a[None, :, None] * d_a
    dA = jnp.sum(i.dt_p * d_a, axis=2).astype(A.dtype)                  # per batch row
    d_dtp = jnp.transpose(d_dtp, (0, 2, 1))[:, :desc.seq_len]
    # dt_bias per batch row, so that its gradient comes per row (summed by the caller).
    rows_bias = None if dt_bias is None else jnp.broadcast_to(dt_bias,
                                                             (desc.batch, *dt_bias.shape))
    _, dt_vjp = jax.vjp(lambda dt, bias: formulas_ssd.process_dt(
        dt, None if bias is None else bias[:, None, :], desc.options.dt_softplus,
        desc.options.dt_limit), dt, rows_bias)
    d_dt, d_bias = dt_vjp(d_dtp)

    p_blocks = -(-desc.head_dim // backward_args["config"].block_p)

    def per_group(parts, like):  # slices [p block, group, block of heads] -> [group]
        parts = parts.reshape(desc.batch, desc.seq_len, p_blocks, desc.groups, -1,
                              desc.state_dim)
        return parts.sum((2, 4)).astype(like.dtype)

    dD = None
    if D is not None:
        dD = jnp.einsum("blhp,blhp->bhp", dy, x.astype(jnp.float32))
        dD = (dD.sum(-1) if D.ndim == 1 else dD).astype(D.dtype)
    return (dx, d_dt, dA, per_group(db_parts, B), per_group(dc_parts, C), dD, dz, d_bias,
            None if initial_states is None else d_init.astype(initial_states.dtype))


# Factors (bjax._partition): batch b, steps l, groups g, heads per group r (heads are the
# compound (g r)), head_dim p, state_dim n. The batch splits, and the heads with their
# groups (a mesh axis on the heads must divide the groups: dB and dC sum over a group's
# heads). The steps stay whole (the scan carries the state along them), and so do p and n
# (dB and dC sum over p). Parameter gradients are summed over the batch (all-reduced).
_HEADS = ("g", "r")
_FACTORS = {"x": ("b", "l", _HEADS, "p"), "dt": ("b", "l", _HEADS), "A": (_HEADS,),
            "B": ("b", "l", "g", "n"), "C": ("b", "l", "g", "n"), "D1": (_HEADS,),
            "D2": (_HEADS, "p"), "z": ("b", "l", _HEADS, "p"), "dt_bias": (_HEADS,),
            "initial_states": ("b", _HEADS, "p", "n"), "seq_idx": ("b", "l")}
_ARGS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states", "seq_idx")


def _arg_factors(name, value):
    return _FACTORS[f"D{value.ndim}" if name == "D" else name]


def _heads_as(factors, groups: int, heads: int):
    """``factors`` with the heads dimension written for ``groups`` (Shardy takes no
    compound with a factor of size 1: one group makes the heads ``r``, one head per group
    makes them ``g``)."""
    heads_dim = _HEADS if 1 < groups < heads else ("r" if groups == 1 < heads else "g")
    return tuple(heads_dim if f == _HEADS else f for f in factors)


def sharding_rules(desc: SsdChunkScanDescriptor, args) -> tuple[_partition.ShardingRule, ...]:
    """The forward's and the backward's rules for the arguments ``args`` (in
    ``ssd_chunk_scan``'s order, None where absent)."""
    def heads(factors):
        return _heads_as(factors, desc.groups, desc.heads)
    present = [heads(_arg_factors(n, v)) for n, v in zip(_ARGS, args) if v is not None]
    x, state = heads(_FACTORS["x"]), heads(("b", _HEADS, "p", "n"))
    # With return_varlen_states, the states entering the chunks ("c") too.
    results = (x, state) + ((heads(("b", "c", _HEADS, "p", "n")),)
                            if desc.return_varlen_states else ())
    # The parameters' gradients per batch row (the caller sums them: XLA all-reduces).
    grads = [heads(("b", *_arg_factors(n, v)) if k in _PARAMS else _arg_factors(n, v))
             for k, (n, v) in enumerate(zip(_ARGS[:9], args[:9])) if v is not None]
    compound = 1 < desc.groups < desc.heads
    common = dict(replicated=frozenset({"l", "r", "p", "n", "c"}),
                  sizes=(("r", desc.heads // desc.groups),) if compound else ())
    return (_partition.ShardingRule(tuple(present), results, **common),
            _partition.ShardingRule((*present, *results), tuple(grads), **common))


def _local(desc: SsdChunkScanDescriptor, x, B) -> SsdChunkScanDescriptor:
    """``desc`` for a device's shard (batch, heads and groups from the shapes)."""
    return dataclasses.replace(desc, batch=x.shape[0], heads=x.shape[2], groups=B.shape[2])


def _scan_call(desc: SsdChunkScanDescriptor, choice: _op.Choice, which: int, args):
    """The kernels' forward (0) or backward (1, the parameters' gradients per batch row)
    on the present ``args`` (and, backward, the two cotangents), partitioned by
    :func:`sharding_rules`. Under ``vmap`` the mapped axis joins the batch; where a
    parameter (A, D, dt_bias) is mapped, and in the backward, a sequential map."""
    present = [v is not None for v in args]
    grads_present = present[:9]

    def kernel(*operands):
        full = _op.with_absent(operands[:sum(present)], present)
        local = _local(desc, full[0], full[3])
        if which == 0:
            return _scan_forward(*full, local, choice)
        cotangents = operands[sum(present):]
        out = _scan_gradients(*full, *cotangents, *[None] * (3 - len(cotangents)), local,
                              choice)
        return tuple(g for g, here in zip(out, grads_present) if here)

    def batched(axis_size, in_batched, *operands):
        call = _scan_call(desc, choice, which, args)
        mapped = _op.with_absent(in_batched[:sum(present)], present)
        if which == 1 or any(mapped[_ARGS.index(n)] for n in ("A", "D", "dt_bias")):
            # Per-example parameter gradients (and mapped parameters) do not fold.
            return jax.lax.map(lambda ops: call(*ops), operands)
        full = _op.with_absent(operands, present)
        folded = [None if v is None else v[0] if name in ("A", "D", "dt_bias")
                  else v.reshape(-1, *v.shape[2:]) for name, v in zip(_ARGS, full)]
        wider = dataclasses.replace(desc, batch=axis_size * desc.batch)
        outs = _scan_call(wider, choice, 0, folded)(*_op.present(folded))
        return tuple(v.reshape(axis_size, -1, *v.shape[1:]) for v in outs)

    rules = choice.implementation.sharding_rules(desc, args)
    return _partition.kernel_call(kernel, rules[which], batched, single_result=False)


_PARAMS = (2, 5, 7)   # A, D, dt_bias among the nine differentiable arguments


def _scan_gradients(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, dy, dfinal,
                    dstates, desc: SsdChunkScanDescriptor, choice: _op.Choice):
    """The nine differentiable arguments' gradients, the parameters' (:data:`_PARAMS`) per
    batch row, as :func:`_scan_backward` gives them."""
    diff = (x, dt, A, B, C, D, z, dt_bias, initial_states)
    if desc.seq_len and desc.batch:
        return _scan_backward(*diff, seq_idx, dy, dfinal, dstates, desc, choice)
    # The empty problem: autodiff of its zeros.
    _, vjp = jax.vjp(lambda *diff: _scan_forward(*diff, seq_idx, desc, choice), *diff)
    grads = list(vjp((dy, dfinal) + ((dstates,) if desc.return_varlen_states else ())))
    for k in _PARAMS:
        if grads[k] is not None:
            grads[k] = jnp.broadcast_to(grads[k], (desc.batch, *grads[k].shape)) * 0
    return tuple(grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11))
def _chunk_scan(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, desc, choice):
    args = (x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx)
    if choice.implementation.sharding_rules is None:   # partitioned by XLA
        return _scan_forward(*args, desc, choice)
    return tuple(_scan_call(desc, choice, 0, args)(*_op.present(args)))


def _chunk_scan_fwd(*args):
    return _chunk_scan(*args), args[:10]


def _chunk_scan_bwd(desc, choice, residuals, cotangents):
    args = tuple(residuals)
    if choice.on_xla:   # autodiff of the jnp implementation
        _, vjp = jax.vjp(lambda *diff: _scan_forward(*diff, args[9], desc, choice), *args[:9])
        return (*vjp(cotangents), None)
    grads = iter(_scan_call(desc, choice, 1, args)(*_op.present(args),
                                                    *cotangents))
    grads = [next(grads) if v is not None else None for v in args[:9]]
    for k in _PARAMS:   # summed over the batch rows (an all-reduce where the batch is split)
        grads[k] = None if grads[k] is None else grads[k].sum(0)
    return (*_partition.typed_like_primals(grads, args[:9]), None)


_chunk_scan.defvjp(_chunk_scan_fwd, _chunk_scan_bwd)


def _step_forward(state, x, dt, A, B, C, D, z, dt_bias, desc: SsdStepDescriptor, choice):
    a, bias, d = _params(A, D, dt_bias, desc.head_dim)
    if desc.batch == 0:
        return jnp.zeros(x.shape, x.dtype), state
    opts = desc.options
    kwargs = {"softplus": opts.dt_softplus, "limit": opts.dt_limit}
    if choice.on_xla:
        return xla_ssd.step(state, x, dt, a, B, C, bias, d, z, **kwargs)
    config = choice.config_for(desc, lambda: pallas_ssd.step_config(
        desc.heads, desc.head_dim, desc.state_dim))
    return pallas_ssd.step(state, x, dt, a, B, C, bias, d, z, interpret=choice.interpret,
                           config=config, **kwargs)


_STEP_ARGS = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")
_STEP_FACTORS = {"state": ("b", _HEADS, "p", "n"), "x": ("b", _HEADS, "p"), "dt": ("b", _HEADS),
                 "A": (_HEADS,), "B": ("b", "g", "n"), "C": ("b", "g", "n"), "D1": (_HEADS,),
                 "D2": (_HEADS, "p"), "z": ("b", _HEADS, "p"), "dt_bias": (_HEADS,)}


def step_sharding_rule(desc: SsdStepDescriptor, args) -> _partition.ShardingRule:
    """The step kernel's rule: batch and heads-with-groups split, as the scan's."""
    def factors(name, value):
        return _heads_as(_STEP_FACTORS[f"D{value.ndim}" if name == "D" else name],
                         desc.groups, desc.heads)
    present = tuple(factors(n, v) for n, v in zip(_STEP_ARGS, args) if v is not None)
    compound = 1 < desc.groups < desc.heads
    return _partition.ShardingRule(
        present, (factors("x", args[1]), factors("state", args[0])),
        replicated=frozenset({"r", "p", "n"}),
        sizes=(("r", desc.heads // desc.groups),) if compound else ())


def _step_call(desc: SsdStepDescriptor, choice: _op.Choice, args):
    """The step kernel on the present ``args``, partitioned by :func:`step_sharding_rule`;
    under ``vmap`` the mapped axis joins the batch (a sequential map where a parameter
    is mapped)."""
    present = [v is not None for v in args]

    def kernel(*operands):
        full = _op.with_absent(operands, present)
        local = dataclasses.replace(desc, batch=full[1].shape[0], heads=full[1].shape[1],
                                    groups=full[4].shape[1])
        return _step_forward(*full, local, choice)

    def batched(axis_size, in_batched, *operands):
        mapped = _op.with_absent(in_batched, present)
        if any(mapped[_STEP_ARGS.index(n)] for n in ("A", "D", "dt_bias")):
            return jax.lax.map(lambda ops: _step_call(desc, choice, args)(*ops), operands)
        full = _op.with_absent(operands, present)
        folded = [None if v is None else v[0] if name in ("A", "D", "dt_bias")
                  else v.reshape(-1, *v.shape[2:]) for name, v in zip(_STEP_ARGS, full)]
        wider = dataclasses.replace(desc, batch=axis_size * desc.batch)
        outs = _step_call(wider, choice, folded)(*_op.present(folded))
        return tuple(v.reshape(axis_size, -1, *v.shape[1:]) for v in outs)

    rule = choice.implementation.sharding_rules(desc, args)
    return _partition.kernel_call(kernel, rule, batched, single_result=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10))
def _step(state, x, dt, A, B, C, D, z, dt_bias, desc, choice):
    args = (state, x, dt, A, B, C, D, z, dt_bias)
    if choice.implementation.sharding_rules is None or desc.batch == 0:   # partitioned by XLA
        return _step_forward(*args, desc, choice)
    return tuple(_step_call(desc, choice, args)(*_op.present(args)))


def _step_fwd(*args):
    return _step_forward(*args), args[:9]


def _step_bwd(desc, choice, residuals, cotangents):
    # One token is a few elementwise ops per state cell: autodiff of the jnp step.
    _, vjp = jax.vjp(lambda *args: _step_forward(*args, desc, _XLA_STEP), *residuals)
    return vjp(cotangents)


_step.defvjp(_step_fwd, _step_bwd)


def tuning_key(desc: SsdChunkScanDescriptor) -> str:
    """The problem's key in the tuning cache: extents, dtype and the optional inputs that
    change the kernels."""
    return problem_key(batch=desc.batch, seq_len=desc.seq_len, heads=desc.heads,
                       head_dim=desc.head_dim, groups=desc.groups, state_dim=desc.state_dim,
                       chunk_size=desc.chunk_size, dtype=jnp.dtype(desc.dtype).name,
                       d=desc.options.d_shape, z=desc.options.has_z,
                       initial_states=desc.has_initial_states, seq_idx=desc.has_seq_idx,
                       varlen_states=desc.return_varlen_states)


def _check_scan_config(desc: SsdChunkScanDescriptor,
                       config: pallas_ssd_backward.ChunkScanConfig) -> None:
    """Launchable tiles that divide the chunk and the heads of a group as the kernels need."""
    op, per_group = "ssd_chunk_scan", desc.heads // desc.groups
    forward, backward = config.forward, config.backward
    for name, tile in (("forward", forward), ("backward", backward)):
        if tile is not None:
            _op.check_launch(tile, op, f"config.{name}")
    divides = [] if forward is None else [
        ("forward.block_q", forward.block_q, desc.chunk_size, "chunk_size"),
        ("forward.block_t", forward.block_t, desc.chunk_size, "chunk_size"),
        ("forward.block_s", forward.block_s, forward.block_t, "forward.block_t"),
        ("forward.block_h", forward.block_h, per_group, "heads per group")]
    divides += [] if backward is None else [
        ("backward.block_q", backward.block_q, desc.chunk_size, "chunk_size"),
        ("backward.block", backward.block, desc.chunk_size, "chunk_size"),
        ("backward.block_h", backward.block_h, per_group, "heads per group"),
        ("backward.source_block_h", backward.source_block_h, per_group, "heads per group")]
    for name, value, whole, whole_name in divides:
        _op.check(whole % value == 0, op, f"config.{name}", f"a divisor of {whole_name} = "
                  f"{whole}", value)
    for name, tile in (("forward", forward), ("backward", backward)):
        if tile is not None:
            _op.check(tile.block_n >= 16, op, f"config.{name}.block_n",
                      "at least 16 (the smallest matmul the state kernels run)", tile.block_n)


def step_tuning_key(desc: SsdStepDescriptor) -> str:
    """The step's key in the tuning cache: extents, dtype and the optional inputs that
    change the kernel."""
    return problem_key(batch=desc.batch, heads=desc.heads, head_dim=desc.head_dim,
                       groups=desc.groups, state_dim=desc.state_dim,
                       dtype=jnp.dtype(desc.dtype).name, d=desc.options.d_shape,
                       z=desc.options.has_z, dt_bias=desc.options.has_dt_bias)


def _check_step_config(desc: SsdStepDescriptor, config: pallas_ssd.StepConfig) -> None:
    """Launchable, with whole programs of heads (a partial one would leave heads
    unwritten)."""
    _op.check_launch(config, "ssd_step")
    _op.check(desc.heads % config.heads_per_program == 0, "ssd_step",
              "config.heads_per_program", f"a divisor of heads = {desc.heads}",
              config.heads_per_program)


# The forward's state kernels, walked or passed along (the heuristic's choice; an explicit
# or tuned config's ``forward.state_passing`` says which it runs).
_STATE_KERNELS = {False: ("bjax_ssd_chunk_states",),
                  True: ("bjax_ssd_chunk_local_states", "bjax_ssd_pass_states")}

CHUNK_SCAN_IMPLEMENTATIONS = (
    _op.Implementation(
        "pallas_triton", ("pallas", "interpret"),
        kernel=lambda desc: " + ".join(("bjax_ssd_time_terms", *_STATE_KERNELS[
            desc.kernel_config.state_passing], "bjax_ssd_chunk_scan")),
        config_type=pallas_ssd_backward.ChunkScanConfig,
        default_config=lambda desc: pallas_ssd_backward.ChunkScanConfig(desc.kernel_config,
                                                                        desc.backward_config),
        check=functools.partial(_kernel_dims_rule, op="ssd_chunk_scan"),
        check_config=_check_scan_config, sharding_rules=sharding_rules,
        tuning_key=tuning_key),
    _op.Implementation("xla", ("xla",), kernel=lambda desc: "bjax.xla.ssd.chunk_scan"),
)
"""``ssd_chunk_scan``'s implementation table, in order of preference."""

STEP_IMPLEMENTATIONS = (
    _op.Implementation(
        "pallas_triton", ("pallas", "interpret"), kernel=lambda desc: "bjax_ssd_step",
        config_type=pallas_ssd.StepConfig,
        default_config=lambda desc: pallas_ssd.step_config(desc.heads, desc.head_dim,
                                                           desc.state_dim),
        check=functools.partial(_kernel_dims_rule, op="ssd_step"),
        check_config=_check_step_config, sharding_rules=step_sharding_rule,
        tuning_key=step_tuning_key),
    _op.Implementation("xla", ("xla",), kernel=lambda desc: "bjax.xla.ssd.step"),
)
"""``ssd_step``'s implementation table, in order of preference."""
# The step's backward is autodiff of the jnp step on every implementation.
_XLA_STEP = _op.Choice(STEP_IMPLEMENTATIONS[-1], "xla")


def _prepare_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit,
                  initial_states, seq_idx, return_final_states, backend, config,
                  cu_seqlens=None, return_varlen_states=False):
    desc = SsdChunkScanDescriptor.from_args(
        x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias,
        dt_softplus=dt_softplus, dt_limit=dt_limit, initial_states=initial_states,
        seq_idx=seq_idx, return_final_states=return_final_states, cu_seqlens=cu_seqlens,
        return_varlen_states=return_varlen_states)
    return desc, _op.select(CHUNK_SCAN_IMPLEMENTATIONS, desc, backend, config,
                            op="ssd_chunk_scan")


def _prepare_step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, backend, config):
    desc = SsdStepDescriptor.from_args(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                       dt_softplus=dt_softplus, dt_limit=dt_limit)
    return desc, _op.select(STEP_IMPLEMENTATIONS, desc, backend, config, op="ssd_step")


def ssd_chunk_scan(x: ArrayLike, dt: ArrayLike, A: ArrayLike, B: ArrayLike, C: ArrayLike, *,
                   chunk_size: int = 256, D: ArrayLike | None = None, z: ArrayLike | None = None,
                   dt_bias: ArrayLike | None = None, dt_softplus: bool = False,
                   dt_limit: tuple[float, float] = (0.0, float("inf")),
                   initial_states: ArrayLike | None = None, seq_idx: ArrayLike | None = None,
                   cu_seqlens: ArrayLike | None = None, return_final_states: bool = False,
                   return_varlen_states: bool = False, backend: _op.Backend = None,
                   config: pallas_ssd_backward.ChunkScanConfig | None = None
                   ) -> jax.Array | tuple[jax.Array, ...]:
    """Mamba-2's selective state-space scan over whole sequences, chunked (module doc).

    Args:
      x: ``[batch, seqlen, heads, head_dim]``, float32 / float16 / bfloat16.
      dt: ``[batch, seqlen, heads]`` step sizes (any of those float dtypes).
      A: ``[heads]`` (negative for a decaying state); any float dtype, used in float32.
      B, C: ``[batch, seqlen, groups, state_dim]`` in x's dtype, ``heads % groups == 0``.
      chunk_size: a power of two from 16 to 1024 (results agree across chunk
        sizes up to rounding; 256 suits long sequences, 64-128 short ones).
      D: optional skip ``[heads]`` or ``[heads, head_dim]``.
      z: optional gate, x's shape and dtype: ``y * silu(z)``.
      dt_bias: optional ``[heads]``, added to dt.
      dt_softplus: apply softplus to ``dt + dt_bias``.
      dt_limit: ``(low, high)``: the processed dt is clamped to it (the default
        ``(0, inf)`` maps negative step sizes to 0 and changes nothing else).
      initial_states: optional ``[batch, heads, head_dim, state_dim]`` state before
        the first step (of the first segment, with ``seq_idx``); used in float32.
      seq_idx: optional integer ``[batch, seqlen]``: the state restarts at 0
        wherever it changes (packed sequences).
      cu_seqlens: optional integer ``[num_seqs + 1]`` (mamba_ssm's): with ``batch == 1``,
        sequence ``i`` is steps ``cu_seqlens[i] .. cu_seqlens[i + 1] - 1`` of the row
        (``cu_seqlens[0] = 0``, non-decreasing, at most seqlen; steps past the last
        boundary form one more segment). It sets the segments as ``seq_idx`` would
        (give one of the two) and lets ``return_varlen_states`` find each sequence's end.
      return_final_states: also return the state after the last step.
      return_varlen_states: also return each sequence's final state, float32
        ``[num_seqs, heads, head_dim, state_dim]`` (needs ``cu_seqlens``; an empty
        sequence's is 0; ``initial_states`` seeds the sequence at step 0), to continue
        every packed sequence with :func:`ssd_step`. Differentiable like ``y``.
      backend: ``None`` (``$BJAX_BACKEND``, else the first of
        :data:`CHUNK_SCAN_IMPLEMENTATIONS` that runs the call here: Pallas on CUDA
        GPUs up to :data:`MAX_DIM` heads, head_dim and state_dim, XLA elsewhere),
        ``"pallas"``, ``"interpret"`` or ``"xla"``.
      config: the kernels' configurations, forward and backward (``None`` in either:
        its heuristic).

    Returns:
      ``y`` ``[batch, seqlen, heads, head_dim]`` in x's dtype, followed (in a tuple) by
      ``final_states`` float32 ``[batch, heads, head_dim, state_dim]`` with
      ``return_final_states`` and ``varlen_states`` with ``return_varlen_states``.

    Raises:
      InvalidProblemError: shapes that do not fit together, a chunk_size that is
        not a power of two in range, groups not dividing heads, non-bool flags,
        a bad dt_limit, B / C / z of another dtype than x, non-integer seq_idx;
        cu_seqlens not an integer vector of 2 or more, given with seq_idx or with
        batch != 1; return_varlen_states without cu_seqlens;
        ``config`` of another type, not launchable, or with blocks that do not divide
        the chunk or a group's heads.
      UnsupportedError: x not float32 / float16 / bfloat16, a non-float parameter;
        heads, head_dim or state_dim over 256 on the Pallas kernels (an explicit
        kernel backend, or ``config``); ``backend="pallas"`` without a CUDA GPU.
    """
    x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens = _op.asarrays(
        x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens)
    desc, choice = _prepare_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus,
                                 dt_limit, initial_states, seq_idx, return_final_states,
                                 backend, config, cu_seqlens, return_varlen_states)
    if cu_seqlens is not None:
        seq_idx = _varlen.sequence_numbers(cu_seqlens, desc.seq_len)
    out = _chunk_scan(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, desc, choice)
    results = (out[0],) + ((out[1],) if desc.return_final_states else ())
    if desc.return_varlen_states:
        results += (_varlen.ssd_states(
            x[0], dt[0], A, B[0], dt_bias, out[2][0], cu_seqlens, chunk_size=desc.chunk_size,
            softplus=desc.options.dt_softplus, limit=desc.options.dt_limit),)
    return results[0] if len(results) == 1 else results


def ssd_step(state: ArrayLike, x: ArrayLike, dt: ArrayLike, A: ArrayLike, B: ArrayLike,
             C: ArrayLike, *, D: ArrayLike | None = None, z: ArrayLike | None = None,
             dt_bias: ArrayLike | None = None, dt_softplus: bool = False,
             dt_limit: tuple[float, float] = (0.0, float("inf")), backend: _op.Backend = None,
             config: pallas_ssd.StepConfig | None = None) -> tuple[jax.Array, jax.Array]:
    """One decoding step of the recurrence (module doc) for every sequence of a batch.

    Args:
      state: float32 ``[batch, heads, head_dim, state_dim]``, the state before
        this token; updated in place when donated to the enclosing ``jit``.
      x: ``[batch, heads, head_dim]``; dt ``[batch, heads]``; B, C
        ``[batch, groups, state_dim]``; A, D, z, dt_bias, dt_softplus, dt_limit,
        backend: as in :func:`ssd_chunk_scan`, without the sequence axis
        (:data:`STEP_IMPLEMENTATIONS`).
      config: the step kernel's launch configuration; ``None``: the heuristic.

    Returns:
      ``(y [batch, heads, head_dim]`` in x's dtype, ``new_state)``. Running it over
      a sequence matches ``ssd_chunk_scan(..., return_final_states=True)``.

    Raises:
      InvalidProblemError / UnsupportedError: as :func:`ssd_chunk_scan`; a state
      that is not float32.
    """
    state, x, dt, A, B, C, D, z, dt_bias = _op.asarrays(state, x, dt, A, B, C, D, z, dt_bias)
    desc, choice = _prepare_step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit,
                                 backend, config)
    return _step(state, x, dt, A, B, C, D, z, dt_bias, desc, choice)


_PRECISION = _op.PrecisionGuarantee(
    math_precision="float32", accumulator="float32", deterministic=True,
    bit_stable_on_same_hardware=True,
    notes="matmul operands in the input dtype (float32 inputs: full float32, no TF32); "
          "dt, cumulative sums and states in float32; every exponent masked before exp")


@_op.register_planner(ssd_chunk_scan)
def _plan_chunk_scan(x, dt, A, B, C, *, chunk_size=256, D=None, z=None, dt_bias=None,
                     dt_softplus=False, dt_limit=(0.0, float("inf")), initial_states=None,
                     seq_idx=None, cu_seqlens=None, return_final_states=False,
                     return_varlen_states=False, backend=None, config=None):
    desc, choice = _prepare_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus,
                                 dt_limit, initial_states, seq_idx, return_final_states,
                                 backend, config, *_op.asarrays(cu_seqlens),
                                 return_varlen_states)
    return _op.Plan.of("ssd_chunk_scan", desc, choice, _PRECISION)


@_op.register_planner(ssd_step)
def _plan_step(state, x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False,
               dt_limit=(0.0, float("inf")), backend=None, config=None):
    desc, choice = _prepare_step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit,
                                 backend, config)
    return _op.Plan.of("ssd_step", desc, choice, _PRECISION)
