"""Every Sinkhorn launch config on a grid (matrices per program x warps), forward and the
gradient, against the XLA implementation on the same logits: which configs the compiled
kernels get wrong, and which matrix of a wrong one differs first.

    PYTHONPATH=. python3 scripts/sinkhorn_config_probe.py [OUT_FILE]

On the H200 (JAX 0.11.2) the tuner rejected ``SinkhornConfig(16, 8)`` at [16384, 4, 4]
float32 (relative error 1.16 to the heuristic's results) while ``(16, 4)``, ``(32, 8)``
and the heuristic agreed exactly.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

import bjax
from pallas_kernels.sinkhorn import SinkhornConfig

BLOCKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
WARPS = (1, 2, 4, 8, 16)


def loss(logits, **kwargs):
    return jnp.sum(jnp.sin(bjax.sinkhorn_knopp(logits, **kwargs)))


def relative(got, want):
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def probe(count: int, n: int, write) -> None:
    logits = jax.random.normal(jax.random.key(0), (count, n, n), jnp.float32)
    want = np.asarray(bjax.sinkhorn_knopp(logits, backend="xla"))
    want_grad = np.asarray(jax.grad(lambda l: loss(l, backend="xla"))(logits))
    for block in BLOCKS:
        for warps in WARPS:
            config = SinkhornConfig(block, warps)
            try:
                got = np.asarray(bjax.sinkhorn_knopp(logits, backend="pallas", config=config))
                grad = np.asarray(jax.grad(lambda l: loss(l, backend="pallas",
                                                          config=config))(logits))
            except Exception as failure:   # a config this device cannot launch
                write(f"FAIL count={count} n={n} {config}: {type(failure).__name__}")
                continue
            errors = relative(got, want), relative(grad, want_grad)
            verdict = "BAD " if max(errors) > 1e-5 else "ok  "
            wrong = np.flatnonzero(np.abs(got - want).reshape(count, -1).max(axis=1) > 1e-4)
            first = f", first wrong matrix {wrong[0]} of {wrong.size}" if wrong.size else ""
            write(f"{verdict}count={count} n={n} block={block} warps={warps} cells="
                  f"{block * pl.next_power_of_2(n) ** 2} threads={32 * warps} output {errors[0]:.1e} "
                  f"gradient {errors[1]:.1e}{first}")


def main(argv) -> None:
    out = open(argv[1], "w") if len(argv) > 1 else sys.stdout

    def write(line):
        print(line, file=out, flush=True)
    for n in (4, 3, 8):
        for count in (16384, 37):
            probe(count, n, write)


if __name__ == "__main__":
    main(sys.argv)
