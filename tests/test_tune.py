"""Tuned configs (bjax.tune): the cache, where a call's config comes from, the tuner's
checks, and the search spaces' candidates against the float64 oracles."""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bjax
from bjax import _op
from bjax.hyper_connection import sinkhorn_tuning_key
from bjax.tune import __main__ as cli
from bjax.tune import cache, problems, tuner
from pallas_kernels import cascade as pallas_cascade
from pallas_kernels import conv as pallas_conv
from pallas_kernels import gated as pallas_gated
from pallas_kernels import hyper_connection as pallas_hc
from pallas_kernels import sinkhorn as pallas_sinkhorn
from pallas_kernels import ssd as pallas_ssd
from pallas_kernels import ssd_backward as pallas_ssd_backward
from pallas_kernels import state_passing
from pallas_kernels import write_slice as pallas_write_slice
from tests import oracles, test_cascade, test_conv, test_hyper_connection, test_ssd
from tests.conftest import KERNEL_BACKEND, assert_close, random


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    monkeypatch.setenv(cache.CACHE_ENV_VAR, str(path))
    return path


def _spread(space, count):
    """``count`` candidates spread over ``space`` (its first and last included)."""
    picks = np.linspace(0, len(space) - 1, count).round().astype(int)
    return [space[i] for i in dict.fromkeys(picks)]


def _all_on_gpu(space, count):
    """Every candidate of a small search space on the GPU (a compiled kernel can be
    wrong at one launch config alone: the H200 ran Sinkhorn wrong at 16 matrices and 8
    warps, right at its neighbours); ``count`` spread over it in the interpreter."""
    return list(space) if KERNEL_BACKEND == "pallas" else _spread(space, count)


def test_configs_round_trip_through_json():
    nested = pallas_ssd_backward.ChunkScanConfig(
        pallas_ssd.SsdConfig(block_q=64, block_t=32, block_s=32, block_p=16, block_h=2),
        None)
    for config in (nested, pallas_conv.ConvConfig(block_d=256, piece_len=32),
                   pallas_gated.TileConfig(4, 256, 8)):
        data = json.loads(json.dumps(cache.config_to_json(config)))
        assert cache.config_from_json(data) == config
    with pytest.raises(bjax.TuningCacheError, match="not in pallas_kernels"):
        cache.config_from_json({"type": "os:system", "fields": {}})
    with pytest.raises(bjax.TuningCacheError, match=r"TileConfig.*fields \['block_rows'\]"):
        cache.config_from_json({"type": "pallas_kernels.tiling:TileConfig",
                                "fields": {"block_rows": 1}})
    with pytest.raises(TypeError, match="not a pallas_kernels config"):
        cache.config_to_json({"block_rows": 1})


def test_the_user_cache_comes_first_and_entries_are_replaced(user_cache, tmp_path):
    key = cache.problem_key(rows=3, cols=4)
    assert cache.problem_key(cols=4, rows=3) == key == "cols=4,rows=3"
    assert cache.lookup("gated_activation", key) is None
    first, second = pallas_gated.TileConfig(1, 128, 4), pallas_gated.TileConfig(2, 128, 8)
    cache.record("gated_activation", key, first)
    assert cache.lookup("gated_activation", key) == first
    assert cache.lookup("gated_activation", key, device="another kind") is None
    cache.record("gated_activation", key, second, ms=0.5)
    assert cache.lookup("gated_activation", key) == second
    stored = json.loads(user_cache.read_text())
    entry = stored["entries"][cache.device_kind()]["gated_activation"][key]
    assert stored["format"] == cache.FORMAT and entry["ms"] == 0.5 and entry["jax"]
    user_cache.write_text(json.dumps({"format": 99, "entries": {}}))
    with pytest.raises(bjax.TuningCacheError, match="format 99"):
        cache.lookup("gated_activation", key)
    user_cache.write_text("{not json")
    with pytest.raises(bjax.TuningCacheError, match="tuning.json: not a tuning cache"):
        cache.lookup("gated_activation", key)
    # At trace time, from the op that reads it.
    with pytest.raises(bjax.TuningCacheError, match="not a tuning cache"):
        jax.jit(lambda x: bjax.swiglu(x, backend=KERNEL_BACKEND)).trace(
            jax.ShapeDtypeStruct((3, 8), jnp.float32))


