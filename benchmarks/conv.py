"""causal_conv1d and causal_conv1d_step: bjax vs the XLA implementations a user would write.

    python -m benchmarks.conv [--backend pallas] [--sweep]

Forward and backward of ``causal_conv1d`` (silu, with bias) at Mamba-2 2.7B's conv,
``[4, 2048, 5376]`` with 4 taps, in bf16 and f32, and the one-token step at
``[64, 5376]``. Two XLA columns: bjax's own XLA backend (the taps as shifted
multiply-adds in float32, and its autodiff) and ``lax.conv_general_dilated`` with one
group per channel (XLA's convolution). The backward is ``jax.vjp``'s pullback alone
(x, weight and bias gradients). ``ratio`` is XLA time / bjax time (> 1: bjax
faster); ``% copy`` is bjax's unavoidable bytes (forward: x read, y written; backward:
x and dy read, dx written) over the device-copy ceiling measured in the same run.
Large problems are device throughput (many calls enqueued, one wait); the step is
kernel time from a profiler trace.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import bjax
from benchmarks import cases, harness
from pallas_kernels import conv as kernels


def lax_conv(x, weight, bias):
    """Depthwise causal convolution with XLA's convolution (float32 math)."""
    taps, channels = weight.shape[1], x.shape[2]
    u = jax.lax.conv_general_dilated(
        x.astype(jnp.float32), weight.astype(jnp.float32).T[:, None, :], window_strides=(1,),
        padding=[(taps - 1, 0)], dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=channels, precision=jax.lax.Precision.HIGHEST)
    return jax.nn.silu(u + bias.astype(jnp.float32)).astype(x.dtype)


def _backward(fn):
    return jax.jit(lambda x, w, b, dy: jax.vjp(fn, x, w, b)[1](dy))


def run(backend: str, sweep: bool) -> str:
    ceiling, ceiling_how = harness.copy_ceiling_tbps()
    rows = []
    for shape, dtype in cases.CONV_SHAPES:
        x, w, b = cases.conv_inputs(shape, dtype)
        dy = jax.random.normal(jax.random.key(1), x.shape, jnp.float32).astype(dtype)
        fns = {"bjax": lambda x, w, b: bjax.causal_conv1d(x, w, b, activation="silu",
                                                          backend=backend),
               "xla": lambda x, w, b: bjax.causal_conv1d(x, w, b, activation="silu",
                                                         backend="xla"),
               "lax.conv": lax_conv}
        for direction, make, nbytes, args in (
                ("fwd", jax.jit, 2 * x.nbytes, (x, w, b)),
                ("bwd", _backward, 3 * x.nbytes, (x, w, b, dy))):
            times = {name: harness.device_time_ms(make(fn), *args) for name, fn in fns.items()}
            tbps = nbytes / (times["bjax"] * 1e-3) / 1e12
            rows.append(["causal_conv1d", direction, "x".join(map(str, shape)),
                         jnp.dtype(dtype).name, f"{times['bjax']:.4f}", f"{times['xla']:.4f}",
                         f"{times['xla'] / times['bjax']:.2f}", f"{times['lax.conv']:.4f}",
                         f"{times['lax.conv'] / times['bjax']:.2f}", f"{tbps:.2f}",
                         f"{100 * tbps / ceiling:.0f}%"])
            print(" | ".join(rows[-1]), flush=True)
    state, x, w, b = cases.conv_step_inputs()
    times = {name: harness.kernel_time_ms(jax.jit(lambda s, x, w, b, backend=name:
                                                  bjax.causal_conv1d_step(
                                                      s, x, w, b, activation="silu",
                                                      backend=backend)), state, x, w, b)
             for name in (backend, "xla")}
    nbytes = 2 * (state.nbytes + x.nbytes)
    tbps = nbytes / (times[backend] * 1e-3) / 1e12
    rows.append(["causal_conv1d_step", "fwd", "x".join(map(str, cases.CONV_STEP_SHAPE)),
                 "bfloat16", f"{times[backend]:.4f}", f"{times['xla']:.4f}",
                 f"{times['xla'] / times[backend]:.2f}", "", "", f"{tbps:.2f}",
                 f"{100 * tbps / ceiling:.0f}%"])
    text = [harness.report(
        f"copy ceiling: {ceiling:.2f} TB/s ({ceiling_how}); backend={backend}",
        ["op", "dir", "shape", "dtype", "bjax ms", "XLA ms", "ratio", "lax.conv ms", "ratio",
         "bjax TB/s", "% copy"], rows)]
    if sweep:
        text += ["", sweep_configs(ceiling)]
    return "\n".join(text)


def sweep_configs(ceiling: float) -> str:
    """Forward and backward kernel times at the bf16 shape for several configurations."""
    shape, dtype = cases.CONV_SHAPES[0]
    x, w, b = cases.conv_inputs(shape, dtype)
    dy = jax.random.normal(jax.random.key(1), x.shape, jnp.float32).astype(dtype)
    w32, b32 = w.astype(jnp.float32).T, b.astype(jnp.float32)
    configs = [kernels.default_config(*x.shape)] + [
        kernels.ConvConfig(*c) for c in
        [(128, 4, 64, 8, 4), (128, 4, 64, 16, 4), (128, 4, 128, 16, 4), (128, 2, 64, 8, 4),
         (128, 2, 64, 16, 4), (64, 4, 64, 8, 2), (64, 8, 64, 8, 4), (256, 2, 64, 8, 4),
         (128, 4, 64, 8, 8), (64, 4, 64, 16, 4), (128, 1, 64, 16, 4), (64, 2, 64, 16, 2)]]
    out = []
    for config in configs:
        fwd = jax.jit(lambda x, c=config: kernels.forward(x, w32, b32, None, None,
                                                          activation="silu", config=c))
        bwd = jax.jit(lambda x, dy, c=config: kernels.backward(x, w32, b32, None, None, dy,
                                                               activation="silu", config=c))
        t_f = harness.device_time_ms(fwd, x)
        t_b = harness.device_time_ms(bwd, x, dy)
        f_tbps = 2 * x.nbytes / (t_f * 1e-3) / 1e12
        b_tbps = 3 * x.nbytes / (t_b * 1e-3) / 1e12
        out.append([config.block_d, config.block_lanes, config.piece_len, config.unroll,
                    config.num_warps, f"{t_f:.4f}", f"{100 * f_tbps / ceiling:.0f}%",
                    f"{t_b:.4f}", f"{100 * b_tbps / ceiling:.0f}%"])
        print(out[-1], flush=True)
    return (f"causal_conv1d config sweep, {'x'.join(map(str, shape))} bf16 silu (first row: "
            "default_config)\n" + harness.markdown_table(
                ["block_d", "lanes", "piece", "unroll", "warps", "fwd ms", "fwd % copy",
                 "bwd ms", "bwd % copy"], out))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="pallas")
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    harness.write_report("conv", run(args.backend, args.sweep))


if __name__ == "__main__":
    main()
