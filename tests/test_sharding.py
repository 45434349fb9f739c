"""Ops inside sharded programs: partitioned along their independent axes, never gathered.

On eight devices, or on two (tests/conftest.py forces eight CPU devices where there is
no GPU, two with BJAX_TEST_DEVICES=2; with fewer devices these tests skip): the meshes
are written for eight, and :func:`mesh_of` shrinks their first axis to the devices
there, so (8,) becomes (2,) and (4, 2) becomes (1, 2). The kernels run compiled on a GPU
and through the interpreter elsewhere. For each case the compiled program is read for
collectives, the output's sharding is compared with the one the op's rule gives,
and the values with the unsharded call's, forward and backward (a ``vjp`` with a
cotangent sharded like the output, so that no reduction is needed).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import bjax
from benchmarks import harness
from bjax.hyper_connection import sinkhorn_tuning_key
from bjax.tune import cache as tune_cache
from pallas_kernels import cascade as pallas_cascade
from pallas_kernels import sinkhorn as pallas_sinkhorn
from pallas_kernels import ssd as pallas_ssd
from pallas_kernels import ssd_backward as pallas_ssd_backward
from pallas_kernels.tiling import TileConfig
from tests.conftest import FAST_COMPILE, KERNEL_BACKEND, random, uniform

DEVICES = 8 if len(jax.devices()) >= 8 else 2
pytestmark = pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 or 8 devices")

GATHERS = ("all-gather", "all-to-all", "collective-permute")
BACKENDS = (KERNEL_BACKEND, "xla")


def mesh_of(shape):
    """A mesh of ``shape`` (written for 8 devices) on :data:`DEVICES` devices: the first
    axis shrinks to fit."""
    shape = (shape[0] * DEVICES // int(np.prod(shape)),) + tuple(shape[1:])
    names = ("data", "model")[: len(shape)]
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape),
                         devices=jax.devices()[:DEVICES])


def collectives(compiled_text: str, names=GATHERS + ("all-reduce",)) -> dict:
    """``{kind: count}`` of the collectives of ``names`` in compiled HLO text."""
    return {kind: count for kind, (count, _) in harness.collectives(compiled_text).items()
            if kind in names}


def sharded_as(array, mesh, spec) -> bool:
    """``array`` is laid out over ``mesh`` as ``spec`` says (equivalent shardings: an axis
    of one device, as "data" in (1, 2), drops from the spec JAX reports)."""
    return array.sharding.is_equivalent_to(NamedSharding(mesh, spec), array.ndim)


def normalized(spec, rank):
    entries = tuple(spec) + (None,) * (rank - len(spec))
    return entries


def cotangent_like(y):
    """A cotangent with distinct entries, sharded like ``y``."""
    values = 0.5 + jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape) / y.size
    return jax.device_put(values.astype(y.dtype), y.sharding)


def run_sharded(fn, args, specs, mesh):
    """``fn(*args)`` with ``args`` sharded by ``specs``, and its vjp for a cotangent sharded
    like the output: ``(outputs, gradients, cotangents, forward program, backward program)``."""
    sharded = [jax.device_put(a, NamedSharding(mesh, spec)) for a, spec in zip(args, specs)]
    forward = jax.jit(fn)
    outputs = forward(*sharded)
    cotangents = jax.tree.map(cotangent_like, outputs)
    backward = jax.jit(lambda args, c: jax.vjp(fn, *args)[1](c))
    grads = backward(sharded, cotangents)
    return (outputs, grads, cotangents, forward.lower(*sharded).compile().as_text(),
            backward.lower(sharded, cotangents).compile().as_text())


def check_partitioned(fn, args, specs, mesh, out_specs, exact=True, reduced_grads=(),
                      tolerance=1e-6):
    """No collective in either program; outputs sharded by ``out_specs`` and gradients like
    their arguments; values equal to the unsharded call's (``exact``: bit for bit, as the
    kernels run the same code on every row; else within ``tolerance`` of each array's
    largest entry, as XLA fuses, contracts and sums the sharded program differently)."""
    outputs, grads, cotangents, forward, backward = run_sharded(fn, args, specs, mesh)
    # Only gradients of parameters (``reduced_grads``: argument indices) may be summed over
    # the devices that split the batch.
    allowed = {"all-reduce"} if reduced_grads else set()
    assert collectives(forward) == {}, collectives(forward)
    assert set(collectives(backward)) <= allowed, collectives(backward)
    for out, spec in zip(jax.tree.leaves(outputs), out_specs):
        assert sharded_as(out, mesh, spec), (out.sharding, spec)
    for grad, spec in zip(grads, specs):
        assert sharded_as(grad, mesh, spec), (grad.sharding, spec)
    def value_and_grads(args, cotangents):
        value, vjp = jax.vjp(fn, *args)
        return value, vjp(cotangents)
    reference, reference_grads = jax.jit(value_and_grads)(
        args, jax.tree.map(np.asarray, cotangents))
    for out, ref in zip(jax.tree.leaves((outputs, grads)), jax.tree.leaves((reference,
                                                                          reference_grads))):
        if exact:
            np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
        else:
            ref = np.asarray(ref)
            np.testing.assert_allclose(np.asarray(out), ref, rtol=0,
                                       atol=tolerance * max(np.abs(ref).max(), 1e-30))


# (shape, axis, spec, mesh): every axis but the split one sharded, on 1-d and 2-d meshes.
GATED_CASES = [
    ((16, 12, 64), -1, P("data"), (8,)),
    ((16, 12, 64), -1, P("data", "model"), (4, 2)),
    ((64, 16, 8), 0, P(None, "data", "model"), (4, 2)),
    ((8, 32, 16), 1, P(("data", "model"), None, None), (4, 2)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", GATED_CASES, ids=lambda c: f"{c[0]}-axis{c[1]}-{c[2]}")
def test_gated_keeps_its_sharding(case, backend):
    shape, axis, spec, mesh_shape = case
    x = random(0, shape, jnp.float32, scale=1.0)
    check_partitioned(lambda x: bjax.swiglu(x, axis=axis, backend=backend), (x,), (spec,),
                      mesh_of(mesh_shape), (spec,), exact=backend != "xla")


def test_gated_split_axis_is_gathered(backend=KERNEL_BACKEND):
    """The kernels' documented rule: the split axis is never divided (each device needs
    both halves of its rows), so a caller's sharding of it is gathered, and the result is
    replicated along it. (The XLA backend is partitioned by XLA, its own way.)"""
    mesh = mesh_of((4, 2))
    x = random(1, (16, 64), jnp.float32, scale=1.0)

    def fn(x):
        return bjax.swiglu(x, backend=backend)

    (y, _, _, forward, _) = run_sharded(fn, (x,), (P("data", "model"),), mesh)
    assert "all-gather" in collectives(forward)
    assert sharded_as(y, mesh, P("data", None))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(fn(x)))


def test_a_tuned_config_is_read_for_each_shard(tmp_path, monkeypatch, backend=KERNEL_BACKEND):
    """A tuning cache entry (bjax.tune) for the problem each device holds: the sharded call
    runs it with no collective, sharded like its input, equal to the unsharded call. An
    entry of the wrong type under that shard's key is then an error: the lookup is made for
    the shard's problem, not the whole one."""
    monkeypatch.setenv(tune_cache.CACHE_ENV_VAR, str(tmp_path / "tuning.json"))
    x = random(3, (16, 12, 64), jnp.float32, scale=1.0)
    shard = bjax.plan(bjax.swiglu, x[:16 // DEVICES], backend="xla").descriptor
    tune_cache.record("gated_activation", bjax.gated.tuning_key(shard), TileConfig(2, 16, 1))
    check_partitioned(lambda x: bjax.swiglu(x, backend=backend), (x,), (P("data"),),
                      mesh_of((8,)), (P("data"),))
    tune_cache.record("gated_activation", bjax.gated.tuning_key(shard), pallas_cascade.MergeConfig())
    sharded = jax.device_put(x, NamedSharding(mesh_of((8,)), P("data")))
    with pytest.raises(bjax.InvalidProblemError, match="tuning cache entry gated_activation / "
                       f".*rows={16 // DEVICES * 12}.*must be a TileConfig"):
        jax.jit(lambda x: bjax.swiglu(x, backend=backend))(sharded)


def merge_problem(seed, v_shape, s_shape):
    return (random((seed, 0), v_shape, jnp.float32, scale=1.0),
            4 * random((seed, 1), s_shape, jnp.float32, scale=1.0))


# (state spec, mesh): steps, heads, and both.
MERGE_CASES = [(P("data"), (8,)), (P(None, "data"), (8,)), (P("data", "model"), (4, 2))]


def state_spec(spec):
    return P(*normalized(spec, 3)[:2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("spec, mesh_shape", MERGE_CASES, ids=str)
def test_merge_state_keeps_its_sharding(spec, mesh_shape, masked, backend):
    v_a, s_a = merge_problem(2, (16, 8, 32), (16, 8))
    v_b, s_b = merge_problem(3, (16, 8, 32), (16, 8))
    mask = (jnp.arange(16) % 3 != 1) if masked else None   # a constant: sliced, not moved
    # The kernels: bit for bit. XLA's implementation, and the interpreted masked kernel
    # under XLA's older CPU fusion emitters (FAST_COMPILE, `make test`), compile the
    # shard's program differently from the whole one's: 1 ulp off in a few elements.
    exact = backend != "xla" and not (masked and FAST_COMPILE)
    check_partitioned(lambda *a: bjax.merge_state(*a, mask=mask, backend=backend),
                      (v_a, s_a, v_b, s_b), (spec, state_spec(spec)) * 2, mesh_of(mesh_shape),
                      (spec, state_spec(spec)), exact=exact)


def test_merge_state_reads_a_tuned_config_for_each_shard(tmp_path, monkeypatch,
                                                        backend=KERNEL_BACKEND):
    """As test_a_tuned_config_is_read_for_each_shard, for the merge: the entry of each
    device's steps runs with no collective, bit for bit the unsharded call's."""
    monkeypatch.setenv(tune_cache.CACHE_ENV_VAR, str(tmp_path / "tuning.json"))
    args = (*merge_problem(2, (16, 8, 32), (16, 8)), *merge_problem(3, (16, 8, 32), (16, 8)))
    shard = bjax.plan(bjax.merge_state, *(a[:16 // DEVICES] for a in args),
                      backend="xla").descriptor
    tuned = pallas_cascade.MergeConfig(TileConfig(1, 4, 4), TileConfig(2, 2, 4))
    tune_cache.record("merge_state", bjax.cascade.tuning_key(shard), tuned)
    spec = P("data")
    check_partitioned(lambda *a: bjax.merge_state(*a, backend=backend), args,
                      (spec, state_spec(spec)) * 2, mesh_of((8,)), (spec, state_spec(spec)))
    tune_cache.record("merge_state", bjax.cascade.tuning_key(shard), TileConfig(1, 4, 4))
    sharded = [jax.device_put(a, NamedSharding(mesh_of((8,)), s))
               for a, s in zip(args, (spec, state_spec(spec)) * 2)]
    with pytest.raises(bjax.InvalidProblemError, match="tuning cache entry merge_state / "
                       f".*seq_len={16 // DEVICES}.*must be a MergeConfig"):
        jax.jit(lambda *a: bjax.merge_state(*a, backend=backend))(*sharded)


def test_sinkhorn_reads_a_tuned_config_for_each_shard(tmp_path, monkeypatch,
                                                     backend=KERNEL_BACKEND):
    """As test_a_tuned_config_is_read_for_each_shard, for sinkhorn_knopp: the entry of each
    device's matrices runs with no collective, bit for bit the unsharded call's; one
    that cannot run under that shard's key is an error naming it."""
    monkeypatch.setenv(tune_cache.CACHE_ENV_VAR, str(tmp_path / "tuning.json"))
    logits = random(5, (40, 4, 4), jnp.float32, scale=1.0)
    key = sinkhorn_tuning_key(bjax.plan(bjax.sinkhorn_knopp, logits[:40 // DEVICES],
                                        backend="xla").descriptor)
    tune_cache.record("sinkhorn_knopp", key, pallas_sinkhorn.SinkhornConfig(2, 1))
    check_partitioned(lambda m: bjax.sinkhorn_knopp(m, backend=backend), (logits,),
                      (P("data"),), mesh_of((8,)), (P("data"),))
    tune_cache.record("sinkhorn_knopp", key, pallas_sinkhorn.SinkhornConfig(3, 1))
    sharded = jax.device_put(logits, NamedSharding(mesh_of((8,)), P("data")))
    with pytest.raises(Exception, match=f"tuning cache entry sinkhorn_knopp / "
                       f"count={40 // DEVICES},.*must be a config that runs this call"):
        jax.jit(lambda m: bjax.sinkhorn_knopp(m, backend=backend))(sharded)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec, mesh_shape", MERGE_CASES, ids=str)
def test_merge_states_keeps_its_sharding(spec, mesh_shape, backend):
    """K index sets: split like merge_state's steps and heads; the set axis stays whole."""
    steps, heads = normalized(spec, 2)
    many = P(steps, None, heads)
    v, s = merge_problem(4, (16, 3, 8, 32), (16, 3, 8))
    check_partitioned(lambda v, s: bjax.merge_states(v, s, backend=backend), (v, s),
                      (many, many), mesh_of(mesh_shape), (spec, state_spec(spec)),
                      exact=backend != "xla")


def test_merge_state_head_dim_split_is_gathered_for_the_backward(backend=KERNEL_BACKEND):
    """The documented rule: the forward splits head_dim too; the backward sums over it
    (<dv, v_k - v>), so there it is gathered."""
    spec = P("data", None, "model")
    args = (*merge_problem(2, (16, 8, 32), (16, 8)), *merge_problem(3, (16, 8, 32), (16, 8)))
    mesh = mesh_of((4, 2))
    outputs, _, _, forward, backward = run_sharded(
        lambda *a: bjax.merge_state(*a, backend=backend), args,
        (spec, state_spec(spec)) * 2, mesh)
    assert collectives(forward) == {}
    assert sharded_as(outputs[0], mesh, spec)
    assert "all-gather" in collectives(backward)


# A KV-cache append: batch, heads and head_dim covered whole, a position along the steps.
WRITE_POSITIONS = {"static": 5, "traced": jnp.int32(7),
                   "per_row": jnp.arange(8, dtype=jnp.int32) * 3 % 61}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("position", WRITE_POSITIONS, ids=str)
@pytest.mark.parametrize("spec, mesh_shape", [(P("data"), (8,)),
                                              (P("data", None, "model"), (4, 2)),
                                              (P(None, None, "data", "model"), (4, 2))], ids=str)
def test_write_slice_keeps_its_sharding(spec, mesh_shape, position, backend):
    cache = random(5, (8, 64, 4, 32), jnp.float32, scale=1.0)
    token = random(6, (8, 1, 4, 32), jnp.float32, scale=1.0)
    start = (0, WRITE_POSITIONS[position], 0, 0)
    check_partitioned(lambda c, t: bjax.write_slice(c, t, start, backend=backend),
                      (cache, token), (spec, spec), mesh_of(mesh_shape), (spec,))


def test_write_slice_positioned_axis_is_gathered(backend=KERNEL_BACKEND):
    """The documented rule: an axis where the window sits at a position (the steps of a
    KV cache) is never divided; a caller's sharding of it is gathered."""
    cache = jnp.zeros((8, 64, 4, 32), jnp.float32)
    token = jnp.ones((8, 1, 4, 32), jnp.float32)
    (out, _, _, forward, _) = run_sharded(
        lambda c, t: bjax.write_slice(c, t, (0, 9, 0, 0), backend=backend), (cache, token),
        (P("data", "model"), P("data")), mesh_of((4, 2)))
    assert "all-gather" in collectives(forward)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(
        bjax.write_slice(cache, token, (0, 9, 0, 0), backend="xla")))



def ssd_problem(seed, batch, seq_len, heads, head_dim, groups, state_dim):
    return dict(
        x=random((seed, 0), (batch, seq_len, heads, head_dim), jnp.float32, scale=1.0),
        dt=uniform((seed, 1), (batch, seq_len, heads), -2.0, 0.5, jnp.float32),
        A=-uniform((seed, 2), (heads,), 0.5, 3.0, jnp.float32),
        B=random((seed, 3), (batch, seq_len, groups, state_dim), jnp.float32, scale=1.0),
        C=random((seed, 4), (batch, seq_len, groups, state_dim), jnp.float32, scale=1.0),
        D=random((seed, 5), (heads,), jnp.float32, scale=1.0),
        z=random((seed, 6), (batch, seq_len, heads, head_dim), jnp.float32, scale=1.0),
        dt_bias=random((seed, 7), (heads,), jnp.float32, scale=1.0),
        initial_states=random((seed, 8), (batch, heads, head_dim, state_dim), jnp.float32,
                              scale=1.0))


def check_ssd_chunk_scan_sharded(problem, batch_axis, heads_axis, mesh_shape, backend,
                                 config=None):
    """``ssd_chunk_scan`` of ``problem`` (:func:`ssd_problem`) with its batch and heads
    split (in ``config``, or the heuristic's); the gradients of A, D and dt_bias are summed
    over the batch's devices, the only collective."""
    names = list(problem)
    per_name = {"x": P(batch_axis, None, heads_axis), "dt": P(batch_axis, None, heads_axis),
                "A": P(heads_axis), "B": P(batch_axis, None, heads_axis),
                "C": P(batch_axis, None, heads_axis), "D": P(heads_axis),
                "z": P(batch_axis, None, heads_axis), "dt_bias": P(heads_axis),
                "initial_states": P(batch_axis, heads_axis)}

    def fn(*values):
        kwargs = dict(zip(names, values))
        positional = [kwargs.pop(n) for n in ("x", "dt", "A", "B", "C")]
        return bjax.ssd_chunk_scan(*positional, chunk_size=16, dt_softplus=True,
                                   return_final_states=True, backend=backend, config=config,
                                   **kwargs)

    check_partitioned(fn, tuple(problem.values()), tuple(per_name[n] for n in names),
                      mesh_of(mesh_shape), (per_name["x"], P(batch_axis, heads_axis)),
                      exact=False, reduced_grads=(2, 5, 7),
                      # dA sums terms that largely cancel over every step of a head: summed
                      # in another order it moves by a few 1e-6 of its largest entry.
                      tolerance=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_axis, heads_axis, mesh_shape",
                         [("data", None, (8,)), ("data", "model", (4, 2)),
                          (("data", "model"), None, (4, 2))], ids=str)
def test_ssd_chunk_scan_keeps_its_sharding(batch_axis, heads_axis, mesh_shape, backend):
    check_ssd_chunk_scan_sharded(ssd_problem(7, 8, 40, 4, 16, 2, 16), batch_axis, heads_axis,
                                 mesh_shape, backend)


def test_ssd_chunk_scan_whole_head_dim_blocks_keep_the_sharding(backend=KERNEL_BACKEND):
    """head_dim 128 in bfloat16, where the forward's programs take the whole head_dim and
    one head (``pallas_kernels.ssd.default_config``), with batch and heads split."""
    problem = ssd_problem(7, 8, 40, 4, 128, 2, 16)
    for name in ("x", "B", "C", "z"):
        problem[name] = problem[name].astype(jnp.bfloat16)
    plan = bjax.plan(bjax.ssd_chunk_scan, *(problem[n] for n in ("x", "dt", "A", "B", "C")),
                     chunk_size=16, backend=backend)
    assert (plan.block_config.forward.block_p, plan.block_config.forward.block_h) == (128, 1)
    check_ssd_chunk_scan_sharded(problem, "data", "model", (4, 2), backend)


def test_ssd_chunk_scan_wide_state_keeps_the_sharding(backend=KERNEL_BACKEND):
    """bfloat16 with a state padded past 128, where the backward's programs take one head on
    8 warps (``pallas_kernels.ssd_backward.default_config``), with batch and heads split."""
    problem = ssd_problem(8, 8, 40, 4, 16, 2, 130)
    for name in ("x", "B", "C", "z"):
        problem[name] = problem[name].astype(jnp.bfloat16)
    plan = bjax.plan(bjax.ssd_chunk_scan, *(problem[n] for n in ("x", "dt", "A", "B", "C")),
                     chunk_size=16, backend=backend)
    backward = plan.block_config.backward
    assert (backward.block_h, backward.num_warps) == (1, 8)
    check_ssd_chunk_scan_sharded(problem, "data", "model", (4, 2), backend)


@pytest.mark.parametrize("passing", [False, True], ids=["walked", "passed"])
def test_ssd_chunk_scan_state_blocks_keep_the_sharding(passing, backend=KERNEL_BACKEND):
    """The state kernels of both directions in blocks of 16 state columns over state 40
    (``block_n``; three blocks, the last partial), walked or passed along, with batch and
    heads split."""
    problem = ssd_problem(13, 8, 40, 4, 16, 2, 40)
    args = (16, 16, 40, 2, jnp.float32)
    blocks = {"state_passing": passing, "block_n": 16}
    config = pallas_ssd_backward.ChunkScanConfig(
        dataclasses.replace(pallas_ssd.default_config(*args), **blocks),
        dataclasses.replace(pallas_ssd_backward.default_config(*args), **blocks))
    check_ssd_chunk_scan_sharded(problem, "data", "model", (4, 2), backend, config)


def test_ssd_chunk_scan_shared_scores_keep_the_sharding(backend=KERNEL_BACKEND):
    """The backward's chunk kernels with a group's two heads a program sharing the scores
    (``shared_scores``), with batch and heads split (one group a device)."""
    problem = ssd_problem(14, 8, 40, 4, 16, 2, 16)
    args = (16, 16, 16, 2, jnp.float32)
    config = pallas_ssd_backward.ChunkScanConfig(
        pallas_ssd.default_config(*args),
        dataclasses.replace(pallas_ssd_backward.default_config(*args), block_h=2,
                            source_block_h=2, shared_scores=True))
    check_ssd_chunk_scan_sharded(problem, "data", "model", (4, 2), backend, config)


def test_ssd_chunk_scan_passed_states_keep_the_sharding(backend=KERNEL_BACKEND):
    """A sequence of 32 chunks and few heads, where the forward passes its chunk states
    along and the backward their gradients back (``pallas_kernels.state_passing``), with
    batch and heads split."""
    problem = ssd_problem(12, 4, 32 * 16, 4, 16, 2, 16)
    plan = bjax.plan(bjax.ssd_chunk_scan, *(problem[n] for n in ("x", "dt", "A", "B", "C")),
                     chunk_size=16, backend=backend)
    assert plan.block_config.forward.state_passing
    assert plan.block_config.backward.state_passing
    check_ssd_chunk_scan_sharded(problem, "data", "model", (4, 2), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ssd_varlen_states_keep_the_heads_split(backend):
    """Packed sequences (one row) split over the heads: the states entering the chunks,
    from which every sequence's final state comes, stay with their heads."""
    problem = ssd_problem(11, 1, 40, 4, 16, 2, 16)
    del problem["initial_states"]
    names = list(problem)
    heads = {"x": P(None, None, "model"), "dt": P(None, None, "model"), "A": P("model"),
             "B": P(None, None, "model"), "C": P(None, None, "model"), "D": P("model"),
             "z": P(None, None, "model"), "dt_bias": P("model")}

    def fn(*values):
        kwargs = dict(zip(names, values))
        positional = [kwargs.pop(n) for n in ("x", "dt", "A", "B", "C")]
        return bjax.ssd_chunk_scan(*positional, chunk_size=16, dt_softplus=True,
                                   cu_seqlens=jnp.array([0, 9, 9, 33, 40]),
                                   return_varlen_states=True, backend=backend, **kwargs)

    check_partitioned(fn, tuple(problem.values()), tuple(heads[n] for n in names),
                      mesh_of((4, 2)), (heads["x"], P(None, "model")), exact=False,
                      tolerance=2e-5)   # as in test_ssd_chunk_scan_keeps_its_sharding


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_axis, heads_axis, mesh_shape",
                         [("data", None, (8,)), ("data", "model", (4, 2))], ids=str)
def test_ssd_step_keeps_its_sharding(batch_axis, heads_axis, mesh_shape, backend):
    """One decoding token: the state, x, dt, B and C split as in the scan."""
    problem = ssd_problem(8, 8, 1, 4, 16, 2, 16)
    state = problem.pop("initial_states")
    step_args = {"state": state, **{n: v[:, 0] if n in ("x", "dt", "B", "C", "z") else v
                                    for n, v in problem.items()}}
    names = list(step_args)
    per_name = {"state": P(batch_axis, heads_axis), "x": P(batch_axis, heads_axis),
                "dt": P(batch_axis, heads_axis), "A": P(heads_axis),
                "B": P(batch_axis, heads_axis), "C": P(batch_axis, heads_axis),
                "D": P(heads_axis), "z": P(batch_axis, heads_axis), "dt_bias": P(heads_axis)}

    def fn(*values):
        kwargs = dict(zip(names, values))
        positional = [kwargs.pop(n) for n in ("state", "x", "dt", "A", "B", "C")]
        return bjax.ssd_step(*positional, dt_softplus=True, backend=backend, **kwargs)

    check_partitioned(fn, tuple(step_args.values()), tuple(per_name[n] for n in names),
                      mesh_of(mesh_shape), (per_name["x"], per_name["state"]), exact=False,
                      reduced_grads=(3, 6, 8))


def test_ssd_step_config_is_checked_against_each_shards_heads(backend=KERNEL_BACKEND):
    """A program of 4 heads suits the whole call's 4 but not a shard's 2 (those heads
    would be left unwritten): an error naming the field, when the program is partitioned."""
    problem = ssd_problem(8, 8, 1, 4, 16, 2, 16)
    state = problem.pop("initial_states")
    args = (state, *(problem[n][:, 0] for n in ("x", "dt")), problem["A"],
            *(problem[n][:, 0] for n in ("B", "C")))
    specs = (P("data", "model"),) * 3 + (P("model"),) + (P("data", "model"),) * 2
    mesh = mesh_of((4, 2))
    sharded = [jax.device_put(a, NamedSharding(mesh, spec)) for a, spec in zip(args, specs)]
    config = pallas_ssd.StepConfig(16, heads_per_program=4)
    with pytest.raises(Exception, match=r"ssd_step: config.heads_per_program must be a "
                                        r"divisor of heads = 2; got 4"):
        jax.jit(lambda *a: bjax.ssd_step(*a, backend=backend, config=config))(*sharded)


def conv_problem():
    return (random((12, 0), (8, 12, 16), jnp.float32, scale=1.0),
            random((12, 1), (16, 4), jnp.float32, scale=1.0),
            random((12, 2), (16,), jnp.float32, scale=1.0),
            random((12, 3), (8, 3, 16), jnp.float32, scale=1.0),
            jnp.asarray(np.cumsum(np.random.default_rng((12, 4)).random((8, 12)) < 0.2, axis=1),
                        jnp.int32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_axis, channel_axis, mesh_shape",
                         [("data", None, (8,)), ("data", "model", (4, 2))], ids=str)
def test_causal_conv1d_keeps_its_sharding(batch_axis, channel_axis, mesh_shape, backend):
    """Batch and channels split, the sequence whole; the weight's and bias's gradients are
    summed over the batch's devices, the only collective."""
    x, weight, bias, initial, seq_idx = conv_problem()
    rows, params = P(batch_axis, None, channel_axis), P(channel_axis)

    def fn(x, weight, bias, initial):
        return bjax.causal_conv1d(x, weight, bias, activation="silu", initial_states=initial,
                                  seq_idx=seq_idx, return_final_states=True, backend=backend)

    check_partitioned(fn, (x, weight, bias, initial), (rows, params, params, rows),
                      mesh_of(mesh_shape), (rows, rows), exact=False, reduced_grads=(1, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_conv1d_step_keeps_its_sharding(backend):
    """The step splits as the convolution: batch and channels."""
    x, weight, bias, initial, _ = conv_problem()
    rows = P("data", None, "model")

    def step(state, x_t, weight, bias):
        return bjax.causal_conv1d_step(state, x_t, weight, bias, activation="silu",
                                       backend=backend)

    check_partitioned(step, (initial, x[:, 0], weight, bias),
                      (rows, P("data", "model"), P("model"), P("model")), mesh_of((4, 2)),
                      (P("data", "model"), rows), exact=False, reduced_grads=(2, 3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead, spec, mesh_shape",
                         [((16,), P("data"), (8,)), ((4, 8), P("data", "model"), (4, 2))],
                         ids=str)
def test_mhc_layer_keeps_its_sharding(lead, spec, mesh_shape, backend):
    """mhc_pre (dynamic H, so every kernel and the Sinkhorn) and mhc_post around a sublayer:
    the tokens split; phi, alpha and bias are whole and their gradients summed over the
    tokens' devices, the only collective."""
    check_mhc_layer(lead, spec, mesh_shape, backend)


def test_mhc_layer_keeps_an_inner_leading_split(backend=KERNEL_BACKEND):
    """Sequence parallelism: x ``[batch, seq, n, C]`` split over seq alone."""
    check_mhc_layer((2, 8), P(None, "data"), (8,), backend)


def check_mhc_layer(lead, spec, mesh_shape, backend):
    n, hidden = 4, 48
    x = random((9, 0), (*lead, n, hidden), jnp.float32, scale=1.0)
    bias = random((9, 1), (n * n + 2 * n,), jnp.float32, scale=1.0)
    phi = random((9, 2), (n * hidden, n * n + 2 * n), jnp.float32, scale=1 / np.sqrt(n * hidden))
    alpha = random((9, 3), (3,), jnp.float32, scale=1.0)

    def fn(x, bias, phi, alpha):
        layer_input, h_post, h_res = bjax.mhc_pre(x, bias=bias, phi=phi, alpha=alpha,
                                                  backend=backend)
        x_next = bjax.mhc_post(x, jnp.tanh(layer_input), h_post, h_res, backend=backend)
        return x_next, layer_input, h_post, h_res

    check_partitioned(fn, (x, bias, phi, alpha), (spec, P(), P(), P()), mesh_of(mesh_shape),
                      (spec, spec, spec, spec), exact=False, reduced_grads=(1, 2, 3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec, mesh_shape", [(P("data"), (8,)), (P(("data", "model")), (4, 2))],
                         ids=str)
def test_hyper_connection_keeps_its_sharding(spec, mesh_shape, backend):
    """The fused static op: the tokens split (over one mesh axis or two); the RMSNorm
    weight and the h logits are whole and their gradients summed over the tokens'
    devices, the only collective."""
    n, hidden = 4, 48
    k = jax.random.split(jax.random.key(10), 5)
    args = (jax.random.normal(k[0], (16, n, hidden), jnp.float32),
            1 + 0.1 * jax.random.normal(k[1], (hidden,), jnp.float32),
            jax.random.normal(k[2], (n,), jnp.float32),
            jax.random.normal(k[3], (n,), jnp.float32),
            jax.random.normal(k[4], (n, n), jnp.float32))

    def fn(*args):
        return bjax.hyper_connection(*args, sinkhorn_iters=5, backend=backend)

    # The h_res gradient passes the token sum of d(mixing matrix) through the Sinkhorn's
    # backward, which magnifies that sum's reordering: 4.9e-6 of its largest entry for
    # these inputs (jax.random's), and 1.1e-5 for the XLA backend partitioned by XLA
    # itself. It depends on the inputs' cancellation: 3.3e-5 for NumPy's draws of seed 10.
    check_partitioned(fn, args, (spec, P(), P(), P(), P()), mesh_of(mesh_shape), (spec,),
                      exact=False, reduced_grads=(1, 2, 3, 4), tolerance=3e-5)


def test_ssd_heads_split_only_with_their_groups(backend=KERNEL_BACKEND):
    """The documented rule: with one group, a mesh axis on the heads cannot divide the
    groups (dB and dC sum over a group's heads), so the heads are gathered; the batch
    still splits."""
    problem = ssd_problem(10, 8, 24, 4, 8, 1, 8)
    x, dt, A, B, C = (problem[n] for n in ("x", "dt", "A", "B", "C"))
    specs = (P("data", None, "model"), P("data", None, "model"), P(), P("data"), P("data"))
    mesh = mesh_of((4, 2))
    (y, _, _, forward, _) = run_sharded(
        lambda *a: bjax.ssd_chunk_scan(*a, chunk_size=16, backend=backend), (x, dt, A, B, C),
        specs, mesh)
    assert "all-gather" in collectives(forward)
    assert normalized(y.sharding.spec, 4)[0] == ("data" if mesh.shape["data"] > 1 else None)
    np.testing.assert_allclose(np.asarray(y), np.asarray(bjax.ssd_chunk_scan(
        x, dt, A, B, C, chunk_size=16, backend="xla")), rtol=0, atol=1e-5 * float(
            np.abs(np.asarray(y)).max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_mlp_trains_tensor_parallel(backend):
    """bjax.nn.GatedMLP on a (data 4, model 2) mesh, Megatron-style: the hidden columns of
    both halves split over "model" (nnx.with_partitioning), the tokens over "data". One
    training step compiles with no all-gather, all-to-all or collective-permute (the
    out-projection's sum over "model" and the weight gradients' sum over "data" are
    all-reduces); the parameters keep their shardings, the loss and the new parameters
    equal the unsharded step's."""
    nnx = pytest.importorskip("flax.nnx")
    mesh = mesh_of((4, 2))
    init = nnx.initializers.lecun_normal()
    with jax.set_mesh(mesh):  # flax places annotated parameters on the current mesh
        model = bjax.nn.GatedMLP(
            8, 16, 8, kind="swiglu", backend=backend, rngs=nnx.Rngs(0),
            in_kernel_init=nnx.with_partitioning(init, (None, None, "model")),
            out_kernel_init=nnx.with_partitioning(init, ("model", None)))
    graphdef, sharded = nnx.split(model, nnx.Param)
    assert sharded["w_in"]["kernel"][...].sharding.spec == P(None, None, "model")
    assert sharded["w_out"]["kernel"][...].sharding.spec == P("model", None)
    params = jax.tree.map(np.asarray, sharded)  # the same values, on one device
    x = random(1, (32, 8), jnp.float32, scale=1.0)
    target = jnp.sin(x)

    def train_step(params, x, target):
        def loss_fn(params):
            return jnp.mean((nnx.merge(graphdef, params)(x) - target) ** 2)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        return loss, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    data = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, target)]
    step = jax.jit(train_step)
    loss, updated = step(sharded, *data)
    program = step.lower(sharded, *data).compile().as_text()
    assert set(collectives(program)) == {"all-reduce"}, collectives(program)
    for new, old in zip(jax.tree.leaves(updated), jax.tree.leaves(sharded)):
        assert new.sharding.is_equivalent_to(old.sharding, new.ndim), (new.sharding, old.sharding)
    ref_loss, ref_updated = jax.jit(train_step)(params, x, target)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for new, ref in zip(jax.tree.leaves(updated), jax.tree.leaves(ref_updated)):
        np.testing.assert_allclose(np.asarray(new), np.asarray(ref), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cascade_decode_step_keeps_the_batch_split(backend):
    """One decode step of bjax.nn attention on 8 devices: the KV cache and the queries split
    over the batch, the shared prefix replicated. The append (write_slice) and the cascade
    merge (merge_state) run on each device's rows: no collective at all, the cache and the
    output stay split, the values equal the unsharded step's."""
    nnx = pytest.importorskip("flax.nnx")
    from bjax.nn import KVCache, cascade_attention
    batch, heads, kv_heads, head_dim = 8, 4, 2, 16
    f32 = jnp.float32
    q = random((3, 0), (batch, 1, heads, head_dim), f32, scale=1.0)
    k_new, v_new = (random((3, i), (batch, 1, kv_heads, head_dim), f32, scale=1.0)
                    for i in (1, 2))
    prefix_k, prefix_v = (random((3, i), (12, kv_heads, head_dim), f32, scale=1.0)
                          for i in (3, 4))
    lengths = jnp.asarray(np.random.default_rng(3).integers(0, 20, (batch,)), jnp.int32)

    def make_cache():
        cache = KVCache(batch, 32, kv_heads, head_dim, backend=backend)
        cache.lengths[...] = lengths
        return cache

    def decode(cache, q, k_new, v_new):
        cache.append(k_new, v_new)
        return cascade_attention(q, prefix_k, prefix_v, cache, backend=backend)

    mesh = mesh_of((8,))
    rows = NamedSharding(mesh, P("data"))
    cache = make_cache()
    graphdef, state = nnx.split(cache)
    state = jax.device_put(state, rows)
    step = nnx.jit(decode)
    sharded_cache = nnx.merge(graphdef, state)
    args = [jax.device_put(a, rows) for a in (q, k_new, v_new)]
    program = step.lower(sharded_cache, *args).compile().as_text()
    assert collectives(program) == {}, collectives(program)
    out, lse = step(sharded_cache, *args)
    assert sharded_as(out, mesh, P("data"))
    assert sharded_as(sharded_cache.k[...], mesh, P("data"))
    ref_cache = make_cache()
    ref_out, ref_lse = step(ref_cache, q, k_new, v_new)
    np.testing.assert_array_equal(np.asarray(sharded_cache.k[...]), np.asarray(ref_cache.k[...]))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), rtol=0, atol=1e-6)


def test_hybrid_model_trains_data_parallel(backend=KERNEL_BACKEND):
    """A training step of bjax.nn.HybridLM (Mamba-2 and attention mixers, SwiGLU MLPs, mHC
    streams: every op family but write_slice) with the batch split over 8 devices and the
    parameters replicated: the compiled step's only collectives are all-reduces (the loss's
    mean and the parameters' gradients); loss and new parameters equal the unsharded step's.
    On the kernels alone (the XLA implementations' partitioning is XLA's own, and the
    op-level tests above check it)."""
    nnx = pytest.importorskip("flax.nnx")
    model = bjax.nn.HybridLM(16, 16, pattern="ma", n_streams=2, mlp_hidden=32,
                             attention_heads=2, backend=backend, rngs=nnx.Rngs(0),
                             mamba=dict(num_heads=2, head_dim=16, state_size=8, chunk_size=16))
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jax.random.randint(jax.random.key(1), (8, 17), 0, 16)

    def train_step(params, tokens):
        def loss_fn(params):
            logits = nnx.merge(graphdef, params)(tokens[:, :-1])
            return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
                logits, tokens[:, 1:, None], -1)[..., 0])
        loss, grads = jax.value_and_grad(loss_fn)(params)
        return loss, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    sharded = jax.device_put(tokens, NamedSharding(mesh_of((8,)), P("data")))
    step = jax.jit(train_step)
    loss, updated = step(params, sharded)
    program = step.lower(params, sharded).compile().as_text()
    assert set(collectives(program)) == {"all-reduce"}, collectives(program)
    ref_loss, ref_updated = jax.jit(train_step)(params, tokens)
    # The sharded program sums the loss and the gradients over the devices in another order.
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for new, ref in zip(jax.tree.leaves(updated), jax.tree.leaves(ref_updated)):
        np.testing.assert_allclose(np.asarray(new), np.asarray(ref), rtol=0, atol=1e-6)


def _configured_cases():
    """(name, fn, args, specs, out_specs): ops called with a caller's kernel config."""
    x = random((21, 0), (16, 12, 64), jnp.float32, scale=1.0)
    v, s = merge_problem(22, (16, 3, 4, 32), (16, 3, 4))
    logits = random((21, 1), (16, 4, 4), jnp.float32, scale=1.0)
    dest = random((21, 2), (8, 64, 8), jnp.float32, scale=1.0)
    source = random((21, 3), (8, 3, 8), jnp.float32, scale=1.0)
    merge = pallas_cascade.MergeConfig(TileConfig(2, 1, 1), TileConfig(1, 2, 1))
    return [
        ("swiglu", lambda x: bjax.swiglu(x, backend=KERNEL_BACKEND, config=TileConfig(2, 16, 1)),
         (x,), (P("data"),), (P("data"),)),
        ("merge_states", lambda v, s: bjax.merge_states(v, s, backend=KERNEL_BACKEND, config=merge),
         (v, s), (P("data"), P("data")), (P("data"), P("data"))),
        ("sinkhorn_knopp", lambda m: bjax.sinkhorn_knopp(
            m, backend=KERNEL_BACKEND, config=pallas_sinkhorn.SinkhornConfig(2, 1)),
         (logits,), (P("data"),), (P("data"),)),
        ("write_slice", lambda d, w: bjax.write_slice(d, w, (0, 5, 0), backend=KERNEL_BACKEND,
                                                      config=TileConfig(1, 8, 1)),
         (dest, source), (P("data"), P("data")), (P("data"),)),
    ]


@pytest.mark.parametrize("case", _configured_cases(), ids=lambda c: c[0])
def test_a_callers_config_keeps_the_sharding(case):
    """A caller's config= goes to every device's kernel call: still no collective, the
    shardings kept, the values those of the unsharded call with the same config."""
    _, fn, args, specs, out_specs = case
    check_partitioned(fn, args, specs, mesh_of((8,)), out_specs)
