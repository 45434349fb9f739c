"""Cascade-attention merge kernels: ``K`` partial states ``(v_k, s_k)`` -> one.

``s_k`` is the log-sum-exp, in base ``b`` (2 or e), of the scores a partial
attention state was computed over; merging is exact softmax re-weighting:

    m = max_k s_k,   w_k = b^(s_k - m),   W = sum_k w_k,
    v = sum_k w_k v_k / W,                s = m + log_b W.

An *empty* state (``s_k = -inf``, attention over zero keys; ``+inf``, which
some attention kernels emit for such rows, is read the same way) has weight 0
and its ``v_k`` is never read into a sum, whatever it holds: merged with a
non-empty state it returns that state bit for bit, and empty with empty gives
``(0, -inf)``. NaN in a non-empty state propagates.

Backward, with ``p_k = w_k / W`` and ``g_k = <dv, v_k>`` over head_dim:
``dv_k = p_k dv`` and ``ds_k = p_k (ds + ln(b) (g_k - sum_j p_j g_j))``
(``sum_j p_j g_j = <dv, v>``, as in FlashAttention's backward), 0 for empty states.

Layout: ``v`` tiles are ``[block_rows, block_heads, head_dim padded to a power
of 2]`` of ``[seq_len, (K,) num_heads, head_dim]``; ``s`` tiles drop the last
axis. A program owns one tile of every state (the K states unrolled: K is
static), so any seq_len, num_heads and head_dim work, edges masked. Math is in
float32 (float64 for float64 ``v``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.blocks import all_of, load, pallas_call
from pallas_kernels.formulas.cascade import compute_dtype, merge_grad_math, merge_math
from pallas_kernels.tiling import TileConfig, fit_tile, tile_search_space

# Elements of one state's v per program, and programs to launch at least.
_TILE_ELEMENTS = 4096
_MIN_PROGRAMS = 512


def default_config(seq_len: int, num_heads: int, head_dim: int) -> TileConfig:
    """``block_rows`` sequence rows by ``block_cols`` heads (whole head_dim) per program."""
    padded = pl.next_power_of_2(head_dim)
    config = fit_tile(seq_len, num_heads, tile_elements=max(1, _TILE_ELEMENTS // padded),
                      min_programs=_MIN_PROGRAMS, min_block_cols=1,
                      max_block_cols=max(1, _TILE_ELEMENTS // padded))
    elements = config.block_rows * config.block_cols * padded
    return dataclasses.replace(config, num_warps=8 if elements >= 4096 else 4)


def backward_config(seq_len: int, num_heads: int, head_dim: int) -> TileConfig:
    """The forward's tiles with 16 warps where a tile holds 4096 elements or more: the
    backward keeps every state's tile and dv live at once (an H200 sweep: 1.88x the
    forward's time for ``merge_states`` against 1.96x at 8 warps)."""
    config = default_config(seq_len, num_heads, head_dim)
    elements = config.block_rows * config.block_cols * pl.next_power_of_2(head_dim)
    return dataclasses.replace(config, num_warps=16) if elements >= 4096 else config


def search_space(seq_len: int, num_heads: int, head_dim: int, *,
                 backward: bool = False) -> tuple[TileConfig, ...]:
    """The tiles the tuner tries (``bjax.tune``): rows by heads (whole head_dim) of 1024
    to 16384 elements, 4 or 8 warps (the backward also 16)."""
    return tile_search_space(seq_len, num_heads, min_elements=1024, max_elements=16384,
                             cell=pl.next_power_of_2(head_dim), min_block_cols=1,
                             warps=(4, 8, 16) if backward else (4, 8))


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """Tiles of the forward and the backward kernels; ``None``: that one's heuristic
    (:func:`default_config`, :func:`backward_config`)."""
    forward: TileConfig | None = None
    backward: TileConfig | None = None


class _Tile(NamedTuple):
    """This program's index ranges and load/store masks (None where nothing is cut)."""
    rows: Any
    heads: Any
    dims: Any
    rows_in: Any
    s_mask: Any
    v_mask: Any


def _tile(seq_len, num_heads, head_dim, config: TileConfig) -> _Tile:
    block_rows, block_heads = config.block_rows, config.block_cols
    padded = pl.next_power_of_2(head_dim)
    r0, h0 = pl.program_id(1) * block_rows, pl.program_id(0) * block_heads
    rows_in = (r0 + jnp.arange(block_rows)) < seq_len if seq_len % block_rows else None
    heads_in = (h0 + jnp.arange(block_heads)) < num_heads if num_heads % block_heads else None
    dims_in = jnp.arange(padded) < head_dim if head_dim != padded else None
    s_mask = all_of(None if rows_in is None else rows_in[:, None],
                  None if heads_in is None else heads_in[None, :])
    v_mask = all_of(None if s_mask is None else s_mask[:, :, None],
                  None if dims_in is None else dims_in[None, None, :])
    return _Tile(pl.ds(r0, block_rows), pl.ds(h0, block_heads), pl.ds(jnp.int32(0), padded),
                 rows_in, s_mask, v_mask)


