"""Probe: the SSD backward's three kernels (``state_grads``, ``target_grads``,
``source_grads``) timed apart under launch variants of the heuristic's config.

    PYTHONPATH=. python3 scripts/ssd_backward_tiles_probe.py [--match "b4 l4096 h32 p128 n256"]
        [--variants "block=32;block_p=128,num_warps=4"]

A variant is the heuristic's ``SsdBackwardConfig`` with ``field=value`` pairs replaced
(``;`` between variants; ``heuristic`` is always first). Per shape and variant: ms of each
kernel and of the three together, and the variant's ``dx`` and row terms against the
heuristic's (max difference over max magnitude).
"""
import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import cases
from benchmarks import ssd as bench_ssd
from benchmarks.ssd_sweep import matching
from bjax.tune.tuner import device_time_ms
from pallas_kernels import ssd as pk
from pallas_kernels import ssd_backward as pkb

SHAPES = [  # batch, seqlen, heads, head_dim, groups, state, chunk
    (4, 4096, 64, 64, 1, 128, 256),
    (16, 512, 64, 64, 1, 256, 256),
    (4, 4096, 32, 128, 1, 256, 256),
    (1, 131072, 64, 64, 1, 256, 256),
]
VARIANTS = "num_warps=4;block=32;block_p=32"


def parse(text):
    """``"block=32,num_warps=4"`` -> ``{"block": 32, "num_warps": 4}``."""
    return {k: int(v) for k, v in (pair.split("=") for pair in text.split(",") if pair)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--match", action="append", default=[])
    parser.add_argument("--variants", default=VARIANTS)
    options = parser.parse_args()
    for shape in matching(SHAPES, options.match):
        batch, _, heads, head_dim, groups, state_dim, chunk = shape
        x, dt, A, B, C = cases.ssd_inputs(shape)
        dy = jax.random.normal(jax.random.key(9), x.shape, jnp.bfloat16)
        dt_p, a_cs = pk.time_terms(dt, A, chunk_size=chunk, softplus=False,
                                   limit=(0.0, float("inf")))
        args = (chunk, head_dim, state_dim, heads // groups, jnp.bfloat16)
        forward = pk.default_config(*args)
        states, _ = pk.chunk_states(x, B, dt_p, a_cs, chunk_size=chunk, config=forward,
                                    states_dtype=jnp.float32)
        heuristic = pkb.default_config(*args, batch * heads, a_cs.shape[-1] // chunk)
        variants = {"heuristic": heuristic} | {
            text: dataclasses.replace(heuristic, **parse(text))
            for text in options.variants.split(";") if text}
        want = None
        for name, config in variants.items():
            # Arrays go in as arguments: closed over, XLA would fold them as constants.
            kw = dict(chunk_size=chunk, config=config)
            grads = jax.jit(functools.partial(pkb.state_grads, **kw))
            target = jax.jit(functools.partial(pkb.target_grads, **kw))
            source = jax.jit(functools.partial(pkb.source_grads, **kw))
            grads_args = (dy, C, a_cs, states)
            target_args = (x, dy, B, C, dt_p, a_cs, states)
            try:
                ends = grads(*grads_args)[0]
                source_args = (x, dy, B, C, dt_p, a_cs, ends)
                outs = [np.asarray(source(*source_args)[0], np.float32),
                        np.asarray(target(*target_args)[1].sum(1), np.float32)]
                want = outs if want is None else want
                diff = max(np.max(np.abs(o - w)) / np.max(np.abs(w)) for o, w in zip(outs, want))
                times = [device_time_ms(grads, *grads_args, calls=10, trials=3),
                         device_time_ms(target, *target_args, calls=10, trials=3),
                         device_time_ms(source, *source_args, calls=10, trials=3)]
                text = " ".join(f"{t:.4f}" for t in times) + f" sum {sum(times):.4f} d{diff:.0e}"
            except Exception as failure:  # noqa: BLE001 - a compile failure is a result too
                text = f"FAILED {str(failure).strip().splitlines()[-1][:160]}"
            print(f"{bench_ssd._shape_text(shape)} | {name} | {text}", flush=True)
        print("# state_grads target_grads source_grads (ms)", flush=True)


if __name__ == "__main__":
    main()
