"""Probe: mhc_pre's phi gradient ``x_flat^T dproj [n C, count]`` as a Mosaic GPU kernel,
beside the Triton kernel (``pallas_hc.project_weight_grad``, 34-43% of copy at the
benchmarked widths). On the H200 its best configs within ``MAX_SPAN`` reached 61-66%
(BENCHMARKS.md, "The phi gradient as a Mosaic GPU kernel (probe)").

    PYTHONPATH=. python3 scripts/mhc_weight_grad_mosaic_probe.py   # on an H100/H200

The design, the projection's (``pallas_kernels.hyper_connection_mosaic``) turned around:
it computes ``d_phi^T = dproj_pieces^T x_flat``. ``dproj`` (float32) becomes its three
exact bfloat16 pieces side by side, padded to ``width`` (128 for 24 columns) and
transposed once outside (``[width, tokens]``, 2 MB at 8192 tokens), so both wgmma
operands come from shared memory as stored: A a ``[width, block_t]`` tile of the pieces,
B a ``[block_t, block_n]`` tile of x. A program owns ``block_n`` columns of x (rows of
phi) and one of ``splits`` ranges of the tokens, each at most ``MAX_SPAN`` tokens
(the accumulation bound of the projection); the partial ``[width, block_n]`` results are
added outside, then the pieces' rows.

Lowering for CUDA on a CPU (``--lower``) checks layouts, wgmma shapes and shared memory
of every config tried: on JAX 0.10.2, 33 of the 54 lower at 8192 x 4 x 7168; the others
exceed shared memory (128 x 128 tiles past 2 stages, 256-column blocks past 2 stages of
64 tokens).
"""
import functools
import itertools
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import hyper_connection as pallas_hc
from pallas_kernels import hyper_connection_mosaic as mosaic_hc
from pallas_kernels.blocks import split_bf16


def weight_grad_mosaic(x_flat, dproj, *, block_n=128, block_t=64, splits=2, stages=4):
    """``x_flat^T dproj [n C, count]`` float32 for bfloat16 ``x_flat [tokens, n C]`` and
    float32 ``dproj [tokens, count]`` (tokens a multiple of ``block_t * splits``, n C of
    ``block_n``: a probe, no masking)."""
    rows, flat = x_flat.shape
    count = dproj.shape[1]
    width = pallas_hc.stacked_width(count)
    if rows % (block_t * splits) or flat % block_n or rows // splits > mosaic_hc.MAX_SPAN:
        raise ValueError(f"tokens {rows}, n C {flat}: block_t {block_t} x splits {splits}, "
                         f"block_n {block_n}, span <= {mosaic_hc.MAX_SPAN}")
    pieces = jnp.concatenate(split_bf16(dproj, 3), axis=1)
    pieces_t = jnp.pad(pieces, ((0, 0), (0, width - 3 * count))).T
    span = rows // splits

    def body(a_gmem, x_gmem, out_gmem, acc, out_smem):
        cols = pl.ds(lax.axis_index("n") * block_n, block_n)
        split = lax.axis_index("s")

        def step(_, a_smem, x_smem):
            plgpu.wgmma(acc, a_smem, x_smem)
            plgpu.wgmma_wait(1)

        pipeline = plgpu.emit_pipeline(
            step, grid=(span // block_t,),
            in_specs=[plgpu.BlockSpec((width, block_t), lambda k: (0, k),
                                      transforms=mosaic_hc._transforms(block_t, "dproj"),
                                      delay_release=1),
                      plgpu.BlockSpec((block_t, block_n), lambda k: (k, 0),
                                      transforms=mosaic_hc._transforms(block_n, "x"),
                                      delay_release=1)],
            max_concurrent_steps=stages)
        pipeline(a_gmem.at[:, pl.ds(split * span, span)],
                 x_gmem.at[pl.ds(split * span, span), cols])
        plgpu.wgmma_wait(0)
        out_smem[...] = acc[...]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[split, :, cols])
        plgpu.wait_smem_to_gmem(0)

    partial = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((splits, width, flat), jnp.float32),
        grid=(flat // block_n, splits), grid_names=("n", "s"),
        scratch_types=[plgpu.ACC((width, block_n), jnp.float32),
                       plgpu.SMEM((width, block_n), jnp.float32)],
    )(pieces_t, x_flat)
    total = jnp.sum(partial, axis=0)
    return sum(total[p * count:(p + 1) * count] for p in range(3)).T


CONFIGS = [dict(block_n=n, block_t=t, splits=s, stages=st)
           for n, t, s, st in itertools.product((64, 128, 256), (64, 128), (2, 4, 8), (2, 3, 4))]


def lower_all(shape=(8192, 4 * 7168), count=24):
    """Which configs lower for CUDA (no GPU needed)."""
    x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    d = jax.ShapeDtypeStruct((shape[0], count), jnp.float32)
    for config in CONFIGS:
        try:
            jax.jit(functools.partial(weight_grad_mosaic, **config)).trace(x, d).lower(
                lowering_platforms=("cuda",))
            print(f"lowers {config}", flush=True)
        except Exception as failure:
            print(f"FAILED {config}: {str(failure).strip().splitlines()[-1][:200]}", flush=True)


def main():
    from benchmarks import cases, harness
    for shape in cases.MHC_LAYER_SHAPES:
        x, phi, _, _ = cases.mhc_layer_inputs(shape)
        x_flat = x.reshape(shape[0], -1)
        dproj = jax.random.normal(jax.random.key(7), (shape[0], phi.shape[1]), jnp.float32)
        want = np.asarray(x_flat, np.float64).T @ np.asarray(dproj, np.float64)
        copy_ms = x_flat.size * 2 / 4.25e12 * 1e3

        def report(name, run):
            try:
                got = np.asarray(run(x_flat, dproj), np.float64)
                error = np.max(np.abs(got - want)) / np.max(np.abs(want))
                ms = harness.device_time_ms(run, x_flat, dproj)
                print(f"{shape} {name}: {ms:.4f} ms, {copy_ms / ms:.0%} of copy, "
                      f"error {error:.1e}", flush=True)
            except Exception:
                print(f"{shape} {name}: FAILED "
                      f"{traceback.format_exc().strip().splitlines()[-1][:200]}", flush=True)
        report("triton", jax.jit(pallas_hc.project_weight_grad))
        for config in CONFIGS:
            report(f"mosaic {config}", jax.jit(functools.partial(weight_grad_mosaic, **config)))


if __name__ == "__main__":
    lower_all() if "--lower" in sys.argv else main()
