"""Float64 oracles written from the formulas (independent of bjax): NumPy, and a
float64 ``lax.scan`` for the SSD recurrence."""
import math

import numpy as np

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _sigmoid(u):
    return 1.0 / (1.0 + np.exp(-u))


def _phi_cdf(u):
    return 0.5 * (1.0 + _erf(u / math.sqrt(2.0)))


def _phi_pdf(u):
    return np.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi)


def gated_activation_act(u, kind, approximate=False):
    """act(u) and act'(u) of baracuda-kernels' gated-activation table, in float64."""
    if kind == "glu":
        s = _sigmoid(u)
        return s, s * (1 - s)
    if kind == "reglu":
        return np.maximum(u, 0.0), (u > 0).astype(np.float64)
    if kind == "swiglu":
        s = _sigmoid(u)
        return u * s, s * (1 + u * (1 - s))
    if approximate:
        k = math.sqrt(2 / math.pi)
        t = np.tanh(k * (u + 0.044715 * u**3))
        return 0.5 * u * (1 + t), 0.5 * (1 + t) + 0.5 * u * (1 - t * t) * k * (1 + 3 * 0.044715 * u * u)
    return u * _phi_cdf(u), _phi_cdf(u) + u * _phi_pdf(u)


def _halves(x, axis):
    a, b = np.split(np.asarray(x, np.float64), 2, axis=axis)
    return a, b


def gated_activation(x, kind, axis=-1, gate="second", approximate=False):
    """y = a act(b) (gate="second") or act(a) b (gate="first")."""
    a, b = _halves(x, axis)
    if gate == "second":
        return a * gated_activation_act(b, kind, approximate)[0]
    return gated_activation_act(a, kind, approximate)[0] * b


def gated_activation_grad(x, dy, kind, axis=-1, gate="second", approximate=False):
    """dx = concat(da, db) for cotangent dy, from the analytic derivatives."""
    a, b = _halves(x, axis)
    dy = np.asarray(dy, np.float64)
    if gate == "second":
        act, d_act = gated_activation_act(b, kind, approximate)
        da, db = dy * act, dy * a * d_act
    else:
        act, d_act = gated_activation_act(a, kind, approximate)
        da, db = dy * b * d_act, dy * act
    return np.concatenate([da, db], axis=axis)


def write_slice(dest, source, start):
    """``dest`` with the window at ``start`` set to ``source``, row by row along axis 0.

    ``start[d]`` is an int (every row) or, for d >= 1, a vector indexed by the row
    of ``dest``. A row whose window does not fit ``dest`` is left unchanged (as is
    every row when a scalar start does not fit).
    """
    out = np.array(dest, copy=True)
    source = np.asarray(source)
    rows, first = source.shape[0], int(start[0])
    if rows == 0 or not 0 <= first <= dest.shape[0] - rows:
        return out
    for i in range(rows):
        r = first + i
        position = [int(np.asarray(s)[r]) if np.ndim(s) else int(s) for s in start[1:]]
        if all(0 <= p <= e - w for p, e, w in zip(position, dest.shape[1:], source.shape[1:])):
            window = tuple(slice(p, p + w) for p, w in zip(position, source.shape[1:]))
            out[(r, *window)] = source[i]
    return out


def _log_base(x, base):
    return np.log2(x) if base == 2 else np.log(x)


def cascade_merge(v, s, base=2):
    """Merge of K partial attention states: ``v [S, K, H, D], s [S, K, H] -> (v, s)``.

    ``s = +-inf`` is an empty state (weight 0, its ``v`` unused); all empty gives
    ``(0, -inf)``: m = max s_k, w_k = base^(s_k - m), v = sum w_k v_k / sum w_k,
    s = m + log_base(sum w_k).
    """
    v, s = np.asarray(v, np.float64), np.asarray(s, np.float64)
    empty = np.isinf(s)
    all_empty = empty.all(axis=1)
    m = np.max(np.where(empty, -np.inf, s), axis=1)
    m = np.where(all_empty, 0.0, m)
    b = 2.0 if base == 2 else math.e
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        w = np.where(empty, 0.0, b ** (s - m[:, None]))
        total = w.sum(axis=1)
        v_out = np.where(empty[..., None], 0.0, w[..., None] * v).sum(axis=1) / total[..., None]
        s_out = m + _log_base(total, base)
    return (np.where(all_empty[..., None], 0.0, v_out), np.where(all_empty, -np.inf, s_out))


