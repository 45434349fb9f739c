"""GatedMLP: in-projection to two halves of the hidden width, gated activation,
out-projection."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from bjax.gated import gated_activation

_default_init = nnx.initializers.lecun_normal()


class GatedMLP(nnx.Module):
    """``y = W_out · gated(W_in · x)``, the MLP of SwiGLU/GeGLU transformers.

    ``W_in`` (``w_in.kernel [in_features, 2, hidden_features]``) projects
    ``[..., in_features]`` to the two halves ``(a, b)``, ``[..., 2, hidden_features]``, in
    one matmul; the gated activation combines them (``gate`` says which half is
    activated, see :func:`bjax.gated_activation`) and ``W_out`` (``w_out.kernel
    [hidden_features, out_features]``) projects ``[..., hidden_features]`` to
    ``[..., out_features]``. ``w_in.kernel.reshape(in_features, 2 * hidden_features)`` is
    the usual fused ``[a | b]`` kernel.

    Tensor parallelism: the halves are a separate axis so that the hidden axis can be
    split across devices with each device holding both halves of its columns, e.g.
    ``in_kernel_init=nnx.with_partitioning(init, (None, None, "model"))`` and
    ``out_kernel_init=nnx.with_partitioning(init, ("model", None))``: the activation then
    runs on each device's own columns, and only the out-projection sums over them.

    Args:
      in_features, hidden_features: widths; ``out_features`` defaults to ``in_features``.
      kind: ``"glu" | "reglu" | "swiglu" | "geglu"``.
      gate: ``"second"`` (y = a act(b)) or ``"first"`` (y = act(a) b; the
        layout of checkpoints whose gate projection comes first).
      approximate: tanh GELU (GeGLU only).
      use_bias: biases on both projections (``w_in.bias [2, hidden_features]``).
      dtype, param_dtype: computation and parameter dtypes (as ``nnx.Linear``).
      in_kernel_init, out_kernel_init: initialisers of the two kernels (LeCun normal over
        the fan-in, as ``nnx.Linear``); wrap them in ``nnx.with_partitioning`` to shard.
      backend: bjax backend of the activation (``None``: bjax's default).
      rngs: ``nnx.Rngs`` for the initialisers.

    Raises:
      InvalidProblemError, UnsupportedError: from :func:`bjax.gated_activation` at the
        first call (an unknown ``kind`` or ``gate``, an unsupported dtype).
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 *, kind: str = "swiglu", gate: str = "second", approximate: bool = False,
                 use_bias: bool = False, dtype=None, param_dtype=jnp.float32,
                 in_kernel_init=_default_init, out_kernel_init=_default_init,
                 backend: str | None = None, rngs: nnx.Rngs):
        out_features = in_features if out_features is None else out_features
        self.kind, self.gate, self.approximate, self.backend = kind, gate, approximate, backend
        self.w_in = nnx.LinearGeneral(in_features, (2, hidden_features), use_bias=use_bias,
                                      dtype=dtype, param_dtype=param_dtype,
                                      kernel_init=in_kernel_init, rngs=rngs)
        self.w_out = nnx.Linear(hidden_features, out_features, use_bias=use_bias, dtype=dtype,
                                param_dtype=param_dtype, kernel_init=out_kernel_init,
                                rngs=rngs)

    def __call__(self, x):
        h = gated_activation(self.w_in(x), self.kind, axis=-2, gate=self.gate,
                             approximate=self.approximate, backend=self.backend)
        return self.w_out(jnp.squeeze(h, -2))
