"""write_slice: bjax vs lax.dynamic_update_slice, in place.

    python -m benchmarks.write_slice [--backend pallas]

* Decode loop: KV-cache appends of one token ([8, 1, 8, 128]) inside one jitted
  ``fori_loop``, cache [8, S, 8, 128] donated; time per append. On a GPU: 256
  appends, bf16, caches of 32 MiB to 2 GiB. On a CPU: float32 (256 appends) and
  bfloat16 (16 appends: XLA's CPU update of a bf16 array takes milliseconds), caches
  of 32 to 512 MiB. Columns: bjax (scalar position), bjax with per-row positions
  (ragged lengths), ``lax.dynamic_update_slice`` (which clamps out-of-range
  positions) and, on a GPU, bjax's XLA backend (on a CPU it is the default).
* On a GPU, a generic 3-d window (bf16) and an int4 window, dest donated: GPU
  kernel time per call from a profiler trace (a window of a few MiB is shorter than
  JAX's host dispatch of a call), TB/s counting the window's bytes read and written,
  against the device-copy ceiling of the same run.

In each part every column is timed the same way, calls chained on the donated
output; decode columns take turns over several rounds (median reported).
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from jax import lax

import bjax
from benchmarks import cases, harness

def _decode_cases() -> list[tuple]:
    """(dtype, appends per call, cache sizes in MiB) of the decode loop on this device."""
    if jax.default_backend() == "gpu":
        return [(jnp.bfloat16, 256, (32, 128, 512, 2048))]
    return [(jnp.float32, 256, (32, 128, 512)), (jnp.bfloat16, 16, (32, 128, 512))]


def _decode(append, steps: int):
    """jit(cache, tokens, offset) -> cache after ``steps`` appends, cache donated."""
    def run(cache, tokens, offset):
        def step(i, cache):
            return append(cache, tokens[i % tokens.shape[0]], offset + i)
        return lax.fori_loop(0, steps, step, cache)
    return jax.jit(run, donate_argnums=0)


def decode_appends(backend: str) -> dict:
    appends = {
        "bjax": lambda c, t, p: bjax.write_slice(c, t, (0, p, 0, 0), backend=backend),
        "bjax per-row": lambda c, t, p: bjax.write_slice(
            c, t, (0, p + jnp.arange(8) % 3, 0, 0), backend=backend),
        "dynamic_update_slice": lambda c, t, p: lax.dynamic_update_slice(c, t, (0, p, 0, 0)),
    }
    if backend != "xla":
        appends["bjax xla"] = lambda c, t, p: bjax.write_slice(c, t, (0, p, 0, 0),
                                                               backend="xla")
    return appends


def decode_rows(backend: str) -> list[list]:
    appends = decode_appends(backend)
    rows = []
    for dtype, steps, sizes in _decode_cases():
        tokens = jax.random.normal(jax.random.key(1), (16, 8, 1, 8, 128)).astype(dtype)
        itemsize = jnp.dtype(dtype).itemsize
        for mib in sizes:
            seq = mib * 2**20 // (8 * 8 * 128 * itemsize)
            caches = {name: cases.decode_cache(seq, dtype) for name in appends}
            ms = harness.chained_times_ms(
                {name: _decode(a, steps) for name, a in appends.items()}, caches, tokens,
                jnp.int32(seq // 2), calls=10 if steps > 16 else 2, rounds=7 if steps > 16 else 3)
            del caches
            us = {name: t * 1e3 / steps for name, t in ms.items()}
            rows.append([f"8x{seq}x8x128", jnp.dtype(dtype).name, f"{mib} MiB"]
                        + [f"{t:.2f}" for t in us.values()]
                        + [f"{us['dynamic_update_slice'] / us['bjax']:.2f}"])
            print(rows[-1], flush=True)
    return rows


def window_rows(backend: str, ceiling: float) -> list[list]:
    rows = []
    for name, dest_shape, window, start, dtype in cases.WRITE_WINDOWS:
        source = cases.window_source(window, dtype)
        updates = {
            "bjax": lambda d, s: bjax.write_slice(d, s, start, backend=backend),
            "dynamic_update_slice": lambda d, s: lax.dynamic_update_slice(d, s, start),
            "bjax xla": lambda d, s: bjax.write_slice(d, s, start, backend="xla"),
        }
        times = {}
        for label, update in updates.items():
            dest = cases.window_dest(dest_shape, dtype)
            times[label] = harness.kernel_time_ms(jax.jit(update, donate_argnums=0), dest,
                                                  source, chain=True)
            del dest
        nbytes = 2 * source.size * jnp.dtype(dtype).itemsize / (2 if dtype == jnp.int4 else 1)
        tbps = nbytes / (times["bjax"] * 1e-3) / 1e12
        rows.append([name, "x".join(map(str, dest_shape)), "x".join(map(str, window)),
                     jnp.dtype(dtype).name] + [f"{t * 1e3:.1f}" for t in times.values()]
                    + [f"{times['dynamic_update_slice'] / times['bjax']:.2f}", f"{tbps:.2f}",
                       f"{100 * tbps / ceiling:.0f}%"])
        print(rows[-1], flush=True)
    return rows


def run(backend: str) -> str:
    decode = decode_rows(backend)
    parts = [
        harness.environment(), f"backend={backend}", "",
        "Decode loop: us per append (appends of [8, 1, 8, 128] in one fori_loop, cache "
        "donated)", "",
        harness.markdown_table(["cache", "dtype", "size", *decode_appends(backend),
                                "DUS / bjax"], decode)]
    if jax.default_backend() == "gpu":
        ceiling, ceiling_how = harness.copy_ceiling_tbps()
        windows = window_rows(backend, ceiling)
        parts += ["", f"Windows: kernel us per call (TB/s: window bytes read + written; copy "
                  f"ceiling {ceiling:.2f} TB/s, {ceiling_how})", "",
                  harness.markdown_table(["case", "dest", "window", "dtype", "bjax",
                                          "dynamic_update_slice", "bjax xla", "DUS / bjax",
                                          "bjax TB/s", "% copy"], windows)]
    return "\n".join(parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None, help="bjax backend (default: bjax's default)")
    args = parser.parse_args()
    backend = args.backend or bjax.plan(
        bjax.write_slice, jax.ShapeDtypeStruct((2,), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.float32), (0,)).backend
    report = run(backend)
    harness.write_report("write_slice", report)


if __name__ == "__main__":
    main()