def test_shipped_entries_are_valid_configs():
    files = sorted(cache.SHIPPED.glob("*.json"))
    for path in files:
        entries = json.loads(path.read_text())["entries"]
        for device, ops in entries.items():
            for op, by_key in ops.items():
                for key, entry in by_key.items():
                    config = cache.config_from_json(entry["config"])
                    assert entry["ms"] <= entry["heuristic_ms"], (device, op, key)
                    assert config is not None


def _swiglu_key(x):
    desc = bjax.plan(bjax.swiglu, x, backend="xla").descriptor
    return bjax.gated.tuning_key(desc)


def test_plan_reports_explicit_cache_and_heuristic(user_cache):
    x = random(0, (6, 40), jnp.float32)
    heuristic = bjax.plan(bjax.swiglu, x, backend=KERNEL_BACKEND)
    assert heuristic.config_source == "heuristic"
    tuned = pallas_gated.TileConfig(2, 8, 4)
    cache.record("gated_activation", _swiglu_key(x), tuned)
    from_cache = bjax.plan(bjax.swiglu, x, backend=KERNEL_BACKEND)
    assert (from_cache.config_source, from_cache.block_config) == ("cache", tuned)
    explicit = pallas_gated.TileConfig(1, 16, 4)
    given = bjax.plan(bjax.swiglu, x, backend=KERNEL_BACKEND, config=explicit)
    assert (given.config_source, given.block_config) == ("explicit", explicit)
    other = bjax.plan(bjax.swiglu, random(0, (6, 42), jnp.float32), backend=KERNEL_BACKEND)
    assert other.config_source == "heuristic"       # an entry matches one problem only
    assert bjax.plan(bjax.swiglu, x, backend="xla").config_source is None
    y = bjax.swiglu(x, backend=KERNEL_BACKEND)
    assert_close(y, oracles.gated_activation(np.asarray(x, np.float64), "swiglu"), x.dtype)


def test_a_cache_entry_that_cannot_run_is_an_error_naming_it(user_cache):
    x = random(0, (6, 40), jnp.float32)
    cache.record("gated_activation", _swiglu_key(x), pallas_gated.TileConfig(3, 8, 4))
    where = f"tuning cache entry gated_activation / .*rows=6 on {re.escape(repr(cache.device_kind()))}"
    with pytest.raises(bjax.InvalidProblemError,
                       match=f"gated_activation: {where} must be a config that runs this call"):
        bjax.swiglu(x, backend=KERNEL_BACKEND)
    cache.record("gated_activation", _swiglu_key(x), pallas_conv.ConvConfig())
    with pytest.raises(bjax.InvalidProblemError, match="must be a TileConfig; got ConvConfig"):
        bjax.plan(bjax.swiglu, x, backend=KERNEL_BACKEND)


def _two_tuned_candidates():
    """A table of two tuned candidates that run anywhere, keyed by the descriptor."""
    def candidate(name, config_type):
        return _op.Implementation(name, ("xla",), kernel=lambda desc: name,
                                  config_type=config_type, tuning_key=lambda desc: desc)
    return (candidate("first", pallas_gated.TileConfig), candidate("second", pallas_conv.ConvConfig))


def test_a_tuned_entry_picks_the_candidate_whose_config_it_is(user_cache):
    """Where an op has several tuned candidates, the entry's config type says which the
    tuner found fastest: the candidates before it step aside, for that problem only."""
    table = _two_tuned_candidates()
    assert _op.select(table, "rows=8", op="toy").implementation.name == "first"
    tuned = pallas_conv.ConvConfig(block_d=128)
    cache.record("toy", "rows=8", tuned)
    choice = _op.select(table, "rows=8", op="toy")
    assert choice.implementation.name == "second"
    assert choice.rejected == (("first", "the tuned entry for this problem is second's"),)
    assert choice.given_config("rows=8") == (tuned, "cache")
    assert _op.select(table, "rows=9", op="toy").implementation.name == "first"
    # A caller's config is the caller's choice, whatever the cache says.
    given = pallas_gated.TileConfig(1, 128, 4)
    assert _op.select(table, "rows=8", None, given, op="toy").implementation.name == "first"
    # A shard's entry of the other candidate's type is not this candidate's to run.
    first = _op.select(table, "rows=9", op="toy")
    assert first.given_config("rows=8") == (None, None)
    cache.record("toy", "rows=8", pallas_sinkhorn.SinkhornConfig(16, 2))
    with pytest.raises(bjax.InvalidProblemError,
                       match="must be a TileConfig or ConvConfig; got"):
        _op.select(table, "rows=9", op="toy")


