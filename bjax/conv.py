"""Causal depthwise 1-D convolution (the causal-conv1d package's op, channels last):
``causal_conv1d`` over whole sequences and ``causal_conv1d_step`` for one token.

For ``x`` ``[b, l, d]`` and ``weight`` ``[d, k]``:

    y[b, t, c] = act(bias[c] + sum_{j < k} weight[c, j] x[b, t - (k - 1) + j, c])

with ``act`` the identity or silu. The ``k - 1`` rows before the start are zeros, or
``initial_states`` ``[b, k - 1, d]``. With ``seq_idx`` ``[b, l]`` (packed sequences) a
row of another sequence reads as zero: the history restarts wherever ``seq_idx``
changes, and ``initial_states`` belong to the first sequence. mamba_ssm's ``cu_seqlens``
(sequences packed along one row) sets the sequences the same way, and
``return_varlen_states`` returns each one's last ``k - 1`` rows (``bjax._varlen``). Math in
float32; ``y`` in x's dtype.

Gradients (``custom_vjp``) of x, weight, bias and initial_states from a Pallas backward
kernel that recomputes the pre-activation (the residuals are the inputs alone);
``causal_conv1d_step`` through its jnp formula.

Sharded programs: the kernels run on each device's shard, split along the batch and
the channels. The sequence stays whole (each row needs the ``k - 1`` before it); the
only collective is the all-reduce of the weight's and bias's gradients over the
devices that split the batch (:func:`sharding_rules`).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from bjax import _op, _partition, _varlen
from bjax.errors import UnsupportedError
from bjax.tune.cache import problem_key
from bjax.xla import conv as xla_conv
from pallas_kernels import conv as pallas_conv
from pallas_kernels.formulas.conv import ACTIVATIONS

_FLOATS = ("float32", "float16", "bfloat16")
_PARAM_FLOATS = ("float64", "float32", "float16", "bfloat16")
MAX_KERNEL_TAPS = 16
"""The most taps (``k``) the Pallas kernels take: each carries ``3 k`` rows in registers."""


def _check_weight(x_channels, weight, bias, activation, op) -> int:
    """The rules on ``weight``, ``bias`` and ``activation``; returns the taps ``k``."""
    _op.check(weight.ndim == 2 and weight.shape[0] == x_channels, op, "weight.shape",
              f"(d, k) = ({x_channels}, k), one row of taps per channel", tuple(weight.shape))
    taps = int(weight.shape[1])
    _op.check(taps >= 2, op, "weight.shape[1] (the taps k)", "at least 2 (k = 1 has no "
              "history: an elementwise product)", taps)
    _op.check_dtype(weight, "weight", _PARAM_FLOATS, op)
    if bias is not None:
        _op.check_shape(bias, "bias", (x_channels,), "[d]", op)
        _op.check_dtype(bias, "bias", _PARAM_FLOATS, op)
    _op.check(activation is None or (isinstance(activation, str) and activation in ACTIVATIONS),
              op, "activation", "None or 'silu'", repr(activation))
    return taps


@dataclasses.dataclass(frozen=True)
class CausalConv1dDescriptor:
    """Static facts of one ``causal_conv1d`` call (hashable; the custom_vjp's static argument).

    Attributes:
      batch, length, channels: ``x``'s ``[b, l, d]``.
      taps: ``k``, the weight's second extent.
      dtype: x's dtype (and y's).
      activation: ``None`` or ``"silu"``.
      has_bias, has_initial_states: which optional inputs are given.
      has_seq_idx: segments are given (``seq_idx``, or derived from ``cu_seqlens``).
      return_final_states: whether the call returns the last ``k - 1`` rows too.
      num_seqs: the packed sequences of ``cu_seqlens`` (0 without it).
      return_varlen_states: whether the call returns each sequence's last ``k - 1`` rows.
    """
    batch: int
    length: int
    channels: int
    taps: int
    dtype: np.dtype
    activation: str | None
    has_bias: bool
    has_initial_states: bool
    has_seq_idx: bool
    return_final_states: bool
    num_seqs: int = 0
    return_varlen_states: bool = False

    @classmethod
    def from_args(cls, x, weight, bias=None, *, activation=None, seq_idx=None,
                  initial_states=None, return_final_states=False, cu_seqlens=None,
                  return_varlen_states=False, op="causal_conv1d"):
        """Validates the call; raises InvalidProblemError / UnsupportedError naming the argument."""
        _op.check(x.ndim == 3, op, "x", "an array [b, l, d] (channels last)",
                  f"shape {tuple(x.shape)}")
        _op.check_dtype(x, "x", _FLOATS, op)
        batch, length, channels = (int(v) for v in x.shape)
        taps = _check_weight(channels, weight, bias, activation, op)
        if initial_states is not None:
            _op.check_shape(initial_states, "initial_states", (batch, taps - 1, channels),
                         "[b, k - 1, d]", op)
            _op.check(_op.dtype_name(initial_states) in (_op.dtype_name(x), "float32"), op,
                      "initial_states.dtype", f"x's dtype ({_op.dtype_name(x)}) or float32",
                      _op.dtype_name(initial_states))
        if seq_idx is not None:
            _op.check_shape(seq_idx, "seq_idx", (batch, length), "[b, l]", op)
            _op.check(jnp.issubdtype(seq_idx.dtype, jnp.integer), op, "seq_idx.dtype",
                      "an integer dtype", _op.dtype_name(seq_idx))
        _op.check_bool(return_final_states, op, "return_final_states")
        num_seqs = _varlen.check(cu_seqlens, return_varlen_states, seq_idx, batch, op)
        return cls(batch, length, channels, taps, jnp.dtype(x.dtype), activation,
                   bias is not None, initial_states is not None,
                   seq_idx is not None or cu_seqlens is not None, bool(return_final_states),
                   num_seqs, bool(return_varlen_states))

    @property
    def kernel_config(self) -> pallas_conv.ConvConfig:
        return pallas_conv.default_config(self.batch, self.length, self.channels)


@dataclasses.dataclass(frozen=True)
class CausalConv1dStepDescriptor:
    """Static facts of one ``causal_conv1d_step`` call.

    Attributes:
      batch, channels: ``x``'s ``[b, d]``.
      taps: ``k``; the state is ``[b, k - 1, d]``.
      dtype: x's dtype (and y's); state_dtype: the state's (x's or float32).
      activation: ``None`` or ``"silu"``.
      has_bias: whether ``bias`` is given.
    """
    batch: int
    channels: int
    taps: int
    dtype: np.dtype
    state_dtype: np.dtype
    activation: str | None
    has_bias: bool

    @classmethod
    def from_args(cls, conv_state, x, weight, bias=None, *, activation=None):
        op = "causal_conv1d_step"
        _op.check(x.ndim == 2, op, "x", "an array [b, d] (one token per row)",
                  f"shape {tuple(x.shape)}")
        _op.check_dtype(x, "x", _FLOATS, op)
        batch, channels = (int(v) for v in x.shape)
        taps = _check_weight(channels, weight, bias, activation, op)
        _op.check_shape(conv_state, "conv_state", (batch, taps - 1, channels), "[b, k - 1, d]", op)
        _op.check(_op.dtype_name(conv_state) in (_op.dtype_name(x), "float32"), op,
                  "conv_state.dtype", f"x's dtype ({_op.dtype_name(x)}) or float32",
                  _op.dtype_name(conv_state))
        return cls(batch, channels, taps, jnp.dtype(x.dtype), jnp.dtype(conv_state.dtype),
                   activation, bias is not None)


def _kernel_taps_rule(desc, op) -> None:
    _op.check(desc.taps <= MAX_KERNEL_TAPS, op, "weight.shape[1] (the taps k)",
              f"at most {MAX_KERNEL_TAPS} on the Pallas kernels (the XLA backend takes any)",
              desc.taps, UnsupportedError)


def _kernel_weights(weight, bias, channels):
    """The kernels' taps ``[k, d]`` and bias ``[d]``, float32."""
    bias = jnp.zeros((channels,), jnp.float32) if bias is None else bias.astype(jnp.float32)
    return weight.astype(jnp.float32).T, bias


