"""mhc_pre's Mosaic GPU implementation: its projection and phi-gradient kernels against
float64 (GPU), their lowering for CUDA (on any machine: layouts, wgmma shapes and shared
memory), its rules and config errors, and the op choosing it on a Hopper GPU."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bjax
from bjax import _op
from bjax.hyper_connection import _check_mosaic_pre_config, _mosaic_pre_rule
from pallas_kernels import hyper_connection as pallas_hc
from pallas_kernels import hyper_connection_mosaic as mosaic_hc
from tests import test_hyper_connection as layer
from tests.conftest import KERNEL_BACKEND, assert_close

ON_GPU = KERNEL_BACKEND == "pallas"
ON_HOPPER = ON_GPU and _op.cuda_compute_capability() == "9.0"
F32 = jnp.dtype(jnp.float32)


def _spread(space, count):
    picks = np.linspace(0, len(space) - 1, count).round().astype(int)
    return [space[i] for i in dict.fromkeys(picks)]


def _configs(rows, flat, width):
    """The heuristic, a spread of the search space, and its largest shared-memory user."""
    space = mosaic_hc.search_space(rows, flat, width)
    largest = max(space, key=lambda c: mosaic_hc.shared_memory_bytes(c, width))
    return list(dict.fromkeys([mosaic_hc.projection_config(rows, flat, width),
                               *_spread(space, 5),
                               largest]))


def _lower_for_cuda(x_shape, count, config):
    x = jax.ShapeDtypeStruct(x_shape, jnp.bfloat16)
    phi = jax.ShapeDtypeStruct((x_shape[1], count), jnp.float32)
    return jax.jit(lambda a, p: mosaic_hc.project(a, p, config=config)).trace(x, phi).lower(
        lowering_platforms=("cuda",))


# DeepSeek-V3's width (28672 = 4 x 7168) and rows that take 64-row blocks only (192).
LOWERED = [((8192, 28672), 24), ((192, 640), 24)]


@pytest.mark.parametrize("x_shape, count", LOWERED, ids=str)
def test_every_config_tried_lowers_for_cuda(x_shape, count):
    """Mosaic GPU checks a kernel's layouts, wgmma shapes and shared memory while
    lowering, which needs no GPU: the configs the heuristic and a sweep can choose lower."""
    width = pallas_hc.stacked_width(count)
    for config in _configs(*x_shape, width):
        _lower_for_cuda(x_shape, count, config)


def test_the_shared_memory_bound_is_the_compilers(monkeypatch):
    """A config refused for shared memory (4 stages of 64 x 128 tiles beside 64 x 128
    results) is one Mosaic GPU refuses too, and one stage fewer lowers."""
    over = mosaic_hc.MosaicProjectionConfig(64, 128, 4, 4)
    width = pallas_hc.stacked_width(24)
    assert [e[0] for e in mosaic_hc.config_errors(over, 8192, 28672, width)] == ["num_stages"]
    with pytest.raises(ValueError, match="num_stages must be few enough"):
        _lower_for_cuda((8192, 28672), 24, over)
    monkeypatch.setattr(mosaic_hc, "SHARED_MEMORY_BYTES", 10**9)
    with pytest.raises(Exception, match="exceeds available shared memory"):
        _lower_for_cuda((8192, 28672), 24, over)
    _lower_for_cuda((8192, 28672), 24, dataclasses.replace(over, num_stages=3))


def test_what_the_mosaic_projection_runs():
    assert mosaic_hc.unsupported(128, 256, 128, jnp.bfloat16) is None
    assert "bfloat16" in mosaic_hc.unsupported(128, 256, 128, jnp.float32)
    assert "multiples of 64" in mosaic_hc.unsupported(72, 256, 128, jnp.bfloat16)
    assert "at most 256" in mosaic_hc.unsupported(128, 256, 512, jnp.bfloat16)
    assert mosaic_hc.projection_config(8192, 28672, 128) == mosaic_hc.MosaicProjectionConfig(
        128, 64, 4, 4)
    assert mosaic_hc.projection_config(192, 640, 128).block_rows == 64


@pytest.mark.parametrize("rows", [64, 192, 256, 8192])
def test_the_heuristic_fits_every_case_the_kernel_takes(rows):
    """Up to 8 streams (256 stacked columns, where 2 stages of 128-row blocks no longer
    fit shared memory) and a flat row of one to hundreds of steps."""
    for n in range(1, 9):
        width = pallas_hc.stacked_width(n * n + 2 * n)
        for flat in (64, 4 * 160, 4 * 7168):
            assert mosaic_hc.unsupported(rows, flat, width, jnp.bfloat16) is None
            config = mosaic_hc.projection_config(rows, flat, width)
            assert mosaic_hc.config_errors(config, rows, flat, width) == [], (n, flat, config)


def _weight_grad_configs(rows, flat, width):
    """The phi gradient's heuristic, a spread of its search space, and its largest
    shared-memory user."""
    space = mosaic_hc.weight_grad_search_space(rows, flat, width)
    largest = max(space, key=lambda c: mosaic_hc.weight_grad_shared_memory_bytes(c, width))
    return list(dict.fromkeys([mosaic_hc.weight_grad_config(rows, flat, width),
                               *_spread(space, 5), largest]))


def _lower_weight_grad_for_cuda(x_shape, count, config):
    x = jax.ShapeDtypeStruct(x_shape, jnp.bfloat16)
    dproj = jax.ShapeDtypeStruct((x_shape[0], count), jnp.float32)
    return jax.jit(lambda a, d: mosaic_hc.project_weight_grad(a, d, config=config)).trace(
        x, dproj).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("x_shape, count", LOWERED + [((192, 640), 80)], ids=str)
def test_every_weight_grad_config_tried_lowers_for_cuda(x_shape, count):
    """As for the projection; 80 columns (n = 8) make the accumulator 256 rows."""
    width = pallas_hc.stacked_width(count)
    for config in _weight_grad_configs(*x_shape, width):
        _lower_weight_grad_for_cuda(x_shape, count, config)


def test_the_weight_grad_shared_memory_bound_is_the_compilers(monkeypatch):
    """3 stages of 128 x 128 tiles of x and of the pieces are over the bound for Mosaic GPU
    too; 2 stages lower."""
    over = mosaic_hc.MosaicWeightGradConfig(128, 128, 2, 3)
    width = pallas_hc.stacked_width(24)
    assert [e[0] for e in mosaic_hc.weight_grad_errors(over, 8192, 28672, width)] == [
        "num_stages"]
    with pytest.raises(ValueError, match="num_stages must be few enough"):
        _lower_weight_grad_for_cuda((8192, 28672), 24, over)
    monkeypatch.setattr(mosaic_hc, "SHARED_MEMORY_BYTES", 10**9)
    with pytest.raises(Exception, match="exceeds available shared memory"):
        _lower_weight_grad_for_cuda((8192, 28672), 24, over)
    _lower_weight_grad_for_cuda((8192, 28672), 24, dataclasses.replace(over, num_stages=2))


def test_the_weight_grad_heuristic():
    """The H200's fastest configs within MAX_SPAN at the benchmarked widths, and a config
    for every case the kernel takes (up to 8 streams, a few tokens to many)."""
    width = pallas_hc.stacked_width(24)
    assert mosaic_hc.weight_grad_config(8192, 28672, width) == (
        mosaic_hc.MosaicWeightGradConfig(128, 64, 2, 4))
    assert mosaic_hc.weight_grad_config(16384, 10240, width) == (
        mosaic_hc.MosaicWeightGradConfig(128, 64, 4, 4))
    for n in range(1, 9):
        width = pallas_hc.stacked_width(n * n + 2 * n)
        for rows in (64, 192, 7232, 16384):
            for flat in (64, 4 * 160, 4 * 7168):
                config = mosaic_hc.weight_grad_config(rows, flat, width)
                assert mosaic_hc.weight_grad_errors(config, rows, flat, width) == [], (
                    n, rows, flat, config)


def _descriptor(tokens=128, n=4, hidden=64, dtype=jnp.bfloat16, dynamic=True):
    x, bias, phi, alpha = layer.layer_problem(1, (tokens,), n, hidden, dtype, dynamic)
    return bjax.plan(bjax.mhc_pre, x, bias=bias, phi=phi, alpha=alpha, backend="xla").descriptor


@pytest.mark.parametrize("capability, change, reason", [
    ("9.0", {}, None),
    ("10.0", {}, "compute capability 10.0"),
    (None, {}, "compute capability None"),
    ("9.0", {"dynamic": False}, "phi must be given"),
    ("9.0", {"dtype": jnp.float16}, "got float16"),
    ("9.0", {"tokens": 72}, "got 72 and 256"),
])
def test_the_mosaic_implementation_says_why_it_steps_aside(monkeypatch, capability, change,
                                                           reason):
    monkeypatch.setattr(_op, "cuda_compute_capability", lambda: capability)
    desc = _descriptor(**change)
    if reason is None:
        _mosaic_pre_rule(desc)
        return
    with pytest.raises(bjax.UnsupportedError, match=reason):
        _mosaic_pre_rule(desc)


@pytest.mark.parametrize("config, message", [
    (mosaic_hc.MosaicPreConfig(mosaic_hc.MosaicProjectionConfig(block_rows=32)),
     r"config.projection.block_rows must be 64 or 128; got 32"),
    (mosaic_hc.MosaicPreConfig(mosaic_hc.MosaicProjectionConfig(splits=3)),
     r"config.projection.splits must be such that block_cols \* splits divides n C = 256; "
     r"got 3"),
    (mosaic_hc.MosaicPreConfig(mosaic_hc.MosaicProjectionConfig(64, 64, 1, 9)),
     r"config.projection.num_stages must be few enough for 232448 bytes"),
    (mosaic_hc.MosaicPreConfig(mosaic_hc.MosaicProjectionConfig(block_rows=128),
                               pallas_hc.PreConfig(projection=pallas_hc.ProjectionConfig(
                                   64, 64, 128, 1, 4, 3))),
     r"config.kernels.projection must be None \(config.projection configures"),
    (mosaic_hc.MosaicPreConfig(pallas_hc.ProjectionConfig(64, 64, 128, 1, 4, 3)),
     r"config.projection must be a MosaicProjectionConfig or None"),
    (mosaic_hc.MosaicPreConfig(kernels=pallas_hc.PreConfig(
        aggregate=pallas_hc.TileConfig(3, 64, 4))),
     r"config.kernels.aggregate.block_rows must be a power of 2; got 3"),
    (mosaic_hc.MosaicPreConfig(weight_grad=mosaic_hc.MosaicWeightGradConfig(block_cols=32)),
     r"config.weight_grad.block_cols must be 64 or 128; got 32"),
    (mosaic_hc.MosaicPreConfig(weight_grad=mosaic_hc.MosaicWeightGradConfig(splits=3)),
     r"config.weight_grad.splits must be such that block_tokens \* splits divides the "
     r"tokens, 128; got 3"),
    (mosaic_hc.MosaicPreConfig(kernels=pallas_hc.PreConfig(
        weight_grad=pallas_hc.TileConfig(64, 64, 4))),
     r"config.kernels.weight_grad must be None \(config.weight_grad configures"),
    (mosaic_hc.MosaicPreConfig(weight_grad=pallas_hc.TileConfig(64, 64, 4)),
     r"config.weight_grad must be a MosaicWeightGradConfig or None"),
], ids=["block_rows", "splits", "shared-memory", "triton-projection", "config-type",
        "triton-tile", "weight-grad-block", "weight-grad-splits", "triton-weight-grad",
        "weight-grad-type"])
def test_mosaic_config_errors_name_the_field(config, message):
    with pytest.raises(bjax.InvalidProblemError, match=message):
        _check_mosaic_pre_config(_descriptor(), config)


def test_a_split_longer_than_the_checked_span_is_an_error():
    """The span bounds the accumulated error (MAX_SPAN): n C = 8192 needs 2 splits."""
    config = mosaic_hc.MosaicPreConfig(mosaic_hc.MosaicProjectionConfig(128, 64, 1, 4))
    with pytest.raises(bjax.InvalidProblemError,
                       match=r"config.projection.splits must be at least 2 \(each split sums "
                             r"at most 7168 of n C = 8192 products\); got 1"):
        _check_mosaic_pre_config(_descriptor(hidden=2048), config)
    _check_mosaic_pre_config(_descriptor(hidden=2048), mosaic_hc.MosaicPreConfig(
        dataclasses.replace(config.projection, splits=2)))


def test_a_token_split_longer_than_the_checked_span_is_an_error():
    """The phi gradient's splits run over the tokens: 8192 tokens need 2."""
    config = mosaic_hc.MosaicPreConfig(weight_grad=mosaic_hc.MosaicWeightGradConfig(
        128, 64, 1, 4))
    with pytest.raises(bjax.InvalidProblemError,
                       match=r"config.weight_grad.splits must be at least 2 \(each split sums "
                             r"at most 7168 of the 8192 tokens' products\); got 1"):
        _check_mosaic_pre_config(_descriptor(tokens=8192), config)


