"""bjax.nn.MHCBlock against the float64 layer of the paper, and the stream helpers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

import bjax  # noqa: E402
from tests import oracles  # noqa: E402
from tests.conftest import KERNEL_BACKEND  # noqa: E402

# The block's logic on the XLA backend in every configuration; on the kernels in the one
# that runs every kernel (dynamic H) with DeepSeek's options (test_hyper_connection.py checks
# the kernels in every other).
CASES = [(preset, dynamic, "xla") for preset in ("paper", "deepseek") for dynamic in (False, True)]
CASES.append(("deepseek", True, KERNEL_BACKEND))

N, C = 4, 24


class Tanh(nnx.Module):
    """A sublayer with a parameter: F(u) = tanh(u W)."""

    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (C, C)) / C ** 0.5)

    def __call__(self, u):
        return jnp.tanh(u @ self.w[...])


@pytest.mark.parametrize("preset, dynamic, backend", CASES, ids=str)
def test_matches_the_papers_layer(preset, dynamic, backend):
    block = bjax.nn.MHCBlock(Tanh(nnx.Rngs(1)), N, C, dynamic=dynamic, preset=preset,
                             alpha_init=0.5, phi_scale=1.0, backend=backend, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (6, N, C), jnp.float32)
    options = dict(rmsnorm_eps=1e-6, iters=20, sinkhorn_eps=1e-5)   # bjax.mhc_pre's defaults
    if preset == "deepseek":
        options = dict(rmsnorm_eps=1e-6, iters=10, sinkhorn_eps=1e-6, init="softmax",
                       order="deepseek", pre_eps=1e-6, post_scale=1.0, transpose_res=True)
    w = np.asarray(block.sublayer.w[...], np.float64)
    want = oracles.mhc_layer(
        x, lambda u: jnp.tanh(u @ w), block.bias[...],
        phi=None if not dynamic else block.phi[...],
        alpha=None if not dynamic else block.alpha[...], **options)[0]
    got = nnx.jit(lambda b, x: b(x))(block, x)
    assert got.dtype == x.dtype
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)


def test_trains_in_a_stack_of_blocks(backend="xla"):
    """Two blocks between expand_streams and reduce_streams: gradients reach every
    parameter (the sublayers' included) and a few steps lower the loss."""
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([bjax.nn.MHCBlock(Tanh(rngs), N, C, backend=backend,
                                                     rngs=rngs) for _ in range(2)])

        def __call__(self, h):
            x = bjax.nn.expand_streams(h, N)
            for block in self.blocks:
                x = block(x)
            return bjax.nn.reduce_streams(x)

    model = Model(nnx.Rngs(3))
    h = jax.random.normal(jax.random.key(4), (16, C), jnp.float32)
    target = jnp.roll(h, 1, axis=-1)

    @nnx.jit
    def step(model):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(h) - target) ** 2))(model)
        nnx.update(model, jax.tree.map(lambda p, g: p - 0.05 * g, nnx.state(model, nnx.Param),
                                       grads))
        return loss, grads

    loss0, grads = step(model)
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads))
    losses = [float(step(model)[0]) for _ in range(20)]
    assert losses[-1] < float(loss0)


def test_stream_helpers_and_preset_rule():
    h = jnp.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(bjax.nn.reduce_streams(bjax.nn.expand_streams(h, 4)), 4 * h)
    with pytest.raises(bjax.InvalidProblemError, match="preset must be one of"):
        bjax.nn.MHCBlock(lambda u: u, N, C, preset="hc", rngs=nnx.Rngs(0))
