"""A training step on several devices against one: data parallel, and tensor parallel over
heads.

    python -m benchmarks.sharded_step [--devices 2] [--backend pallas] [--size h200]

* ``data``: ``bjax.nn.HybridLM`` (Mamba-2 and attention mixers, SwiGLU MLPs, mHC streams),
  next-token cross-entropy; the global batch split over a mesh of ``--devices`` ("data"),
  the parameters replicated.
* ``heads``: a stack of residual blocks, each an SSD mixer (``ssd_chunk_scan``) and a
  SwiGLU ``bjax.nn.GatedMLP``, Megatron-style on a mesh of ``(1, devices)``: the mixer's
  heads with their groups, and the MLP's hidden columns, split over "model"; mean squared
  error against a fixed target.

Both take one plain SGD step (the parameters donated), bfloat16 parameters at ``h200``
size. Each is timed on the mesh at the global batch and on one device at
``1 / devices`` of it (device throughput: steps enqueued, one block).
``scaling`` = devices x t(one device, batch / devices) / t(mesh, batch), the throughput
ratio (the goal on 2 H200s: 1.8). ``sent`` lists the compiled sharded step's collectives
with the bytes of their results (a split that needs no gather has all-reduces only).
``loss diff``: the sharded step's loss against one device's at the global batch, over its
magnitude. The report names ``NCCL_NVLS_ENABLE`` as the process saw it.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import bjax
from benchmarks import harness


@dataclasses.dataclass(frozen=True)
class Size:
    """The two models and their global batches."""
    vocab: int
    hidden: int
    pattern: str            # HybridLM's mixers ("m": Mamba-2, "a": attention)
    mamba: dict             # HybridLM's Mamba2 arguments
    attention_heads: int
    heads: int              # the head-parallel stack's SSD heads ...
    head_dim: int
    groups: int             # ... in groups, a multiple of the devices
    state: int
    layers: int
    batch: int              # global batch (a multiple of the devices)
    seq_len: int
    chunk: int
    param_dtype: str


SIZES = {
    "h200": Size(vocab=32768, hidden=1024, pattern="mam",
                 mamba=dict(num_heads=32, head_dim=64, state_size=128, chunk_size=256),
                 attention_heads=8, heads=32, head_dim=64, groups=8, state=128, layers=4,
                 batch=16, seq_len=2048, chunk=256, param_dtype="bfloat16"),
    "tiny": Size(vocab=32, hidden=16, pattern="ma",
                 mamba=dict(num_heads=2, head_dim=16, state_size=8, chunk_size=16),
                 attention_heads=2, heads=4, head_dim=8, groups=2, state=8, layers=1,
                 batch=4, seq_len=32, chunk=16, param_dtype="float32"),
}

def _sent(found: dict) -> str:
    return ", ".join(f"{n} {kind}" + (f" ({b / 2**20:.1f} MiB)" if kind == "all-reduce" else "")
                     for kind, (n, b) in found.items()) or "none"


class HeadParallelBlock(nnx.Module):
    """``u + W_out ssd(W_x u, W_dt u, A, W_B u, W_C u)``, then ``+ GatedMLP``: the heads
    (``W_x [hidden, heads, head_dim]``, ``W_dt``, ``A``, ``dt_bias``), the groups
    (``W_B``, ``W_C [hidden, groups, state]``) and the MLP's hidden columns carry a
    "model" axis; only the two out-projections sum over it."""

    def __init__(self, size: Size, backend, rngs: nnx.Rngs):
        dtype = jnp.dtype(size.param_dtype)
        lecun = nnx.initializers.lecun_normal()

        def param(shape, spec, init=lecun):
            return nnx.Param(nnx.with_partitioning(init, spec)(rngs.params(), shape, dtype))

        def uniform(low, high):
            return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, low, high)

        h, p, g, n = size.heads, size.head_dim, size.groups, size.state
        self.w_x = param((size.hidden, h, p), (None, "model", None))
        self.w_dt = param((size.hidden, h), (None, "model"))
        self.w_b = param((size.hidden, g, n), (None, "model", None))
        self.w_c = param((size.hidden, g, n), (None, "model", None))
        self.log_a = param((h,), ("model",), uniform(0.0, 2.0))
        self.dt_bias = param((h,), ("model",), uniform(-4.0, -2.0))
        self.w_out = param((h, p, size.hidden), ("model", None, None),
                           nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2))
        self.mlp = bjax.nn.GatedMLP(
            size.hidden, 4 * size.hidden, param_dtype=dtype, backend=backend, rngs=rngs,
            in_kernel_init=nnx.with_partitioning(lecun, (None, None, "model")),
            out_kernel_init=nnx.with_partitioning(lecun, ("model", None)))
        self.chunk, self.backend = size.chunk, backend

    def __call__(self, u):
        def project(w, spec):
            return jnp.einsum(f"bld,{spec}", u, w[...])
        y = bjax.ssd_chunk_scan(
            project(self.w_x, "dhp->blhp"), project(self.w_dt, "dh->blh").astype(jnp.float32),
            -jnp.exp(self.log_a[...].astype(jnp.float32)), project(self.w_b, "dgn->blgn"),
            project(self.w_c, "dgn->blgn"), chunk_size=self.chunk,
            dt_bias=self.dt_bias[...].astype(jnp.float32), dt_softplus=True,
            backend=self.backend)
        u = u + jnp.einsum("blhp,hpd->bld", y, self.w_out[...])
        return u + self.mlp(u)


class HeadParallelStack(nnx.Module):
    def __init__(self, size: Size, backend, rngs: nnx.Rngs):
        self.blocks = nnx.List([HeadParallelBlock(size, backend, rngs)
                                for _ in range(size.layers)])

    def __call__(self, u):
        for block in self.blocks:
            u = block(u)
        return u


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape),
                         devices=jax.devices()[:int(np.prod(shape))])


def data_parallel(size: Size, backend, devices: int):
    """HybridLM, its loss, its global batch of tokens and the mesh."""
    model = bjax.nn.HybridLM(size.vocab, size.hidden, pattern=size.pattern,
                             attention_heads=size.attention_heads, mamba=size.mamba,
                             param_dtype=jnp.dtype(size.param_dtype), backend=backend,
                             rngs=nnx.Rngs(0))

    def loss(model, tokens):
        logits = model(tokens[:, :-1]).astype(jnp.float32)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
            logits, tokens[:, 1:, None], -1)[..., 0])

    tokens = jax.random.randint(jax.random.key(1), (size.batch, size.seq_len + 1), 0,
                                size.vocab)
    return model, loss, tokens, _mesh((devices,), ("data",))


def head_parallel(size: Size, backend, devices: int):
    """The head-parallel stack, its loss, its global batch of inputs and the mesh."""
    mesh = _mesh((1, devices), ("data", "model"))
    with jax.set_mesh(mesh):   # flax places annotated parameters on the current mesh
        model = HeadParallelStack(size, backend, nnx.Rngs(0))
    u = jax.random.normal(jax.random.key(1), (size.batch, size.seq_len, size.hidden),
                          jnp.dtype(size.param_dtype))

    def loss(model, u):
        return jnp.mean((model(u).astype(jnp.float32) - jnp.sin(u.astype(jnp.float32))) ** 2)
    return model, loss, u, mesh


MODES = {"data": data_parallel, "heads": head_parallel}


def sgd_step(graphdef, loss, lr: float = 1e-3):
    """``(params, loss value), batch -> (params - lr grad, loss value)``, jitted, donating."""
    def step(state, batch):
        params = state[0]
        value, grads = jax.value_and_grad(lambda p: loss(nnx.merge(graphdef, p), batch))(params)
        return jax.tree.map(lambda p, g: p - lr * g.astype(p.dtype), params, grads), value
    return jax.jit(step, donate_argnums=0)


def mode_row(mode: str, size: Size, backend, devices: int, calls: int, rounds: int) -> list:
    """One mode on the mesh against one device: a report row."""
    model, loss, batch, mesh = MODES[mode](size, backend, devices)
    graphdef, params = nnx.split(model, nnx.Param)
    host = jax.tree.map(np.asarray, params)
    # The parameters as the mode places them (data: replicated over the mesh), and on one
    # device; fresh buffers each time, since the step donates them.
    placement = jax.tree.map(lambda v: v.sharding if isinstance(v.sharding, NamedSharding)
                             else NamedSharding(mesh, P()), params)
    one = jax.devices()[0]

    def on_mesh():
        return jax.device_put(host, placement), jnp.float32(0)

    def on_one():
        return jax.device_put(host, one), jnp.float32(0)

    step = sgd_step(graphdef, loss)
    spread = jax.device_put(batch, NamedSharding(mesh, P("data")))
    part = jax.device_put(batch[: size.batch // devices], one)
    sharded_step = step.lower(on_mesh(), spread).compile()
    sent = harness.collectives(sharded_step.as_text())
    loss_mesh = float(sharded_step(on_mesh(), spread)[1])
    loss_one = float(step(on_one(), jax.device_put(batch, one))[1])
    times = harness.chained_times_ms(
        {"mesh": lambda state: sharded_step(state, spread),
         "one": lambda state: step(state, part)},
        {"mesh": on_mesh(), "one": on_one()}, calls=calls, rounds=rounds)
    tokens = size.batch * size.seq_len
    scaling = devices * times["one"] / times["mesh"]
    return [mode, str(devices), "x".join(map(str, mesh.devices.shape)), str(size.batch),
            f"{times['mesh']:.2f}", f"{times['one']:.2f}", f"{tokens / times['mesh'] / 1e3:.3g}",
            f"{tokens / devices / times['one'] / 1e3:.3g}", f"{scaling:.2f}", _sent(sent),
            f"{abs(loss_mesh - loss_one) / abs(loss_one):.0e}"]


HEADER = ["mode", "devices", "mesh", "global batch", "step ms", "1-device ms (batch / N)",
          "Mtok/s", "1-device Mtok/s", "scaling", "sent", "loss diff"]


def run(size: Size, backend, devices: int, *, modes=tuple(MODES), calls: int = 5,
        rounds: int = 3) -> list:
    """The report rows, one a mode.

    Raises:
      ValueError: fewer than ``devices`` devices, or a batch or groups they do not divide."""
    if jax.device_count() < devices or devices < 2:
        raise ValueError(f"--devices must be 2 or more and at most the {jax.device_count()} "
                         f"devices here; got {devices}")
    if size.batch % devices or size.groups % devices:
        raise ValueError(f"the global batch ({size.batch}) and the groups ({size.groups}) "
                         f"must be multiples of --devices; got {devices}")
    return [mode_row(mode, size, backend, devices, calls, rounds) for mode in modes]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--backend", default=None, help="bjax backend (default: bjax's)")
    parser.add_argument("--size", default="h200", choices=sorted(SIZES))
    args = parser.parse_args()
    size = SIZES[args.size]
    rows = run(size, args.backend, args.devices)
    harness.write_report("sharded_step", harness.report(
        f"size {args.size} ({size}); backend={args.backend or 'default'}; "
        f"NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE', 'unset')}", HEADER, rows))


if __name__ == "__main__":
    main()
