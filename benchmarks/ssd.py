"""Mamba-2 SSD: bjax vs the XLA implementation vs mamba_ssm's Triton kernels, in one process.

    python -m benchmarks.ssd [--backend pallas] [--mamba-src PATH]

* ``ssd_chunk_scan`` forward at three shapes (bf16 x / B / C, float32 dt and A):
  the reference shape b=4, l=4096, h=64, p=64, n=128, g=1, chunk 256; Mamba-2 2.7B
  (b=1, l=2048, h=80); and b=2, l=8192, h=128, g=8, chunk 128.
* ``ssd_chunk_scan`` forward + backward (``jax.vjp``; mamba_ssm: ``.backward``) at
  the same shapes, with the peak device memory of bjax's and XLA's compiled
  programs (arguments + outputs + temporaries, from XLA's memory analysis).
* ``ssd_step`` at b=64, h=64, p=64, n=128 (the state donated and fed back).
* mamba_ssm column: ``mamba_chunk_scan_combined`` from the state-spaces/mamba
  source tree at ``--mamba-src`` (its ``mamba_ssm`` package is loaded without
  the package's compiled extensions); left blank where absent.

Every column is device throughput: many calls enqueued, one wait at the end.
``ratio`` is other / bjax (> 1: bjax faster). ``% floor`` (forward rows) gives two
floors over bjax's time: bytes (x, B, C, dt read, y written) at the copy
ceiling, and the chunked algorithm's matmul flops (C B^T per group, the causal
halves) at the bf16 matmul rate, both measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp

import bjax
from benchmarks import cases, harness

SCAN_SHAPES, STEP_SHAPE, inputs = cases.SSD_SCAN_SHAPES, cases.SSD_STEP_SHAPE, cases.ssd_inputs


def floors_ms(shape, copy_tbps, matmul_tflops):
    batch, seq_len, heads, head_dim, groups, state_dim, chunk = shape
    chunks = -(-seq_len // chunk)
    nbytes = (2 * batch * seq_len * heads * head_dim * 2 + 2 * batch * seq_len * groups
              * state_dim * 2 + batch * seq_len * heads * 4)
    flops = 2 * batch * chunks * (groups * chunk * chunk * state_dim / 2
                                  + heads * (chunk * chunk * head_dim / 2
                                             + 2 * chunk * head_dim * state_dim))
    return nbytes / (copy_tbps * 1e9), flops / (matmul_tflops * 1e9)


def matmul_tflops() -> float:
    a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
    ms = harness.device_time_ms(jax.jit(lambda a: a @ a), a, calls=20)
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def load_mamba(src):
    """``mamba_chunk_scan_combined`` from a state-spaces/mamba checkout, or None."""
    if not src or not os.path.isdir(os.path.join(src, "mamba_ssm")):
        return None
    try:
        package = types.ModuleType("mamba_ssm")  # skip __init__: it needs compiled extensions
        package.__path__ = [os.path.join(src, "mamba_ssm")]
        sys.modules["mamba_ssm"] = package
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        return mamba_chunk_scan_combined
    except Exception as e:  # noqa: BLE001  (report and go on without the column)
        print(f"mamba_ssm not loaded: {e!r}")
        return None


def torch_time_ms(fn, calls=50, trials=5):
    import torch
    fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        per_call.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(per_call)


def mamba_ms(mamba, args, chunk):
    import torch
    x, dt, A, B, C = (torch.from_dlpack(jax.block_until_ready(v)) for v in args)
    return torch_time_ms(lambda: mamba(x, dt, A, B, C, chunk))


def _row(op, shape_text, t_mine, t_xla, t_mamba, note):
    """A table row (printed as it comes): times in ms, ratios other / bjax."""
    row = [op, shape_text, f"{t_mine:.4f}", f"{t_xla:.4f}", f"{t_xla / t_mine:.2f}",
           f"{t_mamba:.4f}" if t_mamba else "-", f"{t_mamba / t_mine:.2f}" if t_mamba else "-",
           note]
    print(" | ".join(row), flush=True)
    return row


def _shape_text(shape):
    return "b{} l{} h{} p{} g{} n{} Q{}".format(*shape)


def scan_rows(backend, mamba, copy_tbps, tflops):
    rows = []
    for shape in SCAN_SHAPES:
        chunk = shape[-1]
        args = inputs(shape)
        mine = jax.jit(lambda *a, chunk=chunk: bjax.ssd_chunk_scan(*a, chunk_size=chunk,
                                                                   backend=backend))
        xla = jax.jit(lambda *a, chunk=chunk: bjax.ssd_chunk_scan(*a, chunk_size=chunk,
                                                                  backend="xla"))
        t_mine = harness.device_time_ms(mine, *args)
        t_xla = harness.device_time_ms(xla, *args, calls=10)
        t_mamba = mamba_ms(mamba, args, chunk) if mamba else None
        bytes_floor, flops_floor = floors_ms(shape, copy_tbps, tflops)
        rows.append(_row("ssd_chunk_scan fwd", _shape_text(shape), t_mine, t_xla, t_mamba,
                         f"{100 * bytes_floor / t_mine:.0f}% / "
                         f"{100 * flops_floor / t_mine:.0f}%"))
    return rows


def mamba_fwd_bwd_ms(mamba, args, dy, chunk):
    import torch
    tensors = [torch.from_dlpack(jax.block_until_ready(v)).clone().requires_grad_()
               for v in args]
    grad = torch.from_dlpack(jax.block_until_ready(dy))

    def run():
        for t in tensors:
            t.grad = None
        mamba(*tensors, chunk).backward(grad)
    return torch_time_ms(run, calls=20)


def _fwd_bwd(backend, chunk):
    def loss_vjp(args, dy):
        fn = lambda *a: bjax.ssd_chunk_scan(*a, chunk_size=chunk, backend=backend)  # noqa: E731
        return jax.vjp(fn, *args)[1](dy)
    return jax.jit(loss_vjp)


def peak_mib(fn, *args) -> float:
    """Compiled program's arguments + outputs + temporaries, in MiB (XLA's memory analysis)."""
    stats = fn.lower(*args).compile().memory_analysis()
    return (stats.argument_size_in_bytes + stats.output_size_in_bytes
            + stats.temp_size_in_bytes) / 2**20


def backward_rows(backend, mamba):
    rows = []
    for shape in SCAN_SHAPES:
        chunk = shape[-1]
        args = inputs(shape)
        dy = jax.random.normal(jax.random.key(9), args[0].shape, jnp.bfloat16)
        mine, xla = _fwd_bwd(backend, chunk), _fwd_bwd("xla", chunk)
        t_mine = harness.device_time_ms(mine, args, dy, calls=20)
        t_xla = harness.device_time_ms(xla, args, dy, calls=5, trials=3)
        t_mamba = mamba_fwd_bwd_ms(mamba, args, dy, chunk) if mamba else None
        rows.append(_row("ssd_chunk_scan fwd+bwd", _shape_text(shape), t_mine, t_xla, t_mamba,
                         f"peak {peak_mib(mine, args, dy):.0f} MiB vs XLA "
                         f"{peak_mib(xla, args, dy):.0f}"))
    return rows


def step_row(backend, copy_tbps):
    state, x, dt, A, B, C = cases.ssd_step_inputs()
    # The carry is (y, state): y stays live, so neither side can drop its computation.
    fns = {name: jax.jit(lambda carry, *a, b=b: bjax.ssd_step(carry[1], *a, backend=b),
                         donate_argnums=0)
           for name, b in (("bjax", backend), ("xla", "xla"))}
    times = harness.chained_times_ms(
        fns, {name: (x + 0, state + 0) for name in fns}, x, dt, A, B, C)
    tbps = 2 * state.nbytes / (times["bjax"] * 1e-3) / 1e12
    return _row("ssd_step", "b{} h{} p{} g{} n{}".format(*STEP_SHAPE), times["bjax"],
                times["xla"], None, f"{100 * tbps / copy_tbps:.0f}% (state r+w)")


def run(backend: str, mamba_src: str | None) -> str:
    copy_tbps, how = harness.copy_ceiling_tbps()
    tflops = matmul_tflops()
    mamba = load_mamba(mamba_src)
    rows = (scan_rows(backend, mamba, copy_tbps, tflops) + backward_rows(backend, mamba)
            + [step_row(backend, copy_tbps)])
    return harness.report(
        f"copy ceiling {copy_tbps:.2f} TB/s ({how}); bf16 matmul {tflops:.0f} TFLOP/s (XLA); "
        f"backend={backend}; mamba_ssm {'loaded' if mamba else 'absent'}",
        ["op", "shape", "bjax ms", "XLA ms", "XLA/bjax", "mamba_ssm ms", "mamba/bjax",
         "% floor (bytes / flops)"], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None, help="bjax backend (default: bjax's default)")
    parser.add_argument("--mamba-src", default=os.environ.get("MAMBA_SRC"),
                        help="a state-spaces/mamba checkout (or $MAMBA_SRC)")
    args = parser.parse_args()
    backend = args.backend or bjax.plan(
        bjax.ssd_chunk_scan, *inputs((1, 1, 1, 16, 1, 16, 16))).backend
    harness.write_report("ssd", run(backend, args.mamba_src))


if __name__ == "__main__":
    main()
