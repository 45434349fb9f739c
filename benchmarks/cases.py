"""The problems the benchmarks time, in one place.

The benchmark scripts build their inputs here, and ``tests/test_benchmark_cases.py``
runs every problem on the GPU, forward and backward, against the XLA implementation:
a speed in BENCHMARKS.md is always the speed of a checked answer at that very shape.

Each :class:`Case` names one problem: its op on a backend, its inputs, and the
arguments differentiated.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

import bjax

# ---------------------------------------------------------------- shapes

GATED_SHAPES = [((8192, 28672), jnp.bfloat16), ((8192, 28672), jnp.float32),
                ((16, 28672), jnp.bfloat16)]
GATED_KINDS = ("glu", "reglu", "swiglu", "geglu")

MERGE_PREFILL, MERGE_DECODE = 16384, 64    # steps
MERGE_STATES, MERGE_HEADS, MERGE_HEAD_DIM = 4, 32, 128

SSD_SCAN_SHAPES = [  # batch, seqlen, heads, head_dim, groups, state_dim, chunk
    (4, 4096, 64, 64, 1, 128, 256),
    (1, 2048, 80, 64, 1, 128, 256),
    (2, 8192, 128, 64, 8, 128, 128),
]
SSD_STEP_SHAPE = (64, 64, 64, 1, 128)  # batch, heads, head_dim, groups, state_dim


def ssd_sweep_shapes() -> list[tuple[int, ...]]:
    """The Mamba-2 family for ``benchmarks.ssd_sweep`` (shapes as SSD_SCAN_SHAPES): head_dim
    64 and 128 (4096 channels: 64 or 32 heads), state 64, 128 and 256, groups 1 and 8,
    chunk 128 and 256, from short sequences to long (16 x 512, 4 x 4096, 1 x 131072):
    72 shapes."""
    return [(batch, seq_len, 4096 // head_dim, head_dim, groups, state_dim, chunk)
            for batch, seq_len in ((16, 512), (4, 4096), (1, 131072))
            for head_dim in (64, 128) for state_dim in (64, 128, 256) for groups in (1, 8)
            for chunk in (128, 256)]

HYPER_CONNECTION_SHAPE = (8192, 4, 4096)           # tokens, streams, channels (float32)
MHC_TOKENS, MHC_STREAMS, MHC_HIDDEN = 16384, 4, 2560  # mhc_pre + mhc_post (bf16), Sinkhorn
# mhc_pre + mhc_post (tokens, streams, channels): the width above, and DeepSeek-V3's.
MHC_LAYER_SHAPES = [(MHC_TOKENS, MHC_STREAMS, MHC_HIDDEN), (8192, MHC_STREAMS, 7168)]

CONV_SHAPES = [  # batch, seqlen, channels, taps: Mamba-2 2.7B's conv (5120 + 2 x 128 channels)
    ((4, 2048, 5376, 4), jnp.bfloat16),
    ((4, 2048, 5376, 4), jnp.float32),
]
CONV_STEP_SHAPE = (64, 5376, 4)   # batch, channels, taps

WRITE_WINDOWS = [  # name, dest, window, start, dtype: well over the H200's 50 MB L2
    ("generic 3-d", (64, 1024, 4096), (48, 768, 3000), (7, 100, 200), jnp.bfloat16),
    ("int4 even window", (16384, 32768), (12288, 24576), (1000, 2048), jnp.int4),
]


# ---------------------------------------------------------------- inputs

def gated_input(shape, dtype, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def merge_inputs(steps: int, num_states: int):
    """``(v [S, K, H, D] bf16, s [S, K, H] float32)``: log-sum-exps spread over +-30."""
    v = jax.random.normal(jax.random.key(0), (steps, num_states, MERGE_HEADS, MERGE_HEAD_DIM),
                          jnp.bfloat16)
    s = 10 * jax.random.normal(jax.random.key(1), (steps, num_states, MERGE_HEADS), jnp.float32)
    return v, s


def ssd_inputs(shape, seed=0):
    """``(x, dt, A, B, C)`` of a scan: bf16 x, B, C; dt in [0.001, 0.1]; A in [-16, -1]."""
    batch, seq_len, heads, head_dim, groups, state_dim, _ = shape
    k = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(k[0], (batch, seq_len, heads, head_dim), jnp.bfloat16)
    dt = jax.random.uniform(k[1], (batch, seq_len, heads), jnp.float32, 0.001, 0.1)
    A = -jax.random.uniform(k[2], (heads,), jnp.float32, 1.0, 16.0)
    B = jax.random.normal(k[3], (batch, seq_len, groups, state_dim), jnp.bfloat16)
    C = jax.random.normal(k[4], (batch, seq_len, groups, state_dim), jnp.bfloat16)
    return x, dt, A, B, C


def ssd_step_inputs(seed=1):
    """``(state float32, x, dt, A, B, C)`` of one decode step at :data:`SSD_STEP_SHAPE`."""
    batch, heads, head_dim, groups, state_dim = SSD_STEP_SHAPE
    k = jax.random.split(jax.random.key(seed), 6)
    state = jax.random.normal(k[0], (batch, heads, head_dim, state_dim), jnp.float32)
    x = jax.random.normal(k[1], (batch, heads, head_dim), jnp.bfloat16)
    dt = jax.random.uniform(k[2], (batch, heads), jnp.float32, 0.001, 0.1)
    A = -jax.random.uniform(k[3], (heads,), jnp.float32, 1.0, 16.0)
    B = jax.random.normal(k[4], (batch, groups, state_dim), jnp.bfloat16)
    C = jax.random.normal(k[5], (batch, groups, state_dim), jnp.bfloat16)
    return state, x, dt, A, B, C


def hyper_connection_inputs():
    """``(x, rmsnorm_weight, h_pre, h_post, h_res)`` at :data:`HYPER_CONNECTION_SHAPE`."""
    k = jax.random.split(jax.random.key(0), 6)
    _, n, hidden = HYPER_CONNECTION_SHAPE
    return (jax.random.normal(k[0], HYPER_CONNECTION_SHAPE, jnp.float32),
            jax.random.normal(k[1], (hidden,)), jax.random.normal(k[2], (n,)),
            jax.random.normal(k[3], (n,)), jax.random.normal(k[4], (n, n)))


def mhc_layer_inputs(shape=MHC_LAYER_SHAPES[0]):
    """``(x [T, n, C] bf16, phi, alpha, bias)`` for ``shape`` ``(T, n, C)``: dynamic H."""
    tokens, n, hidden = shape
    count = n * n + 2 * n
    k = jax.random.split(jax.random.key(1), 5)
    x = jax.random.normal(k[0], (tokens, n, hidden), jnp.bfloat16)
    return (x, 0.02 * jax.random.normal(k[1], (n * hidden, count)),
            jnp.array([0.8, 0.6, 1.1], jnp.float32), jax.random.normal(k[2], (count,)))


def mhc_layer(backend, pre_config=None):
    """``mhc_pre`` (with ``pre_config``) then ``mhc_post``, the layer input as the
    sublayer's output."""
    def layer(x, phi, alpha, bias):
        layer_input, h_post, h_res = bjax.mhc_pre(x, phi=phi, alpha=alpha, bias=bias,
                                                  backend=backend, config=pre_config)
        return bjax.mhc_post(x, layer_input, h_post, h_res, backend=backend)
    return layer