def test_merge_state_reads_its_tuned_entry_and_rejects_one_that_cannot_run(user_cache):
    v, s = test_cascade.states(28, 9, 2, 3, 8, jnp.float32, spread=3.0)
    args = test_cascade.pair(v, s)
    key = bjax.cascade.tuning_key(bjax.plan(bjax.merge_state, *args, backend="xla").descriptor)
    tuned = pallas_cascade.MergeConfig(pallas_cascade.TileConfig(2, 1, 4), None)
    cache.record("merge_state", key, tuned)
    plan = bjax.plan(bjax.merge_state, *args, backend=KERNEL_BACKEND)
    assert (plan.config_source, plan.block_config) == ("cache", tuned)
    for got, ref in zip(bjax.merge_state(*args, backend=KERNEL_BACKEND),
                        test_cascade.reference(v, s, 2)):
        assert_close(got, ref, jnp.float32)
    cache.record("merge_state", key, pallas_cascade.MergeConfig(pallas_cascade.TileConfig(3, 1, 4)))
    with pytest.raises(bjax.InvalidProblemError, match="merge_state: tuning cache entry "
                       "merge_state / .* must be a config that runs this call"):
        bjax.merge_state(*args, backend=KERNEL_BACKEND)
    cache.record("merge_state", key, pallas_conv.ConvConfig())
    with pytest.raises(bjax.InvalidProblemError, match="must be a MergeConfig; got ConvConfig"):
        bjax.plan(bjax.merge_state, *args, backend=KERNEL_BACKEND)


def test_the_tuner_rejects_a_candidate_whose_results_differ():
    """A toy problem whose 'config' scales the output: 1.0 is the heuristic, 1.0 + 1e-7
    is within float32's tolerance, 1.5 changes the results and must not be chosen."""
    x = jnp.linspace(1.0, 2.0, 64, dtype=jnp.float32)
    stage = tuner.Stage("scale", lambda best: [1.5, 1.0 + 1e-7], tuner.FORWARD_BACKWARD)
    problem = tuner.Problem("toy", "n=64", lambda scale, x: x * scale, (x,), (0,), 1.0, (stage,))
    result = tuner.tune(problem, calls=1, trials=1, log=lambda line: None)
    by_config = {trial.config: trial for trial in result.trials}
    assert by_config[1.5].ms is None and "rejected" in by_config[1.5].note
    assert by_config[1.0 + 1e-7].ms is not None
    assert result.best in (1.0, 1.0 + 1e-7)


def _toy_problem():
    """A toy problem whose 'config' scales the output; "nan" poisons one entry, "raise"
    fails to trace (as a candidate that does not compile)."""
    def run(scale, x):
        if scale == "raise":
            raise ValueError("no such tile")
        if scale == "nan":
            return x.at[3].set(jnp.nan)
        return x * scale
    x = jnp.linspace(1.0, 2.0, 64, dtype=jnp.float32)
    stage = tuner.Stage("scale", lambda best: ["nan", "raise", 1.5, 1.0 + 1e-7], tuner.FORWARD)
    return tuner.Problem("toy", "n=64", run, (x,), (0,), 1.0, (stage,))


@pytest.mark.parametrize("workers", [1, 4])
def test_the_tuner_rejects_nan_and_reports_failures_on_any_number_of_threads(workers):
    """One NaN among 64 outputs is rejected (not hidden by the other arrays' errors), a
    candidate that fails is reported, and compiling on threads changes neither."""
    result = tuner.tune(_toy_problem(), calls=1, trials=1, log=lambda line: None,
                        workers=workers)
    by_config = {trial.config: trial for trial in result.trials}
    assert by_config["nan"].ms is None and "relative error nan" in by_config["nan"].note
    assert by_config["raise"].ms is None
    assert "failed: ValueError: no such tile" in by_config["raise"].note
    assert by_config[1.5].ms is None and by_config[1.0 + 1e-7].ms is not None


def test_the_tuner_compares_gradients_that_depend_on_the_inputs():
    """Sinkhorn's matrices each sum to n, so a cotangent of ones has a zero gradient and
    the tuner would compare two candidates' rounding noise (it once rejected a correct
    config with a relative error of 1.16 that way). The tuner's cotangent gives a
    gradient as large as the XLA implementation's for a random cotangent."""
    problem = problems.sinkhorn_knopp(8, 4, backend="xla")
    _, (grad,) = tuner._function(problem, None, tuner.FORWARD_BACKWARD)(*problem.arrays)
    logits = problem.arrays[0]
    _, vjp = jax.vjp(lambda l: bjax.sinkhorn_knopp(l, backend="xla"), logits)
    ones_grad, = vjp(jnp.ones_like(logits))
    assert float(jnp.linalg.norm(ones_grad)) < 1e-5 * float(jnp.linalg.norm(grad))
    assert float(jnp.linalg.norm(grad)) > 1e-2 * float(jnp.linalg.norm(logits))


