"""Per-kernel device times of the mHC layer (mhc_pre + mhc_post, dynamic H, bf16).

    python scripts/mhc_profile.py [--shapes 8192x4x7168 16384x4x2560] [--sweep]

Each kernel of the layer's forward and backward is timed alone on the layer's own
operands, with its bytes (inputs read once, outputs written once) as a fraction of
the device-copy ceiling; then the whole layer, forward and forward+backward.
``--sweep`` first times the projection over configs around its heuristic's.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools

import jax
import jax.numpy as jnp

from benchmarks import cases, harness
from pallas_kernels import hyper_connection as hc


def _nbytes(tree):
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


def profile(shape, ceiling):
    tokens, n, hidden = shape
    x, phi, alpha, bias = cases.mhc_layer_inputs(shape)
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
    layer = cases.mhc_layer("pallas")
    fwd = jax.jit(layer)
    both = jax.jit(lambda *a: jax.vjp(lambda *d: layer(*d), *a[:4])[1](a[4]))
    for name, fn, args in (("layer fwd", fwd, (x, phi, alpha, bias)),
                           ("layer fwd+bwd", both, (x, phi, alpha, bias, dout))):
        ms = harness.device_time_ms(fn, *args, calls=10)
        rows.append([name, "x".join(map(str, shape)), f"{ms:.4f}", ""])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def sweep_projection(shape, ceiling):
    """Times :func:`hc.project` over a grid of configs around the heuristic's."""
    tokens, n, hidden = shape
    x, phi, _, _ = cases.mhc_layer_inputs(shape)
    x_flat, phi32 = x.reshape(tokens, -1), phi.astype(jnp.float32)
    width = hc._stacked_phi_pieces(phi32).shape[1]
    base = hc.projection_config(tokens, n * hidden, width, x.dtype.itemsize)
    moved = x_flat.nbytes
    results = []
    for rows_, cols, splits, warps, stages in itertools.product(
            (64, 128), (64, 128), (base.splits, 2 * base.splits), (4, 8), (2, 3)):
        config = dataclasses.replace(base, block_rows=rows_, block_cols=cols, splits=splits,
                                     num_warps=warps, num_stages=stages)
        try:
            ms = harness.device_time_ms(jax.jit(lambda a, p, c=config: hc.project(a, p, config=c)),
                                        x_flat, phi32, calls=20)
        except Exception as error:  # shared memory or registers: skip the config
            print(config, type(error).__name__)
            continue
        results.append((ms, config))
        print(f"{ms:.4f} {100 * moved / (ms * 1e-3) / 1e12 / ceiling:.0f}% {config}", flush=True)
    results.sort(key=lambda r: r[0])
    print("heuristic:", base)
    for ms, config in results[:5]:
        print(f"best {ms:.4f} {config}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=["8192x4x7168", "16384x4x2560"])
    parser.add_argument("--sweep", action="store_true", help="sweep the projection's configs")
    args = parser.parse_args()
    ceiling, how = harness.copy_ceiling_tbps()
    if args.sweep:
        for text in args.shapes:
            sweep_projection(tuple(map(int, text.split("x"))), ceiling)
    rows = []
    for text in args.shapes:
        rows += profile(tuple(map(int, text.split("x"))), ceiling)
    print(harness.report(f"copy ceiling: {ceiling:.2f} TB/s ({how})",
                         ["kernel", "shape", "ms", "% copy"], rows))


if __name__ == "__main__":
    main()
