"""mhc_pre's projection as a Mosaic GPU kernel (Hopper: TMA and wgmma), the faster of its
two implementations where it runs (``bjax.hyper_connection.MHC_PRE_IMPLEMENTATIONS``).

:func:`project` computes what :func:`pallas_kernels.hyper_connection.project` does,
``(x_flat @ phi [rows, count], sum(x_flat^2, -1) [rows])`` in float32 for a bfloat16
``x_flat [rows, n C]``, with the same numerics: phi enters as its three exact bfloat16
pieces side by side (``stacked_phi_pieces``), x as stored (exact), so every product is
float32-exact and the sums are float32, each split of the row summed apart and the
splits and pieces added in a fixed order.

The kernel. A program owns ``block_rows`` rows (64 or 128: one or two wgmma M) and one
of ``splits`` equal ranges of the flat axis. ``plgpu.emit_pipeline`` streams
``[block_rows, block_cols]`` tiles of x and ``[block_cols, width]`` tiles of the stacked
pieces into swizzled shared memory by TMA, ``num_stages`` in flight. Each step issues
one ``wgmma`` from shared memory into a ``[block_rows, width]`` float32 accumulator and,
while it runs, reads the same x tile into registers for the sums of squares. Partial
results go to ``[splits, rows, width]`` and ``[splits, rows]`` and are added outside.

The Triton kernel could not feed a bfloat16 x to the tensor cores as loaded (rows summed
wrong with two or more pipeline stages on the H200, BENCHMARKS.md, mHC); it rounds x
through float32 instead. Here x goes from TMA to wgmma untouched, which is most of the
speed-up (BENCHMARKS.md, "A Mosaic GPU projection").

What it needs (:func:`unsupported`): bfloat16 x, rows a multiple of 64, ``n C`` of 64,
at most 256 stacked columns (a wgmma's N), and a Hopper GPU (wgmma is sm_90a only).

:func:`project_weight_grad` is the projection's phi gradient ``x_flat^T dproj [n C,
count]`` (what :func:`pallas_kernels.hyper_connection.project_weight_grad` computes), the
same design turned around: ``d_phi^T = dproj_pieces^T x_flat``. ``dproj`` (float32)
becomes its three exact bfloat16 pieces side by side, padded to the stacked width and
transposed once outside (``[width, tokens]``, 2 MB at 8192 tokens), so both wgmma operands
come from shared memory as stored. A program owns ``block_cols`` columns of x (rows of
phi) and one of ``splits`` ranges of the tokens; the partial ``[width, block_cols]``
results are added outside, then the pieces' rows.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import hyper_connection as pallas_hc
from pallas_kernels.blocks import split_bf16

# Shared memory of an H100 or H200 block (227 KiB), the bound every config must fit, and
# what Mosaic GPU adds to the tiles (barriers, alignment: 2.6-2.9 KB in JAX 0.10.2's
# lowering of the configs just over the bound).
SHARED_MEMORY_BYTES = 232448
_SHARED_MEMORY_OVERHEAD = 4096
# Row blocks times splits a launch aims at, about one program per SM: on the H200 the
# fastest split counts were 2 for 64 row blocks and 1 for 128 (BENCHMARKS.md, "A Mosaic
# GPU projection"); MAX_SPAN raises them to 4 and 2 there, 2.5% and 4% slower.
_TARGET_PROGRAMS = 128
# Products one accumulator sums, at most. wgmma's float32 accumulation loses accuracy
# in proportion to the span: the H200's worst row errors at 8192 x 4 x 7168 were 5.4e-5,
# 2.8e-5 and 1.2e-5 of the row's largest entry for spans of 28672, 14336 and 7168 (the
# Triton kernel: 1.0e-5), and a span of 14336 broke the float32 bound the projection
# promises (``tests/test_hyper_connection_mosaic.py``). 7168 is the longest span checked
# within it.
MAX_SPAN = 7168
# Pipeline stages the heuristic wants (more, where memory allows, ran no faster).
_STAGES = 4
# The widest wgmma (N).
_MAX_WIDTH = 256


@dataclasses.dataclass(frozen=True)
class MosaicProjectionConfig:
    """Launch configuration of :func:`project`.

    Attributes:
      block_rows: rows a program owns: 64 or 128 (one or two wgmma M).
      block_cols: columns of the flat axis a pipeline step reads: 64 or 128.
      splits: equal ranges of the flat axis, one per program, summed apart
        (``n C`` a multiple of ``block_cols * splits``, each at most :data:`MAX_SPAN`).
      num_stages: pipeline steps in flight (shared memory holds each one's tiles).
    """
    block_rows: int = 128
    block_cols: int = 64
    splits: int = 1
    num_stages: int = 4


@dataclasses.dataclass(frozen=True)
class MosaicWeightGradConfig:
    """Launch configuration of :func:`project_weight_grad`.

    Attributes:
      block_cols: columns of x (rows of phi) a program owns: 64 or 128 (the wgmma's N).
      block_tokens: tokens a pipeline step reads: 64 or 128.
      splits: equal ranges of the tokens, one per program, summed apart (the tokens a
        multiple of ``block_tokens * splits``, each range at most :data:`MAX_SPAN`).
      num_stages: pipeline steps in flight (shared memory holds each one's tiles).
    """
    block_cols: int = 128
    block_tokens: int = 64
    splits: int = 1
    num_stages: int = 4


@dataclasses.dataclass(frozen=True)
class MosaicPreConfig:
    """Launch configurations of ``mhc_pre``'s Mosaic implementation; ``None``: the
    heuristic (derived for each device's shard).

    Attributes:
      projection: :func:`project`'s, :func:`projection_config`.
      kernels: the Triton kernels that run the rest of the op (aggregate, backward,
        Sinkhorn), as :class:`pallas_kernels.hyper_connection.PreConfig`; its own
        ``projection`` and ``weight_grad`` stay ``None``.
      weight_grad: :func:`project_weight_grad`'s, :func:`weight_grad_config`.
    """
    projection: MosaicProjectionConfig | None = None
    kernels: pallas_hc.PreConfig = pallas_hc.PreConfig()
    weight_grad: MosaicWeightGradConfig | None = None


def shared_memory_bytes(config: MosaicProjectionConfig, width: int) -> int:
    """Shared memory ``config`` takes against ``width`` stacked columns: its pipeline
    stages of x and phi tiles (bfloat16), the float32 results staged for the store, and
    Mosaic GPU's own."""
    stage = (config.block_rows * config.block_cols + config.block_cols * width) * 2
    return (config.num_stages * stage + config.block_rows * (width + 1) * 4
            + _SHARED_MEMORY_OVERHEAD)


def unsupported(rows: int, flat: int, width: int, dtype) -> str | None:
    """Why :func:`project` cannot run ``x_flat [rows, flat]`` of ``dtype`` against
    ``width`` stacked columns; ``None``: it can (the device aside, which the op checks)."""
    if jnp.dtype(dtype) != jnp.bfloat16:
        return f"x must be bfloat16 (wgmma operands as stored); got {jnp.dtype(dtype).name}"
    if rows % 64 or flat % 64:
        return f"tokens and n C must be multiples of 64; got {rows} and {flat}"
    if width > _MAX_WIDTH:
        return f"the stacked phi pieces must be at most {_MAX_WIDTH} wide; got {width}"
    return None


def config_errors(config: MosaicProjectionConfig, rows: int, flat: int,
                  width: int) -> list[tuple[str, str, object]]:
    """``(field, expected, got)`` for each rule ``config`` breaks for ``x_flat [rows,
    flat]`` against ``width`` stacked columns (empty: it runs)."""
    errors = []
    for field in ("block_rows", "block_cols"):
        if getattr(config, field) not in (64, 128):
            errors.append((field, "64 or 128", getattr(config, field)))
    for field in ("splits", "num_stages"):
        if not isinstance(getattr(config, field), int) or getattr(config, field) < 1:
            errors.append((field, "an int >= 1", getattr(config, field)))
    if errors:
        return errors
    if rows % config.block_rows:
        errors.append(("block_rows", f"a divisor of the tokens, {rows}", config.block_rows))
    if flat % (config.block_cols * config.splits):
        errors.append(("splits", f"such that block_cols * splits divides n C = {flat}",
                       config.splits))
    elif flat // config.splits > MAX_SPAN:
        errors.append(("splits", f"at least {-(-flat // MAX_SPAN)} (each split sums at most "
                                 f"{MAX_SPAN} of n C = {flat} products)", config.splits))
    memory = shared_memory_bytes(config, width)
    if memory > SHARED_MEMORY_BYTES:
        errors.append(("num_stages", f"few enough for {SHARED_MEMORY_BYTES} bytes of shared "
                                     f"memory (this config takes {memory})", config.num_stages))
    return errors


def projection_config(rows: int, flat: int, width: int) -> MosaicProjectionConfig:
    """The heuristic for ``x_flat [rows, flat]`` against ``width`` stacked columns (a case
    :func:`unsupported` allows): 128-row blocks where the rows allow and 2 stages fit
    (else 64), 64 columns a step, up to ``_STAGES`` stages as shared memory allows, and
    about ``_TARGET_PROGRAMS`` programs (the split count nearest it that divides the
    row's steps and keeps each split's span within :data:`MAX_SPAN`)."""
    steps = flat // 64
    for block_rows in (128, 64):
        if rows % block_rows:
            continue
        wanted = max(1, round(_TARGET_PROGRAMS / (rows // block_rows)))
        splits = min((s for s in range(1, steps + 1)
                      if steps % s == 0 and flat // s <= MAX_SPAN),
                     key=lambda s: (abs(s - wanted), s))
        for stages in range(_STAGES, 1, -1):
            config = MosaicProjectionConfig(block_rows, 64, splits, stages)
            if shared_memory_bytes(config, width) <= SHARED_MEMORY_BYTES:
                return config
    raise ValueError(f"no projection config for x_flat [{rows}, {flat}] and {width} "
                     f"columns: {unsupported(rows, flat, width, jnp.bfloat16)}")


def search_space(rows: int, flat: int, width: int) -> tuple[MosaicProjectionConfig, ...]:
    """The configs a sweep tries: 64 or 128 rows by 64 or 128 columns, 1 to 8 splits
    that divide the row within :data:`MAX_SPAN`, 2 to 6 stages, those that fit shared
    memory."""
    return tuple(config for block_rows in (64, 128) for block_cols in (64, 128)
                 for splits in (1, 2, 4, 7, 8) for stages in (2, 3, 4, 5, 6)
                 if not config_errors(config := MosaicProjectionConfig(
                     block_rows, block_cols, splits, stages), rows, flat, width))


def _pieces_rows(width: int) -> int:
    """Rows of the transposed dproj pieces: ``width`` stacked columns, at least one
    wgmma M (64)."""
    return max(64, width)


def weight_grad_shared_memory_bytes(config: MosaicWeightGradConfig, width: int) -> int:
    """Shared memory ``config`` takes against ``width`` stacked columns: its pipeline
    stages of dproj-piece and x tiles (bfloat16), the float32 result staged for the
    store, and Mosaic GPU's own."""
    pieces = _pieces_rows(width)
    stage = (pieces * config.block_tokens + config.block_tokens * config.block_cols) * 2
    return (config.num_stages * stage + pieces * config.block_cols * 4
            + _SHARED_MEMORY_OVERHEAD)


def weight_grad_errors(config: MosaicWeightGradConfig, rows: int, flat: int,
                       width: int) -> list[tuple[str, str, object]]:
    """``(field, expected, got)`` for each rule ``config`` breaks for ``x_flat [rows,
    flat]`` against ``width`` stacked columns (empty: it runs)."""
    errors = []
    for field in ("block_cols", "block_tokens"):
        if getattr(config, field) not in (64, 128):
            errors.append((field, "64 or 128", getattr(config, field)))
    for field in ("splits", "num_stages"):
        if not isinstance(getattr(config, field), int) or getattr(config, field) < 1:
            errors.append((field, "an int >= 1", getattr(config, field)))
    if errors:
        return errors
    if flat % config.block_cols:
        errors.append(("block_cols", f"a divisor of n C, {flat}", config.block_cols))
    if rows % (config.block_tokens * config.splits):
        errors.append(("splits", f"such that block_tokens * splits divides the tokens, {rows}",
                       config.splits))
    elif rows // config.splits > MAX_SPAN:
        errors.append(("splits", f"at least {-(-rows // MAX_SPAN)} (each split sums at most "
                                 f"{MAX_SPAN} of the {rows} tokens' products)", config.splits))
    memory = weight_grad_shared_memory_bytes(config, width)
    if memory > SHARED_MEMORY_BYTES:
        errors.append(("num_stages", f"few enough for {SHARED_MEMORY_BYTES} bytes of shared "
                                     f"memory (this config takes {memory})", config.num_stages))
    return errors


def weight_grad_config(rows: int, flat: int, width: int) -> MosaicWeightGradConfig:
    """The heuristic for the phi gradient of ``x_flat [rows, flat]`` against ``width``
    stacked columns (a case :func:`unsupported` allows): 128 columns a program where n C
    and the accumulator allow (64 at 256 stacked columns), 64 tokens a step, up to
    ``_STAGES`` stages as shared memory allows, and the fewest token splits within
    :data:`MAX_SPAN` that make about ``_TARGET_PROGRAMS`` programs (on the H200 at
    8192 x 4 x 7168 and 16384 x 4 x 2560: 2 and 4 splits, the fastest configs within
    the span; BENCHMARKS.md)."""
    block_cols = 128 if flat % 128 == 0 and width <= 128 else 64
    steps = rows // 64
    splits = [s for s in range(1, steps + 1) if steps % s == 0 and rows // s <= MAX_SPAN]
    columns = flat // block_cols
    split = next((s for s in splits if columns * s >= _TARGET_PROGRAMS), splits[-1])
    for stages in range(_STAGES, 1, -1):
        config = MosaicWeightGradConfig(block_cols, 64, split, stages)
        if weight_grad_shared_memory_bytes(config, width) <= SHARED_MEMORY_BYTES:
            return config
    raise ValueError(f"no phi-gradient config for x_flat [{rows}, {flat}] and {width} "
                     f"columns: {unsupported(rows, flat, width, jnp.bfloat16)}")


def weight_grad_search_space(rows: int, flat: int,
                             width: int) -> tuple[MosaicWeightGradConfig, ...]:
    """The phi-gradient configs a sweep tries: 64 or 128 columns by 64 or 128 tokens, 1 to
    8 token splits within :data:`MAX_SPAN`, 2 to 4 stages, those that fit shared memory."""
    return tuple(config for block_cols in (64, 128) for block_tokens in (64, 128)
                 for splits in (1, 2, 4, 8) for stages in (2, 3, 4)
                 if not weight_grad_errors(config := MosaicWeightGradConfig(
                     block_cols, block_tokens, splits, stages), rows, flat, width))


def _transforms(minor_elements: int, what: str):
    """Tiling and swizzle of a bfloat16 shared-memory tile ``minor_elements`` wide."""
    swizzle = plgpu.find_swizzle(minor_elements * 16, what)
    return (plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle))


def _load_wgmma(ref):
    """``ref`` (shared memory) into registers in the wgmma accumulator's layout. JAX 0.11
    deprecates the separate index that JAX 0.10 requires; both accept it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Passing the index separately",
                                DeprecationWarning)
        return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA)


def _projection_kernel(x_gmem, w_gmem, out_gmem, squares_gmem, acc, out_smem, squares_smem,
                       *, config: MosaicProjectionConfig, span: int, width: int):
    rows_at = pl.ds(lax.axis_index("m") * config.block_rows, config.block_rows)
    split = lax.axis_index("s")

    def step(_, x_smem, w_smem, squares):
        plgpu.wgmma(acc, x_smem, w_smem)
        x = _load_wgmma(x_smem).astype(jnp.float32)
        squares = squares + jnp.sum(x * x, axis=1)
        plgpu.wgmma_wait(1)  # the step before's product is done: its tiles can go
        return squares

    pipeline = plgpu.emit_pipeline(
        step, grid=(span // config.block_cols,),
        in_specs=[plgpu.BlockSpec((config.block_rows, config.block_cols), lambda k: (0, k),
                                  transforms=_transforms(config.block_cols, "x"),
                                  delay_release=1),
                  plgpu.BlockSpec((config.block_cols, width), lambda k: (k, 0),
                                  transforms=_transforms(width, "phi"), delay_release=1)],
        max_concurrent_steps=config.num_stages,
        init_carry=plgpu.layout_cast(jnp.zeros((config.block_rows,), jnp.float32),
                                     plgpu.Layout.WGMMA.reduce(1)))
    squares = pipeline(x_gmem.at[rows_at, pl.ds(split * span, span)],
                       w_gmem.at[pl.ds(split * span, span)])
    plgpu.wgmma_wait(0)
    out_smem[...] = acc[...]
    squares_smem[...] = squares
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[split, rows_at])
    plgpu.copy_smem_to_gmem(squares_smem, squares_gmem.at[split, rows_at])
    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def project(x_flat, phi, *, config: MosaicProjectionConfig | None = None,
            interpret: bool = False):
    """``(x_flat @ phi [rows, count], sum(x_flat^2, -1) [rows])``, float32, for bfloat16
    ``x_flat [rows, n C]`` and float32 ``phi [n C, count]`` (module doc).

    ``config=None``: :func:`projection_config` for these rows; where this kernel cannot
    run them (:func:`unsupported`: one device's shard of a sharded call can hold rows
    that are not a multiple of 64 where the whole call's are), the Triton kernel runs
    them, with the same numerics. ``interpret``: the Triton kernel in the interpreter
    (Mosaic GPU has none here).

    Raises:
      ValueError: an explicit ``config`` that cannot run these rows (:func:`config_errors`).
    """
    rows, flat = x_flat.shape
    count = phi.shape[1]
    pieces = pallas_hc.stacked_phi_pieces(phi)
    width = pieces.shape[1]
    if config is None:
        if interpret or unsupported(rows, flat, width, x_flat.dtype):
            return pallas_hc.project(x_flat, phi, interpret=interpret)
        config = projection_config(rows, flat, width)
    errors = config_errors(config, rows, flat, width)
    if errors:
        raise ValueError(f"{config} cannot run x_flat [{rows}, {flat}]: " + "; ".join(
            f"{field} must be {expected}, got {got}" for field, expected, got in errors))
    kernel = functools.partial(_projection_kernel, config=config, span=flat // config.splits,
                               width=width)
    partial, squares = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((config.splits, rows, width), jnp.float32),
                  jax.ShapeDtypeStruct((config.splits, rows), jnp.float32)),
        grid=(rows // config.block_rows, config.splits), grid_names=("m", "s"),
        scratch_types=[plgpu.ACC((config.block_rows, width), jnp.float32),
                       plgpu.SMEM((config.block_rows, width), jnp.float32),
                       plgpu.SMEM((config.block_rows,), jnp.float32)],
    )(x_flat, pieces)
    total = jnp.sum(partial, axis=0)
    return (sum(total[:, p * count:(p + 1) * count] for p in range(3)),
            jnp.sum(squares, axis=0))


def _weight_grad_kernel(pieces_gmem, x_gmem, out_gmem, acc, out_smem, *,
                        config: MosaicWeightGradConfig, span: int):
    cols = pl.ds(lax.axis_index("n") * config.block_cols, config.block_cols)
    split = lax.axis_index("s")

    def step(_, pieces_smem, x_smem):
        plgpu.wgmma(acc, pieces_smem, x_smem)
        plgpu.wgmma_wait(1)  # the step before's product is done: its tiles can go

    width = pieces_gmem.shape[0]
    pipeline = plgpu.emit_pipeline(
        step, grid=(span // config.block_tokens,),
        in_specs=[plgpu.BlockSpec((width, config.block_tokens), lambda k: (0, k),
                                  transforms=_transforms(config.block_tokens, "dproj"),
                                  delay_release=1),
                  plgpu.BlockSpec((config.block_tokens, config.block_cols), lambda k: (k, 0),
                                  transforms=_transforms(config.block_cols, "x"),
                                  delay_release=1)],
        max_concurrent_steps=config.num_stages)
    pipeline(pieces_gmem.at[:, pl.ds(split * span, span)],
             x_gmem.at[pl.ds(split * span, span), cols])
    plgpu.wgmma_wait(0)
    out_smem[...] = acc[...]
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[split, :, cols])
    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def project_weight_grad(x_flat, dproj, *, config: MosaicWeightGradConfig | None = None,
                        interpret: bool = False):
    """``x_flat^T dproj [n C, count]`` float32, the gradient of ``phi`` in :func:`project`,
    for bfloat16 ``x_flat [rows, n C]`` and float32 ``dproj [rows, count]`` (module doc):
    every product float32-exact (dproj as three exact bfloat16 pieces), summed in float32.

    ``config=None``: :func:`weight_grad_config` for these rows; where this kernel cannot
    run them (:func:`unsupported`, as for :func:`project`), the Triton kernel runs them.
    ``interpret``: the Triton kernel in the interpreter.

    Raises:
      ValueError: an explicit ``config`` that cannot run these rows
        (:func:`weight_grad_errors`).
    """
    rows, flat = x_flat.shape
    count = dproj.shape[1]
    width = pallas_hc.stacked_width(count)
    if config is None:
        if interpret or unsupported(rows, flat, width, x_flat.dtype):
            return pallas_hc.project_weight_grad(x_flat, dproj, interpret=interpret)
        config = weight_grad_config(rows, flat, width)
    errors = weight_grad_errors(config, rows, flat, width)
    if errors:
        raise ValueError(f"{config} cannot run x_flat [{rows}, {flat}]: " + "; ".join(
            f"{field} must be {expected}, got {got}" for field, expected, got in errors))
    pieces = jnp.concatenate(split_bf16(dproj.astype(jnp.float32), 3), axis=1)
    pieces_t = jnp.pad(pieces, ((0, 0), (0, _pieces_rows(width) - 3 * count))).T
    kernel = functools.partial(_weight_grad_kernel, config=config, span=rows // config.splits)
    partial = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((config.splits, pieces_t.shape[0], flat),
                                              jnp.float32),
        grid=(flat // config.block_cols, config.splits), grid_names=("n", "s"),
        scratch_types=[plgpu.ACC((pieces_t.shape[0], config.block_cols), jnp.float32),
                       plgpu.SMEM((pieces_t.shape[0], config.block_cols), jnp.float32)],
    )(pieces_t, x_flat)
    total = jnp.sum(partial, axis=0)
    return sum(total[p * count:(p + 1) * count] for p in range(3)).T