def test_the_tuner_tunes_the_phi_gradient_of_the_winning_implementation():
    """The last stage offers the Mosaic phi gradient's configs after a Mosaic winner, the
    Triton kernel's tiles after a Triton one."""
    from bjax.tune import problems
    problem = problems.mhc_pre(128, 4, 64, backend="interpret")
    phi_stage = problem.stages[-1]
    mosaic = phi_stage.candidates(mosaic_hc.MosaicPreConfig())
    assert mosaic and {type(c.weight_grad) for c in mosaic} == {
        mosaic_hc.MosaicWeightGradConfig}
    triton = phi_stage.candidates(pallas_hc.PreConfig())
    assert triton and {type(c.weight_grad) for c in triton} == {pallas_hc.TileConfig}


def test_a_mosaic_config_needs_the_gpu_it_runs_on():
    """Anywhere but a Hopper GPU (here: the interpreter) no candidate takes it."""
    x, bias, phi, alpha = layer.layer_problem(1, (128,), 4, 64, jnp.bfloat16, True)
    with pytest.raises(bjax.UnsupportedError, match="takes PreConfig"):
        bjax.mhc_pre(x, bias=bias, phi=phi, alpha=alpha, backend="interpret",
                     config=mosaic_hc.MosaicPreConfig())


def _oracle_projection(x, phi):
    x64, phi64 = (np.asarray(a.astype(jnp.float32), np.float64) for a in (x, phi))
    return x64 @ phi64, np.sum(x64 * x64, axis=1)


