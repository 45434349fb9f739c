"""Probe: the SSD forward chunk scan with the scores ``C_t B_s^T`` computed once per
(batch row, chunk, group) by an XLA batched matmul and read by the scan, against the
shipped scan, which computes them over the whole state in every program of heads.

    PYTHONPATH=. python3 scripts/ssd_scores_probe.py [--match "l131072 n256"] [--block-n 64]
        [--scores-dtype float32] [--heads-per-program 1,2,4]

Per shape (bf16, no segments, seqlen a multiple of the chunk): the shipped
``chunk_scan`` alone and the whole ``bjax.ssd_chunk_scan`` forward, then per variant the
scores matmul plus the variant's scan (and the matmul alone), and the whole forward with
the variant's scan in place of the shipped one, in ms, with the variant's output against
the shipped one's (max difference over max magnitude). The chunk states are the
heuristic's (walked, or passed along on long sequences of few heads). ``--block-n``: the variant's ``C_t S^T`` in pieces of that many state
columns (0: whole). The variant covers the plain case only (no segments, D or z): a
measure of the design, not a kernel of the package.
"""
import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

import bjax
from benchmarks import cases
from benchmarks import ssd as bench_ssd
from benchmarks.ssd_sweep import matching
from bjax.tune.tuner import device_time_ms
from pallas_kernels import ssd as pk
from pallas_kernels.blocks import block_loop, columns, dot, load, pallas_call, rows_cols

# Rows of the Mamba-2 sweep (benchmarks.ssd_sweep), so that the forward compares with its
# mamba_ssm column: the reference shape, three state-256 shapes, a long state-64 one.
DEFAULT_MATCH = ["b4 l4096 h64 p64 g1 n128 Q256", "b16 l512 h64 p64 g1 n256 Q256",
                 "b4 l4096 h32 p128 g1 n256 Q256", "b1 l131072 h64 p64 g1 n256 Q256",
                 "b1 l131072 h32 p128 g1 n64 Q256"]


