"""bjax.nn.attention: attend against the float64 oracle, the KV cache (appends in place),
cascade decoding against attention over the concatenated keys, the self-attention block."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

from jax.test_util import check_grads  # noqa: E402

import bjax  # noqa: E402
from bjax.nn.attention import KVCache, attend, cascade_attention  # noqa: E402
from tests import oracles  # noqa: E402
from tests.conftest import KERNEL_BACKEND, assert_close, random  # noqa: E402

B, T, H, HK, D = 3, 2, 4, 2, 8


def _check_state(out, lse, want_out, want_lse, dtype):
    """``(out, lse)`` against the oracle's; empty states must be exactly ``(0, -inf)``."""
    empty = np.isneginf(want_lse)
    assert lse.dtype == jnp.promote_types(dtype, jnp.float32)
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), empty)
    assert not np.asarray(out, np.float64)[empty].any()
    assert_close(out, want_out, dtype)
    # lse ~ log(s) + max score: float32 sums of a few terms, a few ulp of its magnitude.
    assert_close(np.where(empty, 0, lse), np.where(empty, 0, want_lse), jnp.float32, scale=4)


def _causal_visible(lengths, t, s):
    positions = np.asarray(lengths)[:, None] - t + np.arange(t)
    keys = np.arange(s)
    return (keys < np.asarray(lengths)[:, None, None]) & (keys <= positions[..., None])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shared", [False, True], ids=["per_row_kv", "shared_kv"])
def test_attend_matches_the_oracle(dtype, shared):
    """GQA, per-row lengths (one of them 0: an empty state) and the causal mask."""
    s = 7
    q = random(0, (B, T, H, D), dtype)
    k = random(1, (s, HK, D) if shared else (B, s, HK, D), dtype)
    v = random(2, k.shape, dtype)
    lengths = jnp.array([7, 3, 0])
    positions = lengths[:, None] - T + jnp.arange(T)
    out, lse = jax.jit(lambda *a: attend(*a, kv_lengths=lengths, q_positions=positions))(q, k, v)
    k_rows, v_rows = (np.broadcast_to(a, (B, *k.shape[-3:])) for a in (k, v))
    want = oracles.attention(q, k_rows, v_rows, _causal_visible(lengths, T, s), D ** -0.5)
    assert out.dtype == dtype
    _check_state(out, lse, *want, dtype)


def test_attend_gradients_match_finite_differences():
    """float64, with an empty row (whose out and lse must pass no NaN into the gradients)."""
    q, k, v = (random(i, shape, jnp.float64) for i, shape in
               enumerate([(B, T, H, D), (B, 5, HK, D), (B, 5, HK, D)]))
    lengths = jnp.array([5, 2, 0])

    def loss(q, k, v):
        out, lse = attend(q, k, v, kv_lengths=lengths, q_positions=jnp.array([[3, 4]] * B))
        return jnp.sum(out ** 2) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0) ** 2)

    check_grads(loss, (q, k, v), order=1, modes=["rev"])
    assert all(np.isfinite(g).all() for g in jax.grad(loss, argnums=(0, 1, 2))(q, k, v))


def _cache(lengths, max_len=8, backend="xla", dtype=jnp.float32):
    """A cache whose rows hold random tokens and the given lengths."""
    cache = KVCache(len(lengths), max_len, HK, D, dtype=dtype, backend=backend)
    cache.k[...] = random(10, cache.k[...].shape, dtype)
    cache.v[...] = random(11, cache.v[...].shape, dtype)
    cache.lengths[...] = jnp.array(lengths, jnp.int32)
    return cache


@pytest.mark.parametrize("backend", ["xla", KERNEL_BACKEND])
def test_cache_appends_at_each_rows_length(backend):
    cache = _cache([0, 2, 5], backend=backend)
    before = np.asarray(cache.k[...]), np.asarray(cache.v[...])
    k_new, v_new = random(12, (3, T, HK, D), jnp.float32), random(13, (3, T, HK, D), jnp.float32)
    nnx.jit(lambda c, k, v: c.append(k, v))(cache, k_new, v_new)
    np.testing.assert_array_equal(cache.lengths[...], [2, 4, 7])
    for got, old, new in zip((cache.k[...], cache.v[...]), before, (k_new, v_new)):
        want = old.copy()
        for row, start in enumerate([0, 2, 5]):
            want[row, start:start + T] = new[row]
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("backend", ["xla", KERNEL_BACKEND])
def test_donated_cache_appends_in_place(backend):
    """The compiled append aliases k and v to its outputs and holds no temporary near their
    size, and the new arrays live in the donated buffers."""
    if backend == "interpret":
        pytest.skip("in place is a property of compiled programs; the interpreter emulates")
    cache = KVCache(8, 256, HK, 64, dtype=jnp.bfloat16, backend=backend)
    k_new = v_new = jnp.ones((8, 1, HK, 64), jnp.bfloat16)
    append = nnx.jit(lambda c, k, v: c.append(k, v), donate_argnums=0)
    compiled = append.lower(cache, k_new, v_new).compile()
    aliases = re.search(r"input_output_alias=\{([^}]*\}[^}]*)*\}", compiled.as_text()).group(0)
    assert aliases.count("alias)") == 3, aliases      # k, v and lengths
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < cache.k[...].nbytes // 16, temp
    pointers = [a.unsafe_buffer_pointer() for a in (cache.k[...], cache.v[...])]
    append(cache, k_new, v_new)
    assert [a.unsafe_buffer_pointer() for a in (cache.k[...], cache.v[...])] == pointers
    assert float(cache.k[...][0, 0, 0, 0]) == 1 and float(cache.k[...][0, 1, 0, 0]) == 0


