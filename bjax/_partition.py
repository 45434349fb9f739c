"""Kernel calls that JAX's SPMD partitioner splits instead of gathering.

XLA cannot look inside a Pallas call: left alone, it gathers every operand onto
every device, runs the whole problem on each and returns a replicated result.
:func:`partitioned` wraps a kernel call in ``jax.experimental.custom_partitioning``
with a :class:`ShardingRule`, which names a *factor* for every dimension of every
operand and result (as einsum does). A factor that several dimensions share is
split the same way on all of them; a factor the kernel needs whole is
*replicated*: gathered if the caller had it sharded. Each device then runs the
kernel on its own shards, with no collective.

The rule drives both partitioners: Shardy's ``sharding_rule`` (JAX's default)
and, for GSPMD, the shardings the partition callbacks derive from it.

Inside ``jax.shard_map`` (with its default ``check_vma``) every value's type says
which mesh axes it varies over. A kernel's results vary over every axis an operand
does (``pallas_kernels.blocks.pallas_call``); :func:`vary_like` and
:func:`typed_like_primals` give the ops' own values and gradients the types JAX
expects of them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec


Dim = str | tuple[str, ...]   # a factor, or a compound of factors (major first)


def _factors(dim: Dim) -> tuple[str, ...]:
    return dim if isinstance(dim, tuple) else (dim,)


def _mesh_names(entry) -> tuple[str, ...]:
    return entry if isinstance(entry, tuple) else (entry,)


@dataclasses.dataclass(frozen=True)
class ShardingRule:
    """Factors of every dimension of a kernel call's operands and results.

    Attributes:
      operands: one tuple of dimensions per operand; a dimension is a factor name, or
        a tuple of them (a compound, major first: heads as (groups, heads per group)).
      results: likewise for the results.
      replicated: factors the kernel needs whole on every device (never split).
      reduced: factors summed over in every result that lacks them (dx keeps the
        tokens, dw sums them): each device sums its shard, then those results are
        all-reduced over the factor's mesh axes.
      sizes: ``(factor, size)`` of factors that appear only inside compounds.

    >>> ShardingRule(operands=(("b", "t", "x"),), results=(("b", "t", "y"),),
    ...              replicated=frozenset({"x", "y"})).einsum()
    'b t x -> b t y'
    """
    operands: tuple[tuple[Dim, ...], ...]
    results: tuple[tuple[Dim, ...], ...]
    replicated: frozenset[str] = frozenset()
    reduced: frozenset[str] = frozenset()
    sizes: tuple[tuple[str, int], ...] = ()

    def _in_order(self, chosen) -> tuple[str, ...]:
        """``chosen`` factors in their order of first appearance (Shardy's order)."""
        seen = dict.fromkeys(f for group in (*self.operands, *self.results) for dim in group
                             for f in _factors(dim))
        return tuple(f for f in seen if f in chosen)

    def replicated_in_order(self) -> tuple[str, ...]:
        return self._in_order(self.replicated)

    def reduced_in_order(self) -> tuple[str, ...]:
        return self._in_order(self.reduced)

    def factors_reduced_everywhere(self) -> tuple[str, ...]:
        """Reduced factors absent from every result (Shardy's reduction factors; one
        that a result keeps passes through, and the results lacking it are summed in
        the partitioned call)."""
        kept = {f for dims in self.results for dim in dims for f in _factors(dim)}
        return tuple(f for f in self.reduced_in_order() if f not in kept)

    def einsum(self) -> str:
        """The rule in Shardy's einsum-like notation."""
        def dim(d):
            return f"({' '.join(d)})" if isinstance(d, tuple) else d

        def side(groups):
            return ", ".join(" ".join(dim(d) for d in g) for g in groups)
        return f"{side(self.operands)} -> {side(self.results)}"

    def factor_axes(self, shardings: Sequence[NamedSharding], shapes=None) -> dict[str, object]:
        """Mesh axes for each factor, taken from the operands' shardings in order: the
        first operand dimension sharded along a factor decides it; replicated factors
        and mesh axes already taken by another factor get none. A compound dimension's
        sharding goes to its major factor when that factor's extent (from ``shapes``,
        the operands' shapes) divides evenly, else nowhere."""
        axes: dict[str, object] = {}
        taken: set[str] = set()
        for index, (dims, sharding) in enumerate(zip(self.operands, shardings)):
            spec = tuple(getattr(sharding, "spec", ())) + (None,) * len(dims)
            for position, (dim, entry) in enumerate(zip(dims, spec)):
                factor = _factors(dim)[0]
                if entry is None or factor in self.replicated or factor in axes:
                    continue
                names = set(_mesh_names(entry))
                if names & taken:
                    continue
                if isinstance(dim, tuple):
                    extent = shapes[index][position] // math.prod(
                        self._size(f, shapes) for f in dim[1:])
                    devices = math.prod(sharding.mesh.shape[n] for n in names)
                    if extent % devices:
                        continue
                axes[factor] = entry
                taken |= names
        return axes

    def _size(self, factor, shapes) -> int:
        sizes = dict(self.sizes)
        if factor in sizes:
            return sizes[factor]
        for dims, shape in zip(self.operands, shapes):
            for dim, extent in zip(dims, shape):
                if dim == factor:
                    return extent
        raise ValueError(f"no size for factor {factor!r}")