def test_relative_error_is_the_worst_arrays_and_nan_wins():
    ones = jnp.ones((4, 8), jnp.float32)
    assert tuner.relative_error((ones, ones * 1.001), (ones, ones)) == pytest.approx(1e-3,
                                                                                     rel=1e-4)
    assert np.isnan(tuner.relative_error((ones.at[0, 0].set(jnp.nan), ones * 1.001),
                                         (ones, ones)))
    huge = jnp.full((8,), 2.0**100, jnp.float32)   # squares overflow float32 unscaled
    assert tuner.relative_error(huge * (1 + 2**-20), huge) == pytest.approx(2**-20, rel=1e-3)
    assert tuner.relative_error(jnp.ones(3), jnp.zeros(3)) == np.inf


def test_the_command_tunes_and_the_op_then_runs_the_entry(tmp_path, user_cache, capsys):
    written = tmp_path / "written.json"
    result = cli.main(["swiglu", "--shape", "4,48", "--dtype", "float32", "--calls", "1",
                       "--trials", "1", "--workers", "2", "--backend", KERNEL_BACKEND,
                       "--cache", str(written)])
    assert "recorded in" in capsys.readouterr().out
    assert all(trial.ms is not None for trial in result.trials)
    assert not user_cache.exists()
    user_cache.write_text(written.read_text())
    plan = bjax.plan(bjax.swiglu, jax.ShapeDtypeStruct((4, 48), jnp.float32),
                     backend=KERNEL_BACKEND)
    assert (plan.config_source, plan.block_config) == ("cache", result.best)


