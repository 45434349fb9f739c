"""Manifold-Constrained Hyper-Connections (mHC, arXiv 2512.24880).

A layer keeps ``n`` residual streams ``x [..., n, C]`` and replaces
``x + F(x)`` by ``x_next = H_res x + H_post^T F(H_pre x)``:

* :func:`sinkhorn_knopp` projects ``n x n`` logits towards the doubly stochastic
  matrices: ``P = exp(L - max L)`` (or ``softmax_rows(L) + eps``), then ``iters`` times
  ``P /= (column sums + eps)`` and ``P /= (row sums + eps)`` (or rows first, or
  DeepSeek's schedule), in the log domain: finite at any logit scale. Its gradient
  is exact for the finite number of iterations: the backward walks the iterations in
  reverse (no fixed-point assumption).
* :func:`mhc_pre` computes the coefficients and the sublayer's input
  ``layer_input = sum_i h_pre_i x_i``. Static: ``H~ = bias``. Dynamic:
  ``H~ = alpha * (RMSNorm(vec x) phi) + bias`` per token. Then
  ``h_pre = sigmoid(H~_pre) + pre_eps``, ``h_post = post_scale sigmoid(H~_post)``,
  ``h_res = SK(H~_res)``; ``H~`` is laid out ``[pre (n) | post (n) | res (n^2, row-major)]``.
* :func:`mhc_post` computes ``x_next_i = sum_j h_res_ij x_j + h_post_i f_out``.
* :data:`DEEPSEEK_MHC_PRE` / :data:`DEEPSEEK_MHC_POST` are the options that reproduce
  DeepSeek's released mHC kernels (README: mHC).
* :func:`hyper_connection` is baracuda-kernels' ``HyperConnectionPlan``, a fused static op with ``F = RMSNorm``:
  ``M = SK(h_res)``, ``agg = sum_i sigmoid(h_pre_i) x_i``,
  ``y = agg / sqrt(mean_c agg^2 + eps) * rmsnorm_weight``,
  ``out_i = sum_j M_ij x_j + 2 sigmoid(h_post_i) y``.

x is float32, bfloat16 or float16; coefficients, reductions and all math are
float32. Every op has a ``custom_vjp`` whose backward runs Pallas kernels and
reduces partial sums without atomics (deterministic).

Sharded programs: every op splits along the tokens (every leading axis), each device
running the kernels on its own tokens; the streams, the channels and the weights stay
whole (a split there is gathered), and the weights' gradients are all-reduced over the
tokens' devices.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from bjax import _op, _partition
from bjax.errors import UnsupportedError
from bjax.tune.cache import problem_key
from bjax.xla import hyper_connection as xla_hc
from pallas_kernels import hyper_connection as pallas_hc
from pallas_kernels import hyper_connection_mosaic as mosaic_hc
from pallas_kernels import sinkhorn as pallas_sinkhorn
from pallas_kernels.formulas import sinkhorn as formulas_sinkhorn

SINKHORN_INITS = formulas_sinkhorn.INITS
SINKHORN_ORDERS = tuple(formulas_sinkhorn.SCHEDULES)
SinkhornInit = Literal["exp", "softmax"]
SinkhornOrder = Literal["columns_first", "rows_first", "deepseek"]
MAX_SINKHORN_ITERS = 1000
# The Pallas kernels unroll the n^2 stream mixes; Sinkhorn holds an n x n block.
MAX_KERNEL_STREAMS = 32
# The options of DeepSeek's released mHC kernels (deepseek-ai/TileKernels): 10 Sinkhorn
# iterations from softmax + eps, one column normalisation then rows-then-columns,
# eps 1e-6 everywhere, h_pre = sigmoid + 1e-6, h_post = sigmoid, mixing by h_res^T.
DEEPSEEK_MHC_PRE = types.MappingProxyType(dict(
    rmsnorm_eps=1e-6, sinkhorn_iters=10, sinkhorn_eps=1e-6, sinkhorn_init="softmax",
    sinkhorn_order="deepseek", pre_eps=1e-6, post_scale=1.0))
DEEPSEEK_MHC_POST = types.MappingProxyType(dict(transpose_res=True))
MAX_KERNEL_SINKHORN_N = 128
_X_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


# ---------------------------------------------------------------- validation helpers

def _check_int(value, lo, hi, op, name):
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    _op.check(ok and lo <= value <= hi, op, name, f"an int in [{lo}, {hi}]", repr(value))
    return int(value)


def _check_real(value, op, name, expected, predicate):
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    _op.check(ok and math.isfinite(value) and predicate(float(value)), op, name, expected,
              repr(value))
    return float(value)


def _check_eps(value, op, name):
    return _check_real(value, op, name, "a finite float in (0, 1)", lambda v: 0 < v < 1)


def _check_float_array(a, op, name, shape):
    _op.check(tuple(a.shape) == tuple(shape), op, f"{name}.shape", str(tuple(shape)),
              tuple(a.shape))
    _op.check(jnp.issubdtype(a.dtype, jnp.floating), op, f"{name}.dtype",
              "a float dtype (float32 recommended)", jnp.dtype(a.dtype).name, UnsupportedError)


def _check_x(x, op, name="x", rank=None):
    shape = tuple(x.shape)
    if rank is None:
        _op.check(len(shape) >= 2, op, name, "an array [..., n, C] of rank >= 2",
                  f"shape {shape}")
    else:
        _op.check(len(shape) == rank, op, name, "an array [B, n, C] of rank 3", f"shape {shape}")
    _op.check(shape[-1] >= 1 and shape[-2] >= 1, op, f"{name}.shape",
              "n >= 1 streams of C >= 1 channels", shape)
    _op.check(jnp.dtype(x.dtype) in [jnp.dtype(d) for d in _X_DTYPES], op, f"{name}.dtype",
              "float32, bfloat16 or float16", jnp.dtype(x.dtype).name, UnsupportedError)


def _kernel_streams_rule(desc, op) -> None:
    """The Pallas kernels hold at most :data:`MAX_KERNEL_STREAMS` streams."""
    _op.check(desc.n <= MAX_KERNEL_STREAMS, op, "n (streams)",
              f"<= {MAX_KERNEL_STREAMS} on the Pallas kernels (use backend='xla')", desc.n,
              UnsupportedError)


def _kernel_sinkhorn_rule(desc, op="sinkhorn_knopp") -> None:
    """The Sinkhorn kernel holds matrices of at most :data:`MAX_KERNEL_SINKHORN_N` rows."""
    _op.check(desc.n <= MAX_KERNEL_SINKHORN_N, op, "n",
              f"<= {MAX_KERNEL_SINKHORN_N} on the Pallas kernels (use backend='xla')", desc.n,
              UnsupportedError)


@dataclasses.dataclass(frozen=True)
class SinkhornOptions:
    """Static options of a Sinkhorn-Knopp projection."""
    iters: int = 20
    eps: float = 1e-5
    init: str = "exp"
    order: str = "columns_first"

    @classmethod
    def checked(cls, op, iters, eps, init, order, names=("iters", "eps", "init", "order")):
        iters = _check_int(iters, 1, MAX_SINKHORN_ITERS, op, names[0])
        eps = _check_eps(eps, op, names[1])
        _op.check_choice(init, SINKHORN_INITS, op, names[2])
        _op.check_choice(order, SINKHORN_ORDERS, op, names[3])
        return cls(iters, eps, init, order)

    def as_kwargs(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- Sinkhorn

@dataclasses.dataclass(frozen=True)
class SinkhornDescriptor:
    """Static facts of a ``sinkhorn_knopp`` call."""
    batch_shape: tuple[int, ...]
    n: int
    dtype: np.dtype
    options: SinkhornOptions

    @classmethod
    def from_args(cls, logits, iters, eps, init, order):
        op = "sinkhorn_knopp"
        shape = tuple(logits.shape)
        _op.check(len(shape) >= 2 and shape[-1] == shape[-2] and shape[-1] >= 1, op, "logits",
                  "an array [..., n, n] with n >= 1", f"shape {shape}")
        _op.check(jnp.issubdtype(logits.dtype, jnp.floating), op, "logits.dtype",
                  "a float dtype", jnp.dtype(logits.dtype).name, UnsupportedError)
        options = SinkhornOptions.checked(op, iters, eps, init, order)
        return cls(shape[:-2], shape[-1], jnp.dtype(logits.dtype), options)


# Sharded programs: every kernel call splits along the tokens, which are every leading
# axis (one factor each: "t0", "t1", ...), so that a split of any of them, an inner one
# alone included (sequence parallelism), stays split; streams, channels and weights stay
# whole; results without the tokens (the weights' gradients) are summed over them
# (all-reduced where they are split). Each device flattens its own tokens for the kernel.
def token_rule(operands, results, reduced=False, lead=1) -> _partition.ShardingRule:
    """The rule of a kernel call split along the tokens: ``operands`` and ``results``
    name each array's dimensions, "t" (first) standing for its ``lead`` leading axes, one
    factor ``t0 .. t{lead-1}`` each; every other factor stays whole. With ``reduced``,
    results without the tokens are summed over them.

    >>> token_rule((("t", "c"), ("c",)), (("t",),), lead=2).einsum()
    't0 t1 c, c -> t0 t1'
    """
    tokens = tuple(f"t{axis}" for axis in range(lead))

    def expand(dims):
        return tuple(f for dim in dims for f in (tokens if dim == "t" else (dim,)))
    operands, results = tuple(map(expand, operands)), tuple(map(expand, results))
    whole = {f for dims in (*operands, *results) for f in dims} - set(tokens)
    return _partition.ShardingRule(operands, results, replicated=frozenset(whole),
                                   reduced=frozenset(tokens if reduced else ()))


def _token_split(choice: _op.Choice, kernel, operands, results, *, reduced=False, **static):
    """``kernel(*arrays, **static, interpret=...)`` on tokens flattened to one axis, as a
    function of arrays whose tokens are any number of leading axes (the same for every
    array with "t"), partitioned by the implementation's :func:`token_rule` over them.
    Under ``vmap``: a sequential map."""
    single = len(results) == 1

    def on_shards(*arrays):
        tokens = next(a.shape[:a.ndim - len(d) + 1] for a, d in zip(arrays, operands) if "t" in d)
        flat = [a.reshape(math.prod(tokens), *a.shape[len(tokens):]) if "t" in d else a
                for a, d in zip(arrays, operands)]
        out = kernel(*flat, **static, interpret=choice.interpret)
        out = [r.reshape(*tokens, *r.shape[1:]) if "t" in d else r
               for r, d in zip((out,) if single else out, results)]
        return out[0] if single else tuple(out)

    def split(*arrays):
        lead = next(a.ndim - len(d) + 1 for a, d in zip(arrays, operands) if "t" in d)
        rule = choice.implementation.sharding_rules(operands, results, reduced, lead)

        def batched(axis_size, in_batched, *arrays):
            return jax.lax.map(lambda values: call(*values), arrays)

        call = _partition.kernel_call(on_shards, rule, batched, single_result=single)
        return call(*arrays)
    return split


_MATRIX, _STEPS, _STREAMS = ("t", "i", "j"), ("t", "s", "i"), ("t", "i", "c")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _sinkhorn(logits, options: SinkhornOptions, choice: _op.Choice):
    """``SK(logits [count, n, n])`` float32, differentiable on every implementation."""
    if choice.on_xla:
        return xla_hc.sinkhorn(logits, **options.as_kwargs())
    return _token_split(choice, _sinkhorn_tiles(pallas_sinkhorn.sinkhorn, options, choice),
                        (_MATRIX,), (_MATRIX,), **options.as_kwargs())(logits)


def _sinkhorn_tiles(kernel, options: SinkhornOptions, choice: _op.Choice):
    """``kernel(logits [count, n, n], ...)`` with the config for the matrices it is given
    (the whole call's, or one device's shard): ``choice``'s (a Sinkhorn table's choice),
    else ``sinkhorn_knopp``'s tuned entry for them, else the heuristic."""
    def call(logits, *rest, **static):
        shard = SinkhornDescriptor((logits.shape[0],), logits.shape[-1],
                                   jnp.dtype(logits.dtype), options)
        return kernel(logits, *rest, config=choice.config_for(shard, lambda: None), **static)
    return call