def _assert_projection(got, want):
    # float32-exact products summed in float32 over n C terms: a few ulp of float32.
    assert_close(got[0], want[0], jnp.float32, layer.SCALE[F32])
    assert_close(got[1], want[1], jnp.float32)


@pytest.mark.skipif(not ON_HOPPER, reason="Mosaic GPU kernel (wgmma): a Hopper GPU")
@pytest.mark.parametrize("rows, n, hidden", [(256, 4, 64), (192, 4, 160), (128, 8, 48)],
                         ids=str)
def test_projection_configs_match_oracle(rows, n, hidden):
    """Stacked widths of 128 (n = 4) and 256 (n = 8: the heuristic's 128-row blocks fit
    shared memory with 1 stage only, so it takes 64), 64- and 128-row blocks."""
    count = n * n + 2 * n
    x = layer.normal(40, (rows, n * hidden), jnp.bfloat16)
    phi = layer.normal(41, (n * hidden, count), std=0.05)
    want = _oracle_projection(x, phi)
    for config in _configs(rows, n * hidden, pallas_hc.stacked_width(count)):
        _assert_projection(mosaic_hc.project(x, phi, config=config), want)


@pytest.mark.skipif(not ON_HOPPER, reason="Mosaic GPU kernel (wgmma): a Hopper GPU")
def test_projection_at_benchmarked_widths():
    """The layer's benchmarked widths (hundreds of pipeline steps a program), twice: a
    pipelined kernel can sum rows wrong from run to run."""
    for shape in layer.cases.MHC_LAYER_SHAPES:
        x, phi, _, _ = layer.cases.mhc_layer_inputs(shape)
        x_flat = x.reshape(shape[0], -1)
        want = _oracle_projection(x_flat, phi)
        for _ in range(2):
            _assert_projection(mosaic_hc.project(x_flat, phi), want)


