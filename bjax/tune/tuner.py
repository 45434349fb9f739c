"""The tuner: time an op's candidate configurations on this device, keep the fastest that
agrees with the heuristic, and record it in a tuning cache (:mod:`bjax.tune`).

A :class:`Problem` is one op call at fixed shapes: its inputs, ``run(config, *arrays)``,
its cache key, and one or more :class:`Stage` s. A stage draws candidates from the
kernel's declared search space (``pallas_kernels.*.search_space``), given the best config
of the stage before it (the SSD scan tunes its forward kernels, then its backward ones
with that forward), and times them forward only or forward and backward.

Every candidate's results (outputs, and gradients when the backward is timed) are
compared with the heuristic's: a candidate whose relative error (Frobenius norm, per
array) exceeds :data:`TOLERANCE` of the output dtype is rejected, as is one that fails
to compile. Configurations change block shapes and summation order, never the math, so
honest candidates agree to float32 rounding (16-bit outputs: their own rounding).

A stage's candidates compile ahead of time on several threads (XLA and Triton compile
outside the GIL; compiling, not timing, is most of a tuning run), then run and are
timed one at a time. A candidate whose compile fails on a thread compiles again alone
before it counts as failed.
"""
from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bjax.tune import cache

# Largest relative error (Frobenius norm, per array) to the heuristic's results, by the
# output's dtype: float32 rounding for float32, one rounding of the result for 16-bit.
TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}

FORWARD, FORWARD_BACKWARD = "forward", "forward+backward"


def device_time_ms(fn, *args, calls: int = 50, trials: int = 5) -> float:
    """Median milliseconds per call of ``fn(*args)`` (``fn`` jitted by the caller): each
    trial enqueues ``calls`` calls and blocks once, so it measures the device's
    throughput, not the host's dispatch."""
    jax.block_until_ready(fn(*args))  # compile and warm up
    jax.block_until_ready(fn(*args))
    per_call = []
    for _ in range(trials):
        start = time.perf_counter()
        out = None
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(per_call)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One round of the search.

    Attributes:
      name: what it tunes (for the report).
      candidates: ``candidates(best)`` -> the op configs to try, given the best config
        so far (the heuristic's before the first stage).
      objective: :data:`FORWARD` or :data:`FORWARD_BACKWARD`, what is timed.
    """
    name: str
    candidates: Callable[[Any], Sequence[Any]]
    objective: str


@dataclasses.dataclass(frozen=True)
class Problem:
    """One op call to tune.

    Attributes:
      op: the op's name in the cache (``Choice.op``).
      key: the problem's key (the implementation's ``tuning_key``).
      run: ``run(config, *arrays)`` -> the op's outputs with that config.
      arrays: the inputs, random.
      wrt: positions in ``arrays`` the backward differentiates.
      heuristic: the op config the heuristics give (what the tuner must beat).
      stages: the rounds of the search, in order.
    """
    op: str
    key: str
    run: Callable[..., Any]
    arrays: tuple
    wrt: tuple[int, ...]
    heuristic: Any
    stages: tuple[Stage, ...]


@dataclasses.dataclass(frozen=True)
class Trial:
    """A candidate's outcome: ``ms`` None when it was rejected (``note`` says why)."""
    stage: str
    config: Any
    ms: float | None
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Result:
    """The tuner's answer: ``best`` (an op config), its time and the heuristic's, under
    ``objective`` (the last stage's), and every trial."""
    problem: Problem
    best: Any
    best_ms: float
    heuristic_ms: float
    objective: str
    trials: tuple[Trial, ...]


def _function(problem: Problem, config: Any, objective: str):
    """Jitted: the outputs, and with the backward also the gradients of ``<outputs,
    cotangent>`` with respect to ``problem.wrt``, for a fixed random cotangent
    (:func:`_cotangent`)."""
    def forward(*arrays):
        return problem.run(config, *arrays)

    if objective == FORWARD:
        return jax.jit(forward)

    def forward_backward(*arrays):
        def of_differentiated(*differentiated):
            full = list(arrays)
            for i, value in zip(problem.wrt, differentiated):
                full[i] = value
            return forward(*full)
        outs, vjp = jax.vjp(of_differentiated, *(arrays[i] for i in problem.wrt))
        return outs, vjp(_cotangent(outs))

    return jax.jit(forward_backward)


def _cotangent(outs):
    """A fixed standard-normal cotangent for each output. Not ones: a cotangent of ones
    has an exactly zero gradient wherever the outputs' sum does not depend on the inputs
    (a Sinkhorn projection's matrices each sum to n), and the candidates' rounding
    noise there is all a comparison would see."""
    leaves, tree = jax.tree.flatten(outs)
    keys = jax.random.split(jax.random.key(0), max(len(leaves), 1))
    return jax.tree.unflatten(tree, [jax.random.normal(k, leaf.shape, leaf.dtype)
                                     for k, leaf in zip(keys, leaves)])