def _sinkhorn_choice(choice: _op.Choice, config) -> _op.Choice:
    """The Sinkhorn of an mHC op with ``choice`` (its backend) and ``config`` (``None``:
    ``sinkhorn_knopp``'s tuned entry or heuristic)."""
    table = SINKHORN_IMPLEMENTATIONS
    return _op.Choice(table[-1] if choice.on_xla else table[0], choice.backend, config,
                      op="sinkhorn_knopp")


def _sinkhorn_fwd(logits, options, choice):
    if choice.on_xla:
        out, vjp = jax.vjp(lambda l: xla_hc.sinkhorn(l, **options.as_kwargs()), logits)
        return out, (vjp,)
    out, scales = _token_split(choice, _sinkhorn_tiles(pallas_sinkhorn.sinkhorn, options, choice),
                               (_MATRIX,), (_MATRIX, _STEPS), **options.as_kwargs(),
                               with_scales=True)(logits)
    return out, (logits, scales)


def _sinkhorn_bwd(options, choice, residuals, grad):
    if choice.on_xla:
        return residuals[0](grad)
    grad = _token_split(choice, _sinkhorn_tiles(pallas_sinkhorn.sinkhorn_backward, options,
                                                choice),
                        (_MATRIX, _STEPS, _MATRIX), (_MATRIX,),
                        **options.as_kwargs())(*residuals, grad)
    return _partition.typed_like_primals((grad,), residuals[:1])


