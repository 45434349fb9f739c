"""The mechanism every op shares: argument checks, implementation tables and plans.

An op is a public function that builds a frozen, hashable *descriptor* from the
static facts of its arguments (shapes, dtypes, options), validating them at
trace time, then picks what runs from its *implementation table*: an ordered
tuple of :class:`Implementation` candidates, kernels first and the XLA reference
last. The first candidate that accepts the call runs it (:func:`select`); one that
cannot raises :class:`UnsupportedError`, which is recorded and falls through.

Every candidate runs on one or more *backends*:

* ``"pallas"``: Pallas kernels lowered through Triton, or Mosaic GPU where an op has
  such an implementation (CUDA GPUs);
* ``"interpret"``: the very same kernels run by the Pallas interpreter (any
  device; slow, used to test the kernels without a GPU);
* ``"xla"``: a pure ``jax.numpy`` implementation (any device).

``backend=`` on every op forces the candidates of one backend; ``config=`` passes
a kernel configuration to the candidate whose config type it is (others step
aside); without it, a kernel runs the configuration tuned for this device and problem
(:mod:`bjax.tune`), else its heuristic. Where an op has several tuned candidates, the
entry's config type also picks the candidate (the tuner records the fastest of them).
``bjax.plan(op, *args, **kwargs)`` returns the :class:`Plan` the call would run, with the
candidate chosen, the ones passed over and why, and the config and where it came from,
without running anything.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Literal, get_args

import jax
import numpy as np

from bjax.errors import InvalidProblemError, UnsupportedError
from bjax.tune import cache as tuning

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


def check_bool(value: Any, op: str, argument: str) -> None:
    """``value`` must be a bool (Python's or NumPy's)."""
    check(isinstance(value, (bool, np.bool_)), op, argument, "a bool", repr(value))


def check_choice(value: Any, choices: tuple, op: str, argument: str) -> None:
    """``value`` must be one of ``choices`` (compared with ``==``, type-checked first)."""
    if not isinstance(value, type(choices[0])) or value not in choices:
        fail(op, argument, f"one of {', '.join(map(repr, choices))}", repr(value))


def dtype_name(value) -> str:
    """The name of ``value``'s dtype (``"bfloat16"``, ...)."""
    return jax.numpy.dtype(value.dtype).name


def check_shape(value, name: str, expected, layout: str, op: str) -> None:
    """``value.shape`` must be ``expected`` (``layout`` names its axes in the message)."""
    check(tuple(value.shape) == tuple(expected), op, f"{name}.shape",
          f"{tuple(expected)} {layout}", tuple(value.shape))


def check_dtype(value, name: str, allowed: tuple[str, ...], op: str,
                error=UnsupportedError) -> None:
    """``value``'s dtype must be one of the names ``allowed``."""
    check(dtype_name(value) in allowed, op, f"{name}.dtype", " or ".join(allowed),
          dtype_name(value), error)


def asarrays(*values) -> list:
    """Each value as a JAX array; ``None`` (an absent optional argument) stays ``None``."""
    return [None if v is None else jax.numpy.asarray(v) for v in values]


def present(values) -> list:
    """The values that are not ``None`` (the operands of a kernel call)."""
    return [v for v in values if v is not None]


def with_absent(values, flags) -> list:
    """``values`` (the present ones, in order) spread over ``flags``, ``None`` where a flag
    is False: the inverse of :func:`present`."""
    values = iter(values)
    return [next(values) if here else None for here in flags]


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


@functools.cache
def cuda_compute_capability() -> str | None:
    """The first CUDA GPU's compute capability (``"9.0"`` on Hopper), ``None`` without
    one."""
    if not cuda_available():
        return None
    return getattr(jax.devices("cuda")[0], "compute_capability", None)


def requested_backend(backend: str | None, op: str) -> tuple[str | None, str]:
    """``(name, source)``: the backend asked for (``None``: choose automatically) and
    the argument it came from (``backend`` or ``$BJAX_BACKEND``).

    Raises:
      InvalidProblemError: a name outside :data:`BACKENDS`.
    """
    source = "backend"
    if backend is None:
        backend = os.environ.get(BACKEND_ENV_VAR) or None
        source = f"${BACKEND_ENV_VAR}"
    if backend is not None and backend not in BACKENDS:
        fail(op, source, f"one of {', '.join(map(repr, BACKENDS))} (or None)", repr(backend))
    return backend, source


