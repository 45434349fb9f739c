"""``python -m bjax.demo``: every op on the default backend, checked and timed.

On a CUDA GPU the default backend is Pallas; elsewhere it is XLA, and the
Pallas kernels also run through the Pallas interpreter (on smaller shapes: the
interpreter runs the grid one program at a time). Gated activations and
cascade merges are compared with the XLA implementation evaluated in
float64, the SSD scan and step and the causal convolution with it in float32 (its matmuls at full float32
precision) (the table gives the largest error relative to the reference's largest
magnitude, bound 2^-7 for bf16 results); write_slice with NumPy, bit for bit
(the error is the fraction of elements whose bits differ; bound 0). Times are the
median of a call.
"""
from __future__ import annotations

import functools
import statistics
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)  # float64 references

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bjax  # noqa: E402


def _time_ms(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _relative_error(out, ref):
    out, ref = jnp.asarray(out, jnp.float64), jnp.asarray(ref, jnp.float64)
    return float(jnp.max(jnp.abs(out - ref)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-300))


# bf16 outputs: rounding alone costs up to half an ulp, 2^-8 of |y| just above a
# power of two; float32 math adds a little more. One ulp (2^-7) bounds both.
_GATED_BOUND = 2**-7


def gated_rows(backend, shape, dtype):
    """Forward and backward of every gated activation."""
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(dtype)
    dy = jax.random.normal(jax.random.key(1), shape[:-1] + (shape[-1] // 2,),
                           jnp.float32).astype(dtype)
    x64, dy64 = x.astype(jnp.float64), dy.astype(jnp.float64)
    rows = []
    for kind in bjax.gated.KINDS:
        fn = functools.partial(bjax.gated_activation, kind=kind, backend=backend)
        ref_fn = functools.partial(bjax.gated_activation, kind=kind, backend="xla")
        fwd = jax.jit(fn)
        bwd = jax.jit(lambda x, dy, fn=fn: jax.vjp(fn, x)[1](dy)[0])
        ref_bwd = jax.vjp(ref_fn, x64)[1](dy64)[0]
        for name, f, args, ref in ((f"{kind} fwd", fwd, (x,), ref_fn(x64)),
                                   (f"{kind} bwd", bwd, (x, dy), ref_bwd)):
            out = f(*args)
            rows.append((name, shape, jnp.dtype(dtype).name, backend,
                         _relative_error(out, ref), _time_ms(f, *args), _GATED_BOUND))
    return rows


def write_slice_rows(backend, cache_shape):
    """A KV-cache append of one token, at one position and at per-row positions
    (one of them past the end: that row must stay unchanged)."""
    batch, seq = cache_shape[:2]
    cache = jax.random.normal(jax.random.key(0), cache_shape, jnp.bfloat16)
    token = jax.random.normal(jax.random.key(1), (batch, 1, *cache_shape[2:]), jnp.bfloat16)
    lengths = np.arange(batch) * 7 % seq
    lengths[-1] = seq  # full: this row is left as it is
    rows = []
    for name, position in (("kv append", np.int32(seq // 2)), ("ragged append", lengths)):
        append = jax.jit(lambda c, t, p: bjax.write_slice(c, t, (0, p) + (0,) * (c.ndim - 2),
                                                          backend=backend))
        out = np.asarray(append(cache, token, position))
        ref = np.array(cache)
        for b, p in enumerate(np.broadcast_to(position, (batch,))):
            if p < seq:
                ref[b, p] = np.asarray(token)[b, 0]
        mismatched = np.mean(out.view(np.uint16) != ref.view(np.uint16))
        rows.append((f"write_slice {name}", cache_shape, "bfloat16", backend, float(mismatched),
                     _time_ms(append, cache, token, position), 0.0))
    return rows


def cascade_rows(backend, shape):
    """merge_states and merge_state of bf16 partial states (some of them empty), forward
    and backward, against the XLA backend evaluated in float64."""
    seq_len, num_states = shape[:2]
    v = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(jnp.bfloat16)
    s = 20 * jax.random.normal(jax.random.key(1), shape[:3], jnp.float32)
    s = s.at[::5, 0].set(-jnp.inf)  # empty states: their v must not leak
    dv = jax.random.normal(jax.random.key(2), (seq_len, *shape[2:]), jnp.bfloat16)
    ds = jax.random.normal(jax.random.key(3), (seq_len, shape[2]), jnp.float32)
    v64, s64 = v.astype(jnp.float64), s.astype(jnp.float64)
    rows = []
    cases = (
        ("merge_state fwd", lambda v, s: bjax.merge_state(v[:, 0], s[:, 0], v[:, 1], s[:, 1],
                                                          backend=backend),
         lambda v, s: bjax.merge_state(v[:, 0], s[:, 0], v[:, 1], s[:, 1], backend="xla")),
        ("merge_states fwd", functools.partial(bjax.merge_states, backend=backend),
         functools.partial(bjax.merge_states, backend="xla")),
        ("merge_states bwd", lambda v, s: jax.vjp(
            functools.partial(bjax.merge_states, backend=backend), v, s)[1](
            (dv.astype(v.dtype), ds.astype(s.dtype))),
         lambda v, s: jax.vjp(functools.partial(bjax.merge_states, backend="xla"), v, s)[1](
            (dv.astype(v.dtype), ds.astype(s.dtype)))),
    )
    for name, fn, ref_fn in cases:
        f = jax.jit(fn)
        error = max(_relative_error(jnp.where(jnp.isinf(r), 0, o), jnp.where(jnp.isinf(r), 0, r))
                    for o, r in zip(f(v, s), ref_fn(v64, s64)))
        rows.append((name, shape, "bfloat16", backend, error, _time_ms(f, v, s), _GATED_BOUND))
    return rows


def ssd_rows(backend, shape):
    """ssd_chunk_scan (bf16, with D, z and softplus), its gradients for x, dt, B, C
    and z, and 16 ssd_steps from its final state, against the XLA backend on float32
    copies of the same inputs."""
    batch, seq_len, heads, head_dim, groups, state_dim, chunk = shape
    k = jax.random.split(jax.random.key(0), 7)
    x = jax.random.normal(k[0], (batch, seq_len, heads, head_dim), jnp.bfloat16)
    dt = jax.random.normal(k[1], (batch, seq_len, heads), jnp.float32) - 3
    A = -jax.random.uniform(k[2], (heads,), jnp.float32, 1.0, 16.0)
    B, C = (jax.random.normal(key, (batch, seq_len, groups, state_dim), jnp.bfloat16)
            for key in k[3:5])
    z = jax.random.normal(k[5], x.shape, jnp.bfloat16)
    D = jax.random.normal(k[6], (heads,), jnp.float32)
    f32 = lambda *vs: [v.astype(jnp.float32) for v in vs]  # noqa: E731

    def scan(x, dt, B, C, z, backend=backend):
        return bjax.ssd_chunk_scan(x, dt, A, B, C, chunk_size=chunk, D=D, z=z, dt_softplus=True,
                                   return_final_states=True, backend=backend)

    def steps(state, x, dt, B, C, z, backend=backend):
        for t in range(16):
            y, state = bjax.ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D=D,
                                     z=z[:, t], dt_softplus=True, backend=backend)
        return y, state

    def grads(x, dt, B, C, z, backend=backend):
        _, vjp = jax.vjp(lambda *a: scan(*a, backend=backend), x, dt, B, C, z)
        return vjp((x, final))

    fn = jax.jit(scan)
    y, final = fn(x, dt, B, C, z)
    ref_y, ref_final = scan(*f32(x, dt, B, C, z), backend="xla")
    grad_fn = jax.jit(grads)
    _, ref_vjp = jax.vjp(lambda *a: scan(*a, backend="xla"), *f32(x, dt, B, C, z))
    ref_grads = ref_vjp((x.astype(jnp.float32), final))
    step_fn = jax.jit(steps)
    step_args = (final, x, dt, B, C, z)
    ref_steps = steps(ref_final, *f32(x, dt, B, C, z), backend="xla")
    return [("ssd_chunk_scan fwd", shape[:4], "bfloat16", backend,
             max(_relative_error(y, ref_y), _relative_error(final, ref_final)),
             _time_ms(fn, x, dt, B, C, z), _GATED_BOUND),
            ("ssd_chunk_scan fwd+bwd", shape[:4], "bfloat16", backend,
             max(_relative_error(o, r) for o, r in zip(grad_fn(x, dt, B, C, z), ref_grads)),
             _time_ms(grad_fn, x, dt, B, C, z), _GATED_BOUND),
            ("ssd_step x16", shape[:4], "bfloat16", backend,
             max(_relative_error(o, r) for o, r in zip(step_fn(*step_args), ref_steps)),
             _time_ms(step_fn, *step_args), _GATED_BOUND)]


def conv_rows(backend, shape):
    """causal_conv1d (bf16, silu, bias; 4 taps), its gradients for x, weight and bias, and
    16 causal_conv1d_steps from its final state, against the XLA backend on float32 copies."""
    batch, length, channels = shape
    k = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(k[0], shape, jnp.bfloat16)
    weight = jax.random.normal(k[1], (channels, 4), jnp.bfloat16)
    bias = jax.random.normal(k[2], (channels,), jnp.bfloat16)
    f32 = lambda *vs: [v.astype(jnp.float32) for v in vs]  # noqa: E731

    def conv(x, weight, bias, backend=backend):
        return bjax.causal_conv1d(x, weight, bias, activation="silu", return_final_states=True,
                                  backend=backend)

    def grads(x, weight, bias, backend=backend):
        out, vjp = jax.vjp(lambda *a: conv(*a, backend=backend)[0], x, weight, bias)
        return vjp(out)

    def steps(state, x, weight, bias, backend=backend):
        for t in range(16):
            y, state = bjax.causal_conv1d_step(state, x[:, t], weight, bias, activation="silu",
                                               backend=backend)
        return y, state

    fn, grad_fn, step_fn = jax.jit(conv), jax.jit(grads), jax.jit(steps)
    args, ref_args = (x, weight, bias), f32(x, weight, bias)
    final = fn(*args)[1]
    step_args = (final, *args)
    ref_steps = steps(final.astype(jnp.float32), *ref_args, backend="xla")
    return [(name, shape, "bfloat16", backend,
             max(_relative_error(o, r) for o, r in zip(mine(*margs), ref)),
             _time_ms(mine, *margs), _GATED_BOUND)
            for name, mine, margs, ref in (
                ("causal_conv1d fwd", fn, args, conv(*ref_args, backend="xla")),
                ("causal_conv1d fwd+bwd", grad_fn, args, grads(*ref_args, backend="xla")),
                ("causal_conv1d_step x16", step_fn, step_args, ref_steps))]


def hyper_connection_rows(backend, shape):
    """The fused static mHC op (baracuda-kernels' ``HyperConnectionPlan``) on float32 x (forward, and gradients of all five inputs), and an
    mHC layer (dynamic mhc_pre, identity sublayer, mhc_post) in bfloat16 with its
    gradients, against the XLA backend on float32 copies."""
    batch, n, hidden = shape
    k = jax.random.split(jax.random.key(1), 8)
    args = (jax.random.normal(k[0], shape, jnp.float32), jax.random.normal(k[1], (hidden,)),
            jax.random.normal(k[2], (n,)), jax.random.normal(k[3], (n,)),
            jax.random.normal(k[4], (n, n)))
    count = n * n + 2 * n
    layer_args = (jax.random.normal(k[5], shape, jnp.bfloat16),
                  0.02 * jax.random.normal(k[6], (n * hidden, count)),
                  jnp.array([0.8, 0.6, 1.1]), jax.random.normal(k[7], (count,)))

    def fused_op(*a, backend=backend):
        return bjax.hyper_connection(*a, backend=backend)

    def layer(x, phi, alpha, bias, backend=backend):
        layer_input, h_post, h_res = bjax.mhc_pre(x, phi=phi, alpha=alpha, bias=bias,
                                                  backend=backend)
        return bjax.mhc_post(x, layer_input, h_post, h_res, backend=backend)

    def grads(fn):
        def run(*a):  # gradients of every argument for the cotangent out
            out, vjp = jax.vjp(fn, *a)
            return vjp(out)
        return run

    rows = []
    for name, fn, fargs, dtype in (("hyper_connection", fused_op, args, "float32"),
                                   ("mhc_pre+mhc_post", layer, layer_args, "bfloat16")):
        f32_args = [a.astype(jnp.float32) for a in fargs]
        ref = functools.partial(fn, backend="xla")
        for direction, make in (("fwd", lambda f: f), ("fwd+bwd", grads)):
            mine = jax.jit(make(fn))
            error = max(_relative_error(o, r) for o, r in zip(
                jax.tree.leaves(mine(*fargs)), jax.tree.leaves(make(ref)(*f32_args))))
            rows.append((f"{name} {direction}", shape, dtype, backend, error,
                         _time_ms(mine, *fargs), _GATED_BOUND))
    return rows


def main() -> int:
    # The backend an op call without backend= runs on here.
    default = bjax.plan(bjax.swiglu, jax.ShapeDtypeStruct((8, 64), jnp.float32)).backend
    on_gpu = default == "pallas"
    runs = [(default, (4096, 8192) if on_gpu else (256, 1024),
             (8, 4096, 8, 128) if on_gpu else (4, 256, 4, 64),
             (4096, 4, 32, 128) if on_gpu else (256, 4, 8, 64),
             (4, 4096, 64, 64, 1, 128, 256) if on_gpu else (1, 256, 4, 32, 1, 32, 64),
             (8192, 4, 4096) if on_gpu else (64, 4, 256),
             (4, 2048, 5376) if on_gpu else (2, 256, 128))]
    if not on_gpu:
        runs.append(("interpret", (64, 256), (4, 64, 2, 32), (16, 3, 4, 32),
                     (1, 70, 4, 16, 2, 16, 32), (9, 4, 40), (2, 37, 24)))
    print(f"bjax {bjax.__version__} on {jax.devices()[0].device_kind}; default backend: {default}")
    header = (f"{'op':<26} {'shape':<18} {'dtype':<9} {'backend':<10} {'error':>12} "
              f"{'bound':>9} {'ms':>9}")
    print(header + "\n" + "-" * len(header))
    failures = 0
    for backend, gated_shape, cache_shape, cascade_shape, ssd_shape, hc_shape, conv_shape in runs:
        rows = (gated_rows(backend, gated_shape, jnp.bfloat16)
                + write_slice_rows(backend, cache_shape) + cascade_rows(backend, cascade_shape)
                + ssd_rows(backend, ssd_shape) + hyper_connection_rows(backend, hc_shape)
                + conv_rows(backend, conv_shape))
        for name, shp, dtype, be, err, ms, bound in rows:
            failures += err > bound
            print(f"{name:<26} {str(shp):<18} {dtype:<9} {be:<10} {err:>12.2e} {bound:>9.2e} "
                  f"{ms:>9.3f}")
    print(f"\n{'all results match their references' if not failures else 'MISMATCH'}"
          f" ({failures} outside their bound)")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
