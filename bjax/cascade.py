"""Cascade-attention merge: ``merge_state`` (two partial states) and ``merge_states`` (K).

A partial attention state is ``(v, s)``: the attention output over a subset of
the keys and ``s``, the log-sum-exp of its scores, in base ``lse_base`` (2, the
convention of FlashInfer; or ``"e"``, that of flash-attn, vLLM and tokamax).
Merging is exact softmax re-weighting, in float32 (float64 for float64 ``v``):

    m = max_k s_k,   w_k = b^(s_k - m),
    v = sum_k w_k v_k / sum_k w_k,   s = m + log_b sum_k w_k.

Empty states: ``s = -inf`` (attention over zero keys) has weight 0 and its
``v`` is never read, whatever it holds; merged with a non-empty state the
result is that state bit for bit, and empty with empty is ``(0, -inf)``.
``s = +inf`` is not a log-sum-exp; flash-attn emits it for rows with no keys,
so it is read as an empty state too (the result's ``s`` is then ``-inf``, never
``+inf``). NaN in a non-empty state (in ``v`` or ``s``) propagates.

Gradients (``custom_vjp``, Pallas backward kernels): with ``p_k = w_k / sum_j w_j``,
``dv_k = p_k dv`` and ``ds_k = p_k (ds + ln(b) <dv, v_k - v>)``; 0 into empty states.

Sharded programs: the kernels run on each device's shard, split along the steps and
the heads (and head_dim in the forward) with no collective, the results sharded as
the states (:func:`sharding_rules`). The index sets of ``merge_states`` stay whole,
and so does head_dim in the backward, which sums over it.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from bjax import _op, _partition
from bjax.errors import UnsupportedError
from bjax.tune.cache import problem_key
from bjax.xla import cascade as xla_cascade
from pallas_kernels import cascade as pallas_cascade
from pallas_kernels.formulas import cascade as formulas_cascade

LSE_BASES = formulas_cascade.BASES
LseBase = Literal[2, "e"]
_V_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


@dataclasses.dataclass(frozen=True)
class CascadeMergeDescriptor:
    """Static facts of one merge (hashable; the custom_vjp's static argument).

    Attributes:
      op: ``"merge_state"`` (two states) or ``"merge_states"`` (``num_states``).
      seq_len, num_states, num_heads, head_dim: extents.
      v_dtype: dtype of every ``v`` (and of the merged ``v``).
      s_dtype: dtype of every ``s`` (float32; float64 with float64 ``v``).
      lse_base: 2 or ``"e"``.
      masked: ``merge_state`` was given a row mask.
      in_place: ``merge_state`` writes over ``v_a, s_a`` (Pallas backend).
    """
    op: str
    seq_len: int
    num_states: int
    num_heads: int
    head_dim: int
    v_dtype: np.dtype
    s_dtype: np.dtype
    lse_base: int | str
    masked: bool = False
    in_place: bool = False

    @property
    def v_shape(self) -> tuple[int, int, int]:
        """Shape of one state's (and the merged) ``v``."""
        return (self.seq_len, self.num_heads, self.head_dim)

    @property
    def kernel_config(self) -> pallas_cascade.TileConfig:
        return pallas_cascade.default_config(self.seq_len, self.num_heads, self.head_dim)

    @property
    def backward_config(self) -> pallas_cascade.TileConfig:
        return pallas_cascade.backward_config(self.seq_len, self.num_heads, self.head_dim)



@dataclasses.dataclass(frozen=True)
class MergeStateDescriptor(CascadeMergeDescriptor):
    """A :class:`CascadeMergeDescriptor` of ``merge_state`` (two states)."""

    @classmethod
    def from_args(cls, v_a, s_a, v_b, s_b, mask, lse_base, in_place):
        """Validates a ``merge_state`` call; raises naming the argument."""
        op = "merge_state"
        _check_base(lse_base, op)
        _op.check_bool(in_place, op, "in_place")
        _check_v(v_a, "v_a", 3, "[seq_len, num_heads, head_dim]", op)
        for name, x in (("v_b", v_b), ("s_a", s_a), ("s_b", s_b)):
            expected = v_a.shape if name == "v_b" else v_a.shape[:2]
            _op.check(tuple(x.shape) == tuple(expected), op, f"{name}.shape",
                      f"{tuple(expected)} to match v_a {tuple(v_a.shape)}", tuple(x.shape))
        _op.check(v_b.dtype == v_a.dtype, op, "v_b.dtype", f"{v_a.dtype} (v_a's dtype)",
                  jnp.dtype(v_b.dtype).name)
        _check_s(s_a, "s_a", v_a.dtype, op)
        _op.check(s_b.dtype == s_a.dtype, op, "s_b.dtype", f"{s_a.dtype} (s_a's dtype)",
                  jnp.dtype(s_b.dtype).name)
        if mask is not None:
            _op.check(tuple(mask.shape) == (v_a.shape[0],) and mask.dtype == jnp.bool_, op,
                      "mask", f"None or a bool array of shape ({v_a.shape[0]},) (seq_len)",
                      f"{jnp.dtype(mask.dtype).name} of shape {tuple(mask.shape)}")
        seq_len, num_heads, head_dim = map(int, v_a.shape)
        return cls(op, seq_len, 2, num_heads, head_dim, jnp.dtype(v_a.dtype),
                   jnp.dtype(s_a.dtype), lse_base, mask is not None, bool(in_place))



@dataclasses.dataclass(frozen=True)
class MergeStatesDescriptor(CascadeMergeDescriptor):
    """A :class:`CascadeMergeDescriptor` of ``merge_states`` (``num_states`` states)."""

    @classmethod
    def from_args(cls, v, s, lse_base):
        """Validates a ``merge_states`` call; raises naming the argument."""
        op = "merge_states"
        _check_base(lse_base, op)
        _check_v(v, "v", 4, "[seq_len, num_index_sets, num_heads, head_dim]", op)
        _op.check(v.shape[1] >= 1, op, "v.shape[1] (num_index_sets)", ">= 1", v.shape[1])
        _op.check(tuple(s.shape) == tuple(v.shape[:3]), op, "s.shape",
                  f"{tuple(v.shape[:3])} to match v {tuple(v.shape)}", tuple(s.shape))
        _check_s(s, "s", v.dtype, op)
        seq_len, num_states, num_heads, head_dim = map(int, v.shape)
        return cls(op, seq_len, num_states, num_heads, head_dim, jnp.dtype(v.dtype),
                   jnp.dtype(s.dtype), lse_base)


def _check_base(lse_base, op):
    _op.check(type(lse_base) in (int, str) and lse_base in LSE_BASES, op, "lse_base",
              "2 (FlashInfer's log2-sum-exp) or 'e' (flash-attn's, vLLM's)", repr(lse_base))


def _check_v(v, name, rank, layout, op):
    _op.check(len(v.shape) == rank, op, name, f"an array of rank {rank} {layout}",
              f"shape {tuple(v.shape)}")
    _op.check(v.shape[-1] >= 1 and v.shape[-2] >= 1, op, f"{name}.shape",
              "num_heads >= 1 and head_dim >= 1", tuple(v.shape))
    dtype = jnp.dtype(v.dtype)
    _op.check(dtype in [jnp.dtype(d) for d in _V_DTYPES], op, f"{name}.dtype",
              "float16, bfloat16, float32 or float64", dtype.name, UnsupportedError)
    _op.check(dtype != jnp.float64 or jax.config.jax_enable_x64, op, f"{name}.dtype",
              "float64 only with jax_enable_x64 on", dtype.name, UnsupportedError)


def _check_s(s, name, v_dtype, op):
    allowed = ("float32", "float64") if jnp.dtype(v_dtype) == jnp.float64 else ("float32",)
    _op.check(jnp.dtype(s.dtype).name in allowed, op, f"{name}.dtype",
              " or ".join(allowed) + f" (a log-sum-exp, with v in {jnp.dtype(v_dtype).name})",
              jnp.dtype(s.dtype).name)


def _kernel_options(desc: CascadeMergeDescriptor, choice: _op.Choice, backward=False) -> dict:
    if choice.on_xla:
        return {"base": desc.lse_base}
    given = choice.config_for(desc, pallas_cascade.MergeConfig)
    tile = given.backward if backward else given.forward
    if tile is None:
        tile = desc.backward_config if backward else desc.kernel_config
    return {"base": desc.lse_base, "config": tile, "interpret": choice.interpret}


def _kernels(choice: _op.Choice):
    return xla_cascade if choice.on_xla else pallas_cascade


def _kernel_mask(mask, choice: _op.Choice):
    # The kernels read the row mask as int8 (no bool memory in the Triton lowering).
    return mask if mask is None or choice.on_xla else mask.astype(jnp.int8)


# Factors (bjax._partition): steps t, heads h, head_dim d, index sets k. Steps and heads
# split everywhere; the backward sums over d (<dv, v_k - v>) and every merge over k, so
# those stay whole where they are summed.
_V, _S, _MANY_V, _MANY_S = ("t", "h", "d"), ("t", "h"), ("t", "k", "h", "d"), ("t", "k", "h")


def sharding_rules(desc: CascadeMergeDescriptor) -> tuple[_partition.ShardingRule, ...]:
    """The forward's and the backward's rules of ``desc``'s merge."""
    rule = _partition.ShardingRule
    if desc.op == "merge_states":
        return (rule((_MANY_V, _MANY_S), (_V, _S), frozenset({"k"})),
                rule((_MANY_V, _MANY_S, _V, _S), (_MANY_V, _MANY_S), frozenset({"k", "d"})))
    operands = (_V, _S, _V, _S) + ((("t",),) if desc.masked else ())
    return (rule(operands, (_V, _S)),
            rule(operands + (_V, _S), (_V, _S, _V, _S), frozenset({"d"})))


def _local(desc: CascadeMergeDescriptor, v) -> CascadeMergeDescriptor:
    """``desc`` for the shard ``v`` of a state (extents from its shape)."""
    return dataclasses.replace(desc, seq_len=v.shape[0], num_heads=v.shape[-2],
                               head_dim=v.shape[-1])


def _pair_kernel(desc, choice, in_place, v_a, s_a, v_b, s_b, *mask):
    return _kernels(choice).merge_pair(
        v_a, s_a, v_b, s_b, _kernel_mask(mask[0] if mask else None, choice),
        in_place=in_place, **_kernel_options(_local(desc, v_a), choice))


def _pair_backward_kernel(desc, choice, v_a, s_a, v_b, s_b, *rest):
    *mask, dv, ds = rest
    return _kernels(choice).merge_pair_backward(
        v_a, s_a, v_b, s_b, _kernel_mask(mask[0] if mask else None, choice), dv, ds,
        **_kernel_options(_local(desc, v_a), choice, backward=True))


def _many_kernel(desc, choice, v, s):
    return _kernels(choice).merge_many(v, s, **_kernel_options(_local(desc, v), choice))


def _many_backward_kernel(desc, choice, v, s, dv, ds):
    return _kernels(choice).merge_many_backward(
        v, s, dv, ds, **_kernel_options(_local(desc, v), choice, backward=True))


def _call(desc: CascadeMergeDescriptor, choice: _op.Choice, which: int, in_place=False):
    """The forward (0) or backward (1) call of ``desc``'s merge on its operands (the mask
    last but the cotangents, where there is one), partitioned by the implementation's
    rules (none: XLA partitions it). Under ``vmap`` the batch folds into the steps."""
    kernels = ((functools.partial(_many_kernel, desc, choice),
                functools.partial(_many_backward_kernel, desc, choice))
               if desc.op == "merge_states" else
               (functools.partial(_pair_kernel, desc, choice, in_place),
                functools.partial(_pair_backward_kernel, desc, choice)))
    kernel = kernels[which]
    rules = choice.implementation.sharding_rules
    if rules is None:
        return kernel

    def batched(axis_size, in_batched, *operands):
        del in_batched
        wider = dataclasses.replace(desc, seq_len=axis_size * desc.seq_len)
        folded = [v.reshape(-1, *v.shape[2:]) for v in operands]
        outs = _call(wider, choice, which, in_place)(*folded)
        return tuple(v.reshape(axis_size, -1, *v.shape[1:]) for v in outs)

    return _partition.kernel_call(kernel, rules(desc)[which], batched, single_result=False)


def _pair_forward(v_a, s_a, v_b, s_b, mask, desc, choice, in_place):
    if desc.seq_len == 0:
        return v_a, s_a
    masks = () if mask is None else (mask,)
    return tuple(_call(desc, choice, 0, in_place)(v_a, s_a, v_b, s_b, *masks))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _merge_pair(v_a, s_a, v_b, s_b, mask, desc: CascadeMergeDescriptor, choice: _op.Choice):
    return _pair_forward(v_a, s_a, v_b, s_b, mask, desc, choice, desc.in_place)


def _merge_pair_fwd(v_a, s_a, v_b, s_b, mask, desc, choice):
    # v_a and s_a stay alive for the backward: written over, XLA would first copy them.
    out = _pair_forward(v_a, s_a, v_b, s_b, mask, desc, choice, in_place=False)
    return out, (v_a, s_a, v_b, s_b, mask)


def _merge_pair_bwd(desc, choice, residuals, cotangents):
    v_a, s_a, v_b, s_b, mask = residuals
    dv, ds = cotangents
    if desc.seq_len == 0:
        return dv, ds, jnp.zeros_like(v_b), jnp.zeros_like(s_b), None
    masks = () if mask is None else (mask,)
    grads = _call(desc, choice, 1)(v_a, s_a, v_b, s_b, *masks, dv, ds)
    return (*_partition.typed_like_primals(grads, (v_a, s_a, v_b, s_b)), None)


_merge_pair.defvjp(_merge_pair_fwd, _merge_pair_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _merge_many(v, s, desc: CascadeMergeDescriptor, choice: _op.Choice):
    if desc.seq_len == 0:
        return jnp.zeros(desc.v_shape, desc.v_dtype), jnp.zeros(desc.v_shape[:2], desc.s_dtype)
    return tuple(_call(desc, choice, 0)(v, s))


def _merge_many_fwd(v, s, desc, choice):
    return _merge_many(v, s, desc, choice), (v, s)


def _merge_many_bwd(desc, choice, residuals, cotangents):
    v, s = residuals
    if desc.seq_len == 0:
        return jnp.zeros_like(v), jnp.zeros_like(s)
    return _partition.typed_like_primals(_call(desc, choice, 1)(v, s, *cotangents), (v, s))


_merge_many.defvjp(_merge_many_fwd, _merge_many_bwd)


def _check_config(desc: CascadeMergeDescriptor, config: pallas_cascade.MergeConfig) -> None:
    # The kernels mask partial tiles of steps and heads: any launchable tile runs.
    for tile in (config.forward, config.backward):
        if tile is not None:
            _op.check_launch(tile, desc.op)


def tuning_key(desc: CascadeMergeDescriptor) -> str:
    """The problem's key in the tuning cache (the op is the cache's op name)."""
    return problem_key(seq_len=desc.seq_len, num_states=desc.num_states,
                       num_heads=desc.num_heads, head_dim=desc.head_dim,
                       v_dtype=jnp.dtype(desc.v_dtype).name, s_dtype=jnp.dtype(desc.s_dtype).name,
                       lse_base=desc.lse_base, masked=desc.masked, in_place=desc.in_place)


def _kernel_name(desc: CascadeMergeDescriptor) -> str:
    return f"bjax_{desc.op}"


def _xla_name(desc: CascadeMergeDescriptor) -> str:
    return f"bjax.xla.cascade.{'merge_pair' if desc.op == 'merge_state' else 'merge_many'}"


IMPLEMENTATIONS = (
    _op.Implementation(
        "pallas_triton", ("pallas", "interpret"), kernel=_kernel_name,
        config_type=pallas_cascade.MergeConfig,
        default_config=lambda desc: pallas_cascade.MergeConfig(desc.kernel_config,
                                                               desc.backward_config),
        check_config=_check_config, sharding_rules=sharding_rules, tuning_key=tuning_key),
    _op.Implementation("xla", ("xla",), kernel=_xla_name),
)
"""The merges' implementation table, in order of preference."""


def merge_state(v_a: ArrayLike, s_a: ArrayLike, v_b: ArrayLike, s_b: ArrayLike, *,
                mask: ArrayLike | None = None, lse_base: LseBase = 2, in_place: bool = False,
                backend: _op.Backend = None, config: pallas_cascade.MergeConfig | None = None
                ) -> tuple[jax.Array, jax.Array]:
    """Merges two partial attention states (see the module doc for the formula).

    Args:
      v_a, v_b: ``[seq_len, num_heads, head_dim]``, float16 / bfloat16 / float32
        (float64 with x64 on), same dtype.
      s_a, s_b: ``[seq_len, num_heads]`` log-sum-exps, float32 (float64 allowed
        with float64 ``v``).
      mask: optional bool ``[seq_len]``; rows where it is False return
        ``(v_a, s_a)`` unchanged (and are not read from ``b``).
      lse_base: 2 (default) or ``"e"``: the base of every ``s``, in and out.
      in_place: as baracuda-kernels' ``CascadeAttentionPlan::merge_in_place``: the Pallas kernel writes the
        result over ``v_a, s_a``, saving a buffer when they are donated to the
        enclosing ``jit`` or computed inside it and not used afterwards (the
        prefix attention's output). Where ``v_a`` stays alive (a jit argument
        not donated, a value used again) XLA must copy it first, which costs
        more than the merge. Off by default: a fresh output is also the faster
        one (writing over the buffer just read costs an H200 about 8%,
        BENCHMARKS.md). Under differentiation the forward never writes in
        place (``v_a`` is kept for the backward). The XLA backend decides by
        itself, in place when ``v_a`` is donated.
      backend: ``None`` (``$BJAX_BACKEND``, else the first of :data:`IMPLEMENTATIONS`
        that runs here: Pallas on CUDA GPUs, XLA elsewhere), ``"pallas"``,
        ``"interpret"`` or ``"xla"``.
      config: the kernels' tiles (``[block_rows steps, block_cols heads]``, whole
        head_dim) of the forward and the backward; ``None``: the heuristics.

    Returns:
      ``(v, s)`` in the dtypes of ``(v_a, s_a)``.

    Raises:
      InvalidProblemError: shapes or dtypes of the two sides differ, ``s`` is not
        float32, a bad mask, an unknown ``lse_base``, a non-bool ``in_place``,
        zero heads or head_dim; ``config`` not a ``MergeConfig`` or not launchable.
      UnsupportedError: ``v`` not a float dtype listed above; ``backend="pallas"``
        without a CUDA GPU; ``config`` with the XLA backend.
    """
    v_a, s_a, v_b, s_b = map(jnp.asarray, (v_a, s_a, v_b, s_b))
    mask = None if mask is None else jnp.asarray(mask)
    desc = MergeStateDescriptor.from_args(v_a, s_a, v_b, s_b, mask, lse_base, in_place)
    choice = _op.select(IMPLEMENTATIONS, desc, backend, config, op=desc.op)
    return _merge_pair(v_a, s_a, v_b, s_b, mask, desc, choice)


def merge_states(v: ArrayLike, s: ArrayLike, *, lse_base: LseBase = 2,
                 backend: _op.Backend = None, config: pallas_cascade.MergeConfig | None = None
                 ) -> tuple[jax.Array, jax.Array]:
    """Merges ``num_index_sets`` partial attention states (see the module doc).

    Args:
      v: ``[seq_len, num_index_sets, num_heads, head_dim]``, float16 / bfloat16 /
        float32 (float64 with x64 on).
      s: ``[seq_len, num_index_sets, num_heads]`` log-sum-exps, float32 (float64
        allowed with float64 ``v``).
      lse_base: 2 (default) or ``"e"``.
      backend, config: as in :func:`merge_state`.

    Returns:
      ``(v [seq_len, num_heads, head_dim], s [seq_len, num_heads])`` in the
      dtypes of ``(v, s)``.

    Raises:
      InvalidProblemError: ``s`` of the wrong shape or dtype, no index sets, an
        unknown ``lse_base``, zero heads or head_dim.
      UnsupportedError: as in :func:`merge_state`.
    """
    v, s = jnp.asarray(v), jnp.asarray(s)
    desc = MergeStatesDescriptor.from_args(v, s, lse_base)
    return _merge_many(v, s, desc, _op.select(IMPLEMENTATIONS, desc, backend, config,
                                              op=desc.op))


_PRECISION_NOTES = ("weights by exp2 (base 2) or exp (base e) in the math dtype; a state "
                    "merged with empty states comes back bit for bit")


def _plan(desc: CascadeMergeDescriptor, backend, config) -> _op.Plan:
    math = formulas_cascade.compute_dtype(desc.v_dtype).name
    return _op.Plan.of(desc.op, desc, _op.select(IMPLEMENTATIONS, desc, backend, config,
                                                 op=desc.op),
                       _op.PrecisionGuarantee(math_precision=math, accumulator=math,
                                              deterministic=True,
                                              bit_stable_on_same_hardware=True,
                                              notes=_PRECISION_NOTES))


@_op.register_planner(merge_state)
def _plan_merge_state(v_a, s_a, v_b, s_b, *, mask=None, lse_base=2, in_place=False,
                      backend=None, config=None):
    desc = MergeStateDescriptor.from_args(v_a, s_a, v_b, s_b, mask, lse_base, in_place)
    return _plan(desc, backend, config)


@_op.register_planner(merge_states)
def _plan_merge_states(v, s, *, lse_base=2, backend=None, config=None):
    return _plan(MergeStatesDescriptor.from_args(v, s, lse_base), backend, config)
