"""A first Mosaic GPU design for the causal convolution's forward (the conv's next step in
BENCHMARKS.md), as a probe. It does not run yet; see "Status".

One program per (block of ``BD`` channels, batch row) walks the sequence in blocks of
``BT`` rows. It double-buffers the blocks of x with TMA copies into shared memory, keeps the
``k - 1`` rows before each block (the halo) in a float32 shared buffer in front of it, reads
the ``k`` row-shifted views from there, and stores y through shared memory with TMA. Every
row of x is read from HBM once.

    PYTHONPATH=. python3 scripts/conv_mosaic_probe.py          # CPU: Mosaic GPU interpret mode
    PYTHONPATH=. python3 scripts/conv_mosaic_probe.py gpu      # timing at [4, 2048, 5376] bf16

Status (2026-12-02):
- JAX 0.10.2, CPU interpret mode (``InterpretGPUParams``) fails allocating the
  ``plgpu.Barrier`` scratch ("nan + barrier"; with ``uninitialized_memory="zero"``, an
  AttributeError inside ``jnp.full``). ``plgpu.emit_pipeline`` fails there too, on a
  predicated SMEM-to-GMEM copy.
- JAX 0.11.2 on the H200 does not lower it: ``pallas_call.gpu_lowering`` finds no rule for
  ``mosaic_gpu.CompilerParams`` (``assert rule is not None``). That is so even with
  ``jax._src.pallas.mosaic_gpu.pallas_call_registration`` imported, which in 0.10.2 is what
  registers the rule.
"""
import sys

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax._src.pallas.mosaic_gpu.pallas_call_registration  # noqa: F401  (the lowering rule)

TAPS, HALO = 4, 8


def conv_silu(x, w, *, block_rows=64, block_cols=128, interpret=False):
    """``silu(sum_j w[j] x[t - (k - 1) + j])`` for ``x [b, l, d]``, ``w [k, d]`` float32
    (zeros before the start; ``l`` and ``d`` multiples of the blocks)."""
    batch, length, channels = x.shape
    bt, bd = block_rows, block_cols
    blocks = length // bt

    def kernel(x_gmem, w_gmem, y_gmem, x_buf, y_buf, rows, taps, barriers):
        col0, row = pl.program_id(0) * bd, pl.program_id(1)
        plgpu.copy_gmem_to_smem(w_gmem.at[:, pl.ds(col0, bd)], taps, barriers.at[2])
        plgpu.barrier_wait(barriers.at[2])

        def fetch(t, slot):
            plgpu.copy_gmem_to_smem(x_gmem.at[row, pl.ds(t * bt, bt), pl.ds(col0, bd)],
                                    x_buf.at[slot], barriers.at[slot])
        fetch(0, 0)
        rows[pl.ds(0, HALO)] = jnp.zeros((HALO, bd), jnp.float32)

        def step(t, carry):
            slot = t % 2

            @pl.when(t + 1 < blocks)
            def _():
                fetch(t + 1, 1 - slot)
            plgpu.barrier_wait(barriers.at[slot])
            rows[pl.ds(HALO, bt)] = x_buf[slot].astype(jnp.float32)
            u = jnp.zeros((bt, bd), jnp.float32)
            for j in range(TAPS):
                u = u + rows[pl.ds(HALO - (TAPS - 1) + j, bt)] * jnp.broadcast_to(taps[j],
                                                                                   (bt, bd))
            plgpu.wait_smem_to_gmem(1)          # y_buf[slot]'s previous store has left
            y_buf[slot] = (u * jax.nn.sigmoid(u)).astype(y_buf.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(y_buf.at[slot],
                                    y_gmem.at[row, pl.ds(t * bt, bt), pl.ds(col0, bd)])
            rows[pl.ds(HALO - (TAPS - 1), TAPS - 1)] = rows[pl.ds(HALO + bt - (TAPS - 1),
                                                                  TAPS - 1)]
            return carry

        jax.lax.fori_loop(0, blocks, step, None)
        plgpu.wait_smem_to_gmem(0)

    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(channels // bd, batch),
        in_specs=[pl.BlockSpec(memory_space=plgpu.GMEM)] * 2,
        out_specs=pl.BlockSpec(memory_space=plgpu.GMEM),
        scratch_shapes=[plgpu.SMEM((2, bt, bd), x.dtype), plgpu.SMEM((2, bt, bd), x.dtype),
                        plgpu.SMEM((HALO + bt, bd), jnp.float32),
                        plgpu.SMEM((TAPS, bd), jnp.float32),
                        plgpu.Barrier(num_arrivals=1, num_barriers=3)],
        compiler_params=plgpu.CompilerParams(),
        interpret=interpret,
    )(x, w)


def reference(x, w):
    padded = jnp.pad(x.astype(jnp.float32), ((0, 0), (TAPS - 1, 0), (0, 0)))
    u = sum(w[j] * padded[:, j:j + x.shape[1]] for j in range(TAPS))
    return u * jax.nn.sigmoid(u)


def main():
    on_gpu = "gpu" in sys.argv
    shape = (4, 2048, 5376) if on_gpu else (2, 256, 256)
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (TAPS, shape[2]), jnp.float32)
    if on_gpu:
        from benchmarks import harness
        run = jax.jit(conv_silu)
        ideal = 2 * x.size * 2 / 4.25e12 * 1e3
        ms = harness.device_time_ms(run, x, w)
        print(f"{ms:.4f} ms, {ideal / ms:.0%} of the copy ceiling")
    else:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        run = lambda x, w: conv_silu(x, w, interpret=InterpretGPUParams())  # noqa: E731
    error = jnp.max(jnp.abs(run(x, w).astype(jnp.float32) - reference(x, w)))
    print("largest error", float(error))


if __name__ == "__main__":
    main()
