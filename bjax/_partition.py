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
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec


@dataclasses.dataclass(frozen=True)
class ShardingRule:
    """Factors of every dimension of a kernel call's operands and results.

    Attributes:
      operands: one tuple of factor names per operand, one name per dimension.
      results: likewise for the results.
      replicated: factors the kernel needs whole on every device (never split).

    >>> ShardingRule(operands=(("b", "t", "x"),), results=(("b", "t", "y"),),
    ...              replicated=frozenset({"x", "y"})).einsum()
    'b t x -> b t y'
    """
    operands: tuple[tuple[str, ...], ...]
    results: tuple[tuple[str, ...], ...]
    replicated: frozenset[str] = frozenset()

    def replicated_in_order(self) -> tuple[str, ...]:
        """The replicated factors in their order of first appearance (Shardy's order)."""
        seen = dict.fromkeys(f for group in (*self.operands, *self.results) for f in group)
        return tuple(f for f in seen if f in self.replicated)

    def einsum(self) -> str:
        """The rule in Shardy's einsum-like notation."""
        def side(groups):
            return ", ".join(" ".join(g) for g in groups)
        return f"{side(self.operands)} -> {side(self.results)}"

    def factor_axes(self, shardings: Sequence[NamedSharding]) -> dict[str, object]:
        """Mesh axes for each factor, taken from the operands' shardings in order: the
        first operand dimension sharded along a factor decides it; replicated factors
        and mesh axes already taken by another factor get none."""
        axes: dict[str, object] = {}
        taken: set[str] = set()
        for factors, sharding in zip(self.operands, shardings):
            spec = tuple(getattr(sharding, "spec", ())) + (None,) * len(factors)
            for factor, entry in zip(factors, spec):
                if entry is None or factor in self.replicated or factor in axes:
                    continue
                names = set(entry if isinstance(entry, tuple) else (entry,))
                if names & taken:
                    continue
                axes[factor] = entry
                taken |= names
        return axes


def _specs(groups, axes, mesh):
    return tuple(NamedSharding(mesh, PartitionSpec(*(axes.get(f) for f in factors)))
                 for factors in groups)


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
        axes = rule.factor_axes([a.sharding for a in arg_shapes])
        results = _specs(rule.results, axes, mesh)
        return _specs(rule.operands, axes, mesh), results[0] if single_result else results

    def partition(mesh, arg_shapes, result_shape):
        del result_shape
        mesh = arg_shapes[0].sharding.mesh
        arg_shardings, result_shardings = shardings(mesh, arg_shapes)
        return mesh, kernel, result_shardings, arg_shardings

    def infer(mesh, arg_shapes, result_shape):
        del result_shape
        return shardings(arg_shapes[0].sharding.mesh, arg_shapes)[1]

    wrapped.def_partition(partition=partition, infer_sharding_from_operands=infer,
                          propagate_user_sharding=None, sharding_rule=rule.einsum(),
                          need_replication_factors=rule.replicated_in_order())
    return wrapped


def kernel_call(kernel: Callable, rule: ShardingRule, batched: Callable,
                single_result: bool = True) -> Callable:
    """:func:`partitioned` ``kernel`` that also runs under ``jax.vmap``.

    ``custom_partitioning`` has no batching rule of its own: under ``vmap``,
    ``batched(axis_size, *operands)`` runs instead, every operand with the batch
    axis first (unbatched ones broadcast), and must return the batched results
    (batch axis first), typically from a wider call of the same op.
    """
    @jax.custom_batching.custom_vmap
    def call(*operands):
        return partitioned(kernel, rule, single_result)(*operands)

    @call.def_vmap
    def _vmapped(axis_size, in_batched, *operands):
        operands = [v if is_batched else jnp.broadcast_to(v, (axis_size, *v.shape))
                    for v, is_batched in zip(operands, in_batched)]
        out = batched(axis_size, *operands)
        return out, True if single_result else tuple(True for _ in out)

    return call
