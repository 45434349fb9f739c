"""The ops the tuner knows, as :class:`bjax.tune.tuner.Problem` builders at given shapes.

Inputs are random normal (step sizes through softplus, ``A`` negative), on the default
device. ``backend`` is the op's ``backend=`` (``None``: the kernels on a CUDA GPU).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import bjax
from bjax import _op
from bjax import cascade as bjax_cascade
from bjax import conv as bjax_conv
from bjax import gated as bjax_gated
from bjax.hyper_connection import MHC_PRE_IMPLEMENTATIONS
from bjax.hyper_connection import post_tuning_key as mhc_post_tuning_key
from bjax.hyper_connection import pre_tuning_key as mhc_pre_tuning_key
from bjax.hyper_connection import sinkhorn_tuning_key
from bjax import ssd as bjax_ssd
from bjax.tune.tuner import FORWARD, FORWARD_BACKWARD, Problem, Stage
from bjax.write_slice import tuning_key as write_slice_tuning_key
from pallas_kernels import cascade as pallas_cascade
from pallas_kernels import conv as pallas_conv
from pallas_kernels import gated as pallas_gated
from pallas_kernels import hyper_connection as pallas_hc
from pallas_kernels import hyper_connection_mosaic as mosaic_hc
from pallas_kernels import sinkhorn as pallas_sinkhorn
from pallas_kernels import ssd as pallas_ssd
from pallas_kernels import ssd_backward as pallas_ssd_backward
from pallas_kernels import state_passing
from pallas_kernels import write_slice as pallas_write_slice


def _normal(key, shape, dtype, scale=1.0):
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _forward_then_backward(config_type, forward_space, backward_space) -> tuple[Stage, ...]:
    """The two stages of a config with ``forward`` and ``backward`` fields: the forward
    kernels' candidates (timed forward), then the backward kernels' with the best forward
    (timed forward and backward)."""
    return (Stage("forward kernels", lambda best: [
                config_type(c, best.backward) for c in forward_space], FORWARD),
            Stage("backward kernels", lambda best: [
                config_type(best.forward, c) for c in backward_space], FORWARD_BACKWARD))


def _optional_arrays(arrays: tuple, call):
    """``(given, positions, run)`` for ``arrays`` of which some are None: the others
    (``_op.present``), their positions, and ``run(config, *given)`` = ``call(config,
    *arrays)`` (the None ones back in place, ``_op.with_absent``)."""
    flags = [v is not None for v in arrays]

    def run(config, *given):
        return call(config, *_op.with_absent(given, flags))
    return (tuple(_op.present(arrays)), tuple(i for i, here in enumerate(flags) if here),
            run)


def _mixer_inputs(lead: tuple[int, ...], heads: int, head_dim: int, groups: int,
                  state_dim: int, dtype, d_shape: str | None, z: bool) -> tuple:
    """``(x, dt, A, B, C, dt_bias, D, z)`` of the Mamba-2 mixer's SSD call over the leading
    axes ``lead`` (``[batch, seqlen]`` for the scan, ``[batch]`` for a decode step); ``D``
    of ``d_shape`` and ``z`` None where not asked."""
    keys = iter(jax.random.split(jax.random.key(0), 8))
    x = _normal(next(keys), (*lead, heads, head_dim), dtype)
    dt = _normal(next(keys), (*lead, heads), dtype, 0.5)
    A = -jnp.exp(_normal(next(keys), (heads,), jnp.float32, 0.5))
    B = _normal(next(keys), (*lead, groups, state_dim), dtype)
    C = _normal(next(keys), (*lead, groups, state_dim), dtype)
    dt_bias = _normal(next(keys), (heads,), jnp.float32, 0.5)
    D = None if d_shape is None else _normal(
        next(keys), (heads,) if d_shape == "h" else (heads, head_dim), jnp.float32)
    zv = _normal(next(keys), x.shape, dtype) if z else None
    return x, dt, A, B, C, dt_bias, D, zv


def gated(kind: str, shape: tuple[int, ...], dtype="bfloat16", *, axis: int = -1,
          backend=None) -> Problem:
    """``bjax.gated_activation(x, kind, axis=axis)`` on ``x`` of ``shape``: one stage over
    :func:`pallas_kernels.gated.search_space`, forward and backward (one tile serves both)."""
    x = _normal(jax.random.key(0), shape, dtype)
    desc = bjax_gated.GatedActivationDescriptor.from_args(x, kind, axis=axis)

    def run(config, x):
        return bjax.gated_activation(x, kind, axis=axis, backend=backend, config=config)

    space = pallas_gated.search_space(desc.rows, desc.cols)
    return Problem("gated_activation", bjax_gated.tuning_key(desc), run, (x,), (0,),
                   desc.kernel_config, (Stage("tile", lambda best: space, FORWARD_BACKWARD),))


def merge_states(num_states: int, seq_len: int, heads: int, head_dim: int,
                 dtype="bfloat16", *, backend=None) -> Problem:
    """``bjax.merge_states(v, s)`` with ``v`` ``[seq_len, num_states, heads, head_dim]``
    (``num_states`` 2: ``bjax.merge_state`` of two such states). Two stages: the forward
    tile, then the backward tile with it (:func:`pallas_kernels.cascade.search_space`)."""
    keys = jax.random.split(jax.random.key(0), 2)
    v = _normal(keys[0], (seq_len, num_states, heads, head_dim), dtype)
    s = _normal(keys[1], (seq_len, num_states, heads), jnp.float32, 4.0)
    if num_states == 2:
        arrays = (v[:, 0], s[:, 0], v[:, 1], s[:, 1])

        def run(config, v_a, s_a, v_b, s_b):
            return bjax.merge_state(v_a, s_a, v_b, s_b, backend=backend, config=config)
        desc = bjax.plan(bjax.merge_state, *arrays, backend="xla").descriptor
    else:
        arrays = (v, s)

        def run(config, v, s):
            return bjax.merge_states(v, s, backend=backend, config=config)
        desc = bjax.plan(bjax.merge_states, *arrays, backend="xla").descriptor
    MergeConfig = pallas_cascade.MergeConfig
    stages = _forward_then_backward(
        MergeConfig, pallas_cascade.search_space(seq_len, heads, head_dim),
        pallas_cascade.search_space(seq_len, heads, head_dim, backward=True))
    return Problem(desc.op, bjax_cascade.tuning_key(desc), run, arrays,
                   tuple(range(len(arrays))),
                   MergeConfig(desc.kernel_config, desc.backward_config), stages)


def _pre_kernels(config):
    """The Triton kernels' :class:`PreConfig` of either mhc_pre config type."""
    return config.kernels if isinstance(config, mosaic_hc.MosaicPreConfig) else config