def _shard_config(x, desc: CausalConv1dDescriptor, choice: _op.Choice) -> pallas_conv.ConvConfig:
    """The kernels' configuration for ``x``, the whole problem or a device's shard."""
    shard = dataclasses.replace(desc, batch=x.shape[0], channels=x.shape[2])
    return choice.config_for(shard, lambda: shard.kernel_config)


def _forward(x, weight, bias, initial_states, seq_idx, desc, choice):
    if choice.on_xla:
        return xla_conv.causal_conv1d(x, weight, bias, initial_states, seq_idx, desc.activation)
    w, b = _kernel_weights(weight, bias, x.shape[2])
    config = _shard_config(x, desc, choice)
    return pallas_conv.forward(x, w, b, initial_states, seq_idx, activation=desc.activation,
                               config=config, interpret=choice.interpret)


def _backward(x, weight, bias, initial_states, seq_idx, dy, desc, choice):
    """``(dx, dweight, dbias or None, dinitial_states or None)`` from the kernels."""
    w, b = _kernel_weights(weight, bias, x.shape[2])
    config = _shard_config(x, desc, choice)
    dx, dw, dbias, dinit = pallas_conv.backward(
        x, w, b, initial_states, seq_idx, dy.astype(x.dtype), activation=desc.activation,
        config=config, interpret=choice.interpret)
    return (dx, dw.T.astype(weight.dtype), None if bias is None else dbias.astype(bias.dtype),
            dinit)


