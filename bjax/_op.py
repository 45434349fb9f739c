"""The mechanism every op shares: argument checks, backend choice and plans.

An op is a public function that builds a frozen, hashable *descriptor* from the
static facts of its arguments (shapes, dtypes, options), validating them at
trace time, then dispatches on a *backend*:

* ``"pallas"``: Pallas kernels lowered through Triton (CUDA GPUs);
* ``"interpret"``: the very same kernels run by the Pallas interpreter (any
  device; slow, used to test the kernels without a GPU);
* ``"xla"``: a pure ``jax.numpy`` implementation (any device).

``bjax.plan(op, *args, **kwargs)`` returns the :class:`Plan` the call would run,
without running it.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Literal, get_args

import jax
import numpy as np

from bjax.errors import InvalidProblemError, UnsupportedError

BackendName = Literal["pallas", "interpret", "xla"]
BACKENDS = get_args(BackendName)
# The ``backend=`` argument of every op (None: $BJAX_BACKEND, else Pallas on CUDA GPUs, XLA
# elsewhere).
Backend = BackendName | None
BACKEND_ENV_VAR = "BJAX_BACKEND"


def fail(op: str, argument: str, expected: str, got: Any, error=InvalidProblemError):
    """Raises ``error`` with the message ``"{op}: {argument} must be {expected}; got {got}"``."""
    raise error(f"{op}: {argument} must be {expected}; got {got}")


def check(condition: bool, op: str, argument: str, expected: str, got: Any,
          error=InvalidProblemError) -> None:
    """Raises through :func:`fail` unless ``condition`` holds."""
    if not condition:
        fail(op, argument, expected, got, error)


def check_choice(value: Any, choices: tuple, op: str, argument: str) -> None:
    """``value`` must be one of ``choices`` (compared with ``==``, type-checked first)."""
    if not isinstance(value, type(choices[0])) or value not in choices:
        fail(op, argument, f"one of {', '.join(map(repr, choices))}", repr(value))


def normalize_axis(axis: Any, rank: int, op: str, argument: str = "axis") -> int:
    """Python int in ``[-rank, rank)`` -> the equivalent non-negative axis."""
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
        fail(op, argument, "a Python int", f"{axis!r} of type {type(axis).__name__}")
    if not -rank <= axis < rank:
        fail(op, argument, f"in [{-rank}, {rank}) for an array of rank {rank}", axis)
    return int(axis) % rank


@functools.cache
def cuda_available() -> bool:
    """Whether JAX sees a CUDA GPU."""
    try:
        return bool(jax.devices("cuda"))
    except RuntimeError:
        return False


def resolve_backend(backend: str | None, op: str) -> str:
    """The backend a call runs on.

    ``None`` reads ``$BJAX_BACKEND``; if that is unset too, Pallas where a CUDA
    GPU is present and XLA elsewhere. Asking for ``"pallas"`` without a CUDA
    GPU raises :class:`UnsupportedError`.
    """
    if backend is None:
        backend = os.environ.get(BACKEND_ENV_VAR) or None
        source = f"${BACKEND_ENV_VAR}"
    else:
        source = "backend"
    if backend is None:
        return "pallas" if cuda_available() else "xla"
    if backend not in BACKENDS:
        fail(op, source, f"one of {', '.join(map(repr, BACKENDS))} (or None)", repr(backend))
    if backend == "pallas" and not cuda_available():
        platforms = sorted({d.platform for d in jax.devices()})
        fail(op, source, "'pallas' only where a CUDA GPU is present (use 'interpret' to run the "
             "Pallas kernels on CPU, or 'xla')", f"'pallas' with devices on {platforms}",
             UnsupportedError)
    return backend


@dataclasses.dataclass(frozen=True)
class PrecisionGuarantee:
    """What a kernel promises about its numerics.

    Attributes:
      math_precision: dtype the arithmetic is carried out in (``"float32"``, ...).
      accumulator: dtype of any reduction's accumulator (``None`` if the op has no reduction).
      deterministic: two runs on the same inputs give bit-identical outputs.
      bit_stable_on_same_hardware: the result depends only on inputs and hardware,
        not on launch configuration or scheduling.
      notes: anything else a user should know (approximations and their error).
    """
    math_precision: str
    accumulator: str | None
    deterministic: bool
    bit_stable_on_same_hardware: bool
    notes: str = ""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a call would run: built by :func:`plan`, nothing executed.

    Attributes:
      op: public name of the op.
      descriptor: the op's frozen descriptor (static facts, validated).
      backend: ``"pallas"``, ``"interpret"`` or ``"xla"``.
      kernel: name of the kernel (or XLA function) the backend runs.
      block_config: the kernel's launch configuration (``None`` for XLA).
      precision: the :class:`PrecisionGuarantee`.
    """
    op: str
    descriptor: Any
    backend: str
    kernel: str
    block_config: Any
    precision: PrecisionGuarantee


_PLANNERS: dict[Callable, Callable[..., Plan]] = {}


def register_planner(*ops: Callable):
    """Decorator: ``planner(*args, **kwargs) -> Plan`` answers :func:`plan` for ``ops``."""
    def register(planner):
        for op in ops:
            _PLANNERS[op] = planner
        return planner
    return register


def plan(op: Callable, *args, **kwargs) -> Plan:
    """The :class:`Plan` that ``op(*args, **kwargs)`` would run, without running it.

    Arguments may be arrays or ``jax.ShapeDtypeStruct``; the same validation
    errors as the op itself are raised.

    >>> import jax, jax.numpy as jnp, bjax
    >>> p = bjax.plan(bjax.swiglu, jax.ShapeDtypeStruct((8, 64), jnp.bfloat16), backend="xla")
    >>> p.descriptor.out_shape
    (8, 32)

    Raises:
      InvalidProblemError: ``op`` is not a bjax op; and every error ``op`` itself raises
        for these arguments.
      UnsupportedError: as ``op`` for these arguments.
    """
    planner = _PLANNERS.get(op)
    if planner is None:
        known = sorted(getattr(f, "__name__", str(f)) for f in _PLANNERS)
        fail("plan", "op", f"a bjax op ({', '.join(known)})", repr(op))
    return planner(*args, **kwargs)