_sinkhorn.defvjp(_sinkhorn_fwd, _sinkhorn_bwd)


def _sinkhorn_any(logits, options, choice):
    """``_sinkhorn`` over leading dims ``[..., n, n]`` (none allowed), float32."""
    if logits.size == 0:
        return jnp.zeros(logits.shape, jnp.float32)
    if logits.ndim == 2:
        return _sinkhorn(logits[None], options, choice)[0]
    return _sinkhorn(logits, options, choice)


def _check_sinkhorn_config(desc, config: pallas_sinkhorn.SinkhornConfig) -> None:
    _op.check_launch(config, "sinkhorn_knopp")


def sinkhorn_tuning_key(desc: SinkhornDescriptor) -> str:
    """The problem's key in the tuning cache: matrices, their size, dtype and the walk."""
    return problem_key(count=math.prod(desc.batch_shape), n=desc.n,
                       dtype=jnp.dtype(desc.dtype).name, iters=desc.options.iters,
                       init=desc.options.init, order=desc.options.order)


SINKHORN_IMPLEMENTATIONS = (
    _op.Implementation(
        "pallas_triton", ("pallas", "interpret"), kernel=lambda desc: "bjax_sinkhorn",
        config_type=pallas_sinkhorn.SinkhornConfig,
        default_config=lambda desc: pallas_sinkhorn.default_config(
            math.prod(desc.batch_shape), desc.n),
        check=_kernel_sinkhorn_rule, check_config=_check_sinkhorn_config,
        sharding_rules=token_rule, tuning_key=sinkhorn_tuning_key),
    _op.Implementation("xla", ("xla",), kernel=lambda desc: "bjax.xla.hyper_connection.sinkhorn"),
)
"""``sinkhorn_knopp``'s implementation table, in order of preference."""


def _mhc_table(op: str, kernels, **config_fields) -> tuple[_op.Implementation, ...]:
    """The table of an mHC op: its kernels (at most :data:`MAX_KERNEL_STREAMS` streams;
    ``config_fields``, the :class:`~bjax._op.Implementation` fields of a config the op
    takes; without them the kernels size their tiles from the problem), then the XLA
    implementation."""
    return (_op.Implementation("pallas_triton", ("pallas", "interpret"), kernel=kernels,
                               check=functools.partial(_kernel_streams_rule, op=op),
                               sharding_rules=token_rule, **config_fields),
            _op.Implementation("xla", ("xla",),
                               kernel=lambda desc: f"bjax.xla.hyper_connection.{op}"))


def sinkhorn_knopp(logits: ArrayLike, *, iters: int = 20, eps: float = 1e-5,
                   init: SinkhornInit = "exp", order: SinkhornOrder = "columns_first",
                   backend: _op.Backend = None,
                   config: pallas_sinkhorn.SinkhornConfig | None = None) -> jax.Array:
    """Sinkhorn-Knopp projection of ``logits [..., n, n]`` (module doc).

    Args:
      logits: ``[..., n, n]``, any float dtype (math in float32).
      iters: iterations, 1 to 1000; each normalises columns then rows
        (``order="columns_first"``, the paper's) or rows then columns
        (``"rows_first"``, the order of mHC.cu's kernel); ``"deepseek"`` normalises
        columns once, then ``iters - 1`` times rows then columns (DeepSeek's kernels).
      eps: guard added to every sum, a finite float in (0, 1).
      init: ``"exp"`` starts from ``exp(logits - max)``, the max over each matrix
        (paper, seed); ``"softmax"`` from ``softmax(logits, rows) + eps`` (DeepSeek's).
      backend: ``None`` (``$BJAX_BACKEND``, else the first of
        :data:`SINKHORN_IMPLEMENTATIONS` that runs the call here: Pallas on CUDA GPUs
        for n <= 128, XLA elsewhere), ``"pallas"``, ``"interpret"`` or ``"xla"``.
      config: the kernel's matrices per program and warps, forward and backward;
        ``None``: the heuristic.

    Returns:
      ``M [..., n, n]`` in logits' dtype. Its gradient is exact for the given
      number of iterations. Finite at any finite logit scale: the ``exp`` start is
      shifted by each matrix's maximum, so its largest entry is 1 and ``eps`` guards
      sums relative to it (with ``eps`` -> 0 the shift would not matter at all). A row
      or column far below the largest entry grows by about ``1/eps`` per normalisation
      until its sum reaches 1. The steps run on ``log P``, so such entries are never
      flushed to 0.

    Raises:
      InvalidProblemError: a non-square or rank < 2 ``logits``, ``iters`` outside
        1..1000, ``eps`` not in (0, 1), an unknown ``init`` or ``order``; ``config``
        not a ``SinkhornConfig`` or not launchable.
      UnsupportedError: non-float logits; n > 128 on the Pallas kernels (an explicit
        kernel backend, or ``config``); ``backend="pallas"`` without a CUDA GPU.
    """
    logits = jnp.asarray(logits)
    desc, choice = _prepare_sinkhorn(logits, iters, eps, init, order, backend, config)
    return _sinkhorn_any(logits, desc.options, choice).astype(logits.dtype)


def _prepare_sinkhorn(logits, iters, eps, init, order, backend, config):
    desc = SinkhornDescriptor.from_args(logits, iters, eps, init, order)
    return desc, _op.select(SINKHORN_IMPLEMENTATIONS, desc, backend, config,
                            op="sinkhorn_knopp")


# ---------------------------------------------------------------- the fused static op

@dataclasses.dataclass(frozen=True)
class HyperConnectionDescriptor:
    """Static facts of a ``hyper_connection`` call."""
    batch: int
    n: int
    hidden: int
    dtype: np.dtype
    sinkhorn: SinkhornOptions

    @classmethod
    def from_args(cls, x, weight, h_pre, h_post, h_res, sinkhorn_iters, eps, sinkhorn_order):
        op = "hyper_connection"
        _check_x(x, op, "x_expanded", rank=3)
        batch, n, hidden = map(int, x.shape)
        _op.check(batch >= 1, op, "x_expanded.shape[0] (batch)", ">= 1", batch)
        _check_float_array(weight, op, "rmsnorm_weight", (hidden,))
        _check_float_array(h_pre, op, "h_pre", (n,))
        _check_float_array(h_post, op, "h_post", (n,))
        _check_float_array(h_res, op, "h_res", (n, n))
        options = SinkhornOptions.checked(op, sinkhorn_iters, eps, "exp", sinkhorn_order,
                                          ("sinkhorn_iters", "eps", "init", "sinkhorn_order"))
        return cls(batch, n, hidden, jnp.dtype(x.dtype), options)