def test_a_row_appended_past_max_len_attends_to_nan():
    cache = _cache([7, 4, 6])
    kept = np.asarray(cache.k[...][0])
    cache.append(*(random(i, (3, T, HK, D), jnp.float32) for i in (12, 13)))
    np.testing.assert_array_equal(cache.k[...][0], kept)       # the row was not written
    out, lse = cache.attend(random(14, (3, T, H, D), jnp.float32))
    assert np.isnan(out[0]).all() and np.isnan(lse[0]).all()
    assert not np.isnan(out[1:]).any() and not np.isnan(lse[1:]).any()


@pytest.mark.parametrize("backend", ["xla", KERNEL_BACKEND])
@pytest.mark.parametrize("t, lengths", [(1, [3, 0, 6]), (2, [2, 5, 8])], ids=["decode", "t2"])
def test_cascade_equals_attention_over_the_concatenated_keys(backend, t, lengths):
    p, max_len = 5, 8
    prefix_k, prefix_v = random(20, (p, HK, D), jnp.float32), random(21, (p, HK, D), jnp.float32)
    suffix = _cache(lengths, max_len)
    q = random(22, (3, t, H, D), jnp.float32)
    out, lse = nnx.jit(lambda q, pk, pv, c: cascade_attention(q, pk, pv, c, backend=backend))(
        q, prefix_k, prefix_v, suffix)
    keys = np.concatenate([np.broadcast_to(prefix_k, (3, p, HK, D)), suffix.k[...]], axis=1)
    values = np.concatenate([np.broadcast_to(prefix_v, (3, p, HK, D)), suffix.v[...]], axis=1)
    visible = np.concatenate([np.ones((3, t, p), bool),
                              _causal_visible(lengths, t, max_len)], axis=-1)
    _check_state(out, lse, *oracles.attention(q, keys, values, visible, D ** -0.5), jnp.float32)
    # A row whose suffix holds nothing (length 0) gets the prefix's state bit for bit.
    empty = [r for r, n in enumerate(lengths) if n == 0]
    prefix_out, prefix_lse = jax.jit(attend)(q, prefix_k, prefix_v)
    for got, want in ((out, prefix_out), (lse, prefix_lse)):
        np.testing.assert_array_equal(np.asarray(got)[empty], np.asarray(want)[empty])


def test_self_attention_prefill_and_steps_equal_the_whole_sequence():
    layer = bjax.nn.CausalSelfAttention(32, H, num_kv_heads=HK, rngs=nnx.Rngs(0))
    x = random(30, (2, 9, 32), jnp.float32, scale=1.0)
    whole = nnx.jit(lambda m, x: m(x))(layer, x)
    cache = layer.init_cache(2, 12)
    prefill = nnx.jit(lambda m, x, c: m(x, cache=c)[0])
    step = nnx.jit(lambda m, x, c: m.step(x, c)[0])
    ys = [prefill(layer, x[:, :5], cache)]
    ys += [step(layer, x[:, i], cache)[:, None] for i in range(5, 9)]
    np.testing.assert_allclose(np.concatenate(ys, 1), whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(cache.lengths[...], [9, 9])
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    assert all(np.abs(g).sum() > 0 for g in jax.tree.leaves(grads))


def test_errors_name_the_argument():
    q = jnp.zeros((2, 1, 4, 8), jnp.float32)
    with pytest.raises(bjax.InvalidProblemError, match="attend: q must be"):
        attend(q[0], q, q)
    with pytest.raises(bjax.InvalidProblemError, match=r"attend: k.shape\[-2\] must be"):
        attend(q, jnp.zeros((2, 3, 3, 8)), jnp.zeros((2, 3, 3, 8)))
    with pytest.raises(bjax.InvalidProblemError, match="attend: q, k, v dtypes must be"):
        attend(q, q.astype(jnp.bfloat16), q.astype(jnp.bfloat16))
    with pytest.raises(bjax.InvalidProblemError, match=r"attend: kv_lengths must be an integer"):
        attend(q, q, q, kv_lengths=jnp.array([1.0, 2.0]))
    with pytest.raises(bjax.InvalidProblemError, match=r"attend: q_positions must be .* \(2, 1\)"):
        attend(q, q, q, q_positions=jnp.zeros((2, 3), jnp.int32))
    cache = KVCache(2, 4, 2, 8)
    with pytest.raises(bjax.InvalidProblemError, match=r"KVCache.append: k_new.shape must be"):
        cache.append(jnp.zeros((2, 1, 3, 8)), jnp.zeros((2, 1, 2, 8)))
    with pytest.raises(bjax.InvalidProblemError, match=r"KVCache.append: v_new.dtype must be"):
        cache.append(jnp.zeros((2, 1, 2, 8), jnp.float32), jnp.zeros((2, 1, 2, 8), jnp.bfloat16))
    with pytest.raises(bjax.InvalidProblemError, match="cascade_attention: prefix_k must be"):
        cascade_attention(q, jnp.zeros((2, 3, 2, 8)), jnp.zeros((2, 3, 2, 8)), cache)
    with pytest.raises(bjax.InvalidProblemError, match="CausalSelfAttention: num_kv_heads"):
        bjax.nn.CausalSelfAttention(32, 4, num_kv_heads=3, rngs=nnx.Rngs(0))