def test_the_command_shows_the_entries(user_cache, capsys):
    cache.record("gated_activation", "cols=4,rows=3", pallas_gated.TileConfig(1, 128, 4),
                 ms=0.5, heuristic_ms=0.6, objective=tuner.FORWARD_BACKWARD)
    cli.main(["show"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == (f"{user_cache}: gated_activation / cols=4,rows=3: 0.5 ms (heuristic "
                        f"0.6 ms, forward+backward): TileConfig(block_rows=1, block_cols=128, "
                        f"num_warps=4)")
    cli.main(["show", "--device", "NVIDIA H200"])
    shipped = capsys.readouterr().out
    assert "ssd_chunk_scan / batch=2" in shipped and str(cache.SHIPPED) in shipped


def test_the_command_builds_each_op():
    conv = cli.problem_of(cli._parser().parse_args(
        ["causal_conv1d", "--shape", "2,9,5", "--taps", "3", "--activation", "none"]))
    assert conv.op == "causal_conv1d" and "activation=None" in conv.key and "taps=3" in conv.key
    ssd = cli.problem_of(cli._parser().parse_args(
        ["ssd_chunk_scan", "--batch", "1", "--seqlen", "8", "--heads", "4", "--head-dim", "8",
         "--state", "16", "--groups", "2", "--chunk", "64", "--d", "hp", "--z"]))
    assert ssd.op == "ssd_chunk_scan" and "d=hp" in ssd.key and "z=True" in ssd.key
    assert [stage.objective for stage in ssd.stages] == [tuner.FORWARD, tuner.FORWARD,
                                                         tuner.FORWARD_BACKWARD,
                                                         tuner.FORWARD_BACKWARD]
    for argv, op in ((["merge_state"], "merge_state"), (["merge_states", "--states", "3"],
                                                        "merge_states")):
        merge = cli.problem_of(cli._parser().parse_args(
            argv + ["--seq-len", "9", "--heads", "2", "--head-dim", "8"]))
        assert merge.op == op and f"num_states={3 if op == 'merge_states' else 2}" in merge.key
    pre = cli.problem_of(cli._parser().parse_args(
        ["mhc_pre", "--tokens", "6", "--streams", "3", "--hidden", "50"]))
    assert pre.op == "mhc_pre" and "dynamic=True" in pre.key and len(pre.stages) == 5
    post = cli.problem_of(cli._parser().parse_args(
        ["mhc_post", "--tokens", "6", "--streams", "3", "--hidden", "50", "--transpose-res"]))
    assert post.op == "mhc_post" and "transpose_res=True" in post.key and "n=3" in post.key
    assert [stage.objective for stage in post.stages] == [tuner.FORWARD, tuner.FORWARD_BACKWARD]
    step = cli.problem_of(cli._parser().parse_args(
        ["ssd_step", "--batch", "2", "--heads", "4", "--head-dim", "8", "--state", "16",
         "--d", "none", "--z"]))
    assert step.op == "ssd_step" and "d=None" in step.key and "z=True" in step.key
    conv_step = cli.problem_of(cli._parser().parse_args(
        ["causal_conv1d_step", "--batch", "2", "--channels", "40", "--taps", "3"]))
    assert conv_step.op == "causal_conv1d_step" and "taps=3" in conv_step.key
    write = cli.problem_of(cli._parser().parse_args(
        ["write_slice", "--dest", "4,64,300", "--window", "3,40,200", "--start", "1,5,30",
         "--traced", "1", "--backend", "interpret"]))
    assert write.op == "write_slice" and "starts=1/scalar/30" in write.key
    sinkhorn = cli.problem_of(cli._parser().parse_args(
        ["sinkhorn_knopp", "--count", "9", "--n", "4", "--order", "rows_first"]))
    assert sinkhorn.op == "sinkhorn_knopp" and "order=rows_first" in sinkhorn.key
    assert [len(p.stages) for p in (step, conv_step, write, sinkhorn)] == [1, 1, 1, 1]


def test_the_command_refuses_a_window_the_kernel_does_not_write(capsys):
    with pytest.raises(SystemExit):
        cli.main(["write_slice", "--dest", "4,64,300", "--window", "1,2,3", "--start", "0,0,0",
                  "--backend", "pallas"])
    assert "runs 'dus', not the kernel: nothing to tune" in capsys.readouterr().err


# Candidates of every declared search space against the float64 oracles, at the ops'
# own test tolerances: a config changes blocks and summation order, never the result.

@pytest.mark.parametrize("config", _all_on_gpu(pallas_ssd.step_search_space(4, 24, 64), 4),
                         ids=str)
def test_ssd_step_candidates_match_the_oracle(config):
    x, dt, A, B, C = test_ssd.problem(31, 2, 1, 4, 24, 2, 64, jnp.float32)
    kwargs = test_ssd.features(32, x, 64, ("D2", "z", "dt", "init"))
    state, z = kwargs.pop("initial_states"), kwargs.pop("z")
    y, new_state = bjax.ssd_step(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], z=z[:, 0],
                                 backend=KERNEL_BACKEND, config=config, **kwargs)
    ref_y, ref_state = oracles.ssd_scan(x, dt, A, B, C, z=z, initial_states=state, **kwargs)
    # As tests/test_ssd's step: float32 math throughout.
    assert_close(y, ref_y[:, 0], jnp.float32, 5.0)
    assert_close(new_state, ref_state, jnp.float32, 5.0)


@pytest.mark.parametrize("config", _all_on_gpu(pallas_conv.step_search_space(300), 4), ids=str)
def test_conv_step_candidates_match_the_oracle(config):
    args = test_conv.problem(33, 3, 4, 300, 4, jnp.float32)
    state, x = args["x"][:, 1:], args["x"][:, 0]
    y, new_state = bjax.causal_conv1d_step(state, x, args["weight"], args["bias"],
                                           activation="silu", backend=KERNEL_BACKEND,
                                           config=config)
    window = np.concatenate([np.asarray(state, np.float64),
                             np.asarray(x, np.float64)[:, None]], axis=1)
    ref_y = oracles.causal_conv1d(window, np.asarray(args["weight"], np.float64),
                                  np.asarray(args["bias"], np.float64), activation="silu")
    assert_close(y, ref_y[:, -1], jnp.float32)
    np.testing.assert_array_equal(np.asarray(new_state, np.float64), window[:, 1:])


def _write_candidates():
    view = bjax.WriteSliceDescriptor((4, 64, 300), (3, 40, 200), jnp.dtype(jnp.bfloat16),
                                     (1, "scalar", 30)).kernel_view()
    return _all_on_gpu(pallas_write_slice.search_space(view.window_shape, False), 4)


@pytest.mark.parametrize("config", _write_candidates(), ids=str)
def test_write_slice_candidates_write_the_window_bit_for_bit(config):
    dest = random(34, (4, 64, 300), jnp.bfloat16)
    source = random(35, (3, 40, 200), jnp.bfloat16)
    out = jax.jit(lambda d, s, p: bjax.write_slice(d, s, (1, p, 30), backend=KERNEL_BACKEND,
                                                  config=config))(dest, source, jnp.int32(5))
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(
        oracles.write_slice(dest, source, (1, 5, 30)), np.float32))


