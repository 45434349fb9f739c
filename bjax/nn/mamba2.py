"""Mamba2: the Mamba-2 mixer of mamba_ssm's ``Mamba2`` and transformers' ``Mamba2Mixer``,
on bjax's causal convolution and SSD scan, with decode caches."""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bjax import _op
from bjax.conv import causal_conv1d, causal_conv1d_step
from bjax.ssd import ssd_chunk_scan, ssd_step

_OP = "Mamba2"


class Mamba2Cache(NamedTuple):
    """A mixer's decode state (a pytree: donate it to a jitted step to update it in place).

    Attributes:
      conv_state: ``[b, conv_kernel - 1, conv_dim]``, the convolution's last inputs.
      ssm_state: float32 ``[b, num_heads, head_dim, state_size]``.
    """
    conv_state: jax.Array
    ssm_state: jax.Array


class _DepthwiseConv(nnx.Module):
    """The causal convolution's parameters: ``weight [channels, k]``, ``bias [channels]``
    (torch's ``conv1d.weight [channels, 1, k]`` without its middle axis)."""

    def __init__(self, channels, kernel, use_bias, param_dtype, rngs):
        bound = 1 / math.sqrt(kernel)   # torch.nn.Conv1d's default: U(-1/sqrt(fan_in), ...)
        self.weight = nnx.Param(jax.random.uniform(rngs.params(), (channels, kernel),
                                                   param_dtype, -bound, bound))
        self.bias = (nnx.Param(jax.random.uniform(rngs.params(), (channels,), param_dtype,
                                                  -bound, bound)) if use_bias else None)


class _GatedRMSNorm(nnx.Module):
    """``weight * rmsnorm_groups(y * silu(z))``: the gate first, then an RMSNorm over each
    group of ``group_size`` channels, in float32 (the normalised value cast to y's dtype
    before the weight, as transformers' ``Mamba2RMSNormGated``)."""

    def __init__(self, size, group_size, eps, param_dtype):
        self.weight = nnx.Param(jnp.ones((size,), param_dtype))
        self.group_size, self.eps = group_size, eps

    def __call__(self, y, z):
        h = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        groups = h.reshape(*h.shape[:-1], -1, self.group_size)
        variance = jnp.mean(groups * groups, axis=-1, keepdims=True)
        h = (groups * jax.lax.rsqrt(variance + self.eps)).reshape(h.shape)
        return self.weight[...] * h.astype(y.dtype)