def _with_pre_kernel(config, field: str, value):
    """``config`` (a PreConfig or a MosaicPreConfig) with the Triton kernel ``field`` set."""
    kernels = dataclasses.replace(_pre_kernels(config), **{field: value})
    if isinstance(config, mosaic_hc.MosaicPreConfig):
        return dataclasses.replace(config, kernels=kernels)
    return kernels


def mhc_pre(tokens: int, n: int, hidden: int, dtype="bfloat16", *, backend=None) -> Problem:
    """``bjax.mhc_pre(x, bias=..., phi=..., alpha=...)`` (dynamic H) with x ``[tokens, n,
    hidden]``, from what a plain call runs. Stages, each with the best so far: the
    projection (the Triton kernel's configs, and where the Mosaic implementation runs
    this call, the Mosaic kernel's: the winner's type picks the implementation) and the
    aggregate (forward), then the aggregate's backward, the input gradient and the phi
    gradient (the winning implementation's kernel; forward + backward). The Sinkhorn
    kernels keep their heuristic."""
    count = n * n + 2 * n
    keys = jax.random.split(jax.random.key(0), 3)
    x = _normal(keys[0], (tokens, n, hidden), dtype)
    phi = _normal(keys[1], (n * hidden, count), jnp.float32, 0.02)
    alpha = jnp.array([0.8, 0.6, 1.1], jnp.float32)
    bias = _normal(keys[2], (count,), jnp.float32)
    arrays = (x, phi, alpha, bias)

    def run(config, x, phi, alpha, bias):
        return bjax.mhc_pre(x, bias=bias, phi=phi, alpha=alpha, backend=backend, config=config)

    desc = bjax.plan(bjax.mhc_pre, x, bias=bias, phi=phi, alpha=alpha,
                     backend="xla").descriptor
    flat, width = n * hidden, pallas_hc.stacked_width(count)
    # Whether the Mosaic implementation runs this call here (asked with a config of its
    # type, so that no tuned entry steps in): its heuristic is then what a plain call
    # runs without one.
    try:
        bjax.plan(bjax.mhc_pre, x, bias=bias, phi=phi, alpha=alpha, backend=backend,
                  config=mosaic_hc.MosaicPreConfig())
        on_mosaic = True
    except bjax.UnsupportedError:
        on_mosaic = False
    defaults = {impl.name: impl.default_config for impl in MHC_PRE_IMPLEMENTATIONS}
    heuristic = defaults["pallas_mosaic" if on_mosaic else "pallas_triton"](desc)

    def projections(best):
        kernels = _pre_kernels(best)
        return ([dataclasses.replace(kernels, projection=c) for c in
                 pallas_hc.projection_search_space(tokens, flat, width, dtype)]
                + [mosaic_hc.MosaicPreConfig(c, dataclasses.replace(kernels, projection=None))
                   for c in (mosaic_hc.search_space(tokens, flat, width) if on_mosaic else ())])

    def phi_gradients(best):
        """The phi-gradient kernel of ``best``'s implementation: the Mosaic one's
        configs or the Triton one's tiles."""
        if isinstance(best, mosaic_hc.MosaicPreConfig):
            return [dataclasses.replace(best, weight_grad=c)
                    for c in mosaic_hc.weight_grad_search_space(tokens, flat, width)]
        return [_with_pre_kernel(best, "weight_grad", c)
                for c in pallas_hc.weight_grad_search_space()]

    def stage(name, field, space, objective):
        return Stage(name, lambda best: [_with_pre_kernel(best, field, config)
                                         for config in space], objective)
    stages = (
        Stage("projection", projections, FORWARD),
        stage("aggregate", "aggregate", pallas_hc.stream_search_space(tokens, n, hidden),
              FORWARD),
        stage("aggregate backward", "aggregate_backward",
              pallas_hc.stream_search_space(tokens, n, hidden), FORWARD_BACKWARD),
        stage("input gradient", "input_grad",
              pallas_hc.input_grad_search_space(tokens, hidden), FORWARD_BACKWARD),
        Stage("phi gradient", phi_gradients, FORWARD_BACKWARD))
    return Problem("mhc_pre", mhc_pre_tuning_key(desc), run, arrays, (0, 1, 2, 3),
                   heuristic, stages)


