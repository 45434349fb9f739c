"""Hash the Triton IR of every SSD kernel, lowered for CUDA on any machine (a CPU will do),
at the heuristic's configs of a few shapes: run it at two commits and diff the output to
show that a change leaves the GPU programs as they were (or which kernels it changes).

    PYTHONPATH=. python3 scripts/ssd_triton_ir.py [--backward "block_h=2,source_block_h=2"]
        > ir.txt

``--backward``: fields of the backward's heuristic config replaced
(``benchmarks.harness.with_fields``). Each shape is lowered without the optional inputs
and again with segments (and, for the source kernel, ``D``), the programs ``seq_idx``
and ``D`` reach.

The hash covers the Triton module without debug locations, and the grid. It reads the
module from JAX's Pallas Triton lowering (a private function, ``jax._src.pallas.triton
.lowering.lower_jaxpr_to_triton_module``), so a JAX upgrade may move it.
"""
import argparse
import hashlib

import jax
import jax.numpy as jnp
from jax._src.pallas.triton import lowering

from benchmarks.harness import with_fields
from pallas_kernels import ssd as pk
from pallas_kernels import ssd_backward as pkb

SHAPES = [  # batch, seqlen, heads, head_dim, groups, state, chunk, dtype, passing
    (2, 512, 4, 64, 1, 128, 256, jnp.bfloat16, False),
    (1, 600, 4, 80, 2, 200, 128, jnp.float32, False),
    (1, 256 * 40, 2, 128, 1, 64, 256, jnp.bfloat16, True),
    (2, 512, 4, 128, 1, 256, 256, jnp.bfloat16, False),
]

_modules = []
_lower = lowering.lower_jaxpr_to_triton_module


def _capture(*args, **kwargs):
    result = _lower(*args, **kwargs)
    _modules.append((result.module.operation.get_asm(enable_debug_info=False),
                     tuple(result.grid)))
    return result


def ir_hash(kernel, *args, **static) -> str:
    """The hash of the Triton modules ``kernel(*args, **static)`` lowers to for CUDA."""
    _modules.clear()
    jax.jit(lambda *a: kernel(*a, **static)).trace(*args).lower(lowering_platforms=("cuda",))
    return hashlib.sha256(repr(_modules).encode()).hexdigest()[:16]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backward", default="")
    options = parser.parse_args()
    lowering.lower_jaxpr_to_triton_module = _capture
    for batch, seq_len, heads, head_dim, groups, state, chunk, dtype, passing in SHAPES:
        x = jnp.zeros((batch, seq_len, heads, head_dim), dtype)
        b = jnp.zeros((batch, seq_len, groups, state), dtype)
        length = -(-seq_len // chunk) * chunk
        dt = a_cs = jnp.zeros((batch, heads, length), jnp.float32)
        states = jnp.zeros((batch, length // chunk, heads, head_dim, state), jnp.float32)
        walks = (batch * heads, length // chunk) if passing else ()
        args = (chunk, head_dim, state, heads // groups, dtype, *walks)
        forward = dict(chunk_size=chunk, config=pk.default_config(*args))
        backward = dict(chunk_size=chunk, config=with_fields(pkb.default_config(*args),
                                                             options.backward))
        seg = (jnp.arange(length, dtype=jnp.int32) // 100)[None].repeat(batch, 0)
        d = jnp.zeros((heads, head_dim), jnp.float32)
        hashes = {
            "chunk_states": ir_hash(pk.chunk_states, x, b, dt, a_cs, **forward,
                                    states_dtype=jnp.float32),
            "chunk_scan": ir_hash(pk.chunk_scan, x, b, b, dt, a_cs,
                                  states.astype(pk.snapshot_dtype(dtype)), **forward),
            "state_grads": ir_hash(pkb.state_grads, x, b, a_cs, states, **backward),
            "target_grads": ir_hash(pkb.target_grads, x, x, b, b, dt, a_cs, states, **backward),
            "source_grads": ir_hash(pkb.source_grads, x, x, b, b, dt, a_cs, states, **backward),
            "target_grads seg": ir_hash(pkb.target_grads, x, x, b, b, dt, a_cs, states, seg,
                                        **backward),
            "source_grads seg d": ir_hash(pkb.source_grads, x, x, b, b, dt, a_cs, states, seg,
                                          d, **backward),
        }
        shape = (f"b{batch} l{seq_len} h{heads} p{head_dim} g{groups} n{state} Q{chunk} "
                 f"{jnp.dtype(dtype).name}{' passed' if passing else ''}")
        for name, digest in hashes.items():
            print(f"{shape} | {name} | {digest}")


if __name__ == "__main__":
    main()