def _loaders(tile: _Tile, v_at, s_at, dtype, row_on=None):
    """``load_v(k)``, ``load_s(k)`` from views ``v_at(k)``, ``s_at(k)``; cut-off cells read
    as empty states (rows where ``row_on`` is False too: they are not read at all)."""
    s_mask = all_of(tile.s_mask, None if row_on is None else row_on[:, None])
    v_mask = all_of(tile.v_mask, None if row_on is None else row_on[:, None, None])

    def load_s(k):
        return load(s_at(k), s_mask, -jnp.inf).astype(dtype)

    def load_v(k):
        return load(v_at(k), v_mask, 0).astype(dtype)
    return load_v, load_s, s_mask, v_mask


def _cotangents(dv_ref, ds_ref, tile: _Tile, dtype):
    """This program's tiles of ``(dv, ds)``, 0 outside the arrays."""
    return (load(dv_ref.at[tile.rows, tile.heads, tile.dims], tile.v_mask, 0).astype(dtype),
            load(ds_ref.at[tile.rows, tile.heads], tile.s_mask, 0).astype(dtype))


def _store(ref, value, mask):
    plgpu.store(ref, value.astype(ref.dtype), mask=mask)


def _row_flags(mask_ref, tile: _Tile):
    return load(mask_ref.at[tile.rows], tile.rows_in, 0) != 0


def _pair_forward_kernel(*refs, shape, base, masked, in_place, config):
    v_a, s_a, v_b, s_b, *rest = refs
    mask_ref = rest.pop(0) if masked else None
    v_out, s_out = rest
    tile = _tile(*shape, config)
    row_on = _row_flags(mask_ref, tile) if masked else None
    # In place, rows the mask turns off are neither read nor written (v_out, s_out
    # are v_a, s_a); otherwise they are copied from a.
    skip = row_on if in_place else None
    load_v, load_s, s_mask, v_mask = _loaders(
        tile, lambda k: (v_a, v_b)[k].at[tile.rows, tile.heads, tile.dims],
        lambda k: (s_a, s_b)[k].at[tile.rows, tile.heads], compute_dtype(v_a.dtype), skip)
    v, s = merge_math(load_s, load_v, 2, base)
    v, s = v.astype(v_out.dtype), s.astype(s_out.dtype)
    if masked and not in_place:
        keep_v = load(v_a.at[tile.rows, tile.heads, tile.dims], tile.v_mask, 0)
        keep_s = load(s_a.at[tile.rows, tile.heads], tile.s_mask, 0)
        v = jnp.where(row_on[:, None, None], v, keep_v)
        s = jnp.where(row_on[:, None], s, keep_s)
    _store(v_out.at[tile.rows, tile.heads, tile.dims], v, v_mask)
    _store(s_out.at[tile.rows, tile.heads], s, s_mask)


def _pair_backward_kernel(*refs, shape, base, masked, config):
    v_a, s_a, v_b, s_b, *rest = refs
    mask_ref = rest.pop(0) if masked else None
    dv_ref, ds_ref, dv_a, ds_a, dv_b, ds_b = rest
    tile = _tile(*shape, config)
    dtype = compute_dtype(v_a.dtype)
    load_v, load_s, _, _ = _loaders(
        tile, lambda k: (v_a, v_b)[k].at[tile.rows, tile.heads, tile.dims],
        lambda k: (s_a, s_b)[k].at[tile.rows, tile.heads], dtype)
    dv, ds = _cotangents(dv_ref, ds_ref, tile, dtype)
    keep_a = ~_row_flags(mask_ref, tile)[:, None] if masked else None
    p, d_s = merge_grad_math(load_s, load_v, dv, ds, 2, base, keep_first=keep_a)
    for p_k, d_s_k, dv_k, ds_k in zip(p, d_s, (dv_a, dv_b), (ds_a, ds_b)):
        _store(dv_k.at[tile.rows, tile.heads, tile.dims], p_k[..., None] * dv, tile.v_mask)
        _store(ds_k.at[tile.rows, tile.heads], d_s_k, tile.s_mask)


def _many_forward_kernel(v_ref, s_ref, v_out, s_out, *, shape, base, num_states, config):
    tile = _tile(*shape, config)
    load_v, load_s, s_mask, v_mask = _loaders(
        tile, lambda k: v_ref.at[tile.rows, jnp.int32(k), tile.heads, tile.dims],
        lambda k: s_ref.at[tile.rows, jnp.int32(k), tile.heads], compute_dtype(v_ref.dtype))
    v, s = merge_math(load_s, load_v, num_states, base)
    _store(v_out.at[tile.rows, tile.heads, tile.dims], v, v_mask)
    _store(s_out.at[tile.rows, tile.heads], s, s_mask)


