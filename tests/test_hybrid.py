"""bjax.nn.HybridLM: it learns, and generation with caches matches the full forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")

import bjax  # noqa: E402
from tests.conftest import KERNEL_BACKEND  # noqa: E402

VOCAB, HIDDEN = 16, 32
# The model's logic on the XLA backend; on the GPU also on its kernels (through the Pallas
# interpreter a whole model takes minutes; the ops' own tests run every kernel there).
BACKENDS = ["xla"] + ([] if KERNEL_BACKEND == "interpret" else [KERNEL_BACKEND])


def _model(backend, pattern="mam"):
    return bjax.nn.HybridLM(VOCAB, HIDDEN, pattern=pattern, mamba=dict(chunk_size=16),
                            backend=backend, rngs=nnx.Rngs(0))


def _copy_task(key, batch=16, length=16):
    """Random halves repeated: the second half is predictable from the first."""
    half = jax.random.randint(key, (batch, length // 2), 0, VOCAB)
    return jnp.concatenate([half, half], axis=1)


def test_training_lowers_the_loss():
    model = _model("xla", pattern="ma")
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    def loss_fn(model, tokens):
        logits = model(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @nnx.jit
    def train_step(model, optimizer, tokens):
        loss, grads = nnx.value_and_grad(loss_fn)(model, tokens)
        optimizer.update(model, grads)
        return loss

    held_out = _copy_task(jax.random.key(-1))
    before = float(nnx.jit(loss_fn)(model, held_out))
    for i in range(60):
        train_step(model, optimizer, _copy_task(jax.random.key(i)))
    after = float(nnx.jit(loss_fn)(model, held_out))
    assert after < before - 0.3, (before, after)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generation_with_caches_matches_the_full_forward(backend):
    """Prefill a prompt, then greedy steps (jitted, caches donated); each step's logits
    equal the full forward's at that position."""
    model = _model(backend)
    prompt = _copy_task(jax.random.key(1), batch=3)[:, :7]
    prefill = nnx.jit(lambda m, t, c: m(t, caches=c))
    step = nnx.jit(lambda m, t, c: m.step(t, c), donate_argnums=2)
    logits, caches = prefill(model, prompt, model.init_caches(3, 16))
    tokens, stepped = [prompt], [logits[:, -1]]
    for _ in range(5):
        token = jnp.argmax(stepped[-1], axis=-1)
        tokens.append(token[:, None])
        logits, caches = step(model, token, caches)
        stepped.append(logits)
    sequence = jnp.concatenate(tokens, axis=1)
    full = nnx.jit(lambda m, t: m(t))(model, sequence)
    np.testing.assert_allclose(np.stack(stepped, axis=1), full[:, 6:], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(caches[1].lengths[...], [12, 12, 12])


def test_bad_pattern_is_named():
    with pytest.raises(bjax.InvalidProblemError, match="HybridLM: pattern must be"):
        bjax.nn.HybridLM(VOCAB, HIDDEN, pattern="mx", rngs=nnx.Rngs(0))
