"""Packed sequences given by mamba_ssm's ``cu_seqlens``: their argument rules, their segment
numbers, and each sequence's final state (``return_varlen_states``) of the SSD scan and
of the causal convolution.

Sequence ``i`` is steps ``cu_seqlens[i] .. cu_seqlens[i + 1] - 1`` of a batch of one row.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from bjax import _op
from pallas_kernels.formulas.ssd import process_dt


def check(cu_seqlens, return_varlen_states, seq_idx, batch: int, op: str) -> int:
    """Validates ``cu_seqlens`` and ``return_varlen_states``; returns the number of
    sequences (0 without ``cu_seqlens``)."""
    _op.check_bool(return_varlen_states, op, "return_varlen_states")
    if cu_seqlens is None:
        _op.check(not return_varlen_states, op, "return_varlen_states",
                  "False without cu_seqlens (the sequences' boundaries)", True)
        return 0
    _op.check(cu_seqlens.ndim == 1 and cu_seqlens.shape[0] >= 2, op, "cu_seqlens",
              "a vector [num_seqs + 1] of sequence boundaries", f"shape {cu_seqlens.shape}")
    _op.check(jnp.issubdtype(cu_seqlens.dtype, jnp.integer), op, "cu_seqlens.dtype",
              "an integer dtype", _op.dtype_name(cu_seqlens))
    _op.check(seq_idx is None, op, "seq_idx",
              "None with cu_seqlens (which defines the segments)", "an array")
    _op.check(batch == 1, op, "x.shape[0]",
              "1 with cu_seqlens (the sequences are packed along one row)", batch)
    return int(cu_seqlens.shape[0]) - 1


def sequence_numbers(cu_seqlens, seq_len: int):
    """int32 ``[1, seq_len]``: the sequence of every step (``num_seqs`` past the last
    boundary), a ``seq_idx``."""
    steps = jnp.arange(seq_len, dtype=jnp.int32)
    return jnp.searchsorted(cu_seqlens[1:].astype(jnp.int32), steps, side="right")[None]


def _ends(cu_seqlens):
    cu = cu_seqlens.astype(jnp.int32)
    return cu[:-1], cu[1:] - 1


def ssd_states(x, dt, A, B, dt_bias, chunk_states, cu_seqlens, *, chunk_size: int,
               softplus: bool, limit: tuple[float, float]):
    """Each sequence's final SSD state, float32 ``[num_seqs, heads, head_dim, state_dim]``.

    Sequence ``i`` ends at step ``e`` in chunk ``c = e // chunk_size`` and starts at
    ``s0``. With ``dt'`` the processed step sizes and ``S_c`` the state entering chunk
    ``c`` (``chunk_states[c]``), its state after ``e`` is

        [s0 < c Q or s0 = 0]  exp(A sum_{u=cQ}^{e} dt'_u) S_c
          + sum_{s=max(s0, cQ)}^{e}  dt'_s exp(A sum_{u=s+1}^{e} dt'_u) x_s B_s^T,

    the chunk's own steps of the sequence on top of what it carried in (the sequence at
    step 0 carries the initial state, which is ``S_0``). An empty sequence's is 0.

    Args:
      x: ``[seqlen, heads, head_dim]``; dt ``[seqlen, heads]``; A ``[heads]``; B
        ``[seqlen, groups, state_dim]``; dt_bias ``[heads]`` or None (one batch row).
      chunk_states: float32 ``[chunks, heads, head_dim, state_dim]``.
      cu_seqlens: ``[num_seqs + 1]``.
    """
    seq_len, heads, _ = x.shape
    q, chunks = chunk_size, chunk_states.shape[0]
    starts, ends = _ends(cu_seqlens)
    chunk = jnp.clip(ends // q, 0, chunks - 1)                          # [num_seqs]
    steps = chunk[:, None] * q + jnp.arange(q)                          # [num_seqs, q]
    mine = (steps >= starts[:, None]) & (steps <= ends[:, None]) & (steps < seq_len)
    rows = jnp.clip(steps, 0, seq_len - 1)
    dtp = process_dt(dt[rows], dt_bias, softplus, limit)                # [num_seqs, q, h]
    dtp = jnp.where(mine[..., None], dtp, 0.0)
    cums = jnp.cumsum(dtp, axis=1)
    end = ends - chunk * q                                              # -1: empty at 0
    cum_end = jnp.where((end >= 0)[:, None],
                        jnp.take_along_axis(cums, jnp.maximum(end, 0)[:, None, None], 1)[:, 0],
                        0.0)                                            # [num_seqs, h]
    a = A.astype(jnp.float32)
    weights = dtp * jnp.exp(jnp.where(mine[..., None], a * (cum_end[:, None] - cums), -jnp.inf))
    b = jnp.repeat(B[rows].astype(jnp.float32), heads // B.shape[1], axis=2)   # [s, q, h, n]
    local = jnp.einsum("sqh,sqhp,sqhn->shpn", weights, x[rows].astype(jnp.float32), b,
                       precision=jax.lax.Precision.HIGHEST)
    carries = ((starts < chunk * q) | (starts == 0)) & (ends >= starts)
    carried = jnp.exp(a * cum_end)[..., None, None] * chunk_states[chunk]
    return jnp.where(carries[:, None, None, None], carried, 0.0) + local


def conv_states(x, initial_states, cu_seqlens, taps: int):
    """Each sequence's last ``taps - 1`` rows, ``[num_seqs, taps - 1, d]``: zeros before
    its start (``initial_states``, or zeros, before the sequence at row 0); an empty
    sequence's are zeros. ``x`` ``[l, d]`` and ``initial_states`` ``[taps - 1, d]`` (or
    None) of one batch row; in x's dtype, or float32 with float32 ``initial_states``."""
    dtype = x.dtype if initial_states is None else jnp.promote_types(x.dtype,
                                                                     initial_states.dtype)
    before = (jnp.zeros((taps - 1, x.shape[1]), dtype) if initial_states is None
              else initial_states.astype(dtype))
    rows_and_before = jnp.concatenate([before, x.astype(dtype)])        # row r at r + taps - 1
    starts, ends = _ends(cu_seqlens)
    rows = ends[:, None] - (taps - 2) + jnp.arange(taps - 1)            # [num_seqs, taps - 1]
    keep = ((rows >= starts[:, None]) | (starts[:, None] == 0)) & (ends >= starts)[:, None]
    taken = rows_and_before[jnp.clip(rows + taps - 1, 0, rows_and_before.shape[0] - 1)]
    return jnp.where(keep[..., None], taken, jnp.zeros((), dtype))
