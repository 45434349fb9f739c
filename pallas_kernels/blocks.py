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


def dot(a, b, contract=(1, 0)):
    """``a @ b`` over dims ``contract`` with float32 accumulation, operands in their (shared)
    dtype; float32 operands at full precision (Triton's default for them is TF32)."""
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(a.dtype) == jnp.float32 else None
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                               precision=precision, preferred_element_type=jnp.float32)
