"""bjax.nn.HybridLM: generation with caches matches the full forward. (notebooks/hybrid_lm.ipynb,
run by test_notebook.py, trains it and asserts that the loss goes down.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

import bjax  # noqa: E402
from tests.conftest import KERNEL_BACKEND  # noqa: E402

VOCAB, HIDDEN = 16, 32
# The model's logic on the XLA backend; on the GPU also on its kernels (through the Pallas
# interpreter a whole model takes minutes; the ops' own tests run every kernel there).
BACKENDS = ["xla"] + ([] if KERNEL_BACKEND == "interpret" else [KERNEL_BACKEND])


def _model(backend):
    return bjax.nn.HybridLM(VOCAB, HIDDEN, pattern="mam", mamba=dict(chunk_size=16),
                            backend=backend, rngs=nnx.Rngs(0))


def _copy_task(key, batch=16, length=16):
    """Random halves repeated: the second half is predictable from the first."""
    half = jax.random.randint(key, (batch, length // 2), 0, VOCAB)
    return jnp.concatenate([half, half], axis=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generation_with_caches_matches_the_full_forward(backend):
    """Prefill a prompt, then greedy steps (jitted, caches donated); each step's logits
    equal the full forward's at that position."""
    with jax.default_matmul_precision("highest"):   # float32 projections, no TF32 on a GPU
        _generate_and_compare(_model(backend))


def _generate_and_compare(model):
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
