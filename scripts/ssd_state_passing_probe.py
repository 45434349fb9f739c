"""Probe: the SSD chunk states walked (one program per batch row, head and block of head_dim
through the whole sequence) against computed per chunk and passed along
(``state_passing``, in ``block_pass`` rows a pass program), forward and backward.

    PYTHONPATH=. python3 scripts/ssd_state_passing_probe.py [--part K/N] [--match "l131072 n64"]

Per shape and variant: the op's forward and forward + backward (``jax.vjp``), and the state
kernels alone (``chunk_states``; ``state_grads``), in ms; every variant's outputs against
the walk's (max difference over max magnitude), so a variant that computes something else
shows; and the compiled forward + backward's temporary buffers (``temp``, MiB, from XLA's
memory analysis), where passing keeps its float32 local states. ``passK``: states passed along in both directions, K rows a pass program;
``fwd-pass16``: the forward's passed, the backward's state gradients walked.
``--block-n 256,64``: each variant again with the state kernels of both directions in
blocks of that many state columns (``block_n``; named ``variant/nK``). ``--forward-only``: the
op's forward and ``chunk_states`` alone.
"""
import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import bjax
from benchmarks import cases
from benchmarks import ssd as bench_ssd
from benchmarks.ssd_sweep import matching, part_of
from bjax.tune.tuner import device_time_ms
from pallas_kernels import ssd as pk
from pallas_kernels import ssd_backward as pkb
from pallas_kernels.state_passing import chunk_decay, pass_states

SHAPES = [  # batch, seqlen, heads, head_dim, groups, state, chunk
    (4, 4096, 64, 64, 1, 128, 256),       # the reference shape
    (1, 2048, 80, 64, 1, 128, 256),
    (2, 8192, 128, 64, 8, 128, 128),
    (16, 512, 64, 64, 1, 256, 256),
    (4, 4096, 32, 128, 1, 256, 256),
    (1, 131072, 32, 128, 1, 64, 256),
    (1, 131072, 64, 64, 1, 256, 256),
    (1, 131072, 32, 128, 1, 256, 256),
]
# name: (the forward's pass rows, the backward's); None walks.
VARIANTS = {"walk": (None, None), "pass8": (8, 8), "pass16": (16, 16), "pass32": (32, 32),
            "fwd-pass16": (16, None)}


def configs(shape, blocks, block_n=256):
    _, _, heads, head_dim, groups, state_dim, chunk = shape
    args = (chunk, head_dim, state_dim, heads // groups, jnp.bfloat16)
    forward, backward = (
        dataclasses.replace(module.default_config(*args), state_passing=rows is not None,
                            block_pass=rows or 16)
        for module, rows in zip((pk, pkb), blocks))
    return pkb.ChunkScanConfig(dataclasses.replace(forward, block_n=block_n),
                               dataclasses.replace(backward, block_n=block_n))


def kernels(shape, config, args, dy):
    """The forward's and the backward's state kernels alone, jitted."""
    x, dt, A, B, C = args
    chunk = shape[-1]
    dt_p, a_cs = pk.time_terms(dt, A, chunk_size=chunk, softplus=False,
                               limit=(0.0, float("inf")))
    states = jax.jit(lambda: pk.chunk_states(x, B, dt_p, a_cs, chunk_size=chunk,
                                             config=config.forward,
                                             states_dtype=jnp.float32))
    walked = states()[0]
    grads = jax.jit(lambda s: pkb.state_grads(dy, C, a_cs, s, chunk_size=chunk,
                                              config=config.backward))
    parts = {}
    if config.forward.state_passing:   # the forward's two kernels alone
        local = jax.jit(lambda: pk.chunk_local_states(x, B, dt_p, a_cs, chunk_size=chunk,
                                                      config=config.forward))
        decay = chunk_decay(a_cs, None, chunk)
        passed = jax.jit(lambda v: pass_states(v, decay, block=config.forward.block_pass,
                                               states_dtype=jnp.bfloat16))
        parts = {"local": device_time_ms(local, calls=10, trials=3),
                 "pass": device_time_ms(passed, local(), calls=10, trials=3)}
    return states, grads, walked, parts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="1/1")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--kernels-only", action="store_true",
                        help="time the state kernels alone, not the op")
    parser.add_argument("--match", action="append", default=[],
                        help="keep the shapes whose row text holds these tokens")
    parser.add_argument("--block-n", default="256", help="the state kernels' blocks")
    parser.add_argument("--forward-only", action="store_true")
    options = parser.parse_args()
    widths = [int(v) for v in options.block_n.split(",")]
    variants = {f"{k}/n{n}" if len(widths) > 1 else k: (VARIANTS[k], n)
                for k in options.variants.split(",") for n in widths}
    for shape in matching(part_of(SHAPES, options.part), options.match):
        chunk = shape[-1]
        args = cases.ssd_inputs(shape)
        dy = jax.random.normal(jax.random.key(9), args[0].shape, jnp.bfloat16)
        line, want = [bench_ssd._shape_text(shape)], None
        for name, (blocks, block_n) in variants.items():
            config = configs(shape, blocks, block_n)
            forward = jax.jit(lambda *a, c=config: bjax.ssd_chunk_scan(
                *a, chunk_size=chunk, config=c))

            def fwd_bwd(a, c=config):
                y, vjp = jax.vjp(lambda *v: bjax.ssd_chunk_scan(*v, chunk_size=chunk, config=c),
                                 *a)
                return y, vjp(dy)
            try:
                states, grads, walked, parts = kernels(shape, config, args, dy)
                outs = [np.asarray(v, np.float32) for v in (forward(*args), walked) + (
                    () if options.forward_only else (grads(walked)[0],))]
                want = outs if want is None else want
                diff = max(np.max(np.abs(o - w)) / np.max(np.abs(w)) for o, w in zip(outs, want))
                times = [device_time_ms(states, calls=10, trials=3)]
                if not options.forward_only:
                    times.append(device_time_ms(grads, walked, calls=10, trials=3))
                temp = 0
                if options.forward_only:
                    times.insert(0, device_time_ms(forward, *args, calls=10, trials=3))
                elif not options.kernels_only:
                    times = [device_time_ms(forward, *args, calls=10, trials=3),
                             device_time_ms(jax.jit(fwd_bwd), args, calls=5, trials=3), *times]
                    temp = jax.jit(fwd_bwd).lower(args).compile().memory_analysis()
                    temp = getattr(temp, "temp_size_in_bytes", 0) / 2**20
                text = f"{name} " + " ".join(f"{t:.4f}" for t in times) + f" d{diff:.0e}" + "".join(
                    f" {k} {v:.4f}" for k, v in parts.items()) + f" temp {temp:.0f}"
            except Exception as failure:
                text = f"{name} FAILED {str(failure).strip().splitlines()[-1][:160]}"
            print(f"{line[0]} | {text}", flush=True)
        print("# " + ("fwd chunk_states (ms)" if options.forward_only else
                      "fwd fwd+bwd " * (not options.kernels_only)
                      + "chunk_states state_grads (ms)"), flush=True)


if __name__ == "__main__":
    main()
