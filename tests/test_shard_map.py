"""Ops inside ``jax.shard_map`` with its default checks (``check_vma``).

Every op is called on per-device blocks of arrays split along their first axis, with
its parameters replicated (``P()``), over a mesh of every device here (eight CPU
devices, or the GPUs). The values and the gradients of every argument, the replicated
parameters included (each device's part summed), equal the call outside ``shard_map``.

JAX's Pallas interpreter cannot run inside ``shard_map`` with these checks: it pads the
blocks it slices with values that vary over no mesh axis, which ``check_vma`` refuses
when the program is lowered. On the ``interpret`` backend the programs are therefore
traced (every type, ours included, checked) but not run; the ``pallas`` backend runs them
on a GPU.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

import bjax
from tests.conftest import BACKENDS, random

_N, _C = 4, 8   # mHC: streams, channels

# op: (make(backend) -> fn(*blocks, *params), shapes of the blocks, shapes of the params).
CASES = {
    "swiglu": (lambda b: lambda x: bjax.swiglu(x, backend=b), [(16, 32)], []),
    "merge_state": (lambda b: lambda v, s: bjax.merge_state(v, s, 2 * v, s + 1, backend=b),
                    [(16, 4, 8), (16, 4)], []),
    "merge_states": (lambda b: lambda v, s: bjax.merge_states(v, s, backend=b),
                     [(16, 3, 4, 8), (16, 3, 4)], []),
    "write_slice": (lambda b: lambda c, t: bjax.write_slice(c, t, (0, 3, 0), backend=b),
                    [(16, 10, 8), (16, 1, 8)], []),
    "sinkhorn_knopp": (lambda b: lambda l: bjax.sinkhorn_knopp(l, backend=b), [(16, 4, 4)], []),
    "ssd_chunk_scan": (lambda b: lambda x, dt, B, C, a, D, bias: bjax.ssd_chunk_scan(
        x, dt, -jnp.exp(a), B, C, chunk_size=16, D=D, dt_bias=bias, dt_softplus=True,
        return_final_states=True, backend=b),
        [(8, 16, 2, 4), (8, 16, 2), (8, 16, 1, 8), (8, 16, 1, 8)], [(2,), (2,), (2,)]),
    "ssd_step": (lambda b: lambda st, x, dt, B, C, a, D, bias: bjax.ssd_step(
        st, x, dt, -jnp.exp(a), B, C, D=D, dt_bias=bias, dt_softplus=True, backend=b),
        [(8, 2, 4, 8), (8, 2, 4), (8, 2), (8, 1, 8), (8, 1, 8)], [(2,), (2,), (2,)]),
    "causal_conv1d": (lambda b: lambda x, init, w, bias: bjax.causal_conv1d(
        x, w, bias, activation="silu", initial_states=init, return_final_states=True,
        backend=b), [(8, 12, 16), (8, 3, 16)], [(16, 4), (16,)]),
    "causal_conv1d_step": (lambda b: lambda st, x, w, bias: bjax.causal_conv1d_step(
        st, x, w, bias, activation="silu", backend=b), [(8, 3, 16), (8, 16)], [(16, 4), (16,)]),
    "mhc_pre_static": (lambda b: lambda x, bias: bjax.mhc_pre(x, bias=bias, backend=b),
                       [(16, _N, _C)], [(_N * _N + 2 * _N,)]),
    "mhc_pre_dynamic": (lambda b: lambda x, phi, alpha, bias: bjax.mhc_pre(
        x, phi=phi, alpha=alpha, bias=bias, backend=b),
        [(16, _N, _C)], [(_N * _C, _N * _N + 2 * _N), (3,), (_N * _N + 2 * _N,)]),
    "mhc_post": (lambda b: lambda x, f, hp, hr: bjax.mhc_post(x, f, hp, hr, backend=b),
                 [(16, _N, _C), (16, _C), (16, _N), (16, _N, _N)], []),
    "hyper_connection": (lambda b: lambda x, w, pre, post, res: bjax.hyper_connection(
        x, w, pre, post, res, backend=b), [(16, _N, _C)], [(_C,), (_N,), (_N,), (_N, _N)]),
}


def _problem(op):
    make, blocks, params = CASES[op]
    args = [random((11, i), shape, jnp.float32, scale=1.0)
            for i, shape in enumerate(blocks + params)]
    return make, args, (P("data"),) * len(blocks) + (P(),) * len(params)


def _loss(fn):
    """A scalar of every output (cotangents ``2 out``: distinct on every element)."""
    return lambda *args: sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(fn(*args)))


def _values_and_grads(fn):
    """One program: ``fn``'s outputs and the gradients of :func:`_loss` in every argument."""
    def run(*args):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(jax.tree.map(lambda v: 2 * v, out))
    return jax.jit(run)


def _mapped(fn, specs):
    mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(AxisType.Auto,))
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P("data"))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "interpret"])
@pytest.mark.parametrize("op", CASES)
def test_shard_map_with_checks(op, backend):
    make, args, specs = _problem(op)
    fn = make(backend)
    (outs, grads), (refs, ref_grads) = (_values_and_grads(f)(*args)
                                        for f in (_mapped(fn, specs), fn))
    # The same rows in other programs: XLA may fuse and sum them in another order.
    for out, ref in zip(jax.tree.leaves(outs), jax.tree.leaves(refs)):
        ref = np.asarray(ref)
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    # A replicated parameter's gradient is every device's part, summed: in another order.
    for grad, ref in zip(grads, ref_grads, strict=True):
        ref = np.asarray(ref)
        np.testing.assert_allclose(np.asarray(grad), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("op", CASES)
def test_shard_map_with_checks_traces_on_the_interpreter(op):
    """The kernels' results, the ops' own values and every gradient are typed as
    ``check_vma`` requires (the interpreter itself cannot run here: module doc)."""
    make, args, specs = _problem(op)
    mapped = _mapped(make("interpret"), specs)
    jax.jit(mapped).trace(*args)
    jax.jit(jax.grad(_loss(mapped), argnums=tuple(range(len(args))))).trace(*args)