def _sinkhorn_candidates():
    """37 matrices (a partial last program) and 64 (whole programs: no mask at n = 4); on
    the GPU also mHC's 16384 (where the tuner found a config wrong)."""
    counts = (37, 64) + ((16384,) if KERNEL_BACKEND == "pallas" else ())
    return [(count, config) for count in counts
            for config in _all_on_gpu(pallas_sinkhorn.search_space(count, 4), 4)]


@pytest.mark.parametrize("count, config", _sinkhorn_candidates(), ids=str)
def test_sinkhorn_candidates_match_the_oracle(count, config):
    logits = random(36, (count, 4, 4), jnp.float32, 1.5)
    cotangent = random(37, (count, 4, 4), jnp.float32)
    out, vjp = jax.vjp(lambda l: bjax.sinkhorn_knopp(l, iters=12, backend=KERNEL_BACKEND,
                                                     config=config), logits)
    logits64 = jnp.asarray(logits, jnp.float64)
    ref, ref_vjp = jax.vjp(lambda l: oracles.sinkhorn(l, 12, 1e-5), logits64)
    # As tests/test_hyper_connection's Sinkhorn: 12 float32 normalisations, 8 ulp.
    assert_close(out, ref, jnp.float32, 8.0)
    test_hyper_connection.assert_grad_close(vjp(cotangent)[0], ref_vjp(
        jnp.asarray(cotangent, jnp.float64))[0], 2e-5, "dlogits")


@pytest.mark.parametrize("config", _spread(pallas_gated.search_space(5, 300), 3), ids=str)
def test_gated_candidates_match_the_oracle(config):
    x = random(3, (5, 600), jnp.bfloat16)
    fn = lambda x: bjax.swiglu(x, backend=KERNEL_BACKEND, config=config)  # noqa: E731
    y, vjp = jax.vjp(fn, x)
    dy = random(4, y.shape, jnp.bfloat16)
    x64, dy64 = (np.asarray(v, np.float64) for v in (x, dy))
    assert_close(y, oracles.gated_activation(x64, "swiglu"), jnp.bfloat16)
    # As tests/test_gated: dx multiplies three rounded factors.
    assert_close(vjp(dy)[0], oracles.gated_activation_grad(x64, dy64, "swiglu"), jnp.bfloat16,
                 scale=2.0)


@pytest.mark.parametrize("config", _spread(pallas_conv.search_space(2, 70, 300), 3), ids=str)
def test_conv_candidates_match_the_oracle(config):
    args = test_conv.problem(21, 2, 70, 300, 4, jnp.float32, initial_states=True, seq_idx=True)
    test_conv.check_forward(args, KERNEL_BACKEND, config=config)
    for name, error in test_conv.gradient_errors(args, KERNEL_BACKEND, config=config).items():
        assert error <= test_conv.GRAD_BOUND[jnp.dtype(jnp.float32)], (name, error)


def _merge_candidates():
    return list(zip(_spread(pallas_cascade.search_space(37, 5, 24), 3),
                    _spread(pallas_cascade.search_space(37, 5, 24, backward=True), 3)[::-1]))


@pytest.mark.parametrize("forward, backward", _merge_candidates(), ids=str)
def test_merge_candidates_match_the_oracle(forward, backward):
    config = pallas_cascade.MergeConfig(forward, backward)
    v, s = test_cascade.states(25, 37, 3, 5, 24, jnp.float32, spread=3.0)
    dv = random(26, (37, 5, 24), jnp.float32)
    ds = random(27, (37, 5), jnp.float32)
    for count, merge in ((3, bjax.merge_states), (2, lambda v, s, **kw: bjax.merge_state(
            *test_cascade.pair(v, s), **kw))):
        out, vjp = jax.vjp(lambda v, s: merge(v, s, backend=KERNEL_BACKEND, config=config),
                           v[:, :count], s[:, :count])
        want = test_cascade.reference(v[:, :count], s[:, :count], 2)
        for got, ref in zip(out, want):
            assert_close(got, ref, jnp.float32)
        grads = vjp((dv, ds))
        ref_dv, ref_ds = test_cascade._grad_reference(v[:, :count], s[:, :count], dv, ds, 2)
        # As tests/test_cascade: the backward's dot products over head_dim, 4x for ds.
        assert_close(grads[0], ref_dv, jnp.float32)
        assert_close(grads[1], ref_ds, jnp.float32, scale=4)


