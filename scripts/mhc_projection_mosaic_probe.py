"""Probe (not yet run on a GPU): mhc_pre's projection ``(x_flat @ phi, sum(x_flat^2, -1))``
as a Mosaic GPU kernel, beside the Triton kernel of ``pallas_kernels.hyper_connection``.

    PYTHONPATH=. python3 scripts/mhc_projection_mosaic_probe.py   # on an H100/H200

The design. A program owns ``block_m`` rows of ``x_flat [rows, n C]`` (64 or 128: one
or two wgmma M) and one of ``splits`` ranges of the flat axis. ``plgpu.emit_pipeline``
streams ``[block_m, block_k]`` tiles of x and ``[block_k, width]`` tiles of phi's three
stacked bfloat16 pieces (``_stacked_phi_pieces``, width 128 for 24 columns) into
swizzled shared memory by TMA, ``stages`` in flight. Each step:

* one ``wgmma`` reads both tiles from shared memory into a ``[block_m, width]`` float32
  accumulator. x goes in as stored, which the Triton kernel could not do safely: there a
  bfloat16 x fed to the tensor cores as loaded summed rows wrong with two or more
  pipeline stages (BENCHMARKS.md, "The projection at b474fea");
* the same x tile read into registers (WGMMA layout) adds its squares to a per-row carry.

Lowering checks the layouts, the wgmma shapes and shared memory without a GPU::

    jax.jit(project_mosaic).trace(x, phi).lower(lowering_platforms=("cuda",))

On JAX 0.10.2, 81 of the 108 configs ``main`` tries lower that way. The other 27 need
more than the H200's 232,448 bytes of shared memory: ``block_k`` 128 with 4 stages, or
``block_m`` and ``block_k`` both 128 with 3 stages. None has run on a GPU yet.

Partial sums per split go to ``[splits, rows, width]`` and ``[splits, rows]``, added
outside as the Triton kernel's are. Accuracy is checked on 256 random rows against float64
on the host; time is device throughput (``benchmarks.harness.device_time_ms``), with the
fraction of the copy ceiling for the bytes of x (the projection's unavoidable traffic).
"""
import functools
import itertools
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import hyper_connection as pallas_hc


def _transforms(minor_elements: int, what: str):
    swizzle = plgpu.find_swizzle(minor_elements * 16, what)   # bfloat16 rows
    return (plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle))


def project_mosaic(x_flat, phi, *, block_m=64, block_k=64, splits=8, stages=4):
    """``(x_flat @ phi [rows, count], sum(x_flat^2, -1) [rows])`` float32; ``block_m`` (64
    or 128: a wgmma's M, twice) rows a program, rows a multiple of it and ``n C`` of
    ``block_k * splits`` (a probe: no masking)."""
    rows, flat = x_flat.shape
    count = phi.shape[1]
    pieces = pallas_hc._stacked_phi_pieces(phi)
    width = pieces.shape[1]
    if rows % block_m or flat % (block_k * splits):
        raise ValueError(f"rows {rows} % {block_m} or n C {flat} % {block_k * splits}")
    steps = flat // (block_k * splits)
    span = steps * block_k
    row_layout = plgpu.Layout.WGMMA.reduce(1)

    def body(x_gmem, w_gmem, out_gmem, sq_gmem, acc, out_smem, sq_smem):
        m, s = lax.axis_index("m"), lax.axis_index("s")
        rows_at = pl.ds(m * block_m, block_m)

        def step(_, x_smem, w_smem, squares):
            plgpu.wgmma(acc, x_smem, w_smem)
            x = plgpu.load(x_smem, (), layout=plgpu.Layout.WGMMA).astype(jnp.float32)
            squares = squares + jnp.sum(x * x, axis=1)
            plgpu.wgmma_wait(1)
            return squares

        pipeline = plgpu.emit_pipeline(
            step, grid=(steps,),
            in_specs=[plgpu.BlockSpec((block_m, block_k), lambda k: (0, k),
                                      transforms=_transforms(block_k, "x"), delay_release=1),
                      plgpu.BlockSpec((block_k, width), lambda k: (k, 0),
                                      transforms=_transforms(width, "phi"), delay_release=1)],
            max_concurrent_steps=stages,
            init_carry=plgpu.layout_cast(jnp.zeros((block_m,), jnp.float32), row_layout))
        squares = pipeline(x_gmem.at[rows_at, pl.ds(s * span, span)],
                           w_gmem.at[pl.ds(s * span, span)])
        plgpu.wgmma_wait(0)
        out_smem[...] = acc[...]
        sq_smem[...] = squares
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[s, rows_at])
        plgpu.copy_smem_to_gmem(sq_smem, sq_gmem.at[s, rows_at])
        plgpu.wait_smem_to_gmem(0)

    partial, squares = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((splits, rows, width), jnp.float32),
                  jax.ShapeDtypeStruct((splits, rows), jnp.float32)),
        grid=(rows // block_m, splits), grid_names=("m", "s"),
        scratch_types=[plgpu.ACC((block_m, width), jnp.float32),
                       plgpu.SMEM((block_m, width), jnp.float32),
                       plgpu.SMEM((block_m,), jnp.float32)],
    )(x_flat, pieces)
    total = jnp.sum(partial, axis=0)
    return (sum(total[:, p * count:(p + 1) * count] for p in range(3)),
            jnp.sum(squares, axis=0))


