"""Gated activations: bjax vs the XLA implementation a user would write.

    python -m benchmarks.gated [--backend pallas] [--sweep]

Forward and backward of every kind on x = [8192, 28672] bf16 and f32 and a
decode-sized [16, 28672] bf16, timed in one process: large shapes as device
throughput (many calls enqueued, one block), the decode shape as kernel time
from a profiler trace (there JAX's host dispatch of a call outlasts the kernel). The
XLA column is plain jnp (split, activation in float32, multiply) and its
autodiff. ``ratio`` is XLA time / bjax time (> 1: bjax faster); ``% copy`` is
bjax's bytes (inputs read + outputs written) over the device-copy ceiling
measured in the same run.
"""
from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp

import bjax
from benchmarks import cases, harness
from pallas_kernels import gated as kernels

_ACT = {
    "glu": jax.nn.sigmoid,
    "reglu": jax.nn.relu,
    "swiglu": jax.nn.silu,
    "geglu": lambda u: jax.nn.gelu(u, approximate=False),
}


def xla_reference(x, kind):
    """What a user writes: y = a * act(b), math in float32."""
    a, b = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return (a * _ACT[kind](b)).astype(x.dtype)


def _backward(fn):
    return jax.jit(lambda x, dy: jax.vjp(fn, x)[1](dy)[0])


def run(backend: str, sweep: bool) -> str:
    ceiling, ceiling_how = harness.copy_ceiling_tbps()
    rows = []
    for (shape, dtype), kind in itertools.product(cases.GATED_SHAPES, cases.GATED_KINDS):
        x = cases.gated_input(shape, dtype)
        out_shape = shape[:-1] + (shape[-1] // 2,)
        dy = jax.random.normal(jax.random.key(1), out_shape, jnp.float32).astype(dtype)
        mine = lambda x, kind=kind: bjax.gated_activation(x, kind, backend=backend)  # noqa: E731
        theirs = lambda x, kind=kind: xla_reference(x, kind)  # noqa: E731
        itemsize = jnp.dtype(dtype).itemsize
        # Small problems: JAX's dispatch of a call outlasts the kernel; time the kernels.
        timer = harness.device_time_ms if x.nbytes > 2**26 else harness.kernel_time_ms
        n_in, n_out = x.size, dy.size
        for direction, make, nbytes, args in (
            ("fwd", jax.jit, (n_in + n_out) * itemsize, (x,)),
            ("bwd", _backward, (n_out + 2 * n_in) * itemsize, (x, dy)),
        ):
            t_mine = timer(make(mine), *args)
            t_xla = timer(make(theirs), *args)
            tbps = nbytes / (t_mine * 1e-3) / 1e12
            rows.append([kind, direction, "x".join(map(str, shape)), jnp.dtype(dtype).name,
                         f"{t_mine:.4f}", f"{t_xla:.4f}", f"{t_xla / t_mine:.2f}",
                         f"{tbps:.2f}", f"{100 * tbps / ceiling:.0f}%"])
            print(" | ".join(rows[-1]), flush=True)
    text = [harness.report(
        f"copy ceiling: {ceiling:.2f} TB/s ({ceiling_how}); backend={backend}",
        ["kind", "dir", "shape", "dtype", "bjax ms", "XLA ms", "ratio", "bjax TB/s", "% copy"],
        rows)]
    if sweep:
        text += ["", sweep_configs(ceiling)]
    return "\n".join(text)


def sweep_configs(ceiling: float) -> str:
    """Times swiglu forward/backward on the large bf16 shape for several tile configs."""
    rows_, cols_ = 8192, 14336
    x2 = jax.random.normal(jax.random.key(0), (rows_, 2 * cols_), jnp.float32).astype(jnp.bfloat16)
    dy2 = jax.random.normal(jax.random.key(1), (rows_, cols_), jnp.float32).astype(jnp.bfloat16)
    configs = [kernels.default_config(rows_, cols_)] + [
        kernels.TileConfig(r, c, w) for r, c, w in
        [(1, 1024, 4), (1, 2048, 8), (2, 1024, 4), (2, 1024, 8), (4, 1024, 8), (8, 512, 4),
         (8, 512, 8), (8, 1024, 8), (16, 256, 4), (4, 2048, 8), (16, 512, 8)]]
    out = []
    opts = dict(kind="swiglu", gate="second", approximate=False)
    for config in configs:
        fwd = jax.jit(lambda x, c=config: kernels.gated_forward(x, config=c, **opts))
        bwd = jax.jit(lambda dy, x, c=config: kernels.gated_backward(dy, x, config=c, **opts))
        t_f = harness.device_time_ms(fwd, x2)
        t_b = harness.device_time_ms(bwd, dy2, x2)
        f_tbps = 3 * rows_ * cols_ * 2 / (t_f * 1e-3) / 1e12
        b_tbps = 5 * rows_ * cols_ * 2 / (t_b * 1e-3) / 1e12
        out.append([config.block_rows, config.block_cols, config.num_warps, f"{t_f:.4f}",
                    f"{100 * f_tbps / ceiling:.0f}%", f"{t_b:.4f}", f"{100 * b_tbps / ceiling:.0f}%"])
        print(out[-1], flush=True)
    return "swiglu config sweep, [8192, 28672] bf16 (first row: default_config)\n" + \
        harness.markdown_table(["rows", "cols", "warps", "fwd ms", "fwd % copy", "bwd ms",
                                "bwd % copy"], out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None, help="bjax backend (default: bjax's default)")
    parser.add_argument("--sweep", action="store_true", help="also time tile configs")
    args = parser.parse_args()
    backend = args.backend or bjax.plan(bjax.swiglu, jax.ShapeDtypeStruct((2, 2), jnp.float32)).backend
    report = run(backend, args.sweep)
    harness.write_report("gated", report)


if __name__ == "__main__":
    main()
