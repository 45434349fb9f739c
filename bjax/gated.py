"""Gated activations: GLU, ReGLU, SwiGLU and GeGLU, forward and backward.

``x`` is split along ``axis`` into halves ``(a, b)``; the output has half the
extent there:

====================  ===========================  ==========================
kind                  act(u)                       act'(u)
====================  ===========================  ==========================
``"glu"``             sigmoid(u)                   s (1 - s)
``"reglu"``           max(u, 0)                    1 if u > 0 else 0
``"swiglu"``          u sigmoid(u)                 s (1 + u (1 - s))
``"geglu"``           u Phi(u)                     Phi(u) + u phi(u)
``"geglu"`` approx.   u (1 + tanh(k(u))) / 2       (tanh form, Gemma / T5 v1.1)
====================  ===========================  ==========================

With ``gate="second"`` (default: ``torch.nn.functional.glu`` and ``jax.nn.glu``)
``y = a * act(b)``; with ``gate="first"`` (MLPs whose gate projection comes
first) ``y = act(a) * b``. Math in float32 (float64 for float64 inputs), output
in the input dtype. The backward computes both halves of ``dx`` in one pass
from ``(dy, x)``; the only residual is ``x``.

Sharded programs: under ``jax.jit`` with sharded inputs, the kernels run on each
device's shard of ``x`` and ``y`` / ``dx`` keep ``x``'s sharding, with no
collective, for every axis but ``axis``. ``axis`` itself is never divided (a
device needs both halves of its rows), so a sharding of it is gathered
(:func:`sharding_rule`). The XLA backend is partitioned by XLA.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from bjax import _op, _partition
from bjax.errors import UnsupportedError
from bjax.tune.cache import problem_key
from bjax.xla import gated as xla_gated
from pallas_kernels import gated as pallas_gated
from pallas_kernels.formulas import gated as formulas_gated

Kind = Literal["glu", "reglu", "swiglu", "geglu"]
Gate = Literal["second", "first"]
KINDS, GATES = get_args(Kind), get_args(Gate)
_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16, jnp.float64)
_OP = "gated_activation"


@dataclasses.dataclass(frozen=True)
class GatedActivationDescriptor:
    """Static facts of one gated-activation call (hashable; the custom_vjp's static argument).

    Attributes:
      kind: ``"glu" | "reglu" | "swiglu" | "geglu"``.
      gate: ``"second"`` (y = a act(b)) or ``"first"`` (y = act(a) b).
      approximate: tanh GELU (GeGLU only).
      shape: shape of ``x``.
      dtype: dtype of ``x`` (and of ``y``, ``dx``).
      axis: split axis, non-negative.
    """
    kind: str
    gate: str
    approximate: bool
    shape: tuple[int, ...]
    dtype: np.dtype
    axis: int

    @classmethod
    def from_args(cls, x, kind, *, axis=-1, gate="second", approximate=False):
        """Validates the call; raises InvalidProblemError / UnsupportedError naming the argument."""
        _op.check_choice(kind, KINDS, _OP, "kind")
        _op.check_choice(gate, GATES, _OP, "gate")
        _op.check_bool(approximate, _OP, "approximate")
        _op.check(not approximate or kind == "geglu", _OP, "approximate",
                  "False unless kind='geglu' (only GELU has a tanh approximation)",
                  f"approximate=True with kind={kind!r}")
        shape = tuple(int(d) for d in x.shape)
        _op.check(len(shape) >= 1, _OP, "x", "an array of rank >= 1 (its halves are split "
                  "along axis)", f"rank 0 with shape {shape}")
        dtype = jnp.dtype(x.dtype)
        _op.check(dtype in [jnp.dtype(d) for d in _DTYPES], _OP, "x.dtype",
                  "float32, float16, bfloat16 or float64", dtype.name, UnsupportedError)
        _op.check(dtype != jnp.float64 or jax.config.jax_enable_x64, _OP, "x.dtype",
                  "float64 only with jax_enable_x64 on", dtype.name, UnsupportedError)
        axis = _op.normalize_axis(axis, len(shape), _OP)
        _op.check(shape[axis] % 2 == 0, _OP, f"x.shape[{axis}] (the extent along axis)",
                  "even, to split into two halves", f"{shape[axis]} (x.shape={shape})")
        return cls(kind, gate, bool(approximate), shape, dtype, axis)

    @property
    def rows(self) -> int:
        """Product of the extents before ``axis``."""
        return int(np.prod(self.shape[: self.axis], dtype=np.int64))

    @property
    def cols(self) -> int:
        """Half the extent along ``axis`` times the product of the extents after it."""
        return self.shape[self.axis] // 2 * int(np.prod(self.shape[self.axis + 1:], dtype=np.int64))

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.shape[: self.axis] + (self.shape[self.axis] // 2,) + self.shape[self.axis + 1:]

    @property
    def kernel_config(self) -> pallas_gated.TileConfig:
        return pallas_gated.default_config(self.rows, self.cols)


def _forward(x, desc: GatedActivationDescriptor, choice: _op.Choice):
    """``y`` for ``x`` of ``desc``'s shape (or a shard of it: extents from ``x``)."""
    options = dict(kind=desc.kind, gate=desc.gate, approximate=desc.approximate)
    if choice.on_xla:
        return xla_gated.gated_forward(x, axis=desc.axis, **options)
    desc = dataclasses.replace(desc, shape=tuple(x.shape))
    y2 = pallas_gated.gated_forward(x.reshape(desc.rows, 2 * desc.cols),
                                    config=choice.config_for(desc, lambda: desc.kernel_config),
                                    interpret=choice.interpret, **options)
    return y2.reshape(desc.out_shape)


def _backward(dy, x, desc: GatedActivationDescriptor, choice: _op.Choice):
    """``dx`` from ``(dy, x)``, extents from ``x`` as in :func:`_forward`."""
    options = dict(kind=desc.kind, gate=desc.gate, approximate=desc.approximate)
    if choice.on_xla:
        return xla_gated.gated_backward(dy, x, axis=desc.axis, **options)
    desc = dataclasses.replace(desc, shape=tuple(x.shape))
    dx2 = pallas_gated.gated_backward(dy.reshape(desc.rows, desc.cols),
                                      x.reshape(desc.rows, 2 * desc.cols),
                                      config=choice.config_for(desc, lambda: desc.kernel_config),
                                      interpret=choice.interpret, **options)
    return dx2.reshape(desc.shape)


def sharding_rule(desc: GatedActivationDescriptor) -> tuple[_partition.ShardingRule, ...]:
    """The forward's and the backward's rules: every axis of ``x`` splits, except ``axis``
    (its halves are whole only on a device that holds the whole axis)."""
    dims = tuple(f"d{i}" for i in range(len(desc.shape)))
    half = dims[: desc.axis] + ("half",) + dims[desc.axis + 1:]
    replicated = frozenset({dims[desc.axis], "half"})
    return (_partition.ShardingRule((dims,), (half,), replicated),
            _partition.ShardingRule((half, dims), (dims,), replicated))


def _kernel_call(desc: GatedActivationDescriptor, choice: _op.Choice, which: int):
    """The forward (0) or backward (1) call, partitioned by the implementation's rules
    (none: XLA partitions it). Under ``vmap`` the batch is one more leading axis of the
    same op."""
    call = functools.partial((_forward, _backward)[which], desc=desc, choice=choice)
    rules = choice.implementation.sharding_rules
    if rules is None:
        return call

    def batched(axis_size, in_batched, *operands):
        del in_batched
        wider = dataclasses.replace(desc, shape=(axis_size, *desc.shape), axis=desc.axis + 1)
        return _kernel_call(wider, choice, which)(*operands)

    return _partition.kernel_call(call, rules(desc)[which], batched)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gated(x, desc: GatedActivationDescriptor, choice: _op.Choice):
    if desc.rows * desc.cols == 0:
        return jnp.zeros(desc.out_shape, desc.dtype)
    return _kernel_call(desc, choice, 0)(x)


def _gated_fwd(x, desc, choice):
    return _gated(x, desc, choice), x


def _gated_bwd(desc, choice, x, dy):
    if desc.rows * desc.cols == 0:
        return (jnp.zeros(desc.shape, desc.dtype),)
    return _partition.typed_like_primals((_kernel_call(desc, choice, 1)(dy, x),), (x,))


_gated.defvjp(_gated_fwd, _gated_bwd)


def tuning_key(desc: GatedActivationDescriptor) -> str:
    """The problem's key in the tuning cache: the kernels' 2-D view, dtype and math."""
    return problem_key(kind=desc.kind, gate=desc.gate, approximate=desc.approximate,
                       rows=desc.rows, cols=desc.cols, dtype=jnp.dtype(desc.dtype).name)


def _check_config(desc: GatedActivationDescriptor, config: pallas_gated.TileConfig) -> None:
    del desc   # the kernels mask partial tiles: any launchable tile runs any shape
    _op.check_launch(config, _OP)


IMPLEMENTATIONS = (
    _op.Implementation(
        "pallas_triton", ("pallas", "interpret"),
        kernel=lambda desc: f"bjax_{desc.kind}_forward", config_type=pallas_gated.TileConfig,
        default_config=lambda desc: desc.kernel_config, check_config=_check_config,
        sharding_rules=sharding_rule, tuning_key=tuning_key),
    _op.Implementation("xla", ("xla",), kernel=lambda desc: "bjax.xla.gated.gated_forward"),
)
"""The gated activation's implementation table, in order of preference."""


def _prepare(x, kind, axis, gate, approximate, backend, config):
    desc = GatedActivationDescriptor.from_args(x, kind, axis=axis, gate=gate,
                                               approximate=approximate)
    return desc, _op.select(IMPLEMENTATIONS, desc, backend, config, op=_OP)


def gated_activation(x: ArrayLike, kind: Kind, *, axis: int = -1, gate: Gate = "second",
                     approximate: bool = False, backend: _op.Backend = None,
                     config: pallas_gated.TileConfig | None = None) -> jax.Array:
    """Gated activation of ``x`` split into halves ``(a, b)`` along ``axis``.

    Args:
      x: array of rank >= 1, float32 / float16 / bfloat16 (float64 with x64 on);
        ``x.shape[axis]`` even.
      kind: ``"glu"`` (sigmoid), ``"reglu"`` (relu), ``"swiglu"`` (silu) or
        ``"geglu"`` (GELU; exact erf form unless ``approximate``).
      axis: axis to split (negative counts from the end).
      gate: ``"second"``: ``y = a * act(b)``; ``"first"``: ``y = act(a) * b``.
      approximate: GeGLU only: tanh GELU instead of the exact ``u Phi(u)``.
      backend: ``None`` (``$BJAX_BACKEND``, else the first of :data:`IMPLEMENTATIONS`
        that runs here: Pallas on CUDA GPUs, XLA elsewhere), ``"pallas"``,
        ``"interpret"`` or ``"xla"``.
      config: the kernels' tile (``[block_rows, block_cols]`` of the ``[rows, cols]``
        view, rows before ``axis``; forward and backward); ``None``: the heuristic.

    Returns:
      ``y`` with ``y.shape[axis] == x.shape[axis] // 2``, in ``x.dtype``.

    Raises:
      InvalidProblemError: odd extent along ``axis``, axis out of range, rank 0,
        unknown ``kind`` / ``gate``, ``approximate`` with a kind other than GeGLU;
        ``config`` not a ``TileConfig`` or not launchable.
      UnsupportedError: integer, bool, complex or other non-float dtypes;
        ``backend="pallas"`` without a CUDA GPU; ``config`` with the XLA backend.
    """
    x = jnp.asarray(x)
    desc, choice = _prepare(x, kind, axis, gate, approximate, backend, config)
    return _gated(x, desc, choice)


def _shortcut(kind: str):
    def op(x: ArrayLike, *, axis: int = -1, gate: Gate = "second", approximate: bool = False,
           backend: _op.Backend = None,
           config: pallas_gated.TileConfig | None = None) -> jax.Array:
        return gated_activation(x, kind, axis=axis, gate=gate, approximate=approximate,
                                backend=backend, config=config)
    op.__name__ = op.__qualname__ = kind
    op.__doc__ = (f"``gated_activation(x, {kind!r}, ...)``: see :func:`gated_activation`.\n\n"
                  "Raises:\n  InvalidProblemError, UnsupportedError: as "
                  ":func:`gated_activation`.")
    return op


glu = _shortcut("glu")
reglu = _shortcut("reglu")
swiglu = _shortcut("swiglu")
geglu = _shortcut("geglu")


def _precision(desc: GatedActivationDescriptor) -> _op.PrecisionGuarantee:
    notes = ""
    if desc.kind == "geglu" and not desc.approximate:
        notes = ("Phi from an erfc fit (pallas_kernels/formulas/special.py): relative error at most "
                 "4 max(1, u^2/2) ulp of the math dtype (6 in compiled float32 kernels, "
                 "which use rcp.approx and ex2.approx); for 16-bit outputs a shorter fit "
                 "within 5e-6 relative, a hundredth of a float16 ulp.")
    return _op.PrecisionGuarantee(
        math_precision=formulas_gated.compute_dtype(desc.dtype).name, accumulator=None,
        deterministic=True, bit_stable_on_same_hardware=True, notes=notes)


@_op.register_planner(gated_activation)
def _plan_gated_activation(x, kind, *, axis=-1, gate="second", approximate=False, backend=None,
                           config=None):
    desc, choice = _prepare(x, kind, axis, gate, approximate, backend, config)
    return _op.Plan.of(_OP, desc, choice, _precision(desc))


for _kind, _fn in zip(KINDS, (glu, reglu, swiglu, geglu)):
    _op.register_planner(_fn)(functools.partial(_plan_gated_activation, kind=_kind))
