"""Cascade merge: bjax vs the jnp merge a user would write, forward and backward.

    python -m benchmarks.cascade [--backend pallas]

* ``merge_states`` on v [16384, 4, 32, 128] bf16 (prefill) and [64, 4, 32, 128]
  (decode); ``merge_state`` on v [16384, 32, 128] bf16 and [64, 32, 128].
* XLA column: the formula in jnp (max, exp2, weighted sum, log2; math in
  float32), and its autodiff for the backward. It has no empty-state handling,
  so it is a lower bound on what correct jnp code costs.
* ``merge_state`` forward twice: by default (a fresh output; XLA's jnp not
  donated) and with ``in_place=True`` ((v_a, s_a) donated and each call's
  result fed to the next, for both columns). Prefill shapes are timed as device
  throughput, decode shapes as GPU kernel time from a profiler trace (there
  JAX's dispatch of a call outlasts the kernels).

``ratio`` is XLA time / bjax time (> 1: bjax faster); ``% copy`` is bjax's bytes
(inputs read + outputs written) over the device-copy ceiling of the same run.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import bjax
from benchmarks import cases, harness

PREFILL, DECODE = cases.MERGE_PREFILL, cases.MERGE_DECODE
NUM_STATES = cases.MERGE_STATES


def jnp_merge_states(v, s):
    """Base-2 merge of v [S, K, H, D] by s [S, K, H], as plain jnp."""
    m = jnp.max(s, axis=1, keepdims=True)
    w = jnp.exp2(s - m)
    total = jnp.sum(w, axis=1)
    merged = jnp.sum(w[..., None] * v.astype(jnp.float32), axis=1) / total[..., None]
    return merged.astype(v.dtype), m[:, 0] + jnp.log2(total)


def jnp_merge_state(v_a, s_a, v_b, s_b):
    m = jnp.maximum(s_a, s_b)
    w_a, w_b = jnp.exp2(s_a - m), jnp.exp2(s_b - m)
    total = w_a + w_b
    merged = (w_a[..., None] * v_a.astype(jnp.float32)
              + w_b[..., None] * v_b.astype(jnp.float32)) / total[..., None]
    return merged.astype(v_a.dtype), m + jnp.log2(total)


def _states(seq_len, num_states):
    v, s = cases.merge_inputs(seq_len, num_states)
    dv = jax.random.normal(jax.random.key(2), (seq_len, *v.shape[2:]), jnp.bfloat16)
    ds = jax.random.normal(jax.random.key(3), (seq_len, s.shape[2]), jnp.float32)
    return v, s, dv, ds


def _backward(fn):
    return jax.jit(lambda *args: jax.vjp(fn, *args[:-2])[1](args[-2:]))


def _many_rows(backend, seq_len, ceiling):
    v, s, dv, ds = _states(seq_len, NUM_STATES)
    mine = lambda v, s: bjax.merge_states(v, s, backend=backend)  # noqa: E731
    timer = harness.device_time_ms if seq_len == PREFILL else harness.kernel_time_ms
    out_bytes = (v.nbytes + s.nbytes) // NUM_STATES
    rows = []
    for direction, make, nbytes, args in (
        ("fwd", jax.jit, v.nbytes + s.nbytes + out_bytes, (v, s)),
        ("bwd", _backward, 2 * (v.nbytes + s.nbytes) + out_bytes, (v, s, dv, ds)),
    ):
        rows.append(_row("merge_states", direction, v.shape, timer(make(mine), *args),
                         timer(make(jnp_merge_states), *args), nbytes, ceiling))
    return rows


def _pair_rows(backend, seq_len, ceiling):
    v, s, dv, ds = _states(seq_len, 2)
    v_a, s_a, v_b, s_b = v[:, 0], s[:, 0], v[:, 1], s[:, 1]
    mine = lambda *a: bjax.merge_state(*a, backend=backend)  # noqa: E731
    mine_in_place = lambda *a: bjax.merge_state(*a, in_place=True, backend=backend)  # noqa: E731
    in_place = {name: jax.jit(lambda state, v_b, s_b, f=f: f(*state, v_b, s_b), donate_argnums=0)
                for name, f in (("bjax", mine_in_place), ("xla", jnp_merge_state))}
    fresh_fns = {"bjax": jax.jit(mine), "xla": jax.jit(jnp_merge_state)}
    backward = {"bjax": _backward(mine), "xla": _backward(jnp_merge_state)}
    if seq_len == PREFILL:
        t_in_place = harness.chained_times_ms(
            in_place, {name: (v_a + 0, s_a + 0) for name in in_place}, v_b, s_b)
        t_fresh = {name: harness.device_time_ms(f, v_a, s_a, v_b, s_b)
                   for name, f in fresh_fns.items()}
        t_bwd = {name: harness.device_time_ms(f, v_a, s_a, v_b, s_b, dv, ds)
                 for name, f in backward.items()}
    else:
        t_in_place = {name: harness.kernel_time_ms(f, (v_a + 0, s_a + 0), v_b, s_b, chain=True)
                      for name, f in in_place.items()}
        t_fresh = {name: harness.kernel_time_ms(f, v_a, s_a, v_b, s_b)
                   for name, f in fresh_fns.items()}
        t_bwd = {name: harness.kernel_time_ms(f, v_a, s_a, v_b, s_b, dv, ds)
                 for name, f in backward.items()}
    one = v_a.nbytes + s_a.nbytes
    return [_row("merge_state", direction, v_a.shape, times["bjax"], times["xla"], nbytes,
                 ceiling)
            for direction, times, nbytes in (("fwd", t_fresh, 3 * one),
                                             ("fwd (in_place=True, donated)", t_in_place,
                                              3 * one),
                                             ("bwd", t_bwd, 5 * one))]


def _row(op, direction, shape, t_mine, t_xla, nbytes, ceiling):
    tbps = nbytes / (t_mine * 1e-3) / 1e12
    row = [op, direction, "x".join(map(str, shape)), f"{t_mine:.4f}", f"{t_xla:.4f}",
           f"{t_xla / t_mine:.2f}", f"{tbps:.2f}", f"{100 * tbps / ceiling:.0f}%"]
    print(" | ".join(row), flush=True)
    return row


def run(backend: str) -> str:
    ceiling, ceiling_how = harness.copy_ceiling_tbps()
    rows = []
    for seq_len in (PREFILL, DECODE):
        rows += _many_rows(backend, seq_len, ceiling)
        rows += _pair_rows(backend, seq_len, ceiling)
    return harness.report(
        f"copy ceiling: {ceiling:.2f} TB/s ({ceiling_how}); backend={backend}",
        ["op", "dir", "v shape", "bjax ms", "XLA ms", "ratio", "bjax TB/s", "% copy"], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None, help="bjax backend (default: bjax's default)")
    args = parser.parse_args()
    backend = args.backend or bjax.plan(
        bjax.merge_states, jax.ShapeDtypeStruct((1, 1, 1, 1), jnp.bfloat16),
        jax.ShapeDtypeStruct((1, 1, 1), jnp.float32)).backend
    harness.write_report("cascade", run(backend))


if __name__ == "__main__":
    main()
