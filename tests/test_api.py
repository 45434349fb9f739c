"""The public API as a whole: what every op's docstring and signature promise."""
import ast
import inspect
import pathlib
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bjax
from bjax import _op
from pallas_kernels import cascade as pallas_cascade
from pallas_kernels import sinkhorn as pallas_sinkhorn
from pallas_kernels import ssd as pallas_ssd
from pallas_kernels import ssd_backward as pallas_ssd_backward
from pallas_kernels.tiling import TileConfig
from tests.conftest import KERNEL_BACKEND, random

OPS = [getattr(bjax, name) for name in dir(bjax)
       if not name.startswith("_") and inspect.isfunction(getattr(bjax, name))]


@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_every_public_function_documents_what_it_raises(op):
    assert "Raises:" in (op.__doc__ or ""), op.__name__


@pytest.mark.parametrize("op", [f for f in OPS if "backend" in inspect.signature(f).parameters],
                         ids=lambda f: f.__name__)
def test_backend_is_typed_with_its_choices(op):
    assert typing.get_type_hints(op)["backend"] == _op.Backend
    assert typing.get_args(_op.BackendName) == _op.BACKENDS


# ---------------------------------------------------------------- implementation tables

def _refuse(desc):
    raise bjax.UnsupportedError("toy: refuses every call")


_TOY = (_op.Implementation("refusing", ("interpret",), kernel=lambda d: "none", check=_refuse),
        _op.Implementation("taking", ("interpret", "xla"), kernel=lambda d: "toy_kernel"))


def test_select_falls_through_to_the_next_candidate_and_says_why():
    choice = _op.select(_TOY, None, "interpret", op="toy")
    assert choice.implementation.name == "taking" and choice.backend == "interpret"
    assert choice.rejected == (("refusing", "toy: refuses every call"),)


def test_select_names_each_candidate_when_none_accepts():
    with pytest.raises(bjax.UnsupportedError, match="toy: refuses every call"):
        _op.select(_TOY[:1], None, "interpret", op="toy")
    with pytest.raises(bjax.UnsupportedError, match=r"refusing: runs on interpret, not "
                                                    r"backend='xla'"):
        _op.select(_TOY[:1], None, "xla", op="toy")


@pytest.mark.skipif(KERNEL_BACKEND == "pallas", reason="the automatic choice on a CPU")
def test_automatic_choice_without_a_gpu_passes_the_kernels_over():
    p = bjax.plan(bjax.swiglu, jax.ShapeDtypeStruct((4, 8), jnp.float32))
    assert (p.implementation, p.backend, p.block_config, p.config_source) == (
        "xla", "xla", None, None)
    assert p.rejected == (("pallas_triton", "gated_activation: compiled Pallas kernels need a "
                                            "CUDA GPU; the devices here are on ['cpu']"),)


def test_config_of_a_type_no_candidate_takes_is_invalid():
    with pytest.raises(bjax.InvalidProblemError,
                       match=r"swiglu|gated_activation: config must be TileConfig "
                             r"\(pallas_triton\), or None; got 3"):
        bjax.swiglu(jnp.ones((4, 8), jnp.float32), config=3)


def test_config_is_never_dropped_silently():
    """The XLA implementation takes no config: asking for both is an error, not a no-op."""
    with pytest.raises(bjax.UnsupportedError, match="config must be None for xla"):
        bjax.swiglu(jnp.ones((4, 8), jnp.float32), backend="xla", config=TileConfig(1, 128, 4))


@pytest.mark.parametrize("config, message", [
    (TileConfig(3, 128, 4), "config.block_rows must be a power of 2; got 3"),
    (TileConfig(1, 128, 64), "config.num_warps must be at most 32"),
    (TileConfig(1, 128.0, 4), "config.block_cols must be a Python int"),
])
def test_unlaunchable_config_is_invalid(config, message):
    with pytest.raises(bjax.InvalidProblemError, match=message):
        bjax.swiglu(jnp.ones((4, 8), jnp.float32), backend=KERNEL_BACKEND, config=config)


def test_ssd_config_must_divide_the_chunk_and_the_group():
    x, dt = jnp.ones((1, 16, 4, 8), jnp.float32), jnp.ones((1, 16, 4), jnp.float32)
    A, B = -jnp.ones((4,), jnp.float32), jnp.ones((1, 16, 1, 8), jnp.float32)
    bad = pallas_ssd_backward.ChunkScanConfig(forward=pallas_ssd.SsdConfig(
        block_q=16, block_t=16, block_s=16, block_p=16, block_h=8))
    with pytest.raises(bjax.InvalidProblemError,
                       match=r"config.forward.block_h must be a divisor of heads per group = 4"):
        bjax.ssd_chunk_scan(x, dt, A, B, B, chunk_size=16, backend=KERNEL_BACKEND, config=bad)


