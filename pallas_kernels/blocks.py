"""Helpers for kernels that work on masked blocks: index ranges, masks, loads, dots.

A mask of ``None`` means the block lies wholly inside the array (nothing cut off);
every helper here keeps that convention, so kernels emit no mask they do not need.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def result_type(shape, dtype, *operands):
    """``jax.ShapeDtypeStruct`` of a kernel result computed from ``operands``: inside
    ``jax.shard_map`` it varies over every mesh axis one of them varies over (what
    ``check_vma`` needs to know; outside, there are none)."""
    manual = [t for t in (getattr(jax.typeof(v), "manual_axis_type", None) for v in operands)
              if t is not None]
    if not manual:
        return jax.ShapeDtypeStruct(shape, dtype)
    varying = frozenset().union(*(t.varying for t in manual))
    return jax.ShapeDtypeStruct(shape, dtype,
                                manual_axis_type=manual[0].update(varying=varying))


def pallas_call(kernel, *, out_shape, **options):
    """``pl.pallas_call(kernel, out_shape=..., **options)`` whose results are typed by
    :func:`result_type` from the operands it is called with, so that a kernel runs inside
    ``jax.shard_map`` with its default checks. ``out_shape``: a pytree of
    ``jax.ShapeDtypeStruct``."""
    def call(*operands):
        typed = jax.tree.map(lambda s: result_type(s.shape, s.dtype, *operands), out_shape)
        return pl.pallas_call(kernel, out_shape=typed, **options)(*operands)
    return call


def written_into(kernel, operands, out):
    """``(kernel, operands, input_output_aliases)`` for a :func:`pallas_call` whose first
    result is written into ``out`` (aliased: in place, where tests poison it first);
    unchanged without ``out``."""
    operands = tuple(operands)
    if out is None:
        return kernel, operands, {}
    count = len(operands)

    def body(*refs):   # skips the aliased input's ref
        return kernel(*refs[:count], *refs[count + 1:])
    return body, (*operands, out), {count: 0}


def all_of(*masks):
    """Logical and of the masks that are not None (None if all are)."""
    masks = [m for m in masks if m is not None]
    return functools.reduce(jnp.logical_and, masks) if masks else None


def load(view, mask, other=0):
    """``view``'s block; cells outside ``mask`` (None: none) read as ``other``."""
    return plgpu.load(view, mask=mask, other=other if mask is not None else None)


def padded(extent: int) -> int:
    """A block covering ``extent``: a power of two, at least 16 (Triton's smallest dot)."""
    return max(16, pl.next_power_of_2(extent))


def columns(extent: int, start, block: int):
    """``(pl.ds, mask or None)`` for ``block`` indices from ``start`` along an axis of
    ``extent``; every index int32, with or without x64."""
    start = jnp.int32(start)
    ids = start + jnp.arange(block, dtype=jnp.int32)
    return pl.ds(start, block), (ids < extent) if extent % block else None


def rows_cols(rows, cols):
    """The 2-d mask of row mask ``rows`` and column mask ``cols`` (either may be None)."""
    return all_of(None if rows is None else rows[:, None], None if cols is None else cols[None, :])


def block_loop(first, stop, count: int, body, init, *, constant_trip_count: bool):
    """``fori_loop`` of ``body`` over blocks ``first .. stop - 1``, or, with
    ``constant_trip_count``, over all ``count`` blocks: then the body must leave the
    blocks outside ``first .. stop - 1`` without effect, as a causal mask does.

    Float32 kernels take the constant count. On an H200 (JAX 0.11.2), a software-
    pipelined loop whose bounds depend on the program, with float32 dots (Triton's
    IEEE dot, on FMA units), computed wrong rows; the same loop with constant bounds,
    or unpipelined, computed them right, as did tensor-core dots (BENCHMARKS.md, SSD).
    """
    if constant_trip_count:
        first, stop = jnp.int32(0), jnp.int32(count)
    return jax.lax.fori_loop(first, stop, body, init)


def dot(a, b, contract=(1, 0)):
    """``a @ b`` over dims ``contract`` with float32 accumulation, operands in their (shared)
    dtype; float32 operands at full precision (Triton's default for them is TF32)."""
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(a.dtype) == jnp.float32 else None
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                               precision=precision, preferred_element_type=jnp.float32)


def split_bf16(v, pieces: int):
    """``pieces`` bfloat16 arrays summing to ``v``: 1 piece holds a bfloat16 value
    exactly, 2 a float16 one, 3 a float32 one (8 significant bits each). Each piece is
    the float32 remainder with its low 16 bits cleared, so it converts to bfloat16
    exactly and the next remainder is exact (a masked bit pattern, which no compiler
    folds away as it may fold ``f32(bf16(r))`` back to ``r``)."""
    parts, rest = [], v.astype(jnp.float32)
    for _ in range(pieces):
        high = jax.lax.bitcast_convert_type(
            jax.lax.bitcast_convert_type(rest, jnp.uint32) & jnp.uint32(0xFFFF0000), jnp.float32)
        parts.append(high.astype(jnp.bfloat16))
        rest = rest - high
    return parts


def split_dot(a_parts, b_parts, contract=(1, 0), order: int | None = None):
    """``sum_{i + j < order} a_parts[i] @ b_parts[j]`` on bfloat16 tensor cores with float32
    accumulation (every bfloat16 product is exact in float32). ``order`` (default: all
    pairs) drops the products of the smallest pieces."""
    order = len(a_parts) + len(b_parts) - 1 if order is None else order
    terms = [dot(a, b, contract) for i, a in enumerate(a_parts) for j, b in enumerate(b_parts)
             if i + j < order]
    return functools.reduce(jnp.add, terms)


def bf16_pieces(dtype) -> int:
    """bfloat16 pieces that hold a value of ``dtype`` exactly."""
    return {jnp.dtype(jnp.bfloat16): 1, jnp.dtype(jnp.float16): 2}.get(jnp.dtype(dtype), 3)
