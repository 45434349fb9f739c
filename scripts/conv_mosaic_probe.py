"""Probe: the causal convolution's forward (k = 4, silu, bf16) as a Mosaic GPU kernel.

A ``plgpu.kernel`` program per (piece of ``piece`` rows, block of ``bd`` channels, batch
row) walks its piece in blocks of ``bt`` rows. Each block arrives by TMA together with the
``HALO`` rows before it (rows before the start arrive as zeros: TMA fills out-of-bounds
rows with zeros), through a ring of ``slots`` buffers; the ``k`` row-shifted views are
read from shared memory in the WG_STRIDED layout, and y leaves through shared memory by
TMA. ``copy_only=True`` times the same pipeline with y = x.

    PYTHONPATH=. python3 scripts/conv_mosaic_probe.py     # on a GPU: sweep at [4, 2048, 5376]

Measured (H200, JAX 0.11.2; BENCHMARKS.md, "What a single pass can reach"): the pipeline
copies at 65-84% of the copy ceiling and the convolution runs at 57-75%, against 58% for
the Triton walk of ``pallas_kernels.conv``; runs differ by up to 10 points.

What Mosaic GPU made easy or hard here (for the kernels that follow):

* Easy: rows at any offset of a shared-memory buffer are a plain slice, so a halo costs
  nothing; TMA fills rows before the start with zeros, so a block at step 0 needs no
  special case; a ring of buffers is a few lines (``copy_gmem_to_smem`` with a barrier
  per slot, ``wait_smem_to_gmem(slots - 1)`` before a slot's output is rewritten).
* Hard: ``plgpu.kernel`` is the entry point (``pallas_call`` with
  ``mosaic_gpu.CompilerParams`` is deprecated, and on JAX 0.11.2 it finds no lowering
  rule). Layouts are explicit: a ``WG_STRIDED`` vector needs a multiple of 128 x its
  vector width elements, broadcasting goes along leading axes only, and operands of one
  op must share a layout. The CPU interpreter of JAX 0.10.2 fails on barriers, so such a
  kernel is tested on the GPU alone.
"""
import traceback

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

TAPS, HALO = 4, 8


def conv_silu(x, w, *, bt=32, bd=256, vec=2, piece=256, slots=2, copy_only=False):
    batch, length, channels = x.shape
    blocks = piece // bt
    tile = plgpu.Layout.WG_STRIDED((bt, bd), vec)
    row = plgpu.Layout.WG_STRIDED((bd,), vec)

    def body(x_gmem, w_gmem, y_gmem, xs, ys, taps, bars):
        c0 = jax.lax.axis_index("d") * bd
        b = jax.lax.axis_index("b")
        r0 = jax.lax.axis_index("p") * piece

        def fetch(t, slot):
            plgpu.copy_gmem_to_smem(x_gmem.at[b, pl.ds(r0 + t * bt - HALO, HALO + bt), pl.ds(c0, bd)],
                                    xs.at[slot], bars.at[slot])
        ahead = min(slots, blocks) - 1
        for t in range(ahead + 1):
            fetch(t, t)
        plgpu.copy_gmem_to_smem(w_gmem.at[:, pl.ds(c0, bd)], taps, bars.at[slots])
        plgpu.barrier_wait(bars.at[slots])
        tap = [jnp.broadcast_to(plgpu.load(taps.at[j], (), layout=row), (bt, bd))
               for j in range(TAPS)]

        def step(t, carry):
            slot = t % slots

            @pl.when((t > 0) & (t + ahead < blocks))
            def _():
                fetch(t + ahead, (t + ahead) % slots)
            plgpu.barrier_wait(bars.at[slot])
            if copy_only:
                y = plgpu.load(xs.at[slot, pl.ds(HALO, bt)], (), layout=tile)
            else:
                u = None
                for j in range(TAPS):
                    v = plgpu.load(xs.at[slot, pl.ds(HALO - (TAPS - 1) + j, bt)], (),
                                   layout=tile).astype(jnp.float32) * tap[j]
                    u = v if u is None else u + v
                y = u / (1.0 + jnp.exp(-u))
            plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)
            ys[slot] = y.astype(ys.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(ys.at[slot], y_gmem.at[b, pl.ds(r0 + t * bt, bt), pl.ds(c0, bd)])
            return carry

        jax.lax.fori_loop(0, blocks, step, None)
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(length // piece, channels // bd, batch), grid_names=("p", "d", "b"),
        scratch_types=[plgpu.SMEM((slots, HALO + bt, bd), x.dtype), plgpu.SMEM((slots, bt, bd), x.dtype),
                       plgpu.SMEM((TAPS, bd), jnp.float32),
                       plgpu.Barrier(num_arrivals=1, num_barriers=slots + 1)],
    )(x, w)


def reference(x, w):
    padded = jnp.pad(x.astype(jnp.float32), ((0, 0), (TAPS - 1, 0), (0, 0)))
    u = sum(w[j] * padded[:, j:j + x.shape[1]] for j in range(TAPS))
    return u * jax.nn.sigmoid(u)


def main():
    from benchmarks import harness
    shape = (4, 2048, 5376)
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (TAPS, shape[2]), jnp.float32)
    ideal = 2 * x.size * 2 / 4.25e12 * 1e3
    want = reference(x, w)
    configs = [(bt, bd, vec, piece, slots, copy) for copy in (True, False)
               for bt, bd, vec, piece, slots in (
                   (32, 128, 1, 128, 2), (32, 128, 1, 256, 2), (32, 128, 1, 128, 3), (32, 128, 1, 256, 3),
                   (64, 128, 1, 64, 1), (64, 128, 1, 128, 2), (32, 128, 1, 64, 2),
                   (16, 256, 2, 128, 2), (16, 256, 2, 128, 3), (32, 256, 2, 128, 2), (32, 256, 1, 64, 2),
                   (16, 128, 1, 64, 2), (16, 128, 1, 128, 4))]
    for bt, bd, vec, piece, slots, copy_only in configs:
        tag = f"bt={bt} bd={bd} vec={vec} piece={piece} slots={slots} copy_only={copy_only}"
        try:
            run = jax.jit(lambda x, w: conv_silu(x, w, bt=bt, bd=bd, vec=vec, piece=piece,
                                                 slots=slots, copy_only=copy_only))
            got = run(x, w).astype(jnp.float32)
            ref = x.astype(jnp.float32) if copy_only else want
            error = float(jnp.max(jnp.abs(got - ref)))
            ms = harness.device_time_ms(run, x, w)
            print(f"{tag}: {ms:.4f} ms, {ideal / ms:.0%} of copy, largest error {error:.3g}",
                  flush=True)
        except Exception:
            print(f"{tag}: FAILED " + traceback.format_exc().strip().splitlines()[-1][:300], flush=True)


if __name__ == "__main__":
    main()
