"""bjax.nn.Mamba2: transformers' Mamba2Mixer on the same weights, prefill and decode,
packed sequences, gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

import bjax  # noqa: E402
from tests.conftest import KERNEL_BACKEND  # noqa: E402

# The module's own logic (projections, splits, the gated norm, caches) runs on the XLA
# backend; test_conv.py and test_ssd.py check the kernels against the same XLA
# implementation, and test_gradients_through_the_module runs the module on the kernels.
MODULE_BACKENDS = ("xla",)

CONFIG = dict(hidden_size=32, num_heads=4, head_dim=16, state_size=8, n_groups=2, expand=2,
              conv_kernel=4, chunk_size=16)


def mixer(backend, seed=0, **overrides):
    return bjax.nn.Mamba2(**{**CONFIG, **overrides}, backend=backend, rngs=nnx.Rngs(seed))


def relative_error(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def torch_mixer(seed, **config):
    """transformers' Mamba2Mixer with random weights (every parameter drawn, so that no
    default initialisation hides a mistake), and its state dict as NumPy arrays."""
    torch = pytest.importorskip("torch")
    # Before 5.23, transformers' gated RMSNorm ran over all channels, not per group as
    # mamba_ssm's (and this module's).
    transformers = pytest.importorskip("transformers", minversion="5.23")
    from transformers.models.mamba2 import modeling_mamba2
    torch.manual_seed(seed)
    hf_config = transformers.Mamba2Config(num_hidden_layers=1, vocab_size=16, **config)
    module = modeling_mamba2.Mamba2Mixer(hf_config, layer_idx=0).eval()
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(0.3 * torch.randn_like(param))
            if name == "A_log":
                param.copy_(torch.log(torch.rand_like(param) * 4 + 0.5))
    return module, {k: v.detach().numpy() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
@pytest.mark.parametrize("use_bias", [False, True], ids=["no-bias", "bias"])
def test_matches_transformers(use_bias, backend):
    torch = pytest.importorskip("torch")
    config = {**CONFIG, "use_bias": use_bias, "layer_norm_epsilon": 1e-5}
    module, state_dict = torch_mixer(1, **config)
    x = np.asarray(jax.random.normal(jax.random.key(2), (2, 37, 32), jnp.float32))
    with torch.no_grad():
        want = module(torch.tensor(x)).numpy()
    ours = bjax.nn.Mamba2.from_torch_state_dict(state_dict, **config, backend=backend)
    with jax.default_matmul_precision("highest"):   # float32 projections, no TF32 on a GPU
        y = nnx.jit(lambda m, x: m(x))(ours, jnp.asarray(x))
    assert relative_error(y, want) <= 1e-4


def test_from_torch_state_dict_checks_names_and_shapes():
    good = {"in_proj.weight": np.zeros((2 * 64 + 2 * 2 * 8 + 4, 32), np.float32),
            "conv1d.weight": np.zeros((64 + 32, 1, 4), np.float32),
            "conv1d.bias": np.zeros((96,), np.float32), "dt_bias": np.zeros(4, np.float32),
            "A_log": np.zeros(4, np.float32), "D": np.zeros(4, np.float32),
            "norm.weight": np.zeros(64, np.float32), "out_proj.weight": np.zeros((32, 64),
                                                                                 np.float32)}
    bjax.nn.Mamba2.from_torch_state_dict(good, **CONFIG)
    with pytest.raises(bjax.InvalidProblemError, match="state_dict must be the names"):
        bjax.nn.Mamba2.from_torch_state_dict({**good, "extra": np.zeros(1)}, **CONFIG)
    with pytest.raises(bjax.InvalidProblemError, match=r"state_dict\['D'\].shape must be"):
        bjax.nn.Mamba2.from_torch_state_dict({**good, "D": np.zeros(5)}, **CONFIG)
    with pytest.raises(bjax.InvalidProblemError, match="num_heads \\* head_dim must be"):
        bjax.nn.Mamba2(**{**CONFIG, "head_dim": 8}, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
def test_prefill_then_steps_equal_the_whole_sequence(backend):
    model = mixer(backend, 3)
    x = jax.random.normal(jax.random.key(4), (2, 21, 32), jnp.float32)
    whole = nnx.jit(lambda m, x: m(x))(model, x)
    y, cache = nnx.jit(lambda m, x, c: m(x, cache=c))(model, x[:, :17], model.init_cache(2))
    ys = [y]
    step = nnx.jit(lambda m, x_t, c: m.step(x_t, c), donate_argnums=2)
    for t in range(17, 21):
        y_t, cache = step(model, x[:, t], cache)
        ys.append(y_t[:, None])
    # The chunked scan and the step sum the same terms in another order.
    assert relative_error(jnp.concatenate(ys, axis=1), whole) <= 1e-5


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
def test_packed_sequences(backend):
    """seq_idx reaches the convolution and the scan: two sequences packed in one row give
    what each gives alone."""
    model = mixer(backend, 5)
    x = jax.random.normal(jax.random.key(6), (1, 30, 32), jnp.float32)
    seq_idx = (jnp.arange(30) >= 11).astype(jnp.int32)[None]
    call = nnx.jit(lambda m, x, seq_idx=None: m(x, seq_idx=seq_idx))
    packed = call(model, x, seq_idx)
    alone = jnp.concatenate([call(model, x[:, :11]), call(model, x[:, 11:])], axis=1)
    assert relative_error(packed, alone) <= 1e-5


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
def test_packed_prefill_then_steps_continue_every_sequence(backend):
    """A prefill of packed sequences (cu_seqlens, an empty one among them) returns a cache
    row per sequence; steps from it equal each sequence run whole with its continuation."""
    model = mixer(backend, 9)
    cu = [0, 12, 12, 30, 45]
    x = jax.random.normal(jax.random.key(10), (1, 45, 32), jnp.float32)
    more = jax.random.normal(jax.random.key(11), (4, 3, 32), jnp.float32)
    prefill = nnx.jit(lambda m, x, cu, c: m(x, cache=c, cu_seqlens=cu))
    step = nnx.jit(lambda m, x_t, c: m.step(x_t, c), donate_argnums=2)
    y, cache = prefill(model, x, jnp.array(cu), model.init_cache(1))
    assert cache.conv_state.shape[0] == cache.ssm_state.shape[0] == 4
    steps = []
    for t in range(3):
        y_t, cache = step(model, more[:, t], cache)
        steps.append(y_t)
    steps = jnp.stack(steps, axis=1)
    whole = nnx.jit(lambda m, x: m(x))
    for i, (start, end) in enumerate(zip(cu[:-1], cu[1:])):
        alone = whole(model, jnp.concatenate([x[:, start:end], more[i:i + 1]], axis=1))[0]
        assert relative_error(jnp.concatenate([y[0, start:end], steps[i]]), alone) <= 1e-5


def test_gradients_through_the_module(backend=KERNEL_BACKEND):
    """Outputs and every parameter's gradient from the kernels equal the XLA backend's."""
    x = jax.random.normal(jax.random.key(7), (2, 19, 32), jnp.float32)
    forward = nnx.jit(lambda m, x: m(x))
    assert relative_error(forward(mixer(backend, 8), x), forward(mixer("xla", 8), x)) <= 1e-6

    def grads(backend):
        return nnx.jit(nnx.grad(lambda m: jnp.sum(jnp.sin(m(x)))))(mixer(backend, 8))
    ours, ref = (jax.tree.leaves(nnx.state(grads(b))) for b in (backend, "xla"))
    assert len(ours) == 8
    for g, r in zip(ours, ref):
        assert np.isfinite(np.asarray(g)).all()
        assert relative_error(g, r) <= 1e-5