def _errors(got, x_flat, phi, picked):
    """Largest relative row error of the projection and of the squares on ``picked`` rows
    against float64 on the host."""
    x64 = np.asarray(x_flat[picked], np.float64)
    want = (x64 @ np.asarray(phi, np.float64), np.sum(x64 * x64, axis=1))
    errors = []
    for g, w in zip(got, want):
        g = np.asarray(g, np.float64)[picked]
        scale = np.maximum(np.abs(w).reshape(len(picked), -1).max(axis=1), 1e-30)
        errors.append(float(np.max(np.abs(g - w).reshape(len(picked), -1).max(axis=1) / scale)))
    return errors


def main():
    from benchmarks import harness
    for tokens, n, hidden in ((8192, 4, 7168), (16384, 4, 2560)):
        flat = n * hidden
        keys = jax.random.split(jax.random.key(0), 2)
        x_flat = jax.random.normal(keys[0], (tokens, flat), jnp.float32).astype(jnp.bfloat16)
        phi = 0.02 * jax.random.normal(keys[1], (flat, n * n + 2 * n), jnp.float32)
        picked = np.random.default_rng(0).choice(tokens, 256, replace=False)
        copy_ms = x_flat.size * 2 / 4.25e12 * 1e3
        triton = jax.jit(pallas_hc.project)
        ms = harness.device_time_ms(triton, x_flat, phi)
        print(f"{tokens}x{n}x{hidden} triton: {ms:.4f} ms, {copy_ms / ms:.0%} of copy, errors "
              f"{_errors(triton(x_flat, phi), x_flat, phi, picked)}", flush=True)
        for block_m, block_k, splits, stages in itertools.product(
                (64, 128), (64, 128), (1, 4, 5, 7, 8, 14), (2, 3, 4)):
            tag = f"  mosaic block_m={block_m} block_k={block_k} splits={splits} stages={stages}"
            if flat % (block_k * splits):
                continue
            try:
                run = jax.jit(functools.partial(project_mosaic, block_m=block_m,
                                                block_k=block_k, splits=splits, stages=stages))
                errors = _errors(run(x_flat, phi), x_flat, phi, picked)
                ms = harness.device_time_ms(run, x_flat, phi)
                print(f"{tag}: {ms:.4f} ms, {copy_ms / ms:.0%} of copy, errors {errors}",
                      flush=True)
            except Exception:
                last = traceback.format_exc().strip().splitlines()[-1]
                print(f"{tag}: FAILED {last[:300]}", flush=True)


if __name__ == "__main__":
    main()