def _mhc_pre_candidates():
    tokens, n, hidden = 15, 4, 48
    width = pallas_hc.stacked_width(n * n + 2 * n)
    spaces = (pallas_hc.projection_search_space(tokens, n * hidden, width, jnp.float32),
              pallas_hc.stream_search_space(tokens, n, hidden),
              pallas_hc.stream_search_space(tokens, n, hidden)[::-1],
              pallas_hc.input_grad_search_space(tokens, hidden),
              pallas_hc.weight_grad_search_space())
    return [pallas_hc.PreConfig(*fields) for fields in zip(*(_spread(s, 3) for s in spaces))]


@pytest.mark.parametrize("config", _mhc_pre_candidates(), ids=str)
def test_mhc_pre_candidates_match_the_oracle(config):
    test_hyper_connection.check_mhc_pre(KERNEL_BACKEND, config)


def _mhc_post_candidates():
    return list(zip(_spread(pallas_hc.mix_search_space(6, 3, 50), 3),
                    _spread(pallas_hc.mix_search_space(6, 3, 50, backward=True), 3)[::-1]))


@pytest.mark.parametrize("forward, backward", _mhc_post_candidates(), ids=str)
def test_mhc_post_candidates_match_the_oracle(forward, backward):
    test_hyper_connection.check_mhc_post(KERNEL_BACKEND, pallas_hc.MixConfig(forward, backward))


def _ssd_candidates():
    """Tiles spread over both search spaces, and the chunk-states stages' passing
    variants (each block of pass rows, forward and backward together)."""
    args = (64, 8, 16, 2, jnp.float32)
    passed = zip(*(state_passing.passing_variants(kernels.default_config(*args))[1:]
                   for kernels in (pallas_ssd, pallas_ssd_backward)))
    return list(zip(_spread(pallas_ssd.search_space(*args), 2),
                    _spread(pallas_ssd_backward.search_space(*args), 2)[::-1])) + list(passed)


@pytest.mark.parametrize("forward, backward", _ssd_candidates(), ids=str)
def test_ssd_candidates_match_the_oracle(forward, backward):
    config = pallas_ssd_backward.ChunkScanConfig(forward, backward)
    x, dt, A, B, C = test_ssd.problem(23, 1, 2 * 64 + 9, 4, 8, 2, 16, jnp.float32)
    kwargs = test_ssd.features(24, x, 16, ("D", "dt"))
    test_ssd.check(x, dt, A, B, C, KERNEL_BACKEND, chunk_size=64, config=config, **kwargs)
    test_ssd.check_gradients(x, dt, A, B, C, KERNEL_BACKEND,
                             test_ssd.GRAD_BOUND[jnp.dtype(jnp.float32)], chunk_size=64,
                             config=config, **kwargs)


def _decode_and_sinkhorn_problems():
    """(problem, plan of the same call without a config) for the ops tuned in one stage
    at decode shapes, write_slice and Sinkhorn."""
    step = problems.ssd_step(2, 4, 24, 64, 2, "float32", d_shape="hp", z=True,
                             backend=KERNEL_BACKEND)
    state, x, dt, A, B, C, dt_bias, D, z = step.arrays
    conv = problems.causal_conv1d_step(3, 200, 4, "float32", activation=None,
                                       backend=KERNEL_BACKEND)
    # A window over write_slice's 1 MiB: smaller ones run lax.dynamic_update_slice.
    write = problems.write_slice((4, 128, 1000), (3, 100, 900), (1, 5, 30), "float32",
                                 traced=(1,), backend=KERNEL_BACKEND)
    dest, source, position = write.arrays
    sinkhorn = problems.sinkhorn_knopp(37, 4, "float32", iters=7, init="softmax",
                                       order="deepseek", backend=KERNEL_BACKEND)
    return [
        (step, lambda: bjax.plan(bjax.ssd_step, state, x, dt, A, B, C, D=D, z=z,
                                 dt_bias=dt_bias, dt_softplus=True, backend=KERNEL_BACKEND)),
        (conv, lambda: bjax.plan(bjax.causal_conv1d_step, *conv.arrays,
                                 backend=KERNEL_BACKEND)),
        (write, lambda: bjax.plan(bjax.write_slice, dest, source, (1, position, 30),
                                  backend=KERNEL_BACKEND)),
        (sinkhorn, lambda: bjax.plan(bjax.sinkhorn_knopp, *sinkhorn.arrays, iters=7,
                                     init="softmax", order="deepseek", backend=KERNEL_BACKEND)),
    ]