def mhc_post(tokens: int, n: int, hidden: int, dtype="bfloat16", *, transpose_res=False,
             backend=None) -> Problem:
    """``bjax.mhc_post(x, f_out, h_post, h_res)`` with x ``[tokens, n, hidden]`` and
    coefficients as ``mhc_pre`` gives them (h_post in (0, 2), h_res doubly stochastic). Two
    stages: the forward tile, then the backward tile with it
    (:func:`pallas_kernels.hyper_connection.mix_search_space`)."""
    keys = jax.random.split(jax.random.key(0), 4)
    x = _normal(keys[0], (tokens, n, hidden), dtype)
    f_out = _normal(keys[1], (tokens, hidden), dtype)
    h_post = 2 * jax.nn.sigmoid(_normal(keys[2], (tokens, n), jnp.float32))
    h_res = bjax.sinkhorn_knopp(_normal(keys[3], (tokens, n, n), jnp.float32), backend="xla")
    arrays = (x, f_out, h_post, h_res)

    def run(config, *arrays):
        return bjax.mhc_post(*arrays, transpose_res=transpose_res, backend=backend, config=config)

    desc = bjax.plan(bjax.mhc_post, *arrays, transpose_res=transpose_res,
                     backend="xla").descriptor
    MixConfig = pallas_hc.MixConfig
    stages = _forward_then_backward(
        MixConfig, pallas_hc.mix_search_space(tokens, n, hidden),
        pallas_hc.mix_search_space(tokens, n, hidden, backward=True))
    heuristic = MixConfig(pallas_hc.mix_config(tokens, n, hidden),
                          pallas_hc.mix_backward_config(tokens, n, hidden))
    return Problem("mhc_post", mhc_post_tuning_key(desc), run, arrays, (0, 1, 2, 3),
                   heuristic, stages)


def causal_conv1d(shape: tuple[int, int, int], taps: int = 4, dtype="bfloat16", *,
                  activation: str | None = "silu", backend=None) -> Problem:
    """``bjax.causal_conv1d(x, weight, bias, activation=...)`` with x ``[b, l, d]`` of
    ``shape``: one stage over :func:`pallas_kernels.conv.search_space`, forward and
    backward."""
    keys = jax.random.split(jax.random.key(0), 3)
    x = _normal(keys[0], shape, dtype)
    weight = _normal(keys[1], (shape[2], taps), jnp.float32, taps ** -0.5)
    bias = _normal(keys[2], (shape[2],), jnp.float32)
    desc = bjax_conv.CausalConv1dDescriptor.from_args(x, weight, bias, activation=activation)

    def run(config, x, weight, bias):
        return bjax.causal_conv1d(x, weight, bias, activation=activation, backend=backend,
                                  config=config)

    space = pallas_conv.search_space(*shape)
    return Problem("causal_conv1d", bjax_conv.tuning_key(desc), run, (x, weight, bias),
                   (0, 1, 2), desc.kernel_config,
                   (Stage("walk", lambda best: space, FORWARD_BACKWARD),))