def sinkhorn_inputs():
    return (jax.random.normal(jax.random.key(2), (MHC_TOKENS, MHC_STREAMS, MHC_STREAMS),
                              jnp.float32),)


def conv_inputs(shape, dtype, seed=0):
    """``(x, weight, bias)`` of a causal_conv1d problem ``(b, l, d, k)``."""
    batch, length, channels, taps = shape
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (batch, length, channels), jnp.float32).astype(dtype),
            (jax.random.normal(keys[1], (channels, taps), jnp.float32) / taps).astype(dtype),
            jax.random.normal(keys[2], (channels,), jnp.float32).astype(dtype))


def conv_step_inputs(seed=0):
    """``(conv_state, x, weight, bias)`` of a causal_conv1d_step problem."""
    batch, channels, taps = CONV_STEP_SHAPE
    x, weight, bias = conv_inputs((batch, taps, channels, taps), jnp.bfloat16, seed)
    return x[:, 1:], x[:, 0], weight, bias


def decode_cache(seq_len: int, dtype, seed=0):
    """A KV cache ``[8, seq_len, 8, 128]`` (``seq_len`` 1: one token to append)."""
    return jax.random.normal(jax.random.key(seed), (8, seq_len, 8, 128)).astype(dtype)


def window_dest(shape, dtype):
    """The destination of a window write: small integers, exact in every dtype."""
    return jax.random.randint(jax.random.key(0), shape, -7, 7).astype(dtype)


def window_source(window, dtype):
    """The window written: small integers, exact in every dtype."""
    return jax.random.randint(jax.random.key(1), window, -7, 7).astype(dtype)


# ---------------------------------------------------------------- the cases