def scores(b, c, chunk_size: int, dtype):
    """``C_t . B_s`` within each chunk: ``[batch, chunks, groups, chunk, chunk]``."""
    batch, seq_len, groups, state_dim = b.shape
    shape = (batch, seq_len // chunk_size, chunk_size, groups, state_dim)
    return jnp.einsum("bcqgn,bcsgn->bcgqs", c.reshape(shape), b.reshape(shape),
                      preferred_element_type=jnp.float32).astype(dtype)


def _scan_kernel(x_ref, cb_ref, c_ref, dt_ref, acs_ref, states_ref, y_ref, *, dims, config,
                 block_n):
    chunk, heads_per_group, head_dim, state_dim = dims
    bt, bs, bp, bh = config.block_t, config.block_s, config.block_p, config.block_h
    p_blocks = pl.cdiv(head_dim, bp)
    tile, head_block, c, row = (pl.program_id(i) for i in range(4))
    tb, pb = tile // p_blocks, tile % p_blocks
    heads = [head_block * bh + k for k in range(bh)]
    group = heads[0] // heads_per_group
    p_slice, p_mask = columns(head_dim, pb * bp, bp)
    t_steps = pl.ds(c * chunk + tb * bt, bt)
    t_local = tb * bt + jnp.arange(bt, dtype=jnp.int32)
    a_t = [acs_ref[row, h, t_steps] for h in heads]

    accs = [jnp.zeros((bt, bp), jnp.float32) for _ in heads]
    for k in range(pl.cdiv(state_dim, block_n)):   # C_t S_c^T in pieces of the state
        n_slice, n_mask = columns(state_dim, k * block_n, block_n)
        c_t = load(c_ref.at[row, t_steps, group, n_slice], rows_cols(None, n_mask))
        for i, h in enumerate(heads):
            state = load(states_ref.at[row, c, h, p_slice, n_slice], rows_cols(p_mask, n_mask))
            accs[i] = accs[i] + dot(c_t.astype(states_ref.dtype), state, contract=(1, 1))
    accs = [acc * jnp.exp(a)[:, None] for acc, a in zip(accs, a_t)]

    def body(j, accs):
        s_steps = pl.ds(c * chunk + j * bs, bs)
        cb = cb_ref[row, c, group, pl.ds(tb * bt, bt), pl.ds(j * bs, bs)].astype(jnp.float32)
        pairs = t_local[:, None] >= (j * bs + jnp.arange(bs, dtype=jnp.int32))[None, :]
        new = []
        for h, a, acc in zip(heads, a_t, accs):
            x_s = load(x_ref.at[row, s_steps, h, p_slice], rows_cols(None, p_mask))
            decay = jnp.exp(jnp.where(pairs, a[:, None] - acs_ref[row, h, s_steps][None, :],
                                      -jnp.inf))
            weights = (cb * decay * dt_ref[row, h, s_steps][None, :]).astype(x_s.dtype)
            new.append(acc + dot(weights, x_s))
        return tuple(new)

    accs = block_loop(jnp.int32(0), (tb + 1) * (bt // bs), chunk // bs, body, tuple(accs),
                      constant_trip_count=False)
    for h, acc in zip(heads, accs):
        plgpu.store(y_ref.at[row, t_steps, h, p_slice], acc.astype(y_ref.dtype),
                    mask=rows_cols(None, p_mask))


@functools.partial(jax.jit, static_argnames=("chunk_size", "config", "block_n", "interpret"))
def scan_with_scores(x, cb, c, dt, a_cs, states, *, chunk_size, config, block_n,
                     interpret=False):
    """The plain chunk scan reading ``cb`` (:func:`scores`) for its intra-chunk part."""
    batch, _, heads, head_dim = x.shape
    groups, state_dim = c.shape[2:]
    dims = (chunk_size, heads // groups, head_dim, state_dim)
    kernel = functools.partial(_scan_kernel, dims=dims, config=config,
                               block_n=block_n or state_dim)
    tiles = (chunk_size // config.block_t) * pl.cdiv(head_dim, config.block_p)
    return pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(tiles, heads // config.block_h, cb.shape[1], batch),
        compiler_params=plgpu.CompilerParams(num_warps=config.scan_warps,
                                             num_stages=config.num_stages),
        interpret=interpret, name="probe_ssd_scan_with_scores",
    )(x, cb, c, dt, a_cs, states)


def forward(x, dt, a, b, c, *, chunk_size, config, block_n, scores_dtype, interpret=False):
    """``bjax.ssd_chunk_scan``'s plain forward with the variant's scan."""
    dt_p, a_cs = pk.time_terms(dt, a, chunk_size=chunk_size, softplus=False,
                               limit=(0.0, float("inf")), interpret=interpret)
    states = pk.chunk_states(x, b, dt_p, a_cs, chunk_size=chunk_size, config=config,
                             interpret=interpret)[0]
    return scan_with_scores(x, scores(b, c, chunk_size, scores_dtype), c, dt_p, a_cs, states,
                            chunk_size=chunk_size, config=config, block_n=block_n,
                            interpret=interpret)


def terms(shape, config, interpret=False):
    """The shipped scan's inputs: x, B, C, dt', a_cs and the stored chunk states."""
    x, dt, A, B, C = cases.ssd_inputs(shape)
    chunk = shape[-1]
    dt_p, a_cs = pk.time_terms(dt, A, chunk_size=chunk, softplus=False,
                               limit=(0.0, float("inf")), interpret=interpret)
    states = pk.chunk_states(x, B, dt_p, a_cs, chunk_size=chunk, config=config,
                             interpret=interpret)[0]
    return x, B, C, dt_p, a_cs, states


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--match", action="append", default=[])
    parser.add_argument("--block-n", default="0,64", help="state pieces of C S^T (0: whole)")
    parser.add_argument("--scores-dtype", default="float32,bfloat16")
    parser.add_argument("--heads-per-program", default="", help="default: the heuristic's")
    options = parser.parse_args()
    for shape in matching(cases.ssd_sweep_shapes(), options.match or DEFAULT_MATCH):
        batch, seq_len, heads, head_dim, groups, state_dim, chunk = shape
        config = pk.default_config(chunk, head_dim, state_dim, heads // groups, jnp.bfloat16,
                                   batch_heads=batch * heads, chunks=seq_len // chunk)
        x, B, C, dt_p, a_cs, states = terms(shape, config)
        shipped = jax.jit(lambda: pk.chunk_scan(x, B, C, dt_p, a_cs, states, chunk_size=chunk,
                                                config=config))
        want = np.asarray(shipped(), np.float32)
        inputs = cases.ssd_inputs(shape)
        op = jax.jit(lambda *a: bjax.ssd_chunk_scan(*a, chunk_size=chunk))
        text = bench_ssd._shape_text(shape)
        op_ms = device_time_ms(op, *inputs, calls=10, trials=3)
        source = bjax.plan(bjax.ssd_chunk_scan, *inputs, chunk_size=chunk).config_source
        print(f"{text} | shipped scan {device_time_ms(shipped, calls=10, trials=3):.4f}"
              f" (block_h {config.block_h}), forward {op_ms:.4f} ({source})", flush=True)
        heads_options = [int(v) for v in options.heads_per_program.split(",") if v] or [
            config.block_h]
        for dtype in options.scores_dtype.split(","):
            # Arrays as arguments, not closed over: XLA would fold a constant matmul.
            cb_only = jax.jit(lambda b, c, d=dtype: scores(b, c, chunk, d))
            cb_ms = device_time_ms(cb_only, B, C, calls=10, trials=3)
            for block_h in heads_options:
                if (heads // groups) % block_h:
                    continue
                for block_n in (int(v) for v in options.block_n.split(",")):
                    variant = dataclasses.replace(config, block_h=block_h)
                    run = jax.jit(lambda b, c, v=variant, n=block_n, d=dtype: scan_with_scores(
                        x, scores(b, c, chunk, d), c, dt_p, a_cs, states, chunk_size=chunk,
                        config=v, block_n=n))
                    whole = jax.jit(functools.partial(
                        forward, chunk_size=chunk, config=variant, block_n=block_n,
                        scores_dtype=dtype))
                    try:
                        got = np.asarray(run(B, C), np.float32)
                        diff = np.max(np.abs(got - want)) / np.max(np.abs(want))
                        line = (f"{device_time_ms(run, B, C, calls=10, trials=3):.4f}"
                                f" (scores {cb_ms:.4f}) d{diff:.0e}, forward "
                                f"{device_time_ms(whole, *inputs, calls=10, trials=3):.4f}")
                    except Exception as failure:
                        line = f"FAILED {str(failure).strip().splitlines()[-1][:160]}"
                    print(f"{text} | scores {dtype} block_h {block_h} block_n {block_n} | "
                          f"{line}", flush=True)


if __name__ == "__main__":
    main()