def cascade_merge_grad(v, s, dv, ds, base=2):
    """``(dv_k, ds_k)`` of :func:`cascade_merge`: with p_k = w_k / sum w,
    dv_k = p_k dv and ds_k = p_k (ds + ln(base) <dv, v_k - v>); 0 for empty states."""
    v, s = np.asarray(v, np.float64), np.asarray(s, np.float64)
    dv, ds = np.asarray(dv, np.float64), np.asarray(ds, np.float64)
    v_out, s_out = cascade_merge(v, s, base)
    empty = np.isinf(s)
    b = 2.0 if base == 2 else math.e
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.where(empty, 0.0, b ** (s - s_out[:, None]))
    spread = np.where(empty[..., None], 0.0, v - v_out[:, None])
    dot = np.sum(dv[:, None] * spread, axis=-1)
    return p[..., None] * dv[:, None], p * (ds[:, None] + math.log(b) * dot)


def ssd_scan(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False,
             dt_limit=(0.0, math.inf), initial_states=None, seq_idx=None):
    """Mamba-2's recurrence step by step, a float64 ``lax.scan`` over time (x64 on; JAX
    only for its autodiff): ``(y [b, l, h, p], final [b, h, p, n])``.

    ``dt' = clip(softplus?(dt + dt_bias), dt_limit)``; ``h_t = exp(dt'_t A) h_{t-1} +
    dt'_t x_t B_t^T`` (h restarts at 0 where seq_idx changes); ``y_t = h_t C_t + D x_t``,
    times ``silu(z_t)``. Head i reads group ``i // (h // g)`` of B and C.
    """
    import jax
    import jax.numpy as jnp

    f64 = lambda v: None if v is None else jnp.asarray(v, jnp.float64)  # noqa: E731
    x, dt, A, B, C, D, z, dt_bias = map(f64, (x, dt, A, B, C, D, z, dt_bias))
    batch, seq_len, heads, head_dim = x.shape
    reps = heads // B.shape[2]
    B, C = jnp.repeat(B, reps, axis=2), jnp.repeat(C, reps, axis=2)
    u = dt + (0.0 if dt_bias is None else dt_bias)
    if dt_softplus:
        u = jax.nn.softplus(u)
    u = jnp.clip(u, *dt_limit)
    state = (jnp.zeros((batch, heads, head_dim, B.shape[-1])) if initial_states is None
             else f64(initial_states))
    ids = jnp.zeros((batch, seq_len), jnp.int32) if seq_idx is None else jnp.asarray(seq_idx)
    reset = jnp.concatenate([jnp.zeros((batch, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)

    def step(state, inputs):
        u_t, x_t, b_t, c_t, reset_t = inputs
        state = jnp.where(reset_t[:, None, None, None], 0.0, state)
        state = (jnp.exp(u_t * A)[..., None, None] * state
                 + (u_t[..., None] * x_t)[..., None] * b_t[:, :, None, :])
        return state, jnp.einsum("bhpn,bhn->bhp", state, c_t)

    moved = [jnp.moveaxis(v, 1, 0) for v in (u, x, B, C, reset)]
    final, y = jax.lax.scan(step, state, moved)
    y = jnp.moveaxis(y, 0, 1)
    if D is not None:
        y = y + (D[:, None] if D.ndim == 1 else D) * x
    if z is not None:
        y = y * jax.nn.silu(z)
    return y, final


def sinkhorn(logits, iters, eps, init="exp", order="columns_first"):
    """Sinkhorn-Knopp in float64 ``jax.numpy`` (differentiable, for gradient oracles):
    P = exp(L - max L) (the max over each matrix) or softmax_rows(L) + eps; then each
    normalisation P / (column sums + eps) or P / (row sums + eps): per iteration columns
    then rows ("columns_first") or rows then columns ("rows_first"); "deepseek": one
    column normalisation, then iters - 1 iterations of rows then columns."""
    import jax.numpy as jnp
    import jax
    p = jnp.asarray(logits, jnp.float64)
    if init == "exp":
        # The maximum as a gather at its argmax: its derivative picks that cell (JAX's
        # rule for a unique maximum) without comparing values, which XLA may recompute
        # differently inside a fusion under jit (no cell equal: a 0/0 tie count).
        flat = p.reshape(*p.shape[:-2], -1)
        top = jnp.take_along_axis(flat, jnp.argmax(flat, -1)[..., None], -1)
        p = jnp.exp(p - top[..., None])
    else:
        # Softmax does not depend on the shift: no derivative through it.
        e = jnp.exp(p - jax.lax.stop_gradient(jnp.max(p, axis=-1, keepdims=True)))
        p = e / e.sum(-1, keepdims=True) + eps
    columns, rows = -2, -1
    steps = {"columns_first": [columns, rows] * iters, "rows_first": [rows, columns] * iters,
             "deepseek": [columns] + [rows, columns] * (iters - 1)}[order]
    for axis in steps:
        p = p / (p.sum(axis, keepdims=True) + eps)
    return p


def _sigmoid64(u):
    import jax.numpy as jnp
    return 1 / (1 + jnp.exp(-u))


def hyper_connection(x, weight, h_pre, h_post, h_res, iters, eps, order="columns_first"):
    """HyperConnectionPlan's formula in float64: out_i = sum_j M_ij x_j + 2 sigmoid(h_post_i) y,
    y = agg / sqrt(mean agg^2 + eps) * weight, agg = sum_i sigmoid(h_pre_i) x_i."""
    import jax.numpy as jnp
    x, weight, h_pre, h_post, h_res = (jnp.asarray(a, jnp.float64)
                                       for a in (x, weight, h_pre, h_post, h_res))
    m = sinkhorn(h_res, iters, eps, "exp", order)
    agg = (_sigmoid64(h_pre)[None, :, None] * x).sum(1)
    y = agg / jnp.sqrt((agg * agg).mean(-1, keepdims=True) + eps) * weight
    mixed = (m[None, :, :, None] * x[:, None, :, :]).sum(2)
    return mixed + 2 * _sigmoid64(h_post)[None, :, None] * y[:, None, :]


def mhc_layer(x, sublayer, bias, phi=None, alpha=None, *, rmsnorm_eps, iters, sinkhorn_eps,
              init="exp", order="columns_first", pre_eps=0.0, post_scale=2.0,
              transpose_res=False, x_post=None):
    """The paper's layer in float64 for x [T, n, C]: x_next = H_res x + H_post^T F(H_pre x),
    with H~ = bias (static) or alpha * (RMSNorm(vec x) phi) + bias per token (``x_post``,
    if given, stands for x in H_res x). Returns (x_next, layer_input, h_post, h_res)."""
    import jax.numpy as jnp
    x = jnp.asarray(x, jnp.float64)
    x_post = x if x_post is None else jnp.asarray(x_post, jnp.float64)
    tokens, n, hidden = x.shape
    bias = jnp.asarray(bias, jnp.float64)
    if phi is None:
        h_tilde = jnp.broadcast_to(bias, (tokens, bias.shape[0]))
    else:
        flat = x.reshape(tokens, n * hidden)
        normed = flat / jnp.sqrt((flat * flat).mean(-1, keepdims=True) + rmsnorm_eps)
        alpha = jnp.asarray(alpha, jnp.float64)
        scale = jnp.concatenate([jnp.full(n, alpha[0]), jnp.full(n, alpha[1]),
                                 jnp.full(n * n, alpha[2])])
        h_tilde = scale * (normed @ jnp.asarray(phi, jnp.float64)) + bias
    h_pre = _sigmoid64(h_tilde[:, :n]) + pre_eps
    h_post = post_scale * _sigmoid64(h_tilde[:, n:2 * n])
    h_res = sinkhorn(h_tilde[:, 2 * n:].reshape(tokens, n, n), iters, sinkhorn_eps, init, order)
    layer_input = (h_pre[:, :, None] * x).sum(1)
    res = jnp.swapaxes(h_res, 1, 2) if transpose_res else h_res
    x_next = ((res[:, :, :, None] * x_post[:, None, :, :]).sum(2)
              + h_post[:, :, None] * sublayer(layer_input)[:, None, :])
    return x_next, layer_input, h_post, h_res


def deepseek_mhc_layer(residual, fn, scale, base, norm_weight, sublayer):
    """DeepSeek's released mHC (deepseek-ai/TileKernels) in float64, in its own terms:
    residual [T, n, C], fn [n(n+2), n C], scale [3], base [n(n+2)], norm_weight [n C].
    mixes = RMSNorm(vec residual) * norm_weight @ fn^T (eps 1e-6); pre = sigmoid + 1e-6,
    post = sigmoid, comb = softmax(rows) + 1e-6, one column normalisation, then 9 rounds
    of rows then columns, each p / (sum + 1e-6); out_i = sum_j comb_ji x_j + post_i f.
    Returns (out, layer_input, post, comb)."""
    import jax
    import jax.numpy as jnp
    x = jnp.asarray(residual, jnp.float64)
    tokens, n, hidden = x.shape
    fn, scale, base, w = (jnp.asarray(a, jnp.float64) for a in (fn, scale, base, norm_weight))
    flat = x.reshape(tokens, n * hidden)
    normed = flat / jnp.sqrt((flat * flat).mean(-1, keepdims=True) + 1e-6) * w
    mixes = normed @ fn.T
    pre = _sigmoid64(mixes[:, :n] * scale[0] + base[:n]) + 1e-6
    post = _sigmoid64(mixes[:, n:2 * n] * scale[1] + base[n:2 * n])
    comb = (mixes[:, 2 * n:] * scale[2] + base[2 * n:]).reshape(tokens, n, n)
    comb = jnp.exp(comb - jax.lax.stop_gradient(comb.max(-1, keepdims=True)))  # softmax
    comb = comb / comb.sum(-1, keepdims=True) + 1e-6
    comb = comb / (comb.sum(-2, keepdims=True) + 1e-6)
    for _ in range(10 - 1):
        comb = comb / (comb.sum(-1, keepdims=True) + 1e-6)
        comb = comb / (comb.sum(-2, keepdims=True) + 1e-6)
    layer_input = (pre[:, :, None] * x).sum(1)
    out = (jnp.swapaxes(comb, 1, 2)[:, :, :, None] * x[:, None, :, :]).sum(2) \
        + post[:, :, None] * sublayer(layer_input)[:, None, :]
    return out, layer_input, post, comb


def causal_conv1d(x, weight, bias=None, *, activation=None, initial_states=None, seq_idx=None):
    """``y[b, t, c] = act(bias[c] + sum_j weight[c, j] x[b, t - (k - 1) + j, c])`` in float64
    ``jax.numpy`` (x64 on; JAX only for its autodiff): rows before the start are
    ``initial_states`` (or zeros); a row of another sequence than t's (``seq_idx``) is zero,
    the rows before the start counting as the first sequence's."""
    import jax
    import jax.numpy as jnp

    x, weight = jnp.asarray(x, jnp.float64), jnp.asarray(weight, jnp.float64)
    batch, length, channels = x.shape
    taps = weight.shape[1]
    before = (jnp.zeros((batch, taps - 1, channels)) if initial_states is None
              else jnp.asarray(initial_states, jnp.float64))
    rows = jnp.concatenate([before, x], axis=1)          # row s of x at s + k - 1
    ids = jnp.zeros((batch, length), jnp.int32) if seq_idx is None else jnp.asarray(seq_idx)
    row_ids = jnp.concatenate([jnp.repeat(ids[:, :1], taps - 1, axis=1), ids], axis=1)
    y = jnp.zeros(x.shape) if bias is None else jnp.broadcast_to(
        jnp.asarray(bias, jnp.float64), x.shape)
    for j in range(taps):   # the rows t - (k - 1) + j for every t at once
        same = row_ids[:, j:j + length] == ids
        y = y + weight[:, j] * jnp.where(same[..., None], rows[:, j:j + length], 0.0)
    return jax.nn.silu(y) if activation == "silu" else y


def attention(q, k, v, visible, scale):
    """``(out, lse)`` of softmax attention in float64: ``q [b, t, h, d]``, ``k, v [b, s, hk,
    d]`` (query head i reads kv head i // (h / hk)), ``visible`` bool ``[b, t, s]``; a
    query with no visible key gets ``(0, -inf)``."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, d = q.shape
    k, v = (np.repeat(a, h // a.shape[2], axis=2) for a in (k, v))
    out, lse = np.zeros((b, t, h, d)), np.full((b, t, h), -np.inf)
    for r in range(b):
        for i in range(t):
            keys = np.flatnonzero(visible[r, i])
            if keys.size == 0:
                continue
            scores = scale * np.einsum("hd,shd->hs", q[r, i], k[r, keys])
            peak = scores.max(axis=-1, keepdims=True)
            weights = np.exp(scores - peak)
            out[r, i] = np.einsum("hs,shd->hd", weights, v[r, keys]) / weights.sum(-1)[:, None]
            lse[r, i] = peak[:, 0] + np.log(weights.sum(-1))
    return out, lse