def _many_backward_kernel(v_ref, s_ref, dv_ref, ds_ref, dv_out, ds_out, *, shape, base,
                          num_states, config):
    tile = _tile(*shape, config)
    dtype = compute_dtype(v_ref.dtype)
    load_v, load_s, s_mask, v_mask = _loaders(
        tile, lambda k: v_ref.at[tile.rows, jnp.int32(k), tile.heads, tile.dims],
        lambda k: s_ref.at[tile.rows, jnp.int32(k), tile.heads], dtype)
    dv, ds = _cotangents(dv_ref, ds_ref, tile, dtype)
    p, d_s = merge_grad_math(load_s, load_v, dv, ds, num_states, base)
    for k, (p_k, d_s_k) in enumerate(zip(p, d_s)):
        _store(dv_out.at[tile.rows, jnp.int32(k), tile.heads, tile.dims], p_k[..., None] * dv,
               v_mask)
        _store(ds_out.at[tile.rows, jnp.int32(k), tile.heads], d_s_k, s_mask)


def _call(kernel, operands, out_shapes, shape, config, interpret, name, aliases=None):
    seq_len, num_heads, _ = shape
    return pallas_call(
        kernel,
        out_shape=out_shapes,
        grid=(pl.cdiv(num_heads, config.block_cols), pl.cdiv(seq_len, config.block_rows)),
        input_output_aliases=aliases or {},
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1),
        interpret=interpret,
        name=name,
    )(*operands)


def _like(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


_STATIC = ("base", "config", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC + ("in_place",))
def merge_pair(v_a, s_a, v_b, s_b, mask=None, *, base, config: TileConfig, in_place=False,
               interpret=False):
    """``(v, s)`` merged from ``(v_a, s_a)`` and ``(v_b, s_b)``; rows where ``mask``
    (int8 ``[seq_len]``) is 0 keep a.

    ``v_*``: ``[seq_len, num_heads, head_dim]``; ``s_*``: ``[seq_len, num_heads]``.
    With ``in_place`` the results are written over ``v_a, s_a`` (aliased: in
    place when they are donated, after a copy XLA makes when they are not).
    """
    masked = mask is not None
    kernel = functools.partial(_pair_forward_kernel, shape=v_a.shape, base=base, masked=masked,
                               in_place=in_place, config=config)
    operands = (v_a, s_a, v_b, s_b) + ((mask,) if masked else ())
    return _call(kernel, operands, (_like(v_a), _like(s_a)), v_a.shape, config, interpret,
                 "bjax_merge_state", aliases={0: 0, 1: 1} if in_place else None)


@functools.partial(jax.jit, static_argnames=_STATIC)
def merge_pair_backward(v_a, s_a, v_b, s_b, mask, dv, ds, *, base, config: TileConfig,
                        interpret=False):
    """``(dv_a, ds_a, dv_b, ds_b)`` of :func:`merge_pair` for cotangents ``(dv, ds)``."""
    masked = mask is not None
    kernel = functools.partial(_pair_backward_kernel, shape=v_a.shape, base=base,
                               masked=masked, config=config)
    operands = (v_a, s_a, v_b, s_b) + ((mask,) if masked else ()) + (dv, ds)
    return _call(kernel, operands, (_like(v_a), _like(s_a), _like(v_b), _like(s_b)),
                 v_a.shape, config, interpret, "bjax_merge_state_backward")


@functools.partial(jax.jit, static_argnames=_STATIC)
def merge_many(v, s, *, base, config: TileConfig, interpret=False):
    """``v [seq_len, K, num_heads, head_dim], s [seq_len, K, num_heads] -> (v, s)`` merged."""
    seq_len, num_states, num_heads, head_dim = v.shape
    shape = (seq_len, num_heads, head_dim)
    kernel = functools.partial(_many_forward_kernel, shape=shape, base=base,
                               num_states=num_states, config=config)
    out_shapes = (jax.ShapeDtypeStruct(shape, v.dtype), jax.ShapeDtypeStruct(shape[:2], s.dtype))
    return _call(kernel, (v, s), out_shapes, shape, config, interpret, "bjax_merge_states")


@functools.partial(jax.jit, static_argnames=_STATIC)
def merge_many_backward(v, s, dv, ds, *, base, config: TileConfig, interpret=False):
    """``(dv_states, ds_states)`` of :func:`merge_many` for cotangents ``(dv, ds)``."""
    seq_len, num_states, num_heads, head_dim = v.shape
    shape = (seq_len, num_heads, head_dim)
    kernel = functools.partial(_many_backward_kernel, shape=shape, base=base,
                               num_states=num_states, config=config)
    return _call(kernel, (v, s, dv, ds), (_like(v), _like(s)), shape, config, interpret,
                 "bjax_merge_states_backward")
