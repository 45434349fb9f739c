"""Ops inside sharded programs: partitioned along their independent axes, never gathered.

On eight devices (tests/conftest.py forces eight CPU devices where there is no GPU;
elsewhere these tests skip). For each case the compiled program is read for
collectives, the output's sharding is compared with the one the op's rule gives,
and the values with the unsharded call's, forward and backward (a ``vjp`` with a
cotangent sharded like the output, so that no reduction is needed).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import bjax

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices")

GATHERS = ("all-gather", "all-to-all", "collective-permute")
BACKENDS = ("interpret", "xla")


def mesh_of(shape):
    names = ("data", "model")[: len(shape)]
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def collectives(compiled_text: str, names=GATHERS + ("all-reduce",)) -> dict:
    return {name: compiled_text.count(f" {name}(") + compiled_text.count(f" {name}-start(")
            for name in names if f" {name}" in compiled_text}


def normalized(spec, rank):
    entries = tuple(spec) + (None,) * (rank - len(spec))
    return entries


def run_sharded(fn, x, spec, mesh):
    """``(y, dx, forward program, backward program)`` of ``fn`` on ``x`` sharded by ``spec``."""
    xs = jax.device_put(x, NamedSharding(mesh, spec))
    forward = jax.jit(fn)
    y = forward(xs)
    cotangent = jax.device_put(jnp.ones_like(y) * 0.5 + jnp.arange(y.size).reshape(y.shape)
                               .astype(y.dtype) / y.size, y.sharding)
    backward = jax.jit(lambda x, c: jax.vjp(fn, x)[1](c)[0])
    dx = backward(xs, cotangent)
    return (y, dx, cotangent, forward.lower(xs).compile().as_text(),
            backward.lower(xs, cotangent).compile().as_text())


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
    mesh = mesh_of(mesh_shape)
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)

    def fn(x):
        return bjax.swiglu(x, axis=axis, backend=backend)

    y, dx, cotangent, forward, backward = run_sharded(fn, x, spec, mesh)
    assert collectives(forward) == {} and collectives(backward) == {}, (
        collectives(forward), collectives(backward))
    assert normalized(y.sharding.spec, 3) == normalized(spec, 3)
    assert normalized(dx.sharding.spec, 3) == normalized(spec, 3)
    reference_dx = jax.vjp(fn, x)[1](np.asarray(cotangent))[0]
    np.testing.assert_array_equal(np.asarray(y), np.asarray(fn(x)))
    np.testing.assert_array_equal(np.asarray(dx), np.asarray(reference_dx))


def test_gated_split_axis_is_gathered(backend="interpret"):
    """The kernels' documented rule: the split axis is never divided (each device needs
    both halves of its rows), so a caller's sharding of it is gathered, and the result is
    replicated along it. (The XLA backend is partitioned by XLA, its own way.)"""
    mesh = mesh_of((4, 2))
    x = jax.random.normal(jax.random.key(1), (16, 64), jnp.float32)

    def fn(x):
        return bjax.swiglu(x, backend=backend)

    y, _, _, forward, _ = run_sharded(fn, x, P("data", "model"), mesh)
    assert "all-gather" in collectives(forward)
    assert normalized(y.sharding.spec, 2) == ("data", None)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(fn(x)))