class Mamba2(nnx.Module):
    """The Mamba-2 mixer: ``x [b, l, hidden] -> y [b, l, hidden]``.

    ``in_proj`` gives ``z`` (intermediate), ``xBC`` (conv_dim = intermediate + 2 groups
    state) and ``dt`` (heads); ``xBC`` goes through :func:`bjax.causal_conv1d` with silu
    and splits into ``x``, ``B`` and ``C``; :func:`bjax.ssd_chunk_scan` runs with ``D``,
    ``dt_bias``, softplus, ``time_step_limit`` and ``A = -exp(A_log)``; then the gated
    RMSNorm over groups of ``intermediate / n_groups`` channels, gate first, and
    ``out_proj``. Parameters are named as transformers' ``Mamba2Mixer`` (``in_proj``,
    ``conv1d.weight``, ``conv1d.bias``, ``dt_bias``, ``A_log``, ``D``, ``norm.weight``,
    ``out_proj``), so :meth:`from_torch_state_dict` loads its state dict.

    Args:
      hidden_size, num_heads, head_dim, state_size, n_groups, expand, conv_kernel,
      chunk_size, time_step_limit, layer_norm_epsilon, use_bias, use_conv_bias: as
        transformers' ``Mamba2Config`` (``num_heads * head_dim == expand * hidden_size``).
      time_step_min, time_step_max, time_step_floor: the range ``dt_bias`` is drawn from
        (softplus of it, log-uniform), as transformers initialises it.
      dtype: the activations' dtype (``None``: the input's); param_dtype: the parameters'.
      backend: the bjax backend of the convolution and the scan (``None``: bjax's default).
      rngs: ``nnx.Rngs`` for the initialisers.

    Raises:
      InvalidProblemError: ``num_heads * head_dim != expand * hidden_size``, or
        ``num_heads`` not a multiple of ``n_groups``.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, *, state_size: int = 128,
                 n_groups: int = 1, expand: int = 2, conv_kernel: int = 4, chunk_size: int = 256,
                 time_step_limit: tuple[float, float] = (0.0, float("inf")),
                 layer_norm_epsilon: float = 1e-5, use_bias: bool = False,
                 use_conv_bias: bool = True, time_step_min: float = 0.001,
                 time_step_max: float = 0.1, time_step_floor: float = 1e-4, dtype=None,
                 param_dtype=jnp.float32, backend: str | None = None, rngs: nnx.Rngs):
        intermediate = int(expand * hidden_size)
        _op.check(num_heads * head_dim == intermediate, _OP, "num_heads * head_dim",
                  f"expand * hidden_size = {intermediate}",
                  f"{num_heads} * {head_dim} = {num_heads * head_dim}")
        _op.check(num_heads % n_groups == 0, _OP, "num_heads", f"a multiple of n_groups = "
                  f"{n_groups}", num_heads)
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.state_size, self.n_groups, self.conv_kernel = state_size, n_groups, conv_kernel
        self.chunk_size, self.time_step_limit = chunk_size, tuple(time_step_limit)
        self.intermediate_size = intermediate
        self.conv_dim = intermediate + 2 * n_groups * state_size
        self.dtype, self.backend = dtype, backend
        linear = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_proj = nnx.Linear(hidden_size, intermediate + self.conv_dim + num_heads,
                                  **linear)
        self.conv1d = _DepthwiseConv(self.conv_dim, conv_kernel, use_conv_bias, param_dtype,
                                     rngs)
        dt = jnp.exp(jax.random.uniform(rngs.params(), (num_heads,), jnp.float32)
                     * (math.log(time_step_max) - math.log(time_step_min))
                     + math.log(time_step_min))
        dt = jnp.maximum(dt, time_step_floor)
        self.dt_bias = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(param_dtype))
        self.A_log = nnx.Param(jnp.log(jnp.arange(1, num_heads + 1, dtype=param_dtype)))
        self.D = nnx.Param(jnp.ones((num_heads,), param_dtype))
        self.norm = _GatedRMSNorm(intermediate, intermediate // n_groups, layer_norm_epsilon,
                                  param_dtype)
        self.out_proj = nnx.Linear(intermediate, hidden_size, **linear)

    def init_cache(self, batch: int, dtype=jnp.float32) -> Mamba2Cache:
        """Zero states for ``batch`` sequences (``dtype``: the conv state's, the activations'
        or float32)."""
        return Mamba2Cache(jnp.zeros((batch, self.conv_kernel - 1, self.conv_dim), dtype),
                           jnp.zeros((batch, self.num_heads, self.head_dim, self.state_size),
                                     jnp.float32))

    def _split(self, projected):
        """``(z, xBC, dt)`` of the in-projection."""
        cut = np.cumsum([self.intermediate_size, self.conv_dim])
        return jnp.split(projected, cut, axis=-1)

    def _split_xbc(self, xbc):
        """``(x [..., h, p], B [..., g, n], C [..., g, n])`` of the convolved ``xBC``."""
        groups = self.n_groups * self.state_size
        x, B, C = jnp.split(xbc, [self.intermediate_size, self.intermediate_size + groups],
                            axis=-1)
        lead = xbc.shape[:-1]
        return (x.reshape(*lead, self.num_heads, self.head_dim),
                B.reshape(*lead, self.n_groups, self.state_size),
                C.reshape(*lead, self.n_groups, self.state_size))

    def _ssm_options(self):
        return dict(D=self.D[...], dt_bias=self.dt_bias[...], dt_softplus=True,
                    dt_limit=self.time_step_limit)

    def _out(self, y, z):
        return self.out_proj(self.norm(y.reshape(*y.shape[:-2], -1), z))

    def __call__(self, x, *, cache: Mamba2Cache | None = None, seq_idx=None, cu_seqlens=None):
        """The mixer over whole sequences.

        Args:
          x: ``[b, l, hidden]``.
          cache: optional; the prefill continues from it (zeros from :meth:`init_cache`)
            and the call returns it filled.
          seq_idx: optional integer ``[b, l]`` (packed sequences): the convolution's
            history and the scan's state restart wherever it changes.
          cu_seqlens: optional integer ``[num_seqs + 1]`` instead of ``seq_idx``, with
            ``b == 1`` (mamba_ssm's packed prefill): sequence ``i`` is positions
            ``cu_seqlens[i] .. cu_seqlens[i + 1] - 1``. With a cache (of one row, which
            seeds the sequence at position 0), the returned cache has a row per sequence,
            its final states, for :meth:`step` to continue every sequence.

        Returns:
          ``y [b, l, hidden]``, or ``(y, cache)`` with a cache.
        """
        z, xbc, dt = self._split(self.in_proj(x))
        common = dict(seq_idx=seq_idx, cu_seqlens=cu_seqlens, backend=self.backend)
        # With a cache: the states after the sequence, or after each packed sequence.
        states = dict(return_final_states=cache is not None and cu_seqlens is None,
                      return_varlen_states=cache is not None and cu_seqlens is not None)
        out = causal_conv1d(xbc, self.conv1d.weight[...], _value(self.conv1d.bias),
                            activation="silu", **states, **common,
                            initial_states=None if cache is None else cache.conv_state)
        xbc, conv_state = (out, None) if cache is None else out
        xs, B, C = self._split_xbc(xbc)
        A = -jnp.exp(self.A_log[...].astype(jnp.float32))
        out = ssd_chunk_scan(xs, dt, A, B, C, chunk_size=self.chunk_size, **states, **common,
                             initial_states=None if cache is None else cache.ssm_state,
                             **self._ssm_options())
        if cache is None:
            return self._out(out, z)
        y, ssm_state = out
        return self._out(y, z), Mamba2Cache(conv_state.astype(cache.conv_state.dtype),
                                            ssm_state)

    def step(self, x_t, cache: Mamba2Cache):
        """One token per sequence: ``x_t [b, hidden] -> (y_t [b, hidden], cache)``."""
        z, xbc, dt = self._split(self.in_proj(x_t))
        xbc, conv_state = causal_conv1d_step(cache.conv_state, xbc, self.conv1d.weight[...],
                                             _value(self.conv1d.bias), activation="silu",
                                             backend=self.backend)
        xs, B, C = self._split_xbc(xbc)
        A = -jnp.exp(self.A_log[...].astype(jnp.float32))
        y, ssm_state = ssd_step(cache.ssm_state, xs, dt, A, B, C, backend=self.backend,
                                **self._ssm_options())
        return self._out(y, z), Mamba2Cache(conv_state, ssm_state)

    @classmethod
    def from_torch_state_dict(cls, state_dict, *, rngs: nnx.Rngs | None = None, **config):
        """The mixer with the weights of a transformers ``Mamba2Mixer`` state dict.

        Args:
          state_dict: name -> NumPy array (``{k: v.numpy() for k, v in
            mixer.state_dict().items()}``): ``in_proj.weight [out, in]`` (and
            ``in_proj.bias``), ``conv1d.weight [conv_dim, 1, k]``, ``conv1d.bias``,
            ``dt_bias``, ``A_log``, ``D``, ``norm.weight``, ``out_proj.weight`` (and bias).
          rngs: only for the initialisers that the weights then replace.
          config: the constructor's arguments (``Mamba2Config``'s names).

        Raises:
          InvalidProblemError: a missing or unexpected name, or an array of another shape
            than the configuration gives.
        """
        module = cls(**config, rngs=rngs or nnx.Rngs(0))
        targets = {"in_proj.weight": (module.in_proj.kernel, np.transpose),
                   "in_proj.bias": (module.in_proj.bias, None),
                   "conv1d.weight": (module.conv1d.weight, lambda w: w[:, 0]),
                   "conv1d.bias": (module.conv1d.bias, None),
                   "dt_bias": (module.dt_bias, None), "A_log": (module.A_log, None),
                   "D": (module.D, None), "norm.weight": (module.norm.weight, None),
                   "out_proj.weight": (module.out_proj.kernel, np.transpose),
                   "out_proj.bias": (module.out_proj.bias, None)}
        expected = {name for name, (param, _) in targets.items() if param is not None}
        _op.check(set(state_dict) == expected, "Mamba2.from_torch_state_dict", "state_dict",
                  f"the names {sorted(expected)}", sorted(state_dict))
        for name in expected:
            param, convert = targets[name]
            value = np.asarray(state_dict[name])
            value = convert(value) if convert is not None else value
            _op.check(value.shape == param[...].shape, "Mamba2.from_torch_state_dict",
                      f"state_dict[{name!r}].shape", f"{param[...].shape} after conversion",
                      value.shape)
            param[...] = jnp.asarray(value, param[...].dtype)
        return module


def _value(param):
    return None if param is None else param[...]