@pytest.mark.skipif(not ON_GPU, reason="compiled kernels")
def test_rows_the_mosaic_kernel_cannot_take_run_the_triton_kernel():
    """As a shard of 72 tokens would (a whole call of 576 is a multiple of 64)."""
    x = layer.normal(42, (72, 256), jnp.bfloat16)
    phi = layer.normal(43, (256, 24), std=0.05)
    for got, want in zip(mosaic_hc.project(x, phi), pallas_hc.project(x, phi)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _oracle_weight_grad(x, dproj):
    x64, d64 = (np.asarray(a.astype(jnp.float32), np.float64) for a in (x, dproj))
    return x64.T @ d64


@pytest.mark.skipif(not ON_HOPPER, reason="Mosaic GPU kernel (wgmma): a Hopper GPU")
@pytest.mark.parametrize("rows, n, hidden", [(256, 4, 64), (192, 4, 160), (128, 8, 48),
                                             (1024, 1, 64)], ids=str)
def test_weight_grad_configs_match_oracle(rows, n, hidden):
    """Stacked widths of 16 (padded to one wgmma M, 64), 128 and 256, token splits of one
    step to several."""
    count = n * n + 2 * n
    x = layer.normal(44, (rows, n * hidden), jnp.bfloat16)
    dproj = layer.normal(45, (rows, count))
    want = _oracle_weight_grad(x, dproj)
    for config in _weight_grad_configs(rows, n * hidden, pallas_hc.stacked_width(count)):
        # float32-exact products summed in float32 over the tokens: a few ulp of float32.
        assert_close(mosaic_hc.project_weight_grad(x, dproj, config=config), want,
                     jnp.float32, layer.SCALE[F32])


@pytest.mark.skipif(not ON_HOPPER, reason="Mosaic GPU kernel (wgmma): a Hopper GPU")
def test_weight_grad_at_benchmarked_widths():
    """Thousands of tokens a split (the span MAX_SPAN bounds), twice."""
    for shape in layer.cases.MHC_LAYER_SHAPES:
        x, phi, _, _ = layer.cases.mhc_layer_inputs(shape)
        x_flat = x.reshape(shape[0], -1)
        dproj = layer.normal(46, (shape[0], phi.shape[1]))
        want = _oracle_weight_grad(x_flat, dproj)
        for _ in range(2):
            assert_close(mosaic_hc.project_weight_grad(x_flat, dproj), want, jnp.float32,
                         layer.SCALE[F32])


@pytest.mark.skipif(not ON_GPU, reason="compiled kernels")
def test_tokens_the_mosaic_weight_grad_cannot_take_run_the_triton_kernel():
    x = layer.normal(47, (72, 256), jnp.bfloat16)
    dproj = layer.normal(48, (72, 24))
    np.testing.assert_array_equal(np.asarray(mosaic_hc.project_weight_grad(x, dproj)),
                                  np.asarray(pallas_hc.project_weight_grad(x, dproj)))


@pytest.mark.skipif(not ON_HOPPER, reason="Mosaic GPU kernel (wgmma): a Hopper GPU")
@pytest.mark.parametrize("config", [None, mosaic_hc.MosaicPreConfig(
    mosaic_hc.MosaicProjectionConfig(64, 64, 2, 3),
    pallas_hc.PreConfig(aggregate=pallas_hc.TileConfig(2, 64, 4)),
    mosaic_hc.MosaicWeightGradConfig(64, 64, 2, 3))], ids=["heuristic", "given"])
def test_mhc_pre_runs_the_mosaic_projection_on_hopper(config):
    """The layer with dynamic H through the Mosaic implementation: every output and
    gradient against float64 (128 tokens of 4 streams of 64 channels, bfloat16)."""
    x, bias, phi, alpha = layer.layer_problem(6, (2, 64), 4, 64, jnp.bfloat16, True)
    plan = bjax.plan(bjax.mhc_pre, x, bias=bias, phi=phi, alpha=alpha, config=config)
    assert plan.implementation == "pallas_mosaic"
    assert plan.config_source == ("heuristic" if config is None else "explicit")
    outs = jax.jit(lambda *a: layer.run_layer(*a, "pallas", pre_config=config))(
        x, bias, phi, alpha)
    for name, out, ref in zip(("x_next", "layer_input", "h_post", "h_res"), outs,
                              layer.oracle_layer(x, bias, phi, alpha)):
        out_dtype = jnp.bfloat16 if name in ("x_next", "layer_input") else jnp.float32
        assert_close(out, ref, out_dtype, layer.SCALE[jnp.dtype(out_dtype)]
                     * (2 if name == "x_next" else 1))
    mine, ref = layer.layer_gradients(x, bias, phi, alpha, "pallas", pre_config=config)
    for name, g, r in zip(("x", "bias", "phi", "alpha", "x_post"), mine, ref):
        layer.assert_grad_close(g, r, layer.GRAD_RTOL[jnp.dtype(jnp.bfloat16)], name)


@pytest.mark.skipif(not ON_HOPPER, reason="Mosaic GPU kernel (wgmma): a Hopper GPU")
def test_the_tuner_weighs_both_implementations_and_the_entry_picks_one(tmp_path,
                                                                       monkeypatch):
    """`bjax.tune mhc_pre` offers the Triton and the Mosaic projections in one stage from
    the Mosaic heuristic; a recorded Triton config makes mhc_pre run the Triton
    implementation for that problem, a Mosaic one the Mosaic implementation."""
    from bjax.tune import cache, problems
    monkeypatch.setenv(cache.CACHE_ENV_VAR, str(tmp_path / "tuning.json"))
    problem = problems.mhc_pre(128, 4, 64)
    assert isinstance(problem.heuristic, mosaic_hc.MosaicPreConfig)
    kinds = {type(c) for c in problem.stages[0].candidates(problem.heuristic)}
    assert kinds == {pallas_hc.PreConfig, mosaic_hc.MosaicPreConfig}
    x, phi, alpha, bias = problem.arrays
    for entry, implementation in (
            (dataclasses.replace(problem.heuristic.kernels,
                                 projection=pallas_hc.ProjectionConfig(64, 64, 128, 2, 4, 2)),
             "pallas_triton"),
            (dataclasses.replace(problem.heuristic, projection=mosaic_hc.MosaicProjectionConfig(
                64, 64, 2, 3)), "pallas_mosaic")):
        cache.record("mhc_pre", problem.key, entry)
        plan = bjax.plan(bjax.mhc_pre, x, bias=bias, phi=phi, alpha=alpha)
        assert (plan.implementation, plan.config_source, plan.block_config) == (
            implementation, "cache", entry)