@jax.jit
def _norms(a, b):
    """``(|a - b|, |b|)`` in float32 on the device, both divided by ``max|b|`` (no overflow
    of the squares; the ratio is unchanged)."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(b), initial=0.0), jnp.finfo(jnp.float32).tiny)
    return jnp.linalg.norm(((a - b) / scale).ravel()), jnp.linalg.norm((b / scale).ravel())


def relative_error(got, want) -> float:
    """Largest relative Frobenius-norm error over the arrays of two matching pytrees,
    computed where they are (float32 sums: accurate to about 1e-6 of the error, well
    within :data:`TOLERANCE`; a NaN or infinite result gives NaN or inf)."""
    errors = []
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        diff, ref = (float(v) for v in _norms(a, b))
        errors.append(diff / max(ref, float(np.finfo(np.float32).tiny)))
    return math.nan if any(map(math.isnan, errors)) else max(errors, default=0.0)


def _tolerance(results) -> float:
    return max(TOLERANCE.get(jnp.dtype(leaf.dtype).name, 1e-5)
               for leaf in jax.tree.leaves(results))


def _compile_all(problem: Problem, configs, objective: str, workers: int) -> dict:
    """``{config: its compiled function, or the exception compiling it raised}``, compiled
    on ``workers`` threads."""
    def compile_one(config):
        try:
            return _function(problem, config, objective).lower(*problem.arrays).compile()
        except Exception as failure:   # reported with the candidate
            return failure
    if workers <= 1 or len(configs) <= 1:
        return {config: compile_one(config) for config in configs}
    with ThreadPoolExecutor(min(workers, len(configs))) as pool:
        return dict(zip(configs, pool.map(compile_one, configs)))


def tune(problem: Problem, *, calls: int = 20, trials: int = 3,
         log: Callable[[str], None] = print, workers: int | None = None) -> Result:
    """Runs ``problem``'s stages and returns the fastest agreeing config (nothing recorded:
    see :func:`record`). ``workers``: threads compiling a stage's candidates (``None``:
    one per CPU core)."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    best, history = problem.heuristic, []
    best_ms = heuristic_ms = float("nan")
    for stage in problem.stages:
        reference_fn = _function(problem, problem.heuristic, stage.objective)
        reference = jax.block_until_ready(reference_fn(*problem.arrays))
        tolerance = _tolerance(reference)
        heuristic_ms = device_time_ms(reference_fn, *problem.arrays, calls=calls, trials=trials)
        best_ms = heuristic_ms if best == problem.heuristic else device_time_ms(
            _function(problem, best, stage.objective), *problem.arrays, calls=calls,
            trials=trials)
        log(f"{stage.name} ({stage.objective}): heuristic {heuristic_ms:.4f} ms, "
            f"start {best_ms:.4f} ms")
        configs = list(dict.fromkeys(stage.candidates(best)))
        compiled = _compile_all(problem, configs, stage.objective, workers)
        for config in configs:
            trial = _try(problem, config, compiled[config], stage, reference, tolerance,
                         calls, trials)
            history.append(trial)
            log(f"  {trial.ms if trial.ms is None else round(trial.ms, 4)} ms {trial.note} "
                f"{config}")
            if trial.ms is not None and trial.ms < best_ms:
                best, best_ms = config, trial.ms
    objective = problem.stages[-1].objective
    if best != problem.heuristic:
        best_ms, heuristic_ms = _confirm(problem, best, objective, calls, trials)
        log(f"again, taking turns: {best_ms:.4f} ms against the heuristic's "
            f"{heuristic_ms:.4f} ms")
        if best_ms >= heuristic_ms:   # a win within the noise, or stages that lose together
            best, best_ms = problem.heuristic, heuristic_ms
    return Result(problem, best, best_ms, heuristic_ms, objective, tuple(history))


def _confirm(problem, best, objective, calls, trials, rounds: int = 5):
    """Median times of ``best`` and the heuristic timed in turns (the first timing of a
    sweep and the machine's drift favour neither)."""
    fns = [_function(problem, config, objective) for config in (best, problem.heuristic)]
    times = [[], []]
    for _ in range(rounds):
        for fn, kept in zip(fns, times):
            kept.append(device_time_ms(fn, *problem.arrays, calls=calls, trials=trials))
    return statistics.median(times[0]), statistics.median(times[1])


def _try(problem, config, fn, stage, reference, tolerance, calls, trials) -> Trial:
    """``config``'s trial with ``fn``, its compiled function (an exception: compiled again
    here, alone)."""
    try:
        if isinstance(fn, Exception):
            fn = _function(problem, config, stage.objective)
        error = relative_error(jax.block_until_ready(fn(*problem.arrays)), reference)
        if not error <= tolerance:
            return Trial(stage.name, config, None, f"rejected: relative error {error:.2e} to "
                                                   f"the heuristic's > {tolerance:.0e}")
        return Trial(stage.name, config, device_time_ms(fn, *problem.arrays, calls=calls,
                                                        trials=trials), f"err {error:.1e}")
    except Exception as failure:   # a candidate that does not compile or run here
        return Trial(stage.name, config, None,
                     f"failed: {type(failure).__name__}: {str(failure)[:200]}")


def record(result: Result, path=None) -> Any:
    """Writes ``result.best`` to the cache file ``path`` (default: the user's) under this
    device's kind; returns the path."""
    return cache.record(result.problem.op, result.problem.key, result.best, path=path,
                        ms=round(result.best_ms, 5), heuristic_ms=round(result.heuristic_ms, 5),
                        objective=result.objective)