@pytest.mark.parametrize("which", ["forward", "backward"])
def test_ssd_pass_rows_are_a_power_of_2(which):
    x, dt = jnp.ones((1, 16, 4, 8), jnp.float32), jnp.ones((1, 16, 4), jnp.float32)
    A, B = -jnp.ones((4,), jnp.float32), jnp.ones((1, 16, 1, 8), jnp.float32)
    tiles = {"forward": pallas_ssd.SsdConfig(block_q=16, block_t=16, block_s=16, block_p=16,
                                             state_passing=True, block_pass=12),
             "backward": pallas_ssd_backward.SsdBackwardConfig(
                 block_q=16, block=16, block_p=16, block_h=1, state_passing=True,
                 block_pass=12)}
    bad = pallas_ssd_backward.ChunkScanConfig(**{which: tiles[which]})
    with pytest.raises(bjax.InvalidProblemError,
                       match=rf"config.{which}.block_pass must be a power of 2; got 12"):
        bjax.ssd_chunk_scan(x, dt, A, B, B, chunk_size=16, backend=KERNEL_BACKEND, config=bad)


@pytest.mark.parametrize("which", ["forward", "backward"])
@pytest.mark.parametrize("block_n, expected", [(8, "at least 16"), (48, "a power of 2")])
def test_ssd_state_blocks_are_launchable(block_n, expected, which):
    x, dt = jnp.ones((1, 16, 4, 8), jnp.float32), jnp.ones((1, 16, 4), jnp.float32)
    A, B = -jnp.ones((4,), jnp.float32), jnp.ones((1, 16, 1, 8), jnp.float32)
    tiles = {"forward": pallas_ssd.SsdConfig(block_q=16, block_t=16, block_s=16, block_p=16,
                                             block_n=block_n),
             "backward": pallas_ssd_backward.SsdBackwardConfig(
                 block_q=16, block=16, block_p=16, block_h=1, block_n=block_n)}
    bad = pallas_ssd_backward.ChunkScanConfig(**{which: tiles[which]})
    with pytest.raises(bjax.InvalidProblemError,
                       match=rf"config.{which}.block_n must be {expected}.*; got {block_n}"):
        bjax.ssd_chunk_scan(x, dt, A, B, B, chunk_size=16, backend=KERNEL_BACKEND, config=bad)


@pytest.mark.parametrize("switch", ["shared_scores", "state_passing", "constant_trip_count"])
def test_ssd_config_switches_are_bools(switch):
    """A switch of the backward's config given as anything but True or False (here 1, which
    would pass as a count) is refused, naming it."""
    x, dt = jnp.ones((1, 16, 4, 8), jnp.float32), jnp.ones((1, 16, 4), jnp.float32)
    A, B = -jnp.ones((4,), jnp.float32), jnp.ones((1, 16, 1, 8), jnp.float32)
    bad = pallas_ssd_backward.ChunkScanConfig(backward=pallas_ssd_backward.SsdBackwardConfig(
        block_q=16, block=16, block_p=16, block_h=2, source_block_h=2, **{switch: 1}))
    with pytest.raises(bjax.InvalidProblemError,
                       match=rf"config.backward.{switch} must be True or False; got 1"):
        bjax.ssd_chunk_scan(x, dt, A, B, B, chunk_size=16, backend=KERNEL_BACKEND, config=bad)


def test_ssd_step_config_covers_whole_programs_of_heads():
    """A program of 4 heads over 6 would leave heads 4 and 5 unwritten."""
    state = jnp.zeros((2, 6, 8, 16), jnp.float32)
    x, dt = jnp.ones((2, 6, 8), jnp.float32), jnp.ones((2, 6), jnp.float32)
    A, B = -jnp.ones((6,), jnp.float32), jnp.ones((2, 1, 16), jnp.float32)
    with pytest.raises(bjax.InvalidProblemError,
                       match=r"ssd_step: config.heads_per_program must be a divisor of "
                             r"heads = 6; got 4"):
        bjax.ssd_step(state, x, dt, A, B, B, backend=KERNEL_BACKEND,
                      config=pallas_ssd.StepConfig(8, heads_per_program=4))