def check_available(backend: str, op: str, source: str | None = "backend") -> None:
    """Raises :class:`UnsupportedError` unless this process can run ``backend``
    (``"pallas"`` needs a CUDA GPU).

    ``source`` names the argument that asked for ``backend`` (``"backend"`` or
    ``"$BJAX_BACKEND"``); ``None``: it was chosen automatically, and the message says so.
    """
    if backend != "pallas" or cuda_available():
        return
    platforms = sorted({d.platform for d in jax.devices()})
    if source is None:
        raise UnsupportedError(f"{op}: compiled Pallas kernels need a CUDA GPU; the devices "
                               f"here are on {platforms}")
    fail(op, source, "'pallas' only where a CUDA GPU is present (use 'interpret' to run the "
         "Pallas kernels on CPU, or 'xla')", f"'pallas' with devices on {platforms}",
         UnsupportedError)


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One candidate of an op's implementation table.

    Attributes:
      name: ``"pallas_triton"`` (the Pallas kernels, Triton lowering),
        ``"pallas_mosaic"`` (some of them lowered through Mosaic GPU) or ``"xla"``.
      backends: the backends that run it; the first is the one an automatic choice uses.
      kernel: ``kernel(desc) -> str``, the name of what runs (for :class:`Plan`).
      config_type: the frozen class of its kernel configuration; ``None``: it takes none.
      default_config: ``default_config(desc)``, the heuristic configuration for the whole
        problem (a partitioned call re-derives it for each device's shard).
      check: ``check(desc)`` raises :class:`UnsupportedError` for calls it cannot run.
      check_config: ``check_config(desc, config)`` raises :class:`InvalidProblemError`
        for a caller's configuration that cannot run this call.
      sharding_rules: ``sharding_rules(desc, ...)`` gives the :class:`bjax._partition.ShardingRule`
        of each kernel call; ``None``: XLA partitions the implementation itself.
      tuning_key: ``tuning_key(desc)``, the problem's key in the tuning cache
        (:func:`bjax.tune.problem_key`); ``None``: configurations are not tuned.
    """
    name: str
    backends: tuple[str, ...]
    kernel: Callable[[Any], str]
    config_type: type | None = None
    default_config: Callable[[Any], Any] | None = None
    check: Callable[[Any], None] | None = None
    check_config: Callable[[Any, Any], None] | None = None
    sharding_rules: Callable[..., Any] | None = None
    tuning_key: Callable[[Any], str] | None = None


@dataclasses.dataclass(frozen=True)
class Choice:
    """What a call runs (hashable: the custom_vjp's static argument with the descriptor).

    Attributes:
      implementation: the table's candidate that accepted the call.
      backend: the backend it runs on.
      config: the caller's kernel configuration; ``None``: the tuned one or the heuristic.
      rejected: ``(name, reason)`` of each candidate passed over, in table order.
      op: the op's public name (the tuning cache's key).
    """
    implementation: Implementation
    backend: str
    config: Any = None
    rejected: tuple[tuple[str, str], ...] = dataclasses.field(default=(), compare=False)
    op: str = ""

    @property
    def interpret(self) -> bool:
        return self.backend == "interpret"

    @property
    def on_xla(self) -> bool:
        return self.backend == "xla"

    def given_config(self, desc: Any) -> tuple[Any, str | None]:
        """``(config, source)`` for ``desc`` (the whole problem, or one device's shard):
        the caller's (``"explicit"``), else this device's tuned entry (``"cache"``),
        else ``(None, None)``.

        Raises:
          InvalidProblemError: the caller's config or a cache entry that cannot run
            ``desc`` (a shard can hold less than the whole call the config was checked on).
        """
        impl = self.implementation
        if self.config is not None:
            if impl.check_config is not None:
                impl.check_config(desc, self.config)
            return self.config, "explicit"
        tuned, key = self.tuned_entry(desc)
        if tuned is None or not isinstance(tuned, impl.config_type):
            # None, or (for a shard) the entry of another candidate of the op's table
            # (check_tuned): this call's candidate was chosen for the whole problem.
            return None, None
        if impl.check_config is not None:
            try:
                impl.check_config(desc, tuned)
            except InvalidProblemError as error:
                fail(self.op, _entry_name(self.op, key), "a config that runs this call "
                     "(retune, or remove the entry)", str(error))
        return tuned, "cache"

    def tuned_entry(self, desc: Any) -> tuple[Any, str | None]:
        """``(config, key)``: this device's tuned entry for ``desc`` (``None`` if there is
        none, or the candidate is not tuned) and its key."""
        if self.implementation.tuning_key is None:
            return None, None
        key = self.implementation.tuning_key(desc)
        return tuning.lookup(self.op, key), key

    def check_tuned(self, desc: Any, config_types: tuple[type, ...]) -> None:
        """At trace time: every tuned entry of this op for this device is of one of
        ``config_types`` (those of the op's tuned candidates), and the whole problem's
        entry can run the candidate. (A device's shard reads its own entry later, while
        the program is partitioned.)

        Raises:
          InvalidProblemError: an entry of another config type, or one that cannot run
            ``desc``.
          TuningCacheError: a cache file that cannot be read.
        """
        impl = self.implementation
        if self.config is not None or impl.tuning_key is None:
            return
        names = " or ".join(t.__name__ for t in config_types)
        for _, op, key, entry in tuning.entries():
            if op == self.op:
                tuned = tuning.config_from_json(entry["config"])
                check(isinstance(tuned, config_types), op, _entry_name(op, key),
                      f"a {names}", type(tuned).__name__)
        self.given_config(desc)

    def config_for(self, desc: Any, heuristic: Callable[[], Any]) -> Any:
        """The configuration of a kernel call for ``desc``: :meth:`given_config`, else
        ``heuristic()`` (derived for this shard)."""
        config, _ = self.given_config(desc)
        return heuristic() if config is None else config


def _tuned_for_another(choice: Choice, table, desc: Any) -> str | None:
    """The name of the candidate of ``table`` whose config type the whole problem's tuned
    entry is, when that is not ``choice``'s: the tuner found that candidate faster here
    (an op with several tuned candidates records whichever won)."""
    tuned, _ = choice.tuned_entry(desc)
    if tuned is None or isinstance(tuned, choice.implementation.config_type):
        return None
    return next((impl.name for impl in table if impl is not choice.implementation
                 and impl.tuning_key and isinstance(tuned, impl.config_type)), None)


def _entry_name(op: str, key: str) -> str:
    return f"tuning cache entry {op} / {key} on {tuning.device_kind()!r}"


def _config_types(table) -> str:
    return " or ".join(f"{impl.config_type.__name__} ({impl.name})" for impl in table
                       if impl.config_type is not None) or "None (no candidate takes one)"


def select(table: tuple[Implementation, ...], desc: Any, backend: str | None = None,
           config: Any = None, *, op: str) -> Choice:
    """The first candidate of ``table`` that accepts the call.

    A candidate is passed over when it does not run on the requested backend (with
    ``backend=None``, when its first backend is not available here), when its check
    raises :class:`UnsupportedError`, when ``config`` is not its config type, or (without
    ``config``) when this device's tuned entry for the problem is another candidate's
    config: where an op has several tuned candidates, the tuner records the fastest.

    Raises:
      InvalidProblemError: an unknown backend name; ``config`` of a type no candidate
        takes; ``config`` that the accepting candidate cannot run; a tuned entry of this
        op that is not the candidate's config type, or that cannot run the call
        (:meth:`Choice.check_tuned`).
      TuningCacheError: a tuning cache file that cannot be read.
      UnsupportedError: no candidate accepts the call (with each one's reason); for an
        explicit backend, the reason of the last candidate of that backend.
    """
    requested, source = requested_backend(backend, op)
    if config is not None and not any(impl.config_type is not None
                                      and isinstance(config, impl.config_type) for impl in table):
        fail(op, "config", f"{_config_types(table)}, or None", repr(config))
    rejected, last_error = [], None
    for impl in table:
        if requested is not None and requested not in impl.backends:
            rejected.append((impl.name, f"runs on {' / '.join(impl.backends)}, not "
                                        f"{source}={requested!r}"))
            continue
        runs_on = requested or impl.backends[0]
        try:
            check_available(runs_on, op, source if requested is not None else None)
            if config is not None:
                check(impl.config_type is not None and isinstance(config, impl.config_type),
                      op, "config", f"None for {impl.name}, which takes "
                      + (impl.config_type.__name__ if impl.config_type else "no config"),
                      type(config).__name__, UnsupportedError)
            if impl.check is not None:
                impl.check(desc)
        except UnsupportedError as error:
            rejected.append((impl.name, str(error)))
            last_error = error
            continue
        if config is not None and impl.check_config is not None:
            impl.check_config(desc, config)
        choice = Choice(impl, runs_on, config, tuple(rejected), op)
        owner = None if config is not None else _tuned_for_another(choice, table, desc)
        if owner is not None:
            rejected.append((impl.name, f"the tuned entry for this problem is {owner}'s"))
            continue
        choice.check_tuned(desc, tuple(i.config_type for i in table if i.tuning_key))
        return choice
    if requested is not None and last_error is not None:
        raise last_error
    raise UnsupportedError(f"{op}: no implementation runs this call: "
                           + "; ".join(f"{name}: {why}" for name, why in rejected))


def check_launch(config: Any, op: str, name: str = "config") -> None:
    """The fields every Triton launch configuration shares: ``block*`` sizes and
    ``num_warps`` powers of two (Triton's block shapes and warp counts), ``num_stages``
    and other counts at least 1, switches (fields typed ``bool``) True or False.
    ``name``: the argument the config is (for the errors).

    Raises:
      InvalidProblemError: naming the field.
    """
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        argument = f"{name}.{field.name}"
        if field.type in (bool, "bool"):
            check(isinstance(value, bool), op, argument, "True or False", repr(value))
            continue
        check(isinstance(value, int), op, argument, "a Python int", repr(value))
        if field.name.startswith("block") or field.name == "num_warps":
            check(value >= 1 and value & (value - 1) == 0, op, argument, "a power of 2", value)
        else:
            check(value >= 1, op, argument, ">= 1", value)
    warps = getattr(config, "num_warps", 1)
    check(warps <= 32, op, f"{name}.num_warps", "at most 32 (1024 threads)", warps)


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
      implementation: the candidate of the op's table that runs it (``"pallas_triton"``,
        ``"pallas_mosaic"`` or ``"xla"``).
      backend: ``"pallas"``, ``"interpret"`` or ``"xla"``.
      kernel: name of the kernel (or XLA function) it runs.
      block_config: the kernel's configuration (``None`` for XLA).
      config_source: ``"explicit"`` (the ``config=`` argument), ``"cache"`` (tuned for
        this device and problem, :mod:`bjax.tune`), ``"heuristic"`` (the candidate's
        default for the whole problem), or ``None`` (no configuration).
      rejected: ``(name, reason)`` of each candidate passed over, in table order.
      precision: the :class:`PrecisionGuarantee`.
    """
    op: str
    descriptor: Any
    implementation: str
    backend: str
    kernel: str
    block_config: Any
    config_source: str | None
    rejected: tuple[tuple[str, str], ...]
    precision: PrecisionGuarantee

    @classmethod
    def of(cls, op: str, desc: Any, choice: Choice, precision: PrecisionGuarantee,
           kernel: str | None = None, configured: bool = True) -> "Plan":
        """The plan of ``choice`` for ``desc`` (``kernel``: overrides the candidate's name;
        ``configured=False``: this call runs no configured kernel)."""
        impl = choice.implementation
        config, source = choice.given_config(desc) if configured else (None, None)
        if config is None and impl.default_config is not None and configured:
            config, source = impl.default_config(desc), "heuristic"
        return cls(op=op, descriptor=desc, implementation=impl.name, backend=choice.backend,
                   kernel=kernel or impl.kernel(desc), block_config=config,
                   config_source=source, rejected=choice.rejected, precision=precision)


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
