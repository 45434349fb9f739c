"""GatedMLP: in-projection to 2 x hidden, gated activation, out-projection."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from bjax.gated import gated_activation


class GatedMLP(nnx.Module):
    """``y = W_out · gated(W_in · x)``, the MLP of SwiGLU/GeGLU transformers.

    ``W_in`` projects ``[..., in_features]`` to ``[..., 2 * hidden_features]`` in
    one matmul; the gated activation splits that into ``(a, b)`` (``gate`` says
    which half is activated, see :func:`bjax.gated_activation`) and
    ``W_out`` projects ``[..., hidden_features]`` to ``[..., out_features]``.

    Args:
      in_features, hidden_features: widths; ``out_features`` defaults to ``in_features``.
      kind: ``"glu" | "reglu" | "swiglu" | "geglu"``.
      gate: ``"second"`` (y = a act(b)) or ``"first"`` (y = act(a) b; the
        layout of checkpoints whose gate projection comes first).
      approximate: tanh GELU (GeGLU only).
      use_bias: biases on both projections.
      dtype, param_dtype: computation and parameter dtypes (as ``nnx.Linear``).
      backend: bjax backend of the activation (``None``: bjax's default).
      rngs: ``nnx.Rngs`` for the initialisers.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 *, kind: str = "swiglu", gate: str = "second", approximate: bool = False,
                 use_bias: bool = False, dtype=None, param_dtype=jnp.float32,
                 backend: str | None = None, rngs: nnx.Rngs):
        out_features = in_features if out_features is None else out_features
        self.kind, self.gate, self.approximate, self.backend = kind, gate, approximate, backend
        self.w_in = nnx.Linear(in_features, 2 * hidden_features, use_bias=use_bias, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
        self.w_out = nnx.Linear(hidden_features, out_features, use_bias=use_bias, dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        h = gated_activation(self.w_in(x), self.kind, axis=-1, gate=self.gate,
                             approximate=self.approximate, backend=self.backend)
        return self.w_out(h)