def _specs(groups, axes, mesh):
    def entry(dim):
        return next((axes[f] for f in _factors(dim) if f in axes), None)
    return tuple(NamedSharding(mesh, PartitionSpec(*(entry(d) for d in dims))) for dims in groups)


def partitioned(kernel: Callable, rule: ShardingRule, single_result: bool = True) -> Callable:
    """``kernel`` as a call the SPMD partitioner splits by ``rule``.

    Args:
      kernel: ``kernel(*operands) -> result`` (or a tuple of results), traced once
        per device on that device's shards: it must take every extent from its
        operands' shapes.
      rule: the factors of the operands and results.
      single_result: whether ``kernel`` returns one array (else a tuple).

    Returns:
      A function of the operands (arrays only) with ``kernel``'s results.
    """
    def call(*operands):   # positional only: custom_partitioning binds arguments by position
        return kernel(*operands)

    wrapped = custom_partitioning(call)

    def shardings(mesh, arg_shapes):
        axes = rule.factor_axes([a.sharding for a in arg_shapes], [a.shape for a in arg_shapes])
        results = _specs(rule.results, axes, mesh)
        return axes, _specs(rule.operands, axes, mesh), (
            results[0] if single_result else results)

    def partition(mesh, arg_shapes, result_shape):
        del result_shape
        mesh = arg_shapes[0].sharding.mesh
        axes, arg_shardings, result_shardings = shardings(mesh, arg_shapes)
        sums = [tuple(n for f in rule.reduced_in_order() if f in axes
                      and f not in {g for dim in dims for g in _factors(dim)}
                      for n in _mesh_names(axes[f])) for dims in rule.results]
        if not any(sums):
            return mesh, kernel, result_shardings, arg_shardings

        def summed(*operands):
            results = kernel(*operands)
            results = [results] if single_result else results
            results = [jax.lax.psum(v, names) if names else v
                       for v, names in zip(results, sums)]
            return results[0] if single_result else tuple(results)
        return mesh, summed, result_shardings, arg_shardings

    def infer(mesh, arg_shapes, result_shape):
        del result_shape
        return shardings(arg_shapes[0].sharding.mesh, arg_shapes)[2]

    wrapped.def_partition(partition=partition, infer_sharding_from_operands=infer,
                          propagate_user_sharding=None, sharding_rule=rule.einsum(),
                          need_replication_factors=rule.replicated_in_order(),
                          reduction_factors=rule.factors_reduced_everywhere(),
                          **dict(rule.sizes))
    return wrapped


def kernel_call(kernel: Callable, rule: ShardingRule, batched: Callable,
                single_result: bool = True) -> Callable:
    """:func:`partitioned` ``kernel`` that also runs under ``jax.vmap``.

    ``custom_partitioning`` has no batching rule of its own: under ``vmap``,
    ``batched(axis_size, in_batched, *operands)`` runs instead, every operand with
    the batch axis first (those not batched, ``in_batched`` False, broadcast), and
    must return the batched results (batch axis first), typically from a wider call
    of the same op.
    """
    @jax.custom_batching.custom_vmap
    def call(*operands):
        return partitioned(kernel, rule, single_result)(*operands)

    @call.def_vmap
    def _vmapped(axis_size, in_batched, *operands):
        operands = [v if is_batched else jnp.broadcast_to(v, (axis_size, *v.shape))
                    for v, is_batched in zip(operands, in_batched)]
        out = batched(axis_size, in_batched, *operands)
        return out, True if single_result else tuple(True for _ in out)

    return call


def varying_axes(value) -> frozenset[str]:
    """The mesh axes ``value`` varies over inside ``jax.shard_map`` (none outside)."""
    manual = getattr(jax.typeof(value), "manual_axis_type", None)
    return frozenset() if manual is None else frozenset(manual.varying)


def vary_like(value, *like):
    """``value`` typed as varying over every mesh axis one of ``like`` varies over (its
    values unchanged): a per-token result computed from parameters alone."""
    missing = frozenset().union(*map(varying_axes, like)) - varying_axes(value)
    return jax.lax.pcast(value, tuple(sorted(missing)), to="varying") if missing else value


def typed_like_primals(grads, primals) -> tuple:
    """A ``custom_vjp`` backward's gradients with their primals' types inside
    ``jax.shard_map``: a gradient is summed over the mesh axes it varies over and its
    primal does not (a parameter every shard used whole gets the sum of every shard's
    part: the transpose of the broadcast JAX inserted) and marked varying where its
    primal is. Outside ``shard_map``: unchanged. ``None`` entries pass through."""
    typed = []
    for grad, primal in zip(grads, primals, strict=True):
        if grad is not None and primal is not None:
            extra = varying_axes(grad) - varying_axes(primal)
            if extra:
                grad = jax.lax.psum(grad, tuple(sorted(extra)))
            grad = vary_like(grad, primal)
        typed.append(grad)
    return tuple(typed)