def test_write_slice_per_row_config_is_one_row_high():
    """Each row of a 2-d view has its own position: a taller tile would mix them."""
    dest, source = jnp.zeros((16, 64), jnp.float32), jnp.ones((16, 20), jnp.float32)
    rows = jnp.arange(16, dtype=jnp.int32)
    with pytest.raises(bjax.InvalidProblemError,
                       match=r"write_slice: config.block_rows must be 1 \(per-row positions"
                             r".*; got 4"):
        bjax.write_slice(dest, source, (0, rows), backend=KERNEL_BACKEND,
                         config=TileConfig(4, 32, 4))


def _small_cases():
    """(op, args, kwargs, a config other than the heuristic) for every op that takes one."""
    x = random(0, (6, 40), jnp.float32)
    v, s = random(1, (5, 3, 2, 16), jnp.float32), random(2, (5, 3, 2), jnp.float32)
    dest, src = random(3, (4, 64, 8), jnp.float32), random(4, (4, 3, 8), jnp.float32)
    sx = random(5, (1, 24, 4, 8), jnp.float32)
    sdt = jax.nn.softplus(random(6, (1, 24, 4), jnp.float32))
    sa, sb = -jnp.arange(1.0, 5.0), random(7, (1, 24, 2, 16), jnp.float32)
    state = random(8, (1, 4, 8, 16), jnp.float32)
    logits = random(9, (5, 4, 4), jnp.float32)
    return [
        (bjax.swiglu, (x,), {}, TileConfig(2, 16, 1)),
        (bjax.merge_states, (v, s), {}, pallas_cascade.MergeConfig(TileConfig(2, 1, 2),
                                                                   TileConfig(1, 2, 1))),
        (bjax.write_slice, (dest, src, (0, 7, 0)), {}, TileConfig(1, 8, 1)),
        (bjax.ssd_chunk_scan, (sx, sdt, sa, sb, sb), {"chunk_size": 16},
         pallas_ssd_backward.ChunkScanConfig(
             pallas_ssd.SsdConfig(block_q=8, block_t=8, block_s=4, block_p=16, block_h=1),
             pallas_ssd_backward.SsdBackwardConfig(block_q=8, block=8, block_p=16,
                                                   block_h=1))),
        (bjax.ssd_step, (state, sx[:, 0], sdt[:, 0], sa, sb[:, 0], sb[:, 0]), {},
         pallas_ssd.StepConfig(block_p=2, heads_per_program=1, num_warps=2)),
        (bjax.sinkhorn_knopp, (logits,), {}, pallas_sinkhorn.SinkhornConfig(2, 1)),
    ]


@pytest.mark.parametrize("op, args, kwargs, config", _small_cases(),
                         ids=lambda v: getattr(v, "__name__", ""))
def test_caller_config_runs_the_same_function_and_is_reported(op, args, kwargs, config):
    plan = bjax.plan(op, *args, **kwargs, backend=KERNEL_BACKEND, config=config)
    assert plan.config_source == "explicit" and plan.block_config == config
    default_plan = bjax.plan(op, *args, **kwargs, backend=KERNEL_BACKEND)
    # Compiled, write_slice hands this small window to dynamic_update_slice unless configured.
    heuristic = "heuristic" if default_plan.block_config is not None else None
    assert default_plan.config_source == heuristic and default_plan.block_config != config
    assert op is bjax.write_slice or heuristic == "heuristic"
    run = jax.jit(lambda *a, config=None: op(*a, **kwargs, backend=KERNEL_BACKEND,
                                             config=config), static_argnames="config")
    ours, default = run(*args, config=config), run(*args)
    # Other tiles sum the same terms in another order: a few float32 ulp apart, ulp of the
    # terms' size (the largest output's), since an output can be a sum that nearly cancels.
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(default)):
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, rtol=2e-6, atol=2e-6 * np.abs(b).max())


# ---------------------------------------------------------------- one source of math

def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((_ROOT / "bjax" / "xla").glob("*.py")),
                         ids=lambda p: p.name)
def test_the_xla_implementation_takes_no_math_from_the_kernels(path):
    kernel_imports = [m for m in _imports(path) if m.startswith("pallas_kernels")
                      and not m.startswith("pallas_kernels.formulas")]
    assert kernel_imports == [], kernel_imports


@pytest.mark.parametrize("path", sorted((_ROOT / "pallas_kernels" / "formulas").glob("*.py")),
                         ids=lambda p: p.name)
def test_the_shared_formulas_hold_no_pallas(path):
    pallas = [m for m in _imports(path) if "pallas" in m and "formulas" not in m]
    assert pallas == [], pallas
