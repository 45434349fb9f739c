"""``python -m bjax.demo``: every op on the default backend, checked and timed.

On a CUDA GPU the default backend is Pallas; elsewhere it is XLA, and the
Pallas kernels also run through the Pallas interpreter (on smaller shapes: the
interpreter runs the grid one program at a time). Each result is compared with
the XLA implementation evaluated in float64; the table gives the largest error
relative to the reference's largest magnitude, and the median time of a call.
"""
from __future__ import annotations

import functools
import statistics
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)  # float64 references

import jax.numpy as jnp  # noqa: E402

import bjax  # noqa: E402
from bjax._op import resolve_backend  # noqa: E402


def _time_ms(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _relative_error(out, ref):
    out, ref = jnp.asarray(out, jnp.float64), jnp.asarray(ref, jnp.float64)
    return float(jnp.max(jnp.abs(out - ref)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-300))


def gated_rows(backend, shape, dtype):
    """Forward and backward of every gated activation."""
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(dtype)
    dy = jax.random.normal(jax.random.key(1), shape[:-1] + (shape[-1] // 2,),
                           jnp.float32).astype(dtype)
    x64, dy64 = x.astype(jnp.float64), dy.astype(jnp.float64)
    rows = []
    for kind in bjax.gated.KINDS:
        fn = functools.partial(bjax.gated_activation, kind=kind, backend=backend)
        ref_fn = functools.partial(bjax.gated_activation, kind=kind, backend="xla")
        fwd = jax.jit(fn)
        bwd = jax.jit(lambda x, dy, fn=fn: jax.vjp(fn, x)[1](dy)[0])
        ref_bwd = jax.vjp(ref_fn, x64)[1](dy64)[0]
        for name, f, args, ref in ((f"{kind} fwd", fwd, (x,), ref_fn(x64)),
                                   (f"{kind} bwd", bwd, (x, dy), ref_bwd)):
            out = f(*args)
            rows.append((name, shape, jnp.dtype(dtype).name, backend,
                         _relative_error(out, ref), _time_ms(f, *args)))
    return rows


def main() -> int:
    default = resolve_backend(None, "demo")
    runs = [(default, (4096, 8192) if default == "pallas" else (256, 1024))]
    if default != "pallas":
        runs.append(("interpret", (64, 256)))
    print(f"bjax {bjax.__version__} on {jax.devices()[0].device_kind}; default backend: {default}")
    header = f"{'op':<12} {'shape':<14} {'dtype':<9} {'backend':<10} {'max rel err':>12} {'ms':>9}"
    print(header + "\n" + "-" * len(header))
    worst = 0.0
    for backend, shape in runs:
        for name, shp, dtype, be, err, ms in gated_rows(backend, shape, jnp.bfloat16):
            worst = max(worst, err)
            print(f"{name:<12} {str(shp):<14} {dtype:<9} {be:<10} {err:>12.2e} {ms:>9.3f}")
    # bf16 outputs: rounding alone costs up to half an ulp, 2^-8 of |y| just above
    # a power of two; float32 math adds a little more. One ulp (2^-7) bounds both.
    bound = 2**-7
    ok = worst <= bound
    print(f"\n{'all results match their references' if ok else 'MISMATCH'} "
          f"(worst {worst:.2e}, bound {bound:.2e})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
