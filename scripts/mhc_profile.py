"""Per-kernel device times of the mHC layer (mhc_pre + mhc_post, dynamic H, bf16).

    python scripts/mhc_profile.py [--shapes 8192x4x7168 16384x4x2560]

Each kernel of the layer's forward and backward is timed alone on the layer's own
operands, with its bytes (inputs read once, outputs written once) as a fraction of
the device-copy ceiling. The whole layer: ``python -m benchmarks.hyper_connection``.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks import cases, harness
from pallas_kernels import hyper_connection as hc


def _nbytes(tree):
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


def profile(shape, ceiling):
    tokens, n, hidden = shape
    x, phi, _, _ = cases.mhc_layer_inputs(shape)
    count = phi.shape[1]
    keys = jax.random.split(jax.random.key(7), 6)
    x_flat = x.reshape(tokens, -1)
    h_pre = jax.random.uniform(keys[0], (tokens, n))
    h_post = jax.random.uniform(keys[1], (tokens, n))
    h_res = jax.random.uniform(keys[2], (tokens, n, n))
    plane = jax.random.normal(keys[3], (tokens, hidden), x.dtype)
    dout = jax.random.normal(keys[4], x.shape, x.dtype)
    dproj = jax.random.normal(keys[5], (tokens, count))
    scale = jnp.ones((tokens,))
    phi32 = phi.astype(jnp.float32)
    kernels = {
        "project": (jax.jit(hc.project), (x_flat, phi32)),
        "aggregate": (jax.jit(hc.aggregate), (x, h_pre)),
        "mix": (jax.jit(lambda *a: hc.mix(*a, transpose=False)), (x, plane, h_post, h_res)),
        "mix_backward": (jax.jit(lambda *a: hc.mix_backward(*a, transpose=False)),
                         (x, plane, h_post, h_res, dout)),
        "aggregate_backward": (jax.jit(lambda *a: hc.aggregate_backward(*a, with_dx=False)),
                               (x, h_pre, plane)),
        "project_input_grad": (jax.jit(hc.project_input_grad),
                               (x, h_pre, plane, dproj, phi32, scale)),
        "project_weight_grad": (jax.jit(hc.project_weight_grad), (x_flat, dproj)),
    }
    rows = []
    for name, (fn, args) in kernels.items():
        ms = harness.device_time_ms(fn, *args, calls=20)
        moved = _nbytes(args) + _nbytes(jax.eval_shape(fn, *args))
        rows.append([name, "x".join(map(str, shape)), f"{ms:.4f}",
                     f"{100 * moved / (ms * 1e-3) / 1e12 / ceiling:.0f}%"])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=["8192x4x7168", "16384x4x2560"])
    args = parser.parse_args()
    ceiling, how = harness.copy_ceiling_tbps()
    rows = []
    for text in args.shapes:
        rows += profile(tuple(map(int, text.split("x"))), ceiling)
    print(harness.report(f"copy ceiling: {ceiling:.2f} TB/s ({how})",
                         ["kernel", "shape", "ms", "% copy"], rows))


if __name__ == "__main__":
    main()