# x and dx [t, i, c]; the RMSNorm weight [c]; the stream coefficients [i] and [i, j].
_FUSED_OPERANDS = (_STREAMS, ("c",), ("i",), ("i",), ("i", "j"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _fused(x, weight, s_pre, s_post, mix_matrix, eps: float, choice: _op.Choice):
    return _token_split(choice, pallas_hc.fused_forward, _FUSED_OPERANDS, (_STREAMS,),
                        eps=eps)(x, weight, s_pre, s_post, mix_matrix)


def _fused_fwd(x, weight, s_pre, s_post, mix_matrix, eps, choice):
    return (_fused(x, weight, s_pre, s_post, mix_matrix, eps, choice),
            (x, weight, s_pre, s_post, mix_matrix))


def _fused_bwd(eps, choice, residuals, dout):
    x, weight, s_pre, s_post, mix_matrix = residuals
    dx, dw, d_mix, d_post, d_pre = _token_split(
        choice, pallas_hc.fused_backward, (_STREAMS, *_FUSED_OPERANDS),
        (_STREAMS, ("c",), ("i", "j"), ("i",), ("i",)), reduced=True,
        eps=eps)(x, dout, weight, s_pre, s_post, mix_matrix)
    return _partition.typed_like_primals((dx, dw.astype(weight.dtype), d_pre, d_post, d_mix),
                                         residuals)


_fused.defvjp(_fused_fwd, _fused_bwd)


def hyper_connection(x_expanded: ArrayLike, rmsnorm_weight: ArrayLike, h_pre: ArrayLike,
                     h_post: ArrayLike, h_res: ArrayLike, *, sinkhorn_iters: int = 20,
                     eps: float = 1e-5, sinkhorn_order: SinkhornOrder = "columns_first",
                     backend: _op.Backend = None) -> jax.Array:
    """The fused static mHC op of baracuda-kernels' ``HyperConnectionPlan`` (module doc): ``out [B, n, C]``.

    ``out[b, i, c] = sum_j M[i, j] x[b, j, c] + 2 sigmoid(h_post[i]) y[b, c]`` with
    ``M = SK(h_res)`` (exp init), ``y = RMSNorm(sum_i sigmoid(h_pre[i]) x[b, i, :]) *
    rmsnorm_weight`` and RMSNorm ``v / sqrt(mean(v^2) + eps)``.

    Args:
      x_expanded: ``[B, n, C]`` float32 / bfloat16 / float16.
      rmsnorm_weight: ``[C]``; h_pre, h_post: ``[n]``; h_res: ``[n, n]``; any float
        dtype (used in float32; gradients come back in each one's dtype).
      sinkhorn_iters: 1 to 1000. eps: the RMSNorm and Sinkhorn guard, in (0, 1).
      sinkhorn_order: ``"columns_first"`` (paper) or ``"rows_first"`` (mHC.cu).
      backend: as in :func:`sinkhorn_knopp`.

    Differentiable in all five arrays.

    Raises:
      InvalidProblemError: a bad shape, dtype or option (the message names it).
      UnsupportedError: ``x`` or a coefficient outside the dtypes above; n > 32 on the
        Pallas kernels; ``backend="pallas"`` without a CUDA GPU.
    """
    args = tuple(map(jnp.asarray, (x_expanded, rmsnorm_weight, h_pre, h_post, h_res)))
    desc, choice = _prepare_fused(*args, sinkhorn_iters, eps, sinkhorn_order, backend)
    x, weight, h_pre, h_post, h_res = args
    options = desc.sinkhorn
    if choice.on_xla:
        return xla_hc.hyper_connection(x, weight, h_pre, h_post, h_res, iters=options.iters,
                                       eps=options.eps, order=options.order)
    sinkhorn_choice = _sinkhorn_choice(choice, None)
    s_pre, s_post, mix_matrix = xla_hc.fused_coefficients(
        h_pre, h_post, h_res,
        sinkhorn=lambda logits: _sinkhorn(logits[None], options, sinkhorn_choice)[0])
    return _fused(x, weight, s_pre, s_post, mix_matrix, options.eps, choice)


HYPER_CONNECTION_IMPLEMENTATIONS = _mhc_table(
    "hyper_connection", lambda desc: "bjax_sinkhorn + bjax_hyper_connection")
"""``hyper_connection``'s implementation table, in order of preference."""


def _prepare_fused(x, weight, h_pre, h_post, h_res, sinkhorn_iters, eps, sinkhorn_order,
                   backend):
    desc = HyperConnectionDescriptor.from_args(x, weight, h_pre, h_post, h_res, sinkhorn_iters,
                                               eps, sinkhorn_order)
    return desc, _op.select(HYPER_CONNECTION_IMPLEMENTATIONS, desc, backend,
                            op="hyper_connection")


# ---------------------------------------------------------------- mhc_pre / mhc_post

@dataclasses.dataclass(frozen=True)
class MhcPreDescriptor:
    """Static facts of an ``mhc_pre`` call."""
    batch_shape: tuple[int, ...]
    n: int
    hidden: int
    dtype: np.dtype
    dynamic: bool
    rmsnorm_eps: float
    pre_eps: float
    post_scale: float
    sinkhorn: SinkhornOptions

    @property
    def tokens(self) -> int:
        return math.prod(self.batch_shape)

    @property
    def coefficients(self) -> int:
        return self.n * self.n + 2 * self.n

    @classmethod
    def from_args(cls, x, phi, alpha, bias, rmsnorm_eps, sinkhorn_iters, sinkhorn_eps,
                  sinkhorn_init, sinkhorn_order, pre_eps, post_scale):
        op = "mhc_pre"
        _check_x(x, op)
        n, hidden = map(int, x.shape[-2:])
        count = n * n + 2 * n
        _op.check(bias is not None, op, "bias", f"an array [{count}] (n^2 + 2n)", None)
        _check_float_array(bias, op, "bias", (count,))
        if phi is None:
            _op.check(alpha is None, op, "alpha", "None when phi is None (static H)",
                      f"shape {tuple(alpha.shape) if alpha is not None else None}")
        else:
            _check_float_array(phi, op, "phi", (n * hidden, count))
            _op.check(alpha is not None, op, "alpha", "an array [3] when phi is given", None)
            _check_float_array(alpha, op, "alpha", (3,))
        return cls(
            tuple(map(int, x.shape[:-2])), n, hidden, jnp.dtype(x.dtype), phi is not None,
            _check_eps(rmsnorm_eps, op, "rmsnorm_eps"),
            _check_real(pre_eps, op, "pre_eps", "a finite float >= 0", lambda v: v >= 0),
            _check_real(post_scale, op, "post_scale", "a finite float", lambda v: True),
            SinkhornOptions.checked(op, sinkhorn_iters, sinkhorn_eps, sinkhorn_init,
                                    sinkhorn_order, ("sinkhorn_iters", "sinkhorn_eps",
                                                     "sinkhorn_init", "sinkhorn_order")))


def _pre_tiles(desc: MhcPreDescriptor, choice: _op.Choice) -> pallas_hc.PreConfig:
    """The Triton kernels' :class:`PreConfig`: the caller's or the tuned one (of the Mosaic
    implementation: its ``kernels``); ``None`` fields: the heuristics, which each kernel
    derives from its own, possibly sharded, operands."""
    if choice.on_xla:
        return pallas_hc.PreConfig()
    config = choice.config_for(desc, lambda: None)
    if isinstance(config, mosaic_hc.MosaicPreConfig):
        return config.kernels
    return config or pallas_hc.PreConfig()


def _projection(desc: MhcPreDescriptor, choice: _op.Choice, field: str = "projection"):
    """``(kernel, config)`` of the dynamic projection (``field`` "projection") or of its
    phi gradient ("weight_grad"): the Mosaic kernel on the Mosaic implementation, else the
    Triton one."""
    if choice.implementation.name == "pallas_mosaic":
        config = choice.config_for(desc, lambda: None)
        kernels = {"projection": mosaic_hc.project, "weight_grad": mosaic_hc.project_weight_grad}
        return kernels[field], getattr(config, field) if config is not None else None
    kernels = {"projection": pallas_hc.project, "weight_grad": pallas_hc.project_weight_grad}
    return kernels[field], getattr(_pre_tiles(desc, choice), field)


def _coefficients(h_tilde, desc: MhcPreDescriptor, choice):
    """``(h_pre, h_post, h_res)`` from ``H~ [T, n^2 + 2n]`` (Sinkhorn on ``choice``, with
    the Sinkhorn config of :func:`_pre_tiles`)."""
    sinkhorn_choice = _sinkhorn_choice(choice, _pre_tiles(desc, choice).sinkhorn)
    return xla_hc.mhc_coefficients(
        h_tilde, desc.n,
        sinkhorn=lambda logits: _sinkhorn_any(logits, desc.sinkhorn, sinkhorn_choice),
        pre_eps=desc.pre_eps, post_scale=desc.post_scale)


def _dynamic_coefficients(proj, squares, alpha, bias, desc: MhcPreDescriptor, choice):
    """Coefficients from the projection ``x_flat phi`` and the sums of squares of x_flat."""
    h_tilde = xla_hc.dynamic_h_tilde(proj, squares, alpha, bias, n=desc.n,
                                     flat=desc.n * desc.hidden, rmsnorm_eps=desc.rmsnorm_eps)
    return _coefficients(h_tilde, desc, choice)


def _static_coefficients(bias, x, desc, choice):
    """Static H: the coefficients of ``bias``, the same for every token of ``x`` (and,
    inside ``jax.shard_map``, varying as x's tokens do)."""
    h_pre, h_post, h_res = _coefficients(bias.astype(jnp.float32)[None], desc, choice)
    return tuple(_partition.vary_like(jnp.broadcast_to(h, x.shape[:-2] + h.shape[1:]), x)
                 for h in (h_pre, h_post, h_res))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _pre(x, phi, alpha, bias, desc: MhcPreDescriptor, choice: _op.Choice):
    return _pre_fwd(x, phi, alpha, bias, desc, choice)[0]


def _pre_fwd(x, phi, alpha, bias, desc, choice):
    tiles = _pre_tiles(desc, choice)
    if desc.dynamic:
        project, projection_config = _projection(desc, choice)
        proj, squares = _token_split(choice, project, (("t", "f"), ("f", "k")),
                                     (("t", "k"), ("t",)), config=projection_config)(
            x.reshape(*x.shape[:-2], -1), phi.astype(jnp.float32))
        h_pre, h_post, h_res = _dynamic_coefficients(proj, squares, alpha, bias, desc, choice)
    else:
        proj = squares = None
        h_pre, h_post, h_res = _static_coefficients(bias, x, desc, choice)
    layer_input = _token_split(choice, pallas_hc.aggregate, (_STREAMS, ("t", "i")),
                               (("t", "c"),), config=tiles.aggregate)(x, h_pre)
    return (layer_input, h_post, h_res), (x, phi, alpha, bias, proj, squares)


def _pre_bwd(desc, choice, residuals, cotangents):
    x, phi, alpha, bias, proj, squares = residuals
    d_input, d_post, d_res = cotangents
    tiles = _pre_tiles(desc, choice)
    if not desc.dynamic:
        (h_pre, _, _), coef_vjp = jax.vjp(lambda b: _static_coefficients(b, x, desc, choice), bias)
        dx, d_pre = _token_split(choice, pallas_hc.aggregate_backward,
                                 (_STREAMS, ("t", "i"), ("t", "c")), (_STREAMS, ("t", "i")),
                                 with_dx=True, config=tiles.aggregate_backward)(x, h_pre, d_input)
        return _partition.typed_like_primals((dx, None, None, *coef_vjp((d_pre, d_post, d_res))),
                                             residuals[:4])
    # The coefficients are recomputed (a few [T, n^2 + 2n] ops and one Sinkhorn launch)
    # rather than kept: the residuals stay the inputs, proj and squares.
    (h_pre, _, _), coef_vjp = jax.vjp(
        lambda p, s, a, b: _dynamic_coefficients(p, s, a, b, desc, choice),
        proj, squares, alpha, bias)
    d_pre = _token_split(choice, pallas_hc.aggregate_backward,
                         (_STREAMS, ("t", "i"), ("t", "c")), (("t", "i"),),
                         with_dx=False, config=tiles.aggregate_backward)(x, h_pre, d_input)
    d_proj, d_squares, d_alpha, d_bias = coef_vjp((d_pre, d_post, d_res))
    phi32 = phi.astype(jnp.float32)
    dx = _token_split(choice, pallas_hc.project_input_grad,
                      (_STREAMS, ("t", "i"), ("t", "c"), ("t", "k"), ("f", "k"), ("t",)),
                      (_STREAMS,), config=tiles.input_grad)(
        x, h_pre, d_input, d_proj, phi32, 2 * d_squares)
    weight_grad, weight_grad_config = _projection(desc, choice, "weight_grad")
    d_phi = _token_split(choice, weight_grad, (("t", "f"), ("t", "k")), (("f", "k"),),
                         reduced=True, config=weight_grad_config)(
        x.reshape(*x.shape[:-2], -1), d_proj)
    return _partition.typed_like_primals((dx, d_phi.astype(phi.dtype), d_alpha, d_bias),
                                         residuals[:4])


_pre.defvjp(_pre_fwd, _pre_bwd)


def _check_tiles(op: str, config, fields: dict, prefix: str = "config") -> None:
    """Each of ``fields`` (name: type) of ``config`` (the argument ``prefix``) is None or
    a launchable config of that type."""
    for name, kind in fields.items():
        tile = getattr(config, name)
        if tile is not None:
            _op.check(isinstance(tile, kind), op, f"{prefix}.{name}",
                      f"a {kind.__name__} or None", repr(tile))
            _op.check_launch(tile, op, f"{prefix}.{name}")


def _check_pre_config(desc: MhcPreDescriptor, config: pallas_hc.PreConfig,
                      prefix: str = "config") -> None:
    # The kernels mask partial tiles; the projection's column block must fit phi's
    # stacked pieces, which it walks in whole blocks.
    _check_tiles("mhc_pre", config, {
        "projection": pallas_hc.ProjectionConfig, "aggregate": pallas_hc.TileConfig,
        "aggregate_backward": pallas_hc.TileConfig, "input_grad": pallas_hc.TileConfig,
        "weight_grad": pallas_hc.TileConfig, "sinkhorn": pallas_sinkhorn.SinkhornConfig},
        prefix)
    if desc.dynamic and config.projection is not None:
        width = pallas_hc.stacked_width(desc.n * desc.n + 2 * desc.n)
        _op.check(config.projection.block_width <= width, "mhc_pre",
                  f"{prefix}.projection.block_width",
                  f"<= {width} (phi's three pieces side by side, padded)",
                  config.projection.block_width)


def _mosaic_pre_rule(desc: MhcPreDescriptor) -> None:
    """The Mosaic implementation runs dynamic H (its projection is the Mosaic kernel) on a
    Hopper GPU (wgmma), where :func:`pallas_kernels.hyper_connection_mosaic.unsupported`
    allows."""
    op = "mhc_pre"
    _kernel_streams_rule(desc, op)
    _op.check(desc.dynamic, op, "phi", "given (dynamic H) for the Mosaic projection",
              None, UnsupportedError)
    capability = _op.cuda_compute_capability()
    _op.check(capability == "9.0", op, "the GPU", "a Hopper GPU (compute capability 9.0: "
              "wgmma) for the Mosaic projection", f"compute capability {capability}",
              UnsupportedError)
    width = pallas_hc.stacked_width(desc.coefficients)
    why = mosaic_hc.unsupported(desc.tokens, desc.n * desc.hidden, width, desc.dtype)
    _op.check(why is None, op, "x", "within the Mosaic projection's shapes", why,
              UnsupportedError)


def _check_mosaic_pre_config(desc: MhcPreDescriptor, config: mosaic_hc.MosaicPreConfig) -> None:
    op = "mhc_pre"
    _op.check(isinstance(config.kernels, pallas_hc.PreConfig), op, "config.kernels",
              "a PreConfig", repr(config.kernels))
    for field, what in (("projection", "projection"), ("weight_grad", "phi gradient")):
        _op.check(getattr(config.kernels, field) is None, op, f"config.kernels.{field}",
                  f"None (config.{field} configures the Mosaic {what})",
                  repr(getattr(config.kernels, field)))
    _check_pre_config(desc, config.kernels, "config.kernels")
    width = pallas_hc.stacked_width(desc.coefficients)
    for field, kind, errors in (
            ("projection", mosaic_hc.MosaicProjectionConfig, mosaic_hc.config_errors),
            ("weight_grad", mosaic_hc.MosaicWeightGradConfig, mosaic_hc.weight_grad_errors)):
        given = getattr(config, field)
        if given is None:
            continue
        _op.check(isinstance(given, kind), op, f"config.{field}",
                  f"a {kind.__name__} or None", repr(given))
        for name, expected, got in errors(given, desc.tokens, desc.n * desc.hidden, width):
            _op.fail(op, f"config.{field}.{name}", expected, got)


def pre_tuning_key(desc: MhcPreDescriptor) -> str:
    """``mhc_pre``'s key in the tuning cache."""
    return problem_key(tokens=desc.tokens, n=desc.n, hidden=desc.hidden,
                       dtype=jnp.dtype(desc.dtype).name, dynamic=desc.dynamic,
                       sinkhorn_iters=desc.sinkhorn.iters)


def _prepare_pre(x, phi, alpha, bias, rmsnorm_eps, sinkhorn_iters, sinkhorn_eps,
                 sinkhorn_init, sinkhorn_order, pre_eps, post_scale, backend, config):
    desc = MhcPreDescriptor.from_args(x, phi, alpha, bias, rmsnorm_eps, sinkhorn_iters,
                                      sinkhorn_eps, sinkhorn_init, sinkhorn_order, pre_eps,
                                      post_scale)
    return desc, _op.select(MHC_PRE_IMPLEMENTATIONS, desc, backend, config, op="mhc_pre")


def mhc_pre(x: ArrayLike, *, bias: ArrayLike, phi: ArrayLike | None = None,
            alpha: ArrayLike | None = None, rmsnorm_eps: float = 1e-6, sinkhorn_iters: int = 20,
            sinkhorn_eps: float = 1e-5, sinkhorn_init: SinkhornInit = "exp",
            sinkhorn_order: SinkhornOrder = "columns_first", pre_eps: float = 0.0,
            post_scale: float = 2.0, backend: _op.Backend = None,
            config: pallas_hc.PreConfig | mosaic_hc.MosaicPreConfig | None = None
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """mHC before the sublayer: coefficients and the sublayer's input (module doc).

    Args:
      x: ``[..., n, C]`` residual streams (tokens leading), float32 / bfloat16 / float16.
      bias: ``[n^2 + 2n]``, laid out ``[pre | post | res (row-major n x n)]``.
      phi: ``None`` (static H: the coefficients are ``bias`` alone) or ``[n C, n^2 + 2n]``
        (dynamic H from ``RMSNorm(vec x)``, no norm weight: fold it into phi).
      alpha: ``[3]`` scales of the pre, post and res columns; given exactly when phi is.
      rmsnorm_eps: the guard of the RMS over ``n C`` values, in (0, 1).
      sinkhorn_iters, sinkhorn_eps, sinkhorn_init, sinkhorn_order: as in
        :func:`sinkhorn_knopp`. ``**DEEPSEEK_MHC_PRE`` sets every option as
        DeepSeek's kernels have it.
      pre_eps: added to ``sigmoid(H~_pre)``; >= 0.
      post_scale: ``h_post = post_scale * sigmoid(H~_post)`` (2 in the paper).
      backend: as in :func:`sinkhorn_knopp`.
      config: ``None`` (the tuned entry, else the heuristics); a
        :class:`~pallas_kernels.hyper_connection.PreConfig` runs the Triton
        implementation with it, a
        :class:`~pallas_kernels.hyper_connection_mosaic.MosaicPreConfig` the Mosaic one
        (dynamic H, bfloat16, on a Hopper GPU: :data:`MHC_PRE_IMPLEMENTATIONS`).

    Returns:
      ``(layer_input [..., C] in x's dtype, h_post [..., n], h_res [..., n, n])``,
      the coefficients float32 (per token, also when static).

    Differentiable in x, bias, phi and alpha.

    Raises:
      InvalidProblemError: ``x`` of rank < 2 or with no streams or channels; ``bias``,
        ``phi`` or ``alpha`` missing, of the wrong shape or not float (``alpha`` given
        without ``phi`` or the reverse); ``rmsnorm_eps`` not in (0, 1); a negative or
        non-finite ``pre_eps``; a non-finite ``post_scale``; Sinkhorn options as in
        :func:`sinkhorn_knopp`.
      UnsupportedError: ``x`` not float32, bfloat16 or float16, or a parameter not
        float; more than ``MAX_KERNEL_STREAMS`` streams on the Pallas kernels;
        ``backend="pallas"`` without a CUDA GPU; ``config`` with the XLA backend.
    """
    x = jnp.asarray(x)
    phi, alpha, bias = (None if a is None else jnp.asarray(a) for a in (phi, alpha, bias))
    desc, choice = _prepare_pre(x, phi, alpha, bias, rmsnorm_eps, sinkhorn_iters, sinkhorn_eps,
                                sinkhorn_init, sinkhorn_order, pre_eps, post_scale, backend,
                                config)
    if choice.on_xla:
        return xla_hc.mhc_pre(x, phi, alpha, bias, rmsnorm_eps=desc.rmsnorm_eps,
                              sinkhorn=functools.partial(xla_hc.sinkhorn,
                                                         **desc.sinkhorn.as_kwargs()),
                              pre_eps=desc.pre_eps, post_scale=desc.post_scale)
    lead, n, hidden = desc.batch_shape, desc.n, desc.hidden
    if desc.tokens == 0:
        return (jnp.zeros((*lead, hidden), x.dtype), jnp.zeros((*lead, n), jnp.float32),
                jnp.zeros((*lead, n, n), jnp.float32))
    # The tokens keep their axes (a split of any of them stays split); x [n, C] gets one.
    layer_input, h_post, h_res = _pre(x.reshape(*(lead or (1,)), n, hidden), phi, alpha, bias,
                                      desc, choice)
    return (layer_input.reshape(*lead, hidden), h_post.reshape(*lead, n),
            h_res.reshape(*lead, n, n))


@dataclasses.dataclass(frozen=True)
class MhcPostDescriptor:
    """Static facts of an ``mhc_post`` call."""
    batch_shape: tuple[int, ...]
    n: int
    hidden: int
    dtype: np.dtype
    transpose_res: bool

    @property
    def tokens(self) -> int:
        return math.prod(self.batch_shape)

    @classmethod
    def from_args(cls, x, f_out, h_post, h_res, transpose_res):
        op = "mhc_post"
        _check_x(x, op)
        lead, (n, hidden) = tuple(x.shape[:-2]), tuple(map(int, x.shape[-2:]))
        _op.check(tuple(f_out.shape) == (*lead, hidden), op, "f_out.shape",
                  f"{(*lead, hidden)} (x's tokens and channels)", tuple(f_out.shape))
        _op.check(f_out.dtype == x.dtype, op, "f_out.dtype", f"{jnp.dtype(x.dtype).name} (x's)",
                  jnp.dtype(f_out.dtype).name)
        _check_float_array(h_post, op, "h_post", (*lead, n))
        _check_float_array(h_res, op, "h_res", (*lead, n, n))
        _op.check_bool(transpose_res, op, "transpose_res")
        return cls(tuple(map(int, lead)), n, hidden, jnp.dtype(x.dtype), bool(transpose_res))


_POST_OPERANDS = (_STREAMS, ("t", "c"), ("t", "i"), ("t", "i", "j"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _post(x, f_out, h_post, h_res, transpose: bool, choice: _op.Choice,
          tiles: pallas_hc.MixConfig):
    return _token_split(choice, pallas_hc.mix, _POST_OPERANDS, (_STREAMS,),
                        transpose=transpose, config=tiles.forward)(x, f_out, h_post, h_res)


def _post_fwd(x, f_out, h_post, h_res, transpose, choice, tiles):
    return (_post(x, f_out, h_post, h_res, transpose, choice, tiles),
            (x, f_out, h_post, h_res))


def _post_bwd(transpose, choice, tiles, residuals, dout):
    x, f_out, h_post, h_res = residuals
    dx, df, d_post, d_res = _token_split(
        choice, pallas_hc.mix_backward, (*_POST_OPERANDS, _STREAMS), _POST_OPERANDS,
        transpose=transpose, config=tiles.backward)(x, f_out, h_post, h_res, dout)
    return _partition.typed_like_primals(
        (dx, df, d_post.astype(h_post.dtype), d_res.astype(h_res.dtype)), residuals)


_post.defvjp(_post_fwd, _post_bwd)


def _check_post_config(desc: MhcPostDescriptor, config: pallas_hc.MixConfig) -> None:
    # The kernels mask partial tiles of tokens and channels: any launchable tile runs.
    _check_tiles("mhc_post", config,
                 {"forward": pallas_hc.TileConfig, "backward": pallas_hc.TileConfig})


def post_tuning_key(desc: MhcPostDescriptor) -> str:
    """``mhc_post``'s key in the tuning cache."""
    return problem_key(tokens=desc.tokens, n=desc.n, hidden=desc.hidden,
                       dtype=jnp.dtype(desc.dtype).name, transpose_res=desc.transpose_res)


def _prepare_post(x, f_out, h_post, h_res, transpose_res, backend, config):
    desc = MhcPostDescriptor.from_args(x, f_out, h_post, h_res, transpose_res)
    return desc, _op.select(MHC_POST_IMPLEMENTATIONS, desc, backend, config, op="mhc_post")


def mhc_post(x: ArrayLike, f_out: ArrayLike, h_post: ArrayLike, h_res: ArrayLike, *,
             transpose_res: bool = False, backend: _op.Backend = None,
             config: pallas_hc.MixConfig | None = None) -> jax.Array:
    """mHC after the sublayer: ``x_next[..., i, c] = sum_j h_res[..., i, j] x[..., j, c]
    + h_post[..., i] f_out[..., c]`` (module doc).

    Args:
      x: ``[..., n, C]`` the streams ``mhc_pre`` read, float32 / bfloat16 / float16.
      f_out: ``[..., C]`` the sublayer's output, in x's dtype.
      h_post: ``[..., n]``, h_res: ``[..., n, n]``: per token, as ``mhc_pre`` returns them
        (any float dtype, used in float32).
      transpose_res: mix with ``h_res^T`` (``x_next_i = sum_j h_res[j, i] x_j``), the
        layout of DeepSeek's kernels.
      backend: as in :func:`sinkhorn_knopp`.
      config: the kernels' tiles, ``MixConfig(forward, backward)`` of
        ``TileConfig(block_rows tokens, block_cols channels, num_warps)`` per stream
        (``None`` fields: the heuristic's); default: this device's tuned entry, else the
        heuristic (``bjax.plan(...).config_source``).

    Returns ``x_next [..., n, C]`` in x's dtype; differentiable in all four arrays.

    Raises:
      InvalidProblemError: ``x`` of rank < 2 or with no streams or channels; ``f_out``,
        ``h_post`` or ``h_res`` of the wrong shape or dtype (``f_out`` in x's dtype, the
        coefficients float); a non-bool ``transpose_res``; ``config`` not a ``MixConfig``
        or with a tile that cannot launch.
      UnsupportedError: ``x`` not float32, bfloat16 or float16, or a coefficient not
        float; more than ``MAX_KERNEL_STREAMS`` streams on the Pallas kernels;
        ``backend="pallas"`` without a CUDA GPU; ``config`` with the XLA backend.
    """
    x, f_out, h_post, h_res = map(jnp.asarray, (x, f_out, h_post, h_res))
    desc, choice = _prepare_post(x, f_out, h_post, h_res, transpose_res, backend, config)
    if choice.on_xla:
        return xla_hc.mhc_post(x, f_out, h_post, h_res, transpose_res=desc.transpose_res)
    if desc.tokens == 0:
        return jnp.zeros(x.shape, x.dtype)
    lead, n, hidden = desc.batch_shape or (1,), desc.n, desc.hidden
    out = _post(x.reshape(*lead, n, hidden), f_out.reshape(*lead, hidden),
                h_post.reshape(*lead, n), h_res.reshape(*lead, n, n), desc.transpose_res, choice,
                choice.config_for(desc, pallas_hc.MixConfig))
    return out.reshape(x.shape)


def _mosaic_pre_default(desc: MhcPreDescriptor) -> mosaic_hc.MosaicPreConfig:
    triton = pallas_hc.pre_config(desc.tokens, desc.n, desc.hidden, desc.coefficients,
                                  desc.dtype)
    shape = (desc.tokens, desc.n * desc.hidden, pallas_hc.stacked_width(desc.coefficients))
    return mosaic_hc.MosaicPreConfig(
        mosaic_hc.projection_config(*shape),
        dataclasses.replace(triton, projection=None, weight_grad=None),
        mosaic_hc.weight_grad_config(*shape))


MHC_PRE_IMPLEMENTATIONS = (
    # The Mosaic GPU projection and its phi gradient (1.8x and 1.5-1.8x the Triton kernels
    # at DeepSeek widths on the H200, BENCHMARKS.md); the rest of the op runs the Triton
    # kernels. Both candidates share
    # the tuning key: `bjax.tune mhc_pre` records whichever config is fastest, and a
    # Triton entry makes this candidate step aside for that problem.
    _op.Implementation(
        "pallas_mosaic", ("pallas",),
        kernel=lambda desc: "bjax_mhc_projection_mosaic + bjax_sinkhorn + bjax_mhc_pre",
        config_type=mosaic_hc.MosaicPreConfig, default_config=_mosaic_pre_default,
        check=_mosaic_pre_rule, check_config=_check_mosaic_pre_config,
        sharding_rules=token_rule, tuning_key=pre_tuning_key),
    *_mhc_table(
        "mhc_pre", lambda desc: ("bjax_mhc_projection + " if desc.dynamic else "")
        + "bjax_sinkhorn + bjax_mhc_pre", config_type=pallas_hc.PreConfig,
        default_config=lambda desc: pallas_hc.pre_config(
            desc.tokens, desc.n, desc.hidden, desc.coefficients, desc.dtype),
        check_config=_check_pre_config, tuning_key=pre_tuning_key))
"""``mhc_pre``'s implementation table, in order of preference."""

MHC_POST_IMPLEMENTATIONS = _mhc_table(
    "mhc_post", lambda desc: "bjax_mhc_post", config_type=pallas_hc.MixConfig,
    default_config=lambda desc: pallas_hc.MixConfig(
        pallas_hc.mix_config(desc.tokens, desc.n, desc.hidden),
        pallas_hc.mix_backward_config(desc.tokens, desc.n, desc.hidden)),
    check_config=_check_post_config, tuning_key=post_tuning_key)
"""``mhc_post``'s implementation table, in order of preference."""


# ---------------------------------------------------------------- plans

_PRECISION = _op.PrecisionGuarantee(
    math_precision="float32", accumulator="float32", deterministic=True,
    bit_stable_on_same_hardware=True,
    notes="partial sums reduced in a fixed order (no atomics); the Sinkhorn backward "
          "walks the iterations in reverse")


@_op.register_planner(sinkhorn_knopp)
def _plan_sinkhorn(logits, *, iters=20, eps=1e-5, init="exp", order="columns_first",
                   backend=None, config=None):
    desc, choice = _prepare_sinkhorn(logits, iters, eps, init, order, backend, config)
    return _op.Plan.of("sinkhorn_knopp", desc, choice, _PRECISION)


@_op.register_planner(hyper_connection)
def _plan_hyper_connection(x_expanded, rmsnorm_weight, h_pre, h_post, h_res, *,
                           sinkhorn_iters=20, eps=1e-5, sinkhorn_order="columns_first",
                           backend=None):
    desc, choice = _prepare_fused(x_expanded, rmsnorm_weight, h_pre, h_post, h_res,
                                  sinkhorn_iters, eps, sinkhorn_order, backend)
    return _op.Plan.of("hyper_connection", desc, choice, _PRECISION)


@_op.register_planner(mhc_pre)
def _plan_mhc_pre(x, *, bias, phi=None, alpha=None, rmsnorm_eps=1e-6, sinkhorn_iters=20,
                  sinkhorn_eps=1e-5, sinkhorn_init="exp", sinkhorn_order="columns_first",
                  pre_eps=0.0, post_scale=2.0, backend=None, config=None):
    desc, choice = _prepare_pre(x, phi, alpha, bias, rmsnorm_eps, sinkhorn_iters, sinkhorn_eps,
                                sinkhorn_init, sinkhorn_order, pre_eps, post_scale, backend,
                                config)
    return _op.Plan.of("mhc_pre", desc, choice, _PRECISION)


@_op.register_planner(mhc_post)
def _plan_mhc_post(x, f_out, h_post, h_res, *, transpose_res=False, backend=None, config=None):
    desc, choice = _prepare_post(x, f_out, h_post, h_res, transpose_res, backend, config)
    return _op.Plan.of("mhc_post", desc, choice, _PRECISION)
