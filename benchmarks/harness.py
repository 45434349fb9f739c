"""Timing helpers shared by the benchmarks.

Device throughput, never host dispatch: each measurement enqueues ``calls``
calls of a jitted function and blocks once at the end; the median over
``trials`` such batches is reported. Inputs are random (never zeros).
"""
from __future__ import annotations

import dataclasses
import datetime
import glob
import os
import re
import statistics
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from bjax.tune.tuner import device_time_ms  # noqa: F401  (the benchmarks' timer too)


def with_fields(config, text: str):
    """``config`` (a dataclass of ints and bools) with the fields of ``text`` replaced:
    ``"block_h=2,shared_scores=1"``; a bool field takes 0 / 1 / false / true.

    Raises:
      ValueError: a field ``config`` does not have, or a value of the wrong kind.
    """
    kinds = {field.name: field.type for field in dataclasses.fields(config)}
    values = {}
    for pair in filter(None, text.split(",")):
        name, _, value = pair.partition("=")
        if name not in kinds:
            raise ValueError(f"{type(config).__name__} has no field {name!r}")
        if kinds[name] in (bool, "bool"):
            if value.lower() not in ("0", "1", "false", "true"):
                raise ValueError(f"{name} takes 0, 1, false or true; got {value!r}")
            values[name] = value.lower() in ("1", "true")
        else:
            values[name] = int(value)
    return dataclasses.replace(config, **values)


def chained_times_ms(fns: dict, states: dict, *args, calls: int = 10,
                     rounds: int = 7) -> dict:
    """Median milliseconds per call of ``state = fn(state, *args)`` for each ``fn``
    (donating ``state``; ``states`` holds each one's initial state, consumed).

    For in-place ops: each call consumes the previous call's output, so no
    copy of ``state`` is needed to keep the donated input alive. The functions
    take turns, round by round, so that drift in the machine's speed reaches
    all of them alike.
    """
    states = {name: jax.block_until_ready(fn(fn(states[name], *args), *args))  # warm up
              for name, fn in fns.items()}
    per_call = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            state = states[name]
            start = time.perf_counter()
            for _ in range(calls):
                state = fn(state, *args)
            states[name] = jax.block_until_ready(state)
            per_call[name].append((time.perf_counter() - start) / calls * 1e3)
    return {name: statistics.median(times) for name, times in per_call.items()}


def kernel_time_ms(fn, *args, calls: int = 20, chain: bool = False) -> float:
    """Milliseconds of GPU kernel time per call of ``fn(*args)``, from a jax.profiler trace.

    Sums the durations of every event on the GPU's stream lines (kernels and
    device copies), so host dispatch is excluded: the measure for problems
    whose device work is shorter than JAX's dispatch of a call. With ``chain``,
    each call's output replaces the first argument (``fn`` donating it: in-place
    ops). Falls back to :func:`device_time_ms` where the trace has no GPU plane (CPU).
    """
    out = jax.block_until_ready(fn(*args))
    if chain:
        args = (out, *args[1:])
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(calls):
            out = fn(*args)
            if chain:
                args = (out, *args[1:])
        jax.block_until_ready(out)
        jax.profiler.stop_trace()
        files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        total_ns = 0
        for plane in jax.profiler.ProfileData.from_file(files[0]).planes if files else ():
            if "/device:GPU:0" not in plane.name:
                continue
            for line in plane.lines:
                if line.name.startswith("Stream"):
                    total_ns += sum(event.duration_ns for event in line.events)
    if not total_ns:
        if chain:
            return chained_times_ms({"fn": fn}, {"fn": args[0]}, *args[1:])["fn"]
        return device_time_ms(fn, *args)
    return total_ns / calls / 1e6


def copy_ceiling_tbps(gib: float = 2.0) -> tuple[float, str]:
    """Device-to-device copy bandwidth (bytes read + written per second, in TB/s)."""
    n = int(gib * 2**30) // 2
    try:
        import torch  # the same figure as the anchors, where torch sees the GPU
        if torch.cuda.is_available():
            src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
            dst = torch.empty_like(src)
            for _ in range(3):
                dst.copy_(src)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                dst.copy_(src)
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / 20
            del src, dst
            torch.cuda.empty_cache()
            return 2 * n * 2 / (ms * 1e-3) / 1e12, "torch copy_"
    except ImportError:
        pass
    x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    ms = device_time_ms(jax.jit(lambda x: -x), x, calls=20)
    return 2 * n * 2 / (ms * 1e-3) / 1e12, "XLA negate"


def environment() -> str:
    """One line: date, device, JAX version, commit."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    device = jax.devices()[0]
    return (f"{datetime.date.today().isoformat()} | {device.device_kind} | jax {jax.__version__} "
            f"| commit {os.environ.get('BJAX_COMMIT', commit)}")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report(setting: str, header: list[str], rows: list[list]) -> str:
    """A benchmark's report: the environment line, ``setting`` (ceilings, backend), then
    the table."""
    return "\n".join([environment(), setting, "", markdown_table(header, rows)])


def write_report(name: str, report: str) -> None:
    """Prints ``report`` and, where ``$OUT`` is set, writes it to ``$OUT/{name}_bench.md``."""
    print("\n" + report)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"{name}_bench.md"), "w") as f:
            f.write(report + "\n")


COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute",
               "reduce-scatter")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")


def collectives(hlo: str) -> dict:
    """``{kind: [count, bytes]}`` of the collectives in compiled HLO text; an async pair
    counts once, by its start. The bytes are those of the all-reduces' results (the
    buffers reduced); the other kinds are counted only."""
    found = {}
    for line in hlo.splitlines():
        for kind in COLLECTIVES:
            op = next((f" {kind}{end}(" for end in ("", "-start") if f" {kind}{end}(" in line),
                      None)
            if op is None or "=" not in line:
                continue
            entry = found.setdefault(kind, [0, 0])
            entry[0] += 1
            if kind == "all-reduce":
                result = line.split("=", 1)[1].split(op, 1)[0]
                entry[1] += sum(_BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d]))
                                for t, dims in _SHAPE.findall(result))
    return found