@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked problem.

    Attributes:
      name: what the benchmark's row names.
      op: ``op(backend) -> fn``, the function the row times.
      inputs: ``inputs() -> tuple`` of ``fn``'s arguments.
      diff: the arguments the backward differentiates (``()``: forward only).
      exact: the result is a copy, equal bit for bit to ``reference``'s.
      reference: ``reference(*inputs)``, for exact cases (else the XLA backend is).
    """
    name: str
    op: Callable[[str], Callable]
    inputs: Callable[[], tuple]
    diff: tuple[int, ...] = ()
    exact: bool = False
    reference: Callable | None = None


def _gated_cases():
    for (shape, dtype), kind in itertools.product(GATED_SHAPES, GATED_KINDS):
        yield Case(f"{kind} {'x'.join(map(str, shape))} {jnp.dtype(dtype).name}",
                   lambda b, kind=kind: lambda x: bjax.gated_activation(x, kind, backend=b),
                   lambda shape=shape, dtype=dtype: (gated_input(shape, dtype),), (0,))


def _merge_cases():
    for steps in (MERGE_PREFILL, MERGE_DECODE):
        yield Case(f"merge_states {steps}", lambda b: lambda v, s: bjax.merge_states(
            v, s, backend=b), lambda steps=steps: merge_inputs(steps, MERGE_STATES), (0, 1))

        def pair(steps=steps):
            v, s = merge_inputs(steps, 2)
            return v[:, 0], s[:, 0], v[:, 1], s[:, 1]
        yield Case(f"merge_state {steps}", lambda b: lambda *a: bjax.merge_state(*a, backend=b),
                   pair, (0, 1, 2, 3))


def _ssd_cases():
    for shape in SSD_SCAN_SHAPES:
        yield Case("ssd_chunk_scan b{} l{} h{} p{} g{} n{} Q{}".format(*shape),
                   lambda b, chunk=shape[-1]: lambda *a: bjax.ssd_chunk_scan(
                       *a, chunk_size=chunk, backend=b),
                   lambda shape=shape: ssd_inputs(shape), (0, 1, 2, 3, 4))
    yield Case("ssd_step b{} h{} p{} g{} n{}".format(*SSD_STEP_SHAPE),
               lambda b: lambda *a: bjax.ssd_step(*a, backend=b), ssd_step_inputs,
               (0, 1, 2, 3, 4, 5))


def _mhc_cases():
    yield Case("hyper_connection {}x{}x{}".format(*HYPER_CONNECTION_SHAPE),
               lambda b: lambda *a: bjax.hyper_connection(*a, backend=b),
               hyper_connection_inputs, (0, 1, 2, 3, 4))
    for shape in MHC_LAYER_SHAPES:
        yield Case("mhc_pre+mhc_post {}x{}x{}".format(*shape), mhc_layer,
                   lambda shape=shape: mhc_layer_inputs(shape), (0, 1, 2, 3))
    yield Case(f"sinkhorn_knopp {MHC_TOKENS}x{MHC_STREAMS}x{MHC_STREAMS}",
               lambda b: lambda l: bjax.sinkhorn_knopp(l, backend=b), sinkhorn_inputs, (0,))


def _conv_cases():
    for shape, dtype in CONV_SHAPES:
        yield Case("causal_conv1d b{} l{} d{} k{} silu ".format(*shape) + jnp.dtype(dtype).name,
                   lambda b: lambda *a: bjax.causal_conv1d(*a, activation="silu", backend=b),
                   lambda shape=shape, dtype=dtype: conv_inputs(shape, dtype), (0, 1, 2))
    yield Case("causal_conv1d_step b{} d{} k{} bfloat16".format(*CONV_STEP_SHAPE),
               lambda b: lambda *a: bjax.causal_conv1d_step(*a, activation="silu", backend=b),
               conv_step_inputs, (0, 1, 2, 3))


def _write_cases():
    for name, dest_shape, window, start, dtype in WRITE_WINDOWS:
        yield Case(name, lambda b, start=start: lambda d, s: bjax.write_slice(d, s, start,
                                                                              backend=b),
                   lambda d=dest_shape, w=window, t=dtype: (window_dest(d, t),
                                                            window_source(w, t)),
                   exact=True,
                   reference=lambda d, s, start=start: lax.dynamic_update_slice(d, s, start))
    seq_len = 2048 * 2**20 // (8 * 8 * 128 * 2)   # the decode loop's largest cache, 2 GiB
    yield Case(f"decode append 8x{seq_len}x8x128",
               lambda b: lambda c, t: bjax.write_slice(c, t, (0, seq_len // 2, 0, 0), backend=b),
               lambda: (decode_cache(seq_len, jnp.bfloat16),
                        decode_cache(1, jnp.bfloat16, seed=1)), exact=True,
               reference=lambda c, t: lax.dynamic_update_slice(c, t, (0, seq_len // 2, 0, 0)))


CASES: dict[str, Case] = {case.name: case for case in itertools.chain(
    _gated_cases(), _merge_cases(), _ssd_cases(), _mhc_cases(), _conv_cases(), _write_cases())}
"""Every benchmarked problem, by name."""
