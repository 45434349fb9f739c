"""bjax.nn.GatedMLP: shapes, agreement with the op, and a few training steps."""
import chex
import jax
import jax.numpy as jnp
import pytest

nnx = pytest.importorskip("flax.nnx")

import bjax  # noqa: E402
from tests.conftest import KERNEL_BACKEND  # noqa: E402


@pytest.mark.parametrize("kind,gate", [("swiglu", "first"), ("geglu", "second")])
def test_gated_mlp_forward(kind, gate):
    model = bjax.nn.GatedMLP(6, 16, 3, kind=kind, gate=gate, backend=KERNEL_BACKEND,
                             rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (5, 6), jnp.float32)
    y = model(x)
    assert y.shape == (5, 3)
    # The kernel [in, 2, hidden] flattened is the fused [a | b] kernel.
    fused = model.w_in.kernel[...].reshape(6, 32)
    h = bjax.gated_activation(x @ fused, kind, gate=gate, backend="xla")
    chex.assert_shape(h, (5, 16))
    chex.assert_trees_all_close(y, h @ model.w_out.kernel[...], rtol=1e-5, atol=1e-5)


def test_gated_mlp_trains_under_nnx_jit():
    model = bjax.nn.GatedMLP(4, 32, 1, kind="swiglu", backend=KERNEL_BACKEND, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (64, 4), jnp.float32)
    target = jnp.sin(x.sum(-1, keepdims=True))

    @nnx.jit
    def step(model, x, target):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads))
        return loss

    losses = [float(step(model, x, target)) for _ in range(30)]
    chex.assert_tree_all_finite(losses)
    assert losses[-1] < 0.5 * losses[0], losses


def test_gated_mlp_rejects_bad_options_at_trace_time():
    model = bjax.nn.GatedMLP(4, 8, kind="gelu", rngs=nnx.Rngs(0))
    with pytest.raises(bjax.InvalidProblemError, match="kind must be one of"):
        nnx.jit(lambda m, x: m(x))(model, jnp.ones((2, 4)))
