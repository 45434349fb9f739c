"""SSD across the Mamba-2 family: bjax vs mamba_ssm (and, with ``--xla``, the XLA
implementation), forward and forward + backward, at every shape of
``benchmarks.cases.ssd_sweep_shapes`` (72), in one process.

    python -m benchmarks.ssd_sweep --mamba-src PATH [--part 1/4] [--match "l131072 n256"] [--xla]
        [--keep-compiled DIR]

``--part K/N`` times the K-th of N slices of the shapes (a slice fits one device call);
``--match`` keeps the shapes whose row text holds each of its tokens.
Rows print as they come, so a run cut short keeps what it timed; the report (and
``$OUT/ssd_sweep_bench.md``) follows. ``mamba/bjax`` > 1: bjax faster. ``% floor``
(forward) as ``benchmarks.ssd``: bytes at the copy ceiling / chunked matmul flops at the
bf16 rate, over bjax's time. Inputs, timing and the mamba_ssm loader are
``benchmarks.ssd``'s; bjax runs whatever config a plain call runs (tuned entry or
heuristic, the ``config`` column, which also names the chunk states passed along).

``--keep-compiled DIR`` keeps, between runs, mamba_ssm's Triton autotuning winners and
compiled kernels (``DIR/triton``: ``TRITON_CACHE_AUTOTUNING=1``; the winners are the
``*.autotune.json`` files) and bjax's compiled programs (``DIR/jax``: JAX's persistent
compilation cache). A shape timed before then skips mamba_ssm's autotuning (what a row's
wall time goes to is in the comment line after it); the kernel mamba_ssm runs is still
the one its own autotuner chose on that GPU.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp

import bjax
from benchmarks import cases, harness
from benchmarks import ssd as bench_ssd


def part_of(shapes: list, part: str) -> list:
    """The K-th of N contiguous slices of ``shapes`` (``part`` "K/N", K from 1)."""
    index, count = (int(v) for v in part.split("/"))
    if not 1 <= index <= count:
        raise ValueError(f"--part must be K/N with 1 <= K <= N; got {part}")
    size = -(-len(shapes) // count)
    return shapes[(index - 1) * size:index * size]


def matching(shapes: list, patterns: list[str]) -> list:
    """The shapes whose text (``b16 l512 h64 p64 g1 n256 Q256``) holds every token of one
    of ``patterns``; all of them when ``patterns`` is empty.

    Raises:
      ValueError: patterns that no shape matches (a run that would time nothing)."""
    if not patterns:
        return shapes
    kept = [shape for shape in shapes
            if any(set(p.split()) <= set(bench_ssd._shape_text(shape).split())
                   for p in patterns)]
    if not kept:
        raise ValueError(f"--match must name tokens of a shape's row, e.g. \"l131072 n256\"; "
                         f"got {patterns}, which no shape of {len(shapes)} holds")
    return kept


def _ratio(other, mine):
    return f"{other / mine:.2f}" if other else "-"


def config_text(plan) -> str:
    """Where the plan's config came from, and which state kernels it runs: ``heuristic``,
    ``cache, fwd passed`` (forward chunk states passed along), ``..., bwd passed``."""
    config = plan.block_config
    if config is None:   # the XLA implementation
        return "-"
    passed = [name for name, tile in (("fwd", config.forward), ("bwd", config.backward))
              if tile is not None and tile.state_passing]
    return ", ".join([plan.config_source] + [f"{name} passed" for name in passed])


def shape_row(shape, backend, mamba, copy_tbps, tflops, with_xla) -> list:
    """Forward and forward + backward times of one shape, ratios and % of floor. A comment
    line after the row says the wall seconds each side took (compiling, mamba_ssm's
    autotuning and timing), to budget a run."""
    chunk = shape[-1]
    started = time.perf_counter()
    args = cases.ssd_inputs(shape)
    dy = jax.random.normal(jax.random.key(9), args[0].shape, jnp.bfloat16)
    source = config_text(bjax.plan(bjax.ssd_chunk_scan, *args, chunk_size=chunk,
                                   backend=backend))
    forward = jax.jit(lambda *a: bjax.ssd_chunk_scan(*a, chunk_size=chunk, backend=backend))
    fwd = harness.device_time_ms(forward, *args, calls=20)
    fwd_bwd = harness.device_time_ms(bench_ssd._fwd_bwd(backend, chunk), args, dy, calls=10)
    walls = {"bjax": time.perf_counter() - started}
    m_fwd = m_fwd_bwd = None
    if mamba:
        m_fwd = bench_ssd.mamba_ms(mamba, args, chunk)
        m_fwd_bwd = bench_ssd.mamba_fwd_bwd_ms(mamba, args, dy, chunk)
        walls["mamba_ssm"] = time.perf_counter() - started - walls["bjax"]
    x_fwd = x_fwd_bwd = None
    if with_xla:
        xla_started = time.perf_counter()
        xla = jax.jit(lambda *a: bjax.ssd_chunk_scan(*a, chunk_size=chunk, backend="xla"))
        x_fwd = harness.device_time_ms(xla, *args, calls=5, trials=3)
        x_fwd_bwd = harness.device_time_ms(bench_ssd._fwd_bwd("xla", chunk), args, dy,
                                           calls=3, trials=3)
        walls["XLA"] = time.perf_counter() - xla_started
    bytes_floor, flops_floor = bench_ssd.floors_ms(shape, copy_tbps, tflops)
    row = [bench_ssd._shape_text(shape), source, f"{fwd:.4f}", _ratio(m_fwd, fwd),
           _ratio(x_fwd, fwd), f"{100 * bytes_floor / fwd:.0f}% / {100 * flops_floor / fwd:.0f}%",
           f"{fwd_bwd:.4f}", _ratio(m_fwd_bwd, fwd_bwd), _ratio(x_fwd_bwd, fwd_bwd)]
    print(" | ".join(row), flush=True)
    print("# wall s: " + ", ".join(f"{k} {v:.0f}" for k, v in walls.items()), flush=True)
    return row


def keep_compiled(directory: str) -> None:
    """Keep compiled kernels and Triton's autotuning winners under ``directory`` (before
    mamba_ssm is imported: its autotuners read the setting when they are defined)."""
    os.environ["TRITON_CACHE_AUTOTUNING"] = "1"
    os.environ["TRITON_CACHE_DIR"] = os.path.join(directory, "triton")
    jax.config.update("jax_compilation_cache_dir", os.path.join(directory, "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None, help="bjax backend (default: bjax's default)")
    parser.add_argument("--mamba-src", default=os.environ.get("MAMBA_SRC"),
                        help="a state-spaces/mamba checkout (or $MAMBA_SRC)")
    parser.add_argument("--part", default="1/1", help="K/N: the K-th of N slices of the shapes")
    parser.add_argument("--match", action="append", default=[], metavar="TOKENS",
                        help='only shapes whose text holds every token, e.g. "l131072 n256"; '
                             "repeat for several (any of them)")
    parser.add_argument("--xla", action="store_true", help="time the XLA implementation too")
    parser.add_argument("--keep-compiled", metavar="DIR",
                        help="keep compiled kernels and autotuning winners here between runs")
    args = parser.parse_args()
    if args.keep_compiled:
        keep_compiled(args.keep_compiled)
    shapes = matching(part_of(cases.ssd_sweep_shapes(), args.part), args.match)
    backend = args.backend or bjax.plan(
        bjax.ssd_chunk_scan, *cases.ssd_inputs((1, 1, 1, 16, 1, 16, 16))).backend
    copy_tbps, how = harness.copy_ceiling_tbps()
    tflops = bench_ssd.matmul_tflops()
    mamba = bench_ssd.load_mamba(args.mamba_src)
    rows = [shape_row(shape, backend, mamba, copy_tbps, tflops, args.xla) for shape in shapes]
    harness.write_report("ssd_sweep", harness.report(
        f"copy ceiling {copy_tbps:.2f} TB/s ({how}); bf16 matmul {tflops:.0f} TFLOP/s (XLA); "
        f"backend={backend}; mamba_ssm {'loaded' if mamba else 'absent'}; part {args.part}",
        ["shape", "config", "fwd ms", "mamba/bjax", "XLA/bjax", "% floor (bytes / flops)",
         "fwd+bwd ms", "mamba/bjax", "XLA/bjax"], rows))


if __name__ == "__main__":
    main()
