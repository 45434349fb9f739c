"""mHC: bjax vs the same formulas in jnp (XLA), forward and forward+backward.

    python -m benchmarks.hyper_connection [--backend pallas]

* ``hyper_connection`` (the fused static op of HyperConnectionPlan) on x [8192, 4, 4096] float32,
  20 Sinkhorn iterations.
* ``mhc_pre`` + ``mhc_post`` at 16384 tokens x C = 2560 and at DeepSeek-V3's 8192 x
  C = 7168 (``cases.MHC_LAYER_SHAPES``), n = 4, bfloat16, dynamic H
  (phi [n C, n^2 + 2n]), the sublayer taken as the identity; the backward gives
  gradients for x, phi, alpha and bias. A row per implementation of mhc_pre: the one a
  plain call runs and, where that is the Mosaic GPU one, the Triton one beside it.
* ``sinkhorn_knopp`` alone on one 4 x 4 matrix per token (16384 tokens).

``ratio`` is XLA time / bjax time (> 1: bjax faster). ``% copy`` is bjax's
unavoidable bytes (every input read once, every output written once) over the
device-copy ceiling measured in the same run.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import bjax
from benchmarks import cases, harness
from pallas_kernels.hyper_connection import PreConfig

SEED_SHAPE = cases.HYPER_CONNECTION_SHAPE
TOKENS, STREAMS = cases.MHC_TOKENS, cases.MHC_STREAMS


def _fwd_bwd(fn, argnums):
    """``(out, grads)`` of ``fn`` for a fixed cotangent (the last argument)."""
    def run(*args):
        out, vjp = jax.vjp(lambda *diff: fn(*diff, *args[len(argnums):-1]),
                           *args[:len(argnums)])
        return out, vjp(args[-1])
    return jax.jit(run)


def seed_rows(backend, ceiling):
    args = cases.hyper_connection_inputs()
    x = args[0]
    dout = jax.random.normal(jax.random.key(5), SEED_SHAPE, jnp.float32)
    ops = {name: (lambda *a, b=b: bjax.hyper_connection(*a, backend=b))
           for name, b in (("bjax", backend), ("xla", "xla"))}
    fwd = {name: harness.device_time_ms(jax.jit(f), *args, calls=20) for name, f in ops.items()}
    both = {name: harness.device_time_ms(_fwd_bwd(f, range(5)), *args, dout, calls=10)
            for name, f in ops.items()}
    shape = "x".join(map(str, SEED_SHAPE))
    return [_row("hyper_connection", "fwd", shape, fwd, 2 * x.nbytes, ceiling),
            _row("hyper_connection", "fwd+bwd", shape, both, 5 * x.nbytes, ceiling)]


def layer_rows(backend, ceiling):
    rows = []
    for tokens, n, hidden in cases.MHC_LAYER_SHAPES:
        args = cases.mhc_layer_inputs((tokens, n, hidden))
        x = args[0]
        dout = jax.random.normal(jax.random.key(3), x.shape, jnp.bfloat16)
        ops = {name: cases.mhc_layer(b) for name, b in (("bjax", backend), ("xla", "xla"))}
        chosen = bjax.plan(bjax.mhc_pre, x, phi=args[1], alpha=args[2], bias=args[3],
                           backend=backend).implementation
        if chosen == "pallas_mosaic":   # the Triton implementation beside it
            ops["pallas_triton"] = cases.mhc_layer(backend, PreConfig())
        fwd = {name: harness.device_time_ms(jax.jit(f), *args, calls=20)
               for name, f in ops.items()}
        both = {name: harness.device_time_ms(_fwd_bwd(f, range(4)), *args, dout, calls=10)
                for name, f in ops.items()}
        shape = f"{tokens}x{n}x{hidden} bf16 dynamic"
        # Forward: x read by pre and post, layer_input written and read, x_next written.
        fwd_bytes = 3 * x.nbytes + 2 * x.nbytes // n
        for name in [chosen] + (["pallas_triton"] if "pallas_triton" in ops else []):
            key = "bjax" if name == chosen else name
            fwd_of, both_of = ({"bjax": t[key], "xla": t["xla"]} for t in (fwd, both))
            rows += [_row(f"mhc_pre+mhc_post ({name})", "fwd", shape, fwd_of, fwd_bytes,
                          ceiling),
                     _row(f"mhc_pre+mhc_post ({name})", "fwd+bwd", shape, both_of,
                          fwd_bytes + 4 * x.nbytes, ceiling)]
    return rows


def sinkhorn_rows(backend, ceiling):
    logits, = cases.sinkhorn_inputs()
    dm = jax.random.normal(jax.random.key(3), logits.shape, jnp.float32)
    ops = {name: (lambda l, b=b: bjax.sinkhorn_knopp(l, backend=b))
           for name, b in (("bjax", backend), ("xla", "xla"))}
    fwd = {name: harness.kernel_time_ms(jax.jit(f), logits) for name, f in ops.items()}
    both = {name: harness.kernel_time_ms(_fwd_bwd(f, range(1)), logits, dm)
            for name, f in ops.items()}
    shape = f"{TOKENS}x{STREAMS}x{STREAMS}"
    return [_row("sinkhorn_knopp", "fwd", shape, fwd, 2 * logits.nbytes, ceiling),
            _row("sinkhorn_knopp", "fwd+bwd", shape, both, 5 * logits.nbytes, ceiling)]


def _row(op, direction, shape, times, nbytes, ceiling):
    t_mine, t_xla = times["bjax"], times["xla"]
    tbps = nbytes / (t_mine * 1e-3) / 1e12
    row = [op, direction, shape, f"{t_mine:.4f}", f"{t_xla:.4f}", f"{t_xla / t_mine:.2f}",
           f"{100 * tbps / ceiling:.0f}%"]
    print(" | ".join(row), flush=True)
    return row


def run(backend: str) -> str:
    ceiling, how = harness.copy_ceiling_tbps()
    rows = seed_rows(backend, ceiling) + layer_rows(backend, ceiling) + sinkhorn_rows(backend,
                                                                                      ceiling)
    return harness.report(
        f"copy ceiling: {ceiling:.2f} TB/s ({how}); backend={backend}",
        ["op", "dir", "shape", "bjax ms", "XLA ms", "ratio", "% copy"], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None, help="bjax backend (default: bjax's default)")
    args = parser.parse_args()
    backend = args.backend or bjax.plan(
        bjax.sinkhorn_knopp, jax.ShapeDtypeStruct((2, 2), jnp.float32)).backend
    harness.write_report("hyper_connection", run(backend))


if __name__ == "__main__":
    main()
