"""Probe: the chunked scan's forward at head_dim 128 under the heuristic and a few
whole-head_dim configs (``block_p`` 128), at the head_dim-128 shapes of the Mamba-2 sweep
(``benchmarks.cases.ssd_sweep_shapes``) with batch 16 x 512 and 4 x 4096.

    PYTHONPATH=. python3 scripts/ssd_head_dim_probe.py [--fwd-bwd]

Each config's output is compared with the heuristic's (relative max difference), so a
config that computes something else shows. ``--fwd-bwd`` also times forward + backward
(the backward at its heuristic).
"""
import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np

import bjax
from benchmarks import cases
from benchmarks import ssd as bench_ssd
from bjax.tune.tuner import device_time_ms
from pallas_kernels import ssd as pallas_ssd
from pallas_kernels.ssd_backward import ChunkScanConfig

VARIANTS = {  # name: SsdConfig fields replacing the heuristic's
    "p128 h1 w4": dict(block_p=128, block_h=1, scan_warps=4),
    "p128 h1 w8": dict(block_p=128, block_h=1, scan_warps=8),
    "p128 h2 w8": dict(block_p=128, block_h=2, scan_warps=8),
    "p64 h1 w4": dict(block_p=64, block_h=1, scan_warps=4),
}


def main(with_backward: bool):
    shapes = [s for s in cases.ssd_sweep_shapes() if s[3] == 128 and s[1] <= 4096]
    for shape in shapes:
        batch, seq_len, heads, head_dim, groups, state_dim, chunk = shape
        args = cases.ssd_inputs(shape)
        base = pallas_ssd.default_config(chunk, head_dim, state_dim, heads // groups,
                                         jnp.bfloat16)
        configs = {"heuristic": base} | {
            name: dataclasses.replace(base, **fields) for name, fields in VARIANTS.items()
            if heads // groups % fields["block_h"] == 0}
        want = None
        line = [bench_ssd._shape_text(shape)]
        dy = jax.random.normal(jax.random.key(9), args[0].shape, jnp.bfloat16)
        for name, forward in configs.items():
            config = ChunkScanConfig(forward=forward)
            fn = jax.jit(lambda *a, c=config: bjax.ssd_chunk_scan(
                *a, chunk_size=chunk, config=c))
            try:
                out = np.asarray(fn(*args), np.float32)
                want = out if want is None else want
                diff = np.max(np.abs(out - want)) / np.max(np.abs(want))
                ms = device_time_ms(fn, *args, calls=20, trials=3)
                text = f"{name} {ms:.4f}" + (f" d{diff:.0e}" if diff else "")
                if with_backward:
                    grad = jax.jit(jax.grad(lambda a, c=config: jnp.vdot(
                        bjax.ssd_chunk_scan(*a, chunk_size=chunk, config=c), dy).real))
                    text += f" fb {device_time_ms(grad, args, calls=10, trials=3):.4f}"
            except Exception as failure:
                text = f"{name} FAILED {str(failure).strip().splitlines()[-1][:120]}"
            line.append(text)
        print(" | ".join(line), flush=True)


if __name__ == "__main__":
    main("--fwd-bwd" in sys.argv)