def causal_conv1d_step(batch: int, channels: int, taps: int = 4, dtype="bfloat16", *,
                       activation: str | None = "silu", backend=None) -> Problem:
    """``bjax.causal_conv1d_step(conv_state, x, weight, bias, activation=...)``, one decode
    step with x ``[batch, channels]``: one stage over
    :func:`pallas_kernels.conv.step_search_space`, forward. The state is not donated, so
    every timed call also copies it (the same for every candidate)."""
    keys = jax.random.split(jax.random.key(0), 4)
    state = _normal(keys[0], (batch, taps - 1, channels), dtype)
    x = _normal(keys[1], (batch, channels), dtype)
    weight = _normal(keys[2], (channels, taps), jnp.float32, taps ** -0.5)
    bias = _normal(keys[3], (channels,), jnp.float32)
    desc = bjax_conv.CausalConv1dStepDescriptor.from_args(state, x, weight, bias,
                                                          activation=activation)

    def run(config, state, x, weight, bias):
        return bjax.causal_conv1d_step(state, x, weight, bias, activation=activation,
                                       backend=backend, config=config)

    space = pallas_conv.step_search_space(channels)
    return Problem("causal_conv1d_step", bjax_conv.step_tuning_key(desc), run,
                   (state, x, weight, bias), (), pallas_conv.default_config(batch, 1, channels),
                   (Stage("channels", lambda best: space, FORWARD),))


def ssd_step(batch: int, heads: int, head_dim: int, state_dim: int, groups: int = 1,
             dtype="bfloat16", *, d_shape: str | None = "h", z: bool = False,
             backend=None) -> Problem:
    """``bjax.ssd_step`` as the Mamba-2 mixer calls it at decode (``dt_bias``, softplus;
    ``D`` of ``d_shape``; ``z`` if asked): one stage over
    :func:`pallas_kernels.ssd.step_search_space`, forward. The state is not donated, so
    every timed call also copies it (the same for every candidate)."""
    state = _normal(jax.random.key(1), (batch, heads, head_dim, state_dim), jnp.float32)
    inputs = _mixer_inputs((batch,), heads, head_dim, groups, state_dim, dtype, d_shape, z)
    x, dt, A, B, C, dt_bias, D, zv = inputs

    def call(config, state, x, dt, A, B, C, dt_bias, D, zv):
        return bjax.ssd_step(state, x, dt, A, B, C, D=D, z=zv, dt_bias=dt_bias,
                             dt_softplus=True, backend=backend, config=config)

    given, _, run = _optional_arrays((state, *inputs), call)
    desc = bjax.plan(bjax.ssd_step, state, x, dt, A, B, C, D=D, z=zv, dt_bias=dt_bias,
                     dt_softplus=True, backend="xla").descriptor
    space = pallas_ssd.step_search_space(heads, head_dim, state_dim)
    return Problem("ssd_step", bjax_ssd.step_tuning_key(desc), run, given, (),
                   pallas_ssd.step_config(heads, head_dim, state_dim),
                   (Stage("step", lambda best: space, FORWARD),))


def write_slice(dest_shape: tuple[int, ...], window_shape: tuple[int, ...],
                start: tuple[int, ...], dtype="bfloat16", *, traced: tuple[int, ...] = (),
                backend=None) -> Problem:
    """``bjax.write_slice(dest, source, start)`` with ``source`` of ``window_shape`` at
    ``start`` (a traced scalar on the axes in ``traced``, static elsewhere): one stage over
    :func:`pallas_kernels.write_slice.search_space`, forward. ``dest`` is not donated, so
    every timed call also copies it (the same for every candidate).

    Raises:
      ValueError: a window a plain call does not write with the kernel (small windows
        take ``lax.dynamic_update_slice``; ``WriteSliceDescriptor.route``).
    """
    keys = jax.random.split(jax.random.key(0), 2)
    dest = _normal(keys[0], dest_shape, dtype)
    source = _normal(keys[1], window_shape, dtype)
    positions = tuple(jnp.int32(v) if d in traced else v for d, v in enumerate(start))
    desc, _ = bjax.WriteSliceDescriptor.from_args(dest, source, positions)
    route = desc.route(backend or "pallas")
    if route != "kernel":
        raise ValueError(f"write_slice of this window runs {route!r}, not the kernel: "
                         "nothing to tune")
    view = desc.kernel_view()
    starts = tuple(jnp.int32(start[d]) for d in traced)

    def run(config, dest, source, *traced_starts):
        given = dict(zip(traced, traced_starts))
        return bjax.write_slice(dest, source, tuple(given.get(d, v) for d, v in enumerate(start)),
                                backend=backend, config=config)

    space = pallas_write_slice.search_space(view.window_shape, desc.per_row)
    return Problem("write_slice", write_slice_tuning_key(desc), run,
                   (dest, source, *starts), (), view.config,
                   (Stage("tile", lambda best: space, FORWARD),))