def test_decode_write_and_sinkhorn_problems_reach_their_ops(user_cache):
    """Each problem's entry is the one a plain call of that op reads, and its heuristic
    is the call's."""
    for problem, plan in _decode_and_sinkhorn_problems():
        assert plan().block_config == problem.heuristic, problem.op
        candidates = problem.stages[0].candidates(problem.heuristic)
        tuned = next(c for c in candidates[::-1] if c != problem.heuristic)
        cache.record(problem.op, problem.key, tuned)
        assert (plan().config_source, plan().block_config) == ("cache", tuned), problem.op


def test_mhc_pre_sinkhorn_reads_sinkhorn_knopps_entry(user_cache):
    """mhc_pre's Sinkhorn, left to the heuristic by its config, reads sinkhorn_knopp's
    entry for its matrices: one that cannot run is an error naming it."""
    x, bias, phi, alpha = test_hyper_connection.layer_problem(61, (6,), 4, 16, jnp.float32,
                                                              dynamic=True)
    key = sinkhorn_tuning_key(bjax.plan(bjax.sinkhorn_knopp, jax.ShapeDtypeStruct(
        (6, 4, 4), jnp.float32), backend="xla").descriptor)
    cache.record("sinkhorn_knopp", key, pallas_sinkhorn.SinkhornConfig(3, 4))
    with pytest.raises(bjax.InvalidProblemError, match=r"tuning cache entry sinkhorn_knopp / "
                       r"count=6,.* must be a config that runs this call"):
        bjax.mhc_pre(x, bias=bias, phi=phi, alpha=alpha, backend=KERNEL_BACKEND)


def test_ssd_problem_tunes_around_the_heuristics_chunk_states():
    """At a long sequence of few heads the tuner starts from the heuristic's passed-along
    forward states and passed-back state gradients (their tiles vary around them); the
    chunk-states stages try the walk and each block of pass rows."""
    problem = problems.ssd_chunk_scan(1, 32 * 16, 2, 8, 16, chunk_size=16, dtype="float32",
                                      backend=KERNEL_BACKEND)
    heuristic = problem.heuristic
    assert heuristic.forward.state_passing and heuristic.backward.state_passing
    assert all(c.forward.state_passing for c in problem.stages[0].candidates(heuristic))
    assert all(c.backward.state_passing for c in problem.stages[2].candidates(heuristic))
    passes = [(True, rows) for rows in state_passing.PASS_BLOCKS]
    forward = problem.stages[1].candidates(heuristic)
    assert [(c.forward.state_passing, c.forward.block_pass) for c in forward] == [
        (False, heuristic.forward.block_pass)] + passes
    backward = problem.stages[3].candidates(heuristic)
    assert [(c.backward.state_passing, c.backward.block_pass) for c in backward] == [
        (False, heuristic.backward.block_pass)] + passes


def test_ssd_chunk_states_stages_try_state_blocks():
    """Both chunk-states stages (the forward's states, the backward's state gradients) try
    every walk or pass variant in each block of state columns that fits the state: 32
    and the whole padded 64 at state 40."""
    problem = problems.ssd_chunk_scan(1, 32 * 16, 2, 8, 40, chunk_size=16, dtype="float32",
                                      backend=KERNEL_BACKEND)
    heuristic = problem.heuristic
    for stage, name in ((1, "forward"), (3, "backward")):
        config = getattr(heuristic, name)
        assert config.block_n == 64
        variants = [(False, config.block_pass)] + [(True, rows)
                                                   for rows in state_passing.PASS_BLOCKS]
        tried = [getattr(c, name) for c in problem.stages[stage].candidates(heuristic)]
        assert [(c.state_passing, c.block_pass, c.block_n) for c in tried] == [
            (passing, rows, width) for passing, rows in variants for width in (32, 64)], name


def test_problems_match_their_ops_keys():
    """The tuner's problems carry the keys the ops look up."""
    problem = problems.gated("geglu", (3, 8), "float32", backend=KERNEL_BACKEND)
    x = problem.arrays[0]
    desc = bjax.plan(bjax.geglu, x, backend="xla").descriptor
    assert problem.key == bjax.gated.tuning_key(desc) and problem.op == "gated_activation"
    conv = problems.causal_conv1d((2, 9, 5), 3, "float32", activation=None)
    assert conv.heuristic == pallas_conv.default_config(2, 9, 5)
