"""mhc_pre's projection on the GPU: the Triton kernel and every config of the Mosaic GPU
kernel's search space (``pallas_kernels.hyper_connection_mosaic``), at the benchmarked
mHC widths; time (device throughput), % of the copy ceiling for x's bytes (the
projection's unavoidable traffic) and the largest relative row error against float64 on
256 random rows.

    PYTHONPATH=. python3 scripts/mhc_projection_mosaic_probe.py   # on an H100/H200
"""
import jax
import numpy as np

from benchmarks import cases, harness
from pallas_kernels import hyper_connection as pallas_hc
from pallas_kernels import hyper_connection_mosaic as mosaic_hc


def _errors(got, x_flat, phi, picked):
    x64 = np.asarray(x_flat[picked], np.float64)
    want = (x64 @ np.asarray(phi, np.float64), np.sum(x64 * x64, axis=1))
    errors = []
    for g, w in zip(got, want):
        g = np.asarray(g, np.float64)[picked]
        scale = np.maximum(np.abs(w).reshape(len(picked), -1).max(axis=1), 1e-30)
        errors.append(float(np.max(np.abs(g - w).reshape(len(picked), -1).max(axis=1) / scale)))
    return "errors " + " ".join(f"{e:.1e}" for e in errors)


def main():
    for shape in cases.MHC_LAYER_SHAPES:
        x, phi, _, _ = cases.mhc_layer_inputs(shape)
        x_flat = x.reshape(shape[0], -1)
        rows, flat = x_flat.shape
        picked = np.random.default_rng(0).choice(rows, 256, replace=False)
        copy_ms = x_flat.size * x_flat.dtype.itemsize / 4.25e12 * 1e3
        heuristic = mosaic_hc.projection_config(rows, flat, pallas_hc.stacked_width(
            phi.shape[1]))
        runs = [("triton", jax.jit(pallas_hc.project))] + [
            (f"{config}{' (heuristic)' if config == heuristic else ''}",
             jax.jit(lambda a, p, c=config: mosaic_hc.project(a, p, config=c)))
            for config in mosaic_hc.search_space(rows, flat, pallas_hc.stacked_width(
                phi.shape[1]))]
        for name, run in runs:
            ms = harness.device_time_ms(run, x_flat, phi)
            print(f"{shape} {name}: {ms:.4f} ms, {copy_ms / ms:.0%} of copy, "
                  f"{_errors(run(x_flat, phi), x_flat, phi, picked)}", flush=True)


if __name__ == "__main__":
    main()