_ARGS = ("x", "weight", "bias", "initial_states", "seq_idx")
_FACTORS = {"x": ("b", "l", "d"), "weight": ("d", "k"), "bias": ("d",),
            "initial_states": ("b", "h", "d"), "seq_idx": ("b", "l")}


def sharding_rules(desc: CausalConv1dDescriptor, args) -> tuple[_partition.ShardingRule, ...]:
    """The forward's and the backward's rules: the batch and the channels split; the
    sequence, the taps and the rows before the start (``h``) stay whole; the weight's and
    bias's gradients are summed over the devices that split the batch."""
    present = tuple(_FACTORS[name] for name, v in zip(_ARGS, args) if v is not None)
    grads = tuple(_FACTORS[name] for name, v in zip(_ARGS[:4], args) if v is not None)
    common = dict(replicated=frozenset({"l", "k", "h"}))
    return (_partition.ShardingRule(present, (_FACTORS["x"],), **common),
            _partition.ShardingRule((*present, _FACTORS["x"]), grads,
                                    reduced=frozenset({"b"}), **common))


def _conv_call(desc: CausalConv1dDescriptor, choice: _op.Choice, which: int, args):
    """The kernels' forward (0) or backward (1, the present differentiable arguments'
    gradients) on the present ``args`` (and, backward, the cotangent), partitioned by
    :func:`sharding_rules`. Under ``vmap`` the mapped axis joins the batch (a sequential
    map where the weight or bias is mapped)."""
    present = [v is not None for v in args]
    count = sum(present)

    def kernel(*operands):
        full = _op.with_absent(operands[:count], present)
        local = dataclasses.replace(desc, batch=full[0].shape[0], channels=full[0].shape[2])
        if which == 0:
            return _forward(*full, local, choice)
        grads = _backward(*full, operands[count], local, choice)
        return tuple(g for g, here in zip(grads, present[:4]) if here)

    def batched(axis_size, in_batched, *operands):
        if which == 1 or any(_op.with_absent(in_batched[:count], present)[1:3]):
            # Per-example weight and bias gradients (and mapped weights) do not fold.
            return jax.lax.map(lambda ops: _conv_call(desc, choice, which, args)(*ops), operands)
        full = _op.with_absent(operands, present)
        folded = [None if v is None else v[0] if name in ("weight", "bias")
                  else v.reshape(-1, *v.shape[2:]) for name, v in zip(_ARGS, full)]
        wider = dataclasses.replace(desc, batch=axis_size * desc.batch)
        y = _conv_call(wider, choice, 0, folded)(*_op.present(folded))
        return y.reshape(axis_size, -1, *y.shape[1:])

    rules = sharding_rules(desc, args)
    return _partition.kernel_call(kernel, rules[which], batched, single_result=(which == 0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _conv(x, weight, bias, initial_states, seq_idx, desc, choice):
    args = (x, weight, bias, initial_states, seq_idx)
    if choice.on_xla or desc.batch * desc.length * desc.channels == 0:
        return _forward(*args, desc, _XLA)   # (an empty problem: nothing to launch)
    return _conv_call(desc, choice, 0, args)(*_op.present(args))


def _conv_fwd(*args):
    return _conv(*args), args[:5]


def _conv_bwd(desc, choice, residuals, dy):
    args = tuple(residuals)
    diff = args[:4]
    if choice.on_xla or desc.batch * desc.length * desc.channels == 0:
        _, vjp = jax.vjp(lambda *d: _forward(*d, args[4], desc, _XLA), *diff)
        return (*vjp(dy), None)
    grads = iter(_conv_call(desc, choice, 1, args)(*_op.present(args), dy))
    grads = [None if v is None else next(grads) for v in diff]
    return (*_partition.typed_like_primals(grads, diff), None)


_conv.defvjp(_conv_fwd, _conv_bwd)


def final_states(x, initial_states, seq_idx, taps: int):
    """The last ``k - 1`` rows of ``x`` (with the rows before the start in front of it),
    ``[b, k - 1, d]``; with ``seq_idx``, rows of another sequence than the last row's are
    zero. In x's dtype, or float32 when ``initial_states`` is float32."""
    dtype = x.dtype if initial_states is None else jnp.promote_types(x.dtype,
                                                                     initial_states.dtype)
    batch, length, channels = x.shape
    before = (jnp.zeros((batch, taps - 1, channels), dtype) if initial_states is None
              else initial_states.astype(dtype))
    rows = jnp.concatenate([before, x.astype(dtype)], axis=1)[:, length:]
    if seq_idx is None:
        return rows
    ids = jnp.concatenate([jnp.repeat(seq_idx[:, :1], taps - 1, axis=1), seq_idx], axis=1)
    same = ids[:, length:] == ids[:, -1:]
    return jnp.where(same[..., None], rows, jnp.zeros((), dtype))


def tuning_key(desc: CausalConv1dDescriptor) -> str:
    """The problem's key in the tuning cache: extents, dtype and what the kernels read."""
    return problem_key(batch=desc.batch, length=desc.length, channels=desc.channels,
                       taps=desc.taps, dtype=jnp.dtype(desc.dtype).name,
                       activation=desc.activation, initial_states=desc.has_initial_states,
                       seq_idx=desc.has_seq_idx)


def step_tuning_key(desc: CausalConv1dStepDescriptor) -> str:
    """The step's key in the tuning cache: extents, dtypes and what the kernel reads."""
    return problem_key(batch=desc.batch, channels=desc.channels, taps=desc.taps,
                       dtype=jnp.dtype(desc.dtype).name,
                       state_dtype=jnp.dtype(desc.state_dtype).name,
                       activation=desc.activation, bias=desc.has_bias)


def _check_config(desc, config: pallas_conv.ConvConfig) -> None:
    """Launchable, with pieces of whole steps (the kernels mask partial blocks: any such
    config runs any shape)."""
    op = "causal_conv1d" if isinstance(desc, CausalConv1dDescriptor) else "causal_conv1d_step"
    _op.check_launch(config, op)
    _op.check(config.piece_len % config.unroll == 0, op, "config.piece_len",
              f"a multiple of config.unroll = {config.unroll}", config.piece_len)


IMPLEMENTATIONS = (
    _op.Implementation(
        "pallas_triton", ("pallas", "interpret"),
        kernel=lambda desc: "bjax_causal_conv1d_forward + bjax_causal_conv1d_backward",
        config_type=pallas_conv.ConvConfig, default_config=lambda desc: desc.kernel_config,
        check=functools.partial(_kernel_taps_rule, op="causal_conv1d"),
        check_config=_check_config, sharding_rules=sharding_rules, tuning_key=tuning_key),
    _op.Implementation("xla", ("xla",), kernel=lambda desc: "bjax.xla.conv.causal_conv1d"),
)
"""``causal_conv1d``'s implementation table, in order of preference."""
_XLA = _op.Choice(IMPLEMENTATIONS[-1], "xla")


def _prepare(x, weight, bias, activation, seq_idx, initial_states, return_final_states,
             backend, config, cu_seqlens=None, return_varlen_states=False):
    desc = CausalConv1dDescriptor.from_args(
        x, weight, bias, activation=activation, seq_idx=seq_idx, initial_states=initial_states,
        return_final_states=return_final_states, cu_seqlens=cu_seqlens,
        return_varlen_states=return_varlen_states)
    return desc, _op.select(IMPLEMENTATIONS, desc, backend, config, op="causal_conv1d")


def causal_conv1d(x: ArrayLike, weight: ArrayLike, bias: ArrayLike | None = None, *,
                  activation: str | None = None, seq_idx: ArrayLike | None = None,
                  cu_seqlens: ArrayLike | None = None,
                  initial_states: ArrayLike | None = None, return_final_states: bool = False,
                  return_varlen_states: bool = False, backend: _op.Backend = None,
                  config: pallas_conv.ConvConfig | None = None
                  ) -> jax.Array | tuple[jax.Array, ...]:
    """Causal depthwise convolution over whole sequences (module doc).

    Args:
      x: ``[b, l, d]`` (channels last), float32 / float16 / bfloat16.
      weight: ``[d, k]``, ``k >= 2`` taps per channel, the last applied to the current
        row (causal-conv1d's and ``torch.nn.Conv1d(groups=d)``'s weight without its
        middle axis); any float dtype, used in float32.
      bias: optional ``[d]``, any float dtype.
      activation: ``None`` or ``"silu"``.
      seq_idx: optional integer ``[b, l]``: the history restarts wherever it changes
        (packed sequences).
      cu_seqlens: optional integer ``[num_seqs + 1]`` (mamba_ssm's): with ``b == 1``,
        sequence ``i`` is rows ``cu_seqlens[i] .. cu_seqlens[i + 1] - 1`` (``cu_seqlens[0]
        = 0``, non-decreasing, at most l; rows past the last boundary form one more
        segment). It sets the segments as ``seq_idx`` would (give one of the two).
      initial_states: optional ``[b, k - 1, d]``, the rows before the start (of the first
        sequence, with ``seq_idx`` or ``cu_seqlens``), in x's dtype or float32.
      return_final_states: also return the last ``k - 1`` rows, the state
        :func:`causal_conv1d_step` continues from.
      return_varlen_states: also return each sequence's last ``k - 1`` rows, ``[num_seqs,
        k - 1, d]`` (zeros before a sequence's start; ``initial_states`` before the one at
        row 0; an empty sequence's are zeros), in the dtype of ``final_states``. Needs
        ``cu_seqlens``.
      backend: ``None`` (``$BJAX_BACKEND``, else the first of :data:`IMPLEMENTATIONS` that
        runs here: Pallas on CUDA GPUs up to :data:`MAX_KERNEL_TAPS` taps, XLA
        elsewhere), ``"pallas"``, ``"interpret"`` or ``"xla"``.
      config: the kernels' :class:`pallas_kernels.conv.ConvConfig`; ``None``: the heuristic.

    Returns:
      ``y`` ``[b, l, d]`` in x's dtype, followed (in a tuple) by ``final_states`` with
      ``return_final_states`` and ``varlen_states`` with ``return_varlen_states``.
      ``final_states``
      ``[b, k - 1, d]`` holds the last ``k - 1`` rows of the sequence (with the rows
      before the start in front of a short one); with ``seq_idx``, rows of another
      sequence than the last row's are zero. In x's dtype, or float32 when
      ``initial_states`` is float32 (the rows are copied, never rounded).

    Raises:
      InvalidProblemError: x not of rank 3, a weight that is not ``[d, k]`` with
        ``k >= 2``, bias / initial_states / seq_idx of another shape, an activation
        other than None or ``"silu"``, a non-integer seq_idx, initial_states of another
        dtype than x's or float32, a non-bool return_final_states; cu_seqlens not an integer
        vector of 2 or more, given with seq_idx or with b != 1; return_varlen_states
        without cu_seqlens; ``config`` of another type or not launchable.
      UnsupportedError: x not float32 / float16 / bfloat16, a non-float weight or bias;
        more than :data:`MAX_KERNEL_TAPS` taps on the Pallas kernels; ``backend="pallas"``
        without a CUDA GPU.
    """
    x, weight, bias, seq_idx, initial_states, cu_seqlens = _op.asarrays(
        x, weight, bias, seq_idx, initial_states, cu_seqlens)
    desc, choice = _prepare(x, weight, bias, activation, seq_idx, initial_states,
                            return_final_states, backend, config, cu_seqlens,
                            return_varlen_states)
    if cu_seqlens is not None:
        seq_idx = _varlen.sequence_numbers(cu_seqlens, desc.length)
    results = (_conv(x, weight, bias, initial_states, seq_idx, desc, choice),)
    if desc.return_final_states:
        results += (final_states(x, initial_states, seq_idx, desc.taps),)
    if desc.return_varlen_states:
        results += (_varlen.conv_states(x[0], None if initial_states is None
                                        else initial_states[0], cu_seqlens, desc.taps),)
    return results[0] if len(results) == 1 else results


def _step_forward(conv_state, x, weight, bias, desc: CausalConv1dStepDescriptor, choice):
    if desc.batch * desc.channels == 0:
        return jnp.zeros(x.shape, x.dtype), conv_state
    if choice.on_xla:
        return xla_conv.step(conv_state, x, weight, bias, desc.activation)
    w, b = _kernel_weights(weight, bias, desc.channels)
    config = choice.config_for(desc, lambda: pallas_conv.default_config(desc.batch, 1,
                                                                          desc.channels))
    return pallas_conv.step(conv_state, x, w, b, activation=desc.activation, config=config,
                            interpret=choice.interpret)


_STEP_ARGS = ("conv_state", "x", "weight", "bias")
_STEP_FACTORS = {"conv_state": ("b", "h", "d"), "x": ("b", "d"), "weight": ("d", "k"),
                 "bias": ("d",)}


def step_sharding_rule(desc: CausalConv1dStepDescriptor, args) -> _partition.ShardingRule:
    """The step kernel's rule: batch and channels split."""
    present = tuple(_STEP_FACTORS[n] for n, v in zip(_STEP_ARGS, args) if v is not None)
    return _partition.ShardingRule(present, (_STEP_FACTORS["x"], _STEP_FACTORS["conv_state"]),
                                   replicated=frozenset({"h", "k"}))


def _step_call(desc: CausalConv1dStepDescriptor, choice: _op.Choice, args):
    present = [v is not None for v in args]

    def kernel(*operands):
        full = _op.with_absent(operands, present)
        local = dataclasses.replace(desc, batch=full[1].shape[0], channels=full[1].shape[1])
        return _step_forward(*full, local, choice)

    def batched(axis_size, in_batched, *operands):
        if any(_op.with_absent(in_batched, present)[2:]):
            return jax.lax.map(lambda ops: _step_call(desc, choice, args)(*ops), operands)
        full = _op.with_absent(operands, present)
        folded = [None if v is None else v[0] if name in ("weight", "bias")
                  else v.reshape(-1, *v.shape[2:]) for name, v in zip(_STEP_ARGS, full)]
        wider = dataclasses.replace(desc, batch=axis_size * desc.batch)
        outs = _step_call(wider, choice, folded)(*_op.present(folded))
        return tuple(v.reshape(axis_size, -1, *v.shape[1:]) for v in outs)

    rule = step_sharding_rule(desc, args)
    return _partition.kernel_call(kernel, rule, batched, single_result=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _step(conv_state, x, weight, bias, desc, choice):
    args = (conv_state, x, weight, bias)
    if choice.on_xla or desc.batch * desc.channels == 0:
        return _step_forward(*args, desc, choice)
    return tuple(_step_call(desc, choice, args)(*_op.present(args)))


def _step_fwd(*args):
    return _step(*args), args[:4]


def _step_bwd(desc, choice, residuals, cotangents):
    # One token is k multiply-adds a channel: autodiff of the jnp step.
    _, vjp = jax.vjp(lambda *args: _step_forward(*args, desc, _XLA_STEP), *residuals)
    return vjp(cotangents)


_step.defvjp(_step_fwd, _step_bwd)

STEP_IMPLEMENTATIONS = (
    _op.Implementation(
        "pallas_triton", ("pallas", "interpret"), kernel=lambda desc: "bjax_causal_conv1d_step",
        config_type=pallas_conv.ConvConfig,
        default_config=lambda desc: pallas_conv.default_config(desc.batch, 1, desc.channels),
        check=functools.partial(_kernel_taps_rule, op="causal_conv1d_step"),
        check_config=_check_config, sharding_rules=step_sharding_rule,
        tuning_key=step_tuning_key),
    _op.Implementation("xla", ("xla",), kernel=lambda desc: "bjax.xla.conv.step"),
)
"""``causal_conv1d_step``'s implementation table, in order of preference."""
_XLA_STEP = _op.Choice(STEP_IMPLEMENTATIONS[-1], "xla")


def _prepare_step(conv_state, x, weight, bias, activation, backend, config):
    desc = CausalConv1dStepDescriptor.from_args(conv_state, x, weight, bias,
                                                activation=activation)
    return desc, _op.select(STEP_IMPLEMENTATIONS, desc, backend, config,
                            op="causal_conv1d_step")


def causal_conv1d_step(conv_state: ArrayLike, x: ArrayLike, weight: ArrayLike,
                       bias: ArrayLike | None = None, *, activation: str | None = None,
                       backend: _op.Backend = None,
                       config: pallas_conv.ConvConfig | None = None
                       ) -> tuple[jax.Array, jax.Array]:
    """One token of :func:`causal_conv1d` for every row of a batch.

    Args:
      conv_state: ``[b, k - 1, d]``, the last ``k - 1`` inputs (oldest first), in x's
        dtype or float32. Donated to the enclosing ``jit``, the Pallas kernel updates it
        in place; the XLA backend builds the shifted state through one temporary of its
        size.
      x: ``[b, d]``, float32 / float16 / bfloat16.
      weight, bias, activation, backend: as in :func:`causal_conv1d`
        (:data:`STEP_IMPLEMENTATIONS`).
      config: the step kernel's ``ConvConfig`` (its ``block_d`` and ``num_warps``).

    Returns:
      ``(y [b, d]`` in x's dtype, ``new_conv_state)``: the state shifted by one row with
      x last, in the state's dtype. Running it over a sequence matches
      ``causal_conv1d(..., return_final_states=True)``.

    Raises:
      InvalidProblemError / UnsupportedError: as :func:`causal_conv1d`; a conv_state of
      another shape, or of another dtype than x's or float32.
    """
    conv_state, x, weight, bias = _op.asarrays(conv_state, x, weight, bias)
    desc, choice = _prepare_step(conv_state, x, weight, bias, activation, backend, config)
    return _step(conv_state, x, weight, bias, desc, choice)


_PRECISION = _op.PrecisionGuarantee(
    math_precision="float32", accumulator="float32", deterministic=True,
    bit_stable_on_same_hardware=True,
    notes="the bias, then the taps from the oldest row, added in float32 (the XLA backend in "
          "the same order; fused multiply-adds may differ); weight and bias gradients summed "
          "per program, then over programs in a fixed order")


@_op.register_planner(causal_conv1d)
def _plan_conv(x, weight, bias=None, *, activation=None, seq_idx=None, cu_seqlens=None,
               initial_states=None, return_final_states=False, return_varlen_states=False,
               backend=None, config=None):
    desc, choice = _prepare(x, weight, bias, activation, seq_idx, initial_states,
                            return_final_states, backend, config, *_op.asarrays(cu_seqlens),
                            return_varlen_states)
    return _op.Plan.of("causal_conv1d", desc, choice, _PRECISION)


@_op.register_planner(causal_conv1d_step)
def _plan_step(conv_state, x, weight, bias=None, *, activation=None, backend=None, config=None):
    desc, choice = _prepare_step(conv_state, x, weight, bias, activation, backend, config)
    return _op.Plan.of("causal_conv1d_step", desc, choice, _PRECISION)
