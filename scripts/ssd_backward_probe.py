"""Compare every SSD kernel's outputs, compiled on the GPU, with the same kernel run through
the Pallas interpreter on identical inputs, and say where they differ (which indices of
which output): a bisecting tool for kernels that the compiler gets wrong.

    PYTHONPATH=. python3 scripts/ssd_backward_probe.py [--quick] [--dims]

Launch variants of one problem by default; ``--dims`` adds a head_dim x state_dim grid.
The interpreter on a GPU takes about half a minute a case.
"""
import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import ssd as pk
from pallas_kernels import ssd_backward as pkb

ON_GPU = jax.default_backend() == "gpu"


def inputs(seed, b, l, h, p, g, n, chunk, dtype):
    k = jax.random.split(jax.random.key(seed), 8)
    x = jax.random.normal(k[0], (b, l, h, p), jnp.float32).astype(dtype)
    dt = jax.random.uniform(k[1], (b, l, h), jnp.float32, 0.01, 0.3)
    a = -jax.random.uniform(k[2], (h,), jnp.float32, 0.5, 4.0)
    B = jax.random.normal(k[3], (b, l, g, n), jnp.float32).astype(dtype)
    C = jax.random.normal(k[4], (b, l, g, n), jnp.float32).astype(dtype)
    dy = jax.random.normal(k[5], (b, l, h, p), jnp.float32).astype(dtype)
    dfinal = jax.random.normal(k[6], (b, h, p, n), jnp.float32)
    d = jax.random.normal(k[7], (h, p), jnp.float32)
    return x, dt, a, B, C, dy, dfinal, d


def where_wrong(ref, out, names):
    """Indices along each axis where |out - ref| exceeds 1e-3 of max |ref|."""
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    bad = ~(np.abs(out - ref) <= 1e-3 * max(np.abs(ref).max(), 1e-30))
    parts = []
    for axis, name in enumerate(names):
        idx = np.nonzero(bad.any(axis=tuple(i for i in range(bad.ndim) if i != axis)))[0]
        parts.append(f"{name}={list(idx) if len(idx) <= 12 else f'{len(idx)} of {bad.shape[axis]}: {idx.min()}..{idx.max()}'}")
    return f"{bad.sum()} cells; " + " ".join(parts)


def rel(ref, out):
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    return np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)


AXES = {
    "states": "b c h p n", "final": "b h p n", "y": "b l h p",
    "ends": "b c h p n", "d_init": "b h p n", "carry": "b h c pb",
    "dc_parts": "b l slice n", "rows": "b pb h t",
    "dx": "b l h p", "db_parts": "b l slice n", "cols": "b pb h t", "q": "b pb h t",
    "xy": "b pb h t",
}


def run_case(shape, dtype, config, fwd_config=None, seed=0):
    b, l, h, p, g, n, chunk = shape
    x, dt, a, B, C, dy, dfinal, d = inputs(seed, b, l, h, p, g, n, chunk, dtype)
    fwd_config = fwd_config or pk.default_config(chunk, p, n, h // g, dtype)
    dt_p, a_cs = pk.time_terms(dt, a, chunk_size=chunk, softplus=False,
                               limit=(0.0, float("inf")), interpret=True)

    def outputs(interpret, ref=None):
        fwd = dict(chunk_size=chunk, config=fwd_config, interpret=interpret)
        states, final = pk.chunk_states(x, B, dt_p, a_cs, None, None, states_dtype=jnp.float32,
                                        **fwd)
        y = pk.chunk_scan(x, B, C, dt_p, a_cs, states.astype(pk.snapshot_dtype(x.dtype)),
                          None, d, **fwd)
        states_in = states if ref is None else ref["states"]   # the interpreter's, for both
        bwd = dict(chunk_size=chunk, config=config, interpret=interpret)
        ends, d_init, carry = pkb.state_grads(dy, C, a_cs, states_in, None, dfinal, **bwd)
        ends_in = ends if ref is None else ref["ends"]
        dc_parts, rows = pkb.target_grads(x, dy, B, C, dt_p, a_cs, states_in, None, **bwd)
        dx, db_parts, cols, q, xy = pkb.source_grads(x, dy, B, C, dt_p, a_cs, ends_in, None, d,
                                                      **bwd)
        return dict(states=states, final=final, y=y, ends=ends, d_init=d_init, carry=carry,
                    dc_parts=dc_parts, rows=rows, dx=dx, db_parts=db_parts, cols=cols, q=q,
                    xy=xy)

    interp = outputs(True)
    results = outputs(not ON_GPU, interp)
    worst = max(rel(interp[k], results[k]) for k in interp)
    report = []
    for k in interp:
        e = rel(interp[k], results[k])
        if not np.isfinite(e) or e > 1e-5:
            report.append(f"    {k}: rel {e:.2e}; "
                          f"{where_wrong(interp[k], results[k], AXES[k].split())}")
    return worst, report


def main():
    base = (1, 70, 4, 80, 2, 130, 32)
    default = pkb.default_config(32, 80, 130, 2, jnp.float32)
    variants = {
        "default": default,
        "warps8": dataclasses.replace(default, num_warps=8),
        "stages1": dataclasses.replace(default, num_stages=1),
        "stages3": dataclasses.replace(default, num_stages=3),
        "bp32": dataclasses.replace(default, block_p=32),
        "src_h2": dataclasses.replace(default, source_block_h=2),
    }
    cases = [(name, base, dtype, cfg) for name, cfg in variants.items()
             for dtype in (jnp.float32, jnp.bfloat16)]
    if "--dims" in sys.argv:
        cases += [("dims", (1, 70, 4, p, 2, n, 32), jnp.float32,
                   pkb.default_config(32, p, n, 2, jnp.float32))
                  for p in (64, 80, 96, 100, 130, 200, 256) for n in (64, 128, 130, 200, 256)]
    if "--quick" in sys.argv:
        cases = cases[:2]
    for name, shape, dtype, cfg in cases:
        label = f"{name:8s} {str(shape):28s} {jnp.dtype(dtype).name:8s}"
        try:
            worst, report = run_case(shape, dtype, cfg)
            print(f"{label} worst {worst:.2e}", flush=True)
        except Exception as e:  # noqa: BLE001 - a compile failure is a result too
            report = []
            print(f"{label} ERROR {type(e).__name__}: {str(e)[:200]}", flush=True)
        for line in report:
            print(line, flush=True)


if __name__ == "__main__":
    main()
