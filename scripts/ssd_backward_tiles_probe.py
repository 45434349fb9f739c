"""Probe: the SSD backward's three kernels (``state_grads``, ``target_grads``,
``source_grads``) timed apart under launch variants of the heuristic's config.

    PYTHONPATH=. python3 scripts/ssd_backward_tiles_probe.py [--match "b4 l4096 h32 p128 n256"]
        [--variants "block=32;block_p=128,num_warps=4"]

A variant is the heuristic's ``SsdBackwardConfig`` with ``field=value`` pairs replaced
(``;`` between variants; ``heuristic`` is always first). Per shape and variant: ms of
``target_grads`` and ``source_grads`` (and, for the heuristic, ``state_grads``, which the
variants do not change), and every output of the two against the heuristic's, in a form
all configs share (max difference over max magnitude).
"""
import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import cases
from benchmarks import ssd as bench_ssd
from benchmarks.harness import with_fields
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
VARIANTS = ("block_h=2,source_block_h=2;block_h=2,source_block_h=2,shared_scores=1;"
            "block_h=4,source_block_h=4,shared_scores=1;block_h=8,source_block_h=8,shared_scores=1")


def outputs(target, source, config, shape):
    """The two kernels' outputs in a form every config shares: dC and dB summed per
    group, the per-step terms summed over head_dim blocks, dx."""
    batch, seq_len, heads, head_dim, groups, state_dim, _ = shape
    p_blocks = -(-head_dim // config.block_p)
    per_group = lambda parts: parts.reshape(batch, seq_len, p_blocks, groups, -1,
                                            state_dim).sum((2, 4))
    (dc, rows), (dx, db, cols, q, xy) = target, source
    return [np.asarray(v, np.float32) for v in (
        per_group(dc), rows.sum(1), dx, per_group(db), cols.sum(1), q.sum(1), xy.sum(1))]


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
            text: with_fields(heuristic, text)
            for text in options.variants.split(";") if text}
        want = None
        for name, config in variants.items():
            # Arrays go in as arguments: closed over, XLA would fold them as constants.
            kw = dict(chunk_size=chunk, config=config)
            grads = jax.jit(functools.partial(pkb.state_grads, **kw))
            target = jax.jit(functools.partial(pkb.target_grads, **kw))
            source = jax.jit(functools.partial(pkb.source_grads, **kw))
            target_args = (x, dy, B, C, dt_p, a_cs, states)
            try:
                times = []
                if name == "heuristic":   # the variants leave state_grads' config alone
                    ends = grads(dy, C, a_cs, states)[0]
                    times.append(device_time_ms(grads, dy, C, a_cs, states, calls=10,
                                                trials=3))
                source_args = (x, dy, B, C, dt_p, a_cs, ends)
                outs = outputs(target(*target_args), source(*source_args), config, shape)
                want = outs if want is None else want
                diff = max(np.max(np.abs(o - w)) / np.max(np.abs(w)) for o, w in zip(outs, want))
                times += [device_time_ms(target, *target_args, calls=10, trials=3),
                          device_time_ms(source, *source_args, calls=10, trials=3)]
                text = " ".join(f"{t:.4f}" for t in times) + (
                    f" target+source {sum(times[-2:]):.4f} d{diff:.0e}")
            except Exception as failure:  # noqa: BLE001 - a compile failure is a result too
                text = f"FAILED {str(failure).strip().splitlines()[-1][:160]}"
            print(f"{bench_ssd._shape_text(shape)} | {name} | {text}", flush=True)
        print("# (heuristic: state_grads) target_grads source_grads (ms)", flush=True)


if __name__ == "__main__":
    main()