def sinkhorn_knopp(count: int, n: int, dtype="float32", *, iters: int = 20,
                   init: str = "exp", order: str = "columns_first", backend=None) -> Problem:
    """``bjax.sinkhorn_knopp(logits, iters=..., init=..., order=...)`` on ``count`` matrices
    ``[n, n]``: one stage over :func:`pallas_kernels.sinkhorn.search_space`, forward and
    backward (one config serves both). mhc_pre's Sinkhorn reads these entries where its
    own config leaves the Sinkhorn's to them: ``count`` its tokens, float32, and its
    ``sinkhorn_*`` options."""
    logits = _normal(jax.random.key(0), (count, n, n), dtype, 2.0)

    def run(config, logits):
        return bjax.sinkhorn_knopp(logits, iters=iters, init=init, order=order,
                                   backend=backend, config=config)

    desc = bjax.plan(bjax.sinkhorn_knopp, logits, iters=iters, init=init, order=order,
                     backend="xla").descriptor
    space = pallas_sinkhorn.search_space(count, n)
    return Problem("sinkhorn_knopp", sinkhorn_tuning_key(desc), run, (logits,), (0,),
                   pallas_sinkhorn.default_config(count, n),
                   (Stage("matrices", lambda best: space, FORWARD_BACKWARD),))


def ssd_chunk_scan(batch: int, seq_len: int, heads: int, head_dim: int, state_dim: int,
                   groups: int = 1, chunk_size: int = 256, dtype="bfloat16", *,
                   d_shape: str | None = "h", z: bool = False, backend=None) -> Problem:
    """``bjax.ssd_chunk_scan`` as the Mamba-2 mixer calls it (``dt_bias``, softplus; ``D``
    of ``d_shape``; ``z`` if asked). Four stages: the forward kernels'
    (:func:`pallas_kernels.ssd.search_space`, timed forward), the forward's chunk states
    walked or passed along (``pallas_kernels.state_passing.passing_variants``), each in
    blocks of state columns (:func:`pallas_kernels.ssd.state_block_variants`; timed
    forward), then the same two for the backward with the best forward
    (:func:`pallas_kernels.ssd_backward.search_space`; its state gradients walked or
    passed, in blocks of state columns; timed forward and backward)."""
    inputs = _mixer_inputs((batch, seq_len), heads, head_dim, groups, state_dim, dtype,
                           d_shape, z)
    x, dt, A, B, C, dt_bias, D, zv = inputs

    def call(config, x, dt, A, B, C, dt_bias, D, zv):
        return bjax.ssd_chunk_scan(x, dt, A, B, C, chunk_size=chunk_size, D=D, z=zv,
                                   dt_bias=dt_bias, dt_softplus=True, backend=backend,
                                   config=config)

    given, positions, run = _optional_arrays(inputs, call)
    plan = bjax.plan(bjax.ssd_chunk_scan, x, dt, A, B, C, chunk_size=chunk_size, D=D, z=zv,
                     dt_bias=dt_bias, dt_softplus=True, backend=backend or "xla")
    desc = plan.descriptor
    args = (chunk_size, head_dim, state_dim, heads // groups, jnp.dtype(dtype))
    ChunkScanConfig = pallas_ssd_backward.ChunkScanConfig
    forward, backward = _forward_then_backward(
        ChunkScanConfig, pallas_ssd.search_space(*args, batch * heads, desc.chunks),
        pallas_ssd_backward.search_space(*args, batch * heads, desc.chunks))
    stages = (forward,
              Stage("forward chunk states", lambda best: [
                  ChunkScanConfig(blocks, best.backward)
                  for c in state_passing.passing_variants(best.forward)
                  for blocks in pallas_ssd.state_block_variants(c, state_dim)], FORWARD),
              backward,
              Stage("backward chunk states", lambda best: [
                  ChunkScanConfig(best.forward, blocks)
                  for c in state_passing.passing_variants(best.backward)
                  for blocks in pallas_ssd.state_block_variants(c, state_dim)],
                    FORWARD_BACKWARD))
    return Problem("ssd_chunk_scan", bjax_ssd.tuning_key(desc), run, given, positions,
                   ChunkScanConfig(desc.kernel_config, desc.backward_config), stages)
