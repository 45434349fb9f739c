"""mhc_pre's phi gradient ``x_flat^T dproj`` on the GPU: the Triton kernel and every config
of the Mosaic GPU kernel's search space (``pallas_kernels.hyper_connection_mosaic.
project_weight_grad``), at the benchmarked mHC widths; time (device throughput), % of the
copy ceiling for x's bytes (the kernel's unavoidable traffic) and the largest error
against float64, relative to the gradient's largest entry. On the H200 the heuristic's
configs reached 61-66% against Triton's 34-43% (BENCHMARKS.md, "The phi gradient as a
Mosaic GPU kernel").

    PYTHONPATH=. python3 scripts/mhc_weight_grad_mosaic_probe.py   # on an H100/H200
"""
import jax
import numpy as np

from benchmarks import cases, harness
from pallas_kernels import hyper_connection as pallas_hc
from pallas_kernels import hyper_connection_mosaic as mosaic_hc


def main():
    for shape in cases.MHC_LAYER_SHAPES:
        x, phi, _, _ = cases.mhc_layer_inputs(shape)
        x_flat = x.reshape(shape[0], -1)
        rows, flat = x_flat.shape
        dproj = jax.random.normal(jax.random.key(7), (rows, phi.shape[1]))
        want = np.asarray(x_flat, np.float64).T @ np.asarray(dproj, np.float64)
        copy_ms = x_flat.size * x_flat.dtype.itemsize / 4.25e12 * 1e3
        width = pallas_hc.stacked_width(phi.shape[1])
        heuristic = mosaic_hc.weight_grad_config(rows, flat, width)
        runs = [("triton", jax.jit(pallas_hc.project_weight_grad))] + [
            (f"{config}{' (heuristic)' if config == heuristic else ''}",
             jax.jit(lambda a, d, c=config: mosaic_hc.project_weight_grad(a, d, config=c)))
            for config in mosaic_hc.weight_grad_search_space(rows, flat, width)]
        for name, run in runs:
            got = np.asarray(run(x_flat, dproj), np.float64)
            error = np.max(np.abs(got - want)) / np.max(np.abs(want))
            ms = harness.device_time_ms(run, x_flat, dproj)
            print(f"{shape} {name}: {ms:.4f} ms, {copy_ms / ms:.0%} of copy, error {error:.1e}",
                  flush=True)


if __name__ == "__main__":
    main()
