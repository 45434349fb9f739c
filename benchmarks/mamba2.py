"""bjax.nn.Mamba2 vs the same module on the XLA backend vs a torch layer on mamba_ssm's kernels.

    python -m benchmarks.mamba2 [--backend pallas] [--mamba-src PATH]

The mixer of a Mamba-2 2.7B layer (hidden 2560, 80 heads of 64, state 128, one group,
conv 4, chunk 256) at b=4, l=2048, bf16 activations and parameters, forward and forward +
backward (the gradients of x and of every parameter); and the forward of the same tokens
packed in one row of 5 sequences, with ``seq_idx`` against the prefill with ``cu_seqlens``
that also returns every sequence's states (a second table; the ratio is the states' cost).
The torch column is the same layer built from mamba_ssm's Triton kernels: ``nn.Linear`` projections, torch's depthwise conv1d
and silu (the causal-conv1d package is not installed there), ``mamba_chunk_scan_combined``
and mamba_ssm's gated RMSNorm (``layernorm_gated.RMSNorm``, gate first), loaded from the
state-spaces/mamba source tree at ``--mamba-src`` without its compiled extensions; left
blank where absent. Device throughput; ``ratio`` = other / bjax (> 1: bjax faster).
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

import bjax
from bjax import _varlen
from benchmarks import harness
from benchmarks.ssd import load_mamba, torch_time_ms

LAYER = dict(hidden_size=2560, num_heads=80, head_dim=64, state_size=128, n_groups=1,
             expand=2, conv_kernel=4, chunk_size=256)
BATCH, LENGTH = 4, 2048


def bjax_times(backend, x, dy):
    model = bjax.nn.Mamba2(**LAYER, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                           backend=backend, rngs=nnx.Rngs(0))
    graph, params = nnx.split(model)

    def forward(params, x):
        return nnx.merge(graph, params)(x)

    def backward(params, x, dy):
        return jax.vjp(forward, params, x)[1](dy)
    return (harness.device_time_ms(jax.jit(forward), params, x, calls=20),
            harness.device_time_ms(jax.jit(backward), params, x, dy, calls=20))


def packed_prefill_times(backend, x, cu_seqlens):
    """Forward of one row of packed sequences: segments alone (``seq_idx``), and the
    prefill that also returns a cache row per sequence (``cu_seqlens``, varlen states)."""
    model = bjax.nn.Mamba2(**LAYER, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                           backend=backend, rngs=nnx.Rngs(0))
    graph, params = nnx.split(model)
    seq_idx = _varlen.sequence_numbers(cu_seqlens, x.shape[1])

    def segments(params, x):
        return nnx.merge(graph, params)(x, seq_idx=seq_idx)

    def prefill(params, x):
        module = nnx.merge(graph, params)
        return module(x, cache=module.init_cache(1), cu_seqlens=cu_seqlens)
    return (harness.device_time_ms(jax.jit(segments), params, x, calls=20),
            harness.device_time_ms(jax.jit(prefill), params, x, calls=20))


def torch_layer(src):
    """The torch layer on mamba_ssm's kernels (a callable of x), or None."""
    scan = load_mamba(src)
    if scan is None:
        return None
    import torch
    import torch.nn.functional as F
    from mamba_ssm.ops.triton.layernorm_gated import RMSNorm as RMSNormGated

    hidden, heads, head_dim = LAYER["hidden_size"], LAYER["num_heads"], LAYER["head_dim"]
    inter, state = heads * head_dim, LAYER["state_size"]
    conv_dim = inter + 2 * state
    kw = dict(device="cuda", dtype=torch.bfloat16)
    in_proj = torch.nn.Linear(hidden, 2 * inter + 2 * state + heads, bias=False, **kw)
    out_proj = torch.nn.Linear(inter, hidden, bias=False, **kw)
    conv_w = torch.nn.Parameter(0.3 * torch.randn(conv_dim, 1, 4, **kw))
    conv_b = torch.nn.Parameter(torch.zeros(conv_dim, **kw))
    dt_bias = torch.nn.Parameter(torch.zeros(heads, device="cuda"))
    a_log = torch.nn.Parameter(torch.log(torch.arange(1, heads + 1, device="cuda",
                                                      dtype=torch.float32)))
    d = torch.nn.Parameter(torch.ones(heads, device="cuda"))
    norm = RMSNormGated(inter, eps=1e-5, norm_before_gate=False, group_size=inter, **kw)

    def layer(x):
        batch, length, _ = x.shape
        z, xbc, dt = torch.split(in_proj(x), [inter, conv_dim, heads], dim=-1)
        xbc = F.silu(F.conv1d(xbc.transpose(1, 2), conv_w, conv_b, padding=3,
                              groups=conv_dim)[..., :length]).transpose(1, 2)
        xs, B, C = torch.split(xbc, [inter, state, state], dim=-1)
        y = scan(xs.reshape(batch, length, heads, head_dim), dt, -torch.exp(a_log),
                 B.reshape(batch, length, 1, state), C.reshape(batch, length, 1, state),
                 LAYER["chunk_size"], D=d, dt_bias=dt_bias, dt_softplus=True)
        return out_proj(norm(y.reshape(batch, length, inter), z))
    return layer


