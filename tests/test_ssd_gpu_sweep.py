"""GPU regression sweep of the SSD kernels: awkward head_dim and state_dim, every dtype and
every launch configuration ``default_config`` can select, forward and every gradient.

Compiled kernels only: on the CPU the interpreter runs the very same kernel code, which
tests/test_ssd.py covers at small sizes; what this sweep guards is what the GPU compiler
makes of it (it computed wrong rows of dB at head_dim 80, state_dim 130 in float32, with
no trace in the interpreter; BENCHMARKS.md, SSD notes).
"""
import jax.numpy as jnp
import pytest

from pallas_kernels import ssd as pallas_ssd
from pallas_kernels import ssd_backward as pallas_ssd_backward
from tests.conftest import KERNEL_BACKEND
from tests.test_ssd import (DTYPES, GRAD_BOUND, check, gradient_errors, problem,
                            state_passing_config)

gpu_only = pytest.mark.skipif(KERNEL_BACKEND != "pallas", reason="compiled kernels need a CUDA GPU")

SIZES = (80, 96, 100, 130, 200, 256)
# Each size once as head_dim and once as state_dim, never paired with itself.
DIMS = list(zip(SIZES, SIZES[3:] + SIZES[:3]))
# (heads, groups): heads per group odd (one head per program, block_h 1) or even (two).
LAYOUTS = {"odd_group": (3, 1), "even_group": (4, 2)}
# chunk 32: one block per chunk, 32-step pieces; chunk 128: two 64-step blocks per
# chunk, 128-step pieces (the settings every larger chunk shares).
CHUNKS = (32, 128)
CASES = [(p, n, layout, chunk) for p, n in DIMS for layout in LAYOUTS for chunk in CHUNKS]
# head_dim 128 takes whole-head_dim blocks of one head on 4 warps in bfloat16.
CASES += [(128, 100, layout, chunk) for layout in LAYOUTS for chunk in CHUNKS]


def _ids(case):
    p, n, layout, chunk = case
    return f"p{p}-n{n}-{layout}-chunk{chunk}"


def _problem(case, dtype, seed):
    p, n, layout, chunk = case
    heads, groups = LAYOUTS[layout]
    return problem(seed, 1, 2 * chunk + 5, heads, p, groups, n, dtype), chunk


def _default_configs(kernels) -> list:
    """``kernels.default_config`` (the forward's or the backward's module) at every case and
    dtype of the sweep."""
    return [kernels.default_config(c, p, n, h // g, dtype)
            for p, n, layout, c in CASES for h, g in [LAYOUTS[layout]] for dtype in DTYPES]


def test_sweep_covers_every_configuration():
    forward, backward = _default_configs(pallas_ssd), _default_configs(pallas_ssd_backward)
    # 64-step pieces: float32 with a state padded to 256; constant trip counts: float32.
    assert {(cfg.block_h, cfg.block_q, cfg.constant_trip_count) for cfg in forward} == {
        (h, q, f32) for h in (1, 2) for q in (32, 128) for f32 in (False, True)
    } | {(h, 64, True) for h in (1, 2)}
    assert {(cfg.block_h, cfg.block, cfg.block_q, cfg.constant_trip_count)
            for cfg in backward} == {
        (h, b, q, f32) for h in (1, 2) for b, q in ((32, 32), (64, 128)) for f32 in (False, True)
    } | {(h, 64, 64, True) for h in (1, 2)}
    assert {(cfg.block_p, cfg.scan_warps) for cfg in forward} == {(64, 8), (128, 4)}
    # The backward's warps: 8 with one head a program for 16-bit states padded past 128.
    assert {(cfg.block_h, cfg.num_warps) for cfg in backward} == {(1, 4), (2, 4), (1, 8)}


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_forward(case, dtype):
    (x, dt, A, B, C), chunk = _problem(case, dtype, 70)
    check(x, dt, A, B, C, "pallas", chunk_size=chunk, D=jnp.ones((x.shape[2],), jnp.float32))


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_gradients(case, dtype):
    _check_gradients(case, dtype)


def _check_gradients(case, dtype, config=None):
    (x, dt, A, B, C), chunk = _problem(case, dtype, 71)
    args = (x, dt, A, B, C)
    kwargs = {"chunk_size": chunk, "D": jnp.ones((x.shape[2],), jnp.float32)}
    bounds = dict.fromkeys(("x", "dt", "A", "B", "C", "D"), GRAD_BOUND[jnp.dtype(dtype)])
    if jnp.dtype(dtype) == jnp.float32:
        # The kernels form dA from row sums minus column sums of the decay-weighted score
        # gradient, reverse-cumsummed per chunk: pairs of steps on the same side of a
        # position cancel there, which autodiff of the XLA backend's einsums never forms.
        # At head_dim 100, state_dim 256, one head per group, chunk 32: XLA backend 3.8e-6,
        # the same kernels interpreted on CPU 1.4e-5, on the H200 2.4e-5 (every other
        # gradient: under 5e-7). dA alone is held to 5e-5 in float32.
        bounds["A"] = 5e-5
    else:
        # dA sums dt' * (gradient of a) over every step of a head, terms that largely cancel,
        # so its 16-bit rounding error grows with the cancellation: 2.5e-2 for the XLA
        # backend itself at head_dim 100, state_dim 256 in bfloat16 (every other gradient:
        # under 4e-3). dA is held to twice the XLA backend's error on the same inputs.
        xla_error = gradient_errors(*args, "xla", **kwargs)["A"]
        bounds["A"] = max(bounds["A"], 2 * xla_error)
    for name, error in gradient_errors(*args, "pallas", config=config, **kwargs).items():
        assert error <= bounds[name], (name, error, bounds[name])


# Chunk states computed per chunk and passed along, at the one-block chunks: the local
# kernels' grids and the pass kernel's 16-row blocks over every head_dim of the sweep.
@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", [c for c in CASES if c[3] == 32], ids=_ids)
def test_state_passing(case, dtype):
    p, n, layout, chunk = case
    heads, groups = LAYOUTS[layout]
    config = state_passing_config(chunk, p, n, heads // groups, dtype, block_pass=16)
    (x, dt, A, B, C), _ = _problem(case, dtype, 70)
    check(x, dt, A, B, C, "pallas", chunk_size=chunk, config=config,
          D=jnp.ones((x.shape[2],), jnp.float32))
    _check_gradients(case, dtype, config)