def torch_times(layer, x, dy):
    import torch
    x = torch.from_dlpack(jax.block_until_ready(x)).clone()
    dy = torch.from_dlpack(jax.block_until_ready(dy)).clone()
    x_grad = x.clone().requires_grad_()

    def forward():
        with torch.no_grad():
            layer(x)

    def backward():
        x_grad.grad = None
        layer(x_grad).backward(dy)
    return torch_time_ms(forward, calls=20), torch_time_ms(backward, calls=10)


def run(backend, mamba_src):
    keys = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(keys[0], (BATCH, LENGTH, LAYER["hidden_size"]), jnp.bfloat16)
    dy = jax.random.normal(keys[1], x.shape, jnp.bfloat16)
    mine = bjax_times(backend, x, dy)
    xla = bjax_times("xla", x, dy)
    layer = torch_layer(mamba_src)
    torch = torch_times(layer, x, dy) if layer is not None else (None, None)
    rows = []
    for i, direction in enumerate(("fwd", "fwd+bwd")):
        rows.append([direction, f"{mine[i]:.3f}", f"{xla[i]:.3f}", f"{xla[i] / mine[i]:.2f}",
                     "-" if torch[i] is None else f"{torch[i]:.3f}",
                     "-" if torch[i] is None else f"{torch[i] / mine[i]:.2f}"])
        print(" | ".join(rows[-1]), flush=True)
    packed = x.reshape(1, BATCH * LENGTH, -1)
    cu_seqlens = jnp.array([0, 1000, 3000, 3001, 6500, BATCH * LENGTH], jnp.int32)
    plain, with_states = packed_prefill_times(backend, packed, cu_seqlens)
    packed_row = [f"{plain:.3f}", f"{with_states:.3f}", f"{with_states / plain:.2f}"]
    print(" | ".join(packed_row), flush=True)
    setting = (f"Mamba2 mixer, b{BATCH} l{LENGTH} hidden {LAYER['hidden_size']} "
               f"h{LAYER['num_heads']} p{LAYER['head_dim']} n{LAYER['state_size']} bf16; "
               f"backend={backend}")
    return "\n\n".join([
        harness.report(setting, ["dir", "bjax ms", "XLA ms", "ratio", "torch + mamba_ssm ms",
                                 "ratio"], rows),
        f"The same tokens packed in one row of {cu_seqlens.shape[0] - 1} sequences, forward:",
        harness.markdown_table(["seq_idx ms", "cu_seqlens + varlen states ms", "ratio"],
                               [packed_row])])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="pallas")
    parser.add_argument("--mamba-src", default=None)
    args = parser.parse_args()
    harness.write_report("mamba2", run(args.backend, args.mamba_src))


if __name__ == "__main__":
    main()
