"""HybridLM: a small language model of Mamba-2 and attention mixers, SwiGLU MLPs and mHC
residual streams, with decode caches."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from bjax import _op
from bjax.nn.attention import CausalSelfAttention
from bjax.nn.gated_mlp import GatedMLP
from bjax.nn.mamba2 import Mamba2
from bjax.nn.mhc import MHCBlock, expand_streams, reduce_streams

MIXERS = {"m": "Mamba2", "a": "CausalSelfAttention"}


class PreNorm(nnx.Module):
    """``F(u) = layer(RMSNorm(u))``, passing a decode cache through to the layer.

    ``__call__(u)`` gives ``layer(norm(u))``; ``__call__(u, cache)`` gives the layer's
    ``(y, cache)`` over whole sequences (prefill) and ``__call__(u, cache, step=True)`` its
    ``step``, one token per sequence.
    """

    def __init__(self, hidden, layer, *, param_dtype, rngs):
        self.norm = nnx.RMSNorm(hidden, param_dtype=param_dtype, rngs=rngs)
        self.layer = layer

    def __call__(self, u, cache=None, *, step=False):
        h = self.norm(u)
        if step:
            return self.layer.step(h, cache)
        return self.layer(h) if cache is None else self.layer(h, cache=cache)


class HybridLM(nnx.Module):
    """``tokens [b, l] -> logits [b, l, vocab_size]``.

    The embedding opens ``n_streams`` residual streams (:func:`expand_streams`); each
    letter of ``pattern`` adds a mixer block (``"m"``: :class:`Mamba2`, ``"a"``:
    :class:`CausalSelfAttention`) and a SwiGLU :class:`GatedMLP` block, each an
    :class:`MHCBlock` around a pre-RMSNorm sublayer; the streams are summed
    (:func:`reduce_streams`), normalised and projected to the vocabulary. Attention has no
    positional encoding of its own: the Mamba-2 mixers carry position, so a pattern with
    attention should start with ``"m"``.

    Args:
      vocab_size, hidden_size: the vocabulary and the width.
      pattern: the mixers, bottom to top.
      n_streams: the mHC streams; mhc_preset, dynamic: as :class:`MHCBlock`.
      mlp_hidden: the SwiGLU's hidden width (``4 * hidden_size`` by default).
      attention_heads, attention_kv_heads: the attention mixers' heads.
      mamba: further :class:`Mamba2` arguments (``num_heads``, ``head_dim``,
        ``state_size``, ``chunk_size``, ...; by default heads of 16 over
        ``2 * hidden_size`` and state 16).
      param_dtype, backend: of every module.
      rngs: ``nnx.Rngs`` for the initialisers.

    Raises:
      InvalidProblemError: a letter of ``pattern`` other than ``"m"`` and ``"a"``.
    """

    def __init__(self, vocab_size: int, hidden_size: int, *, pattern: str = "mam",
                 n_streams: int = 4, mlp_hidden: int | None = None, attention_heads: int = 4,
                 attention_kv_heads: int | None = None, mamba: dict | None = None,
                 mhc_preset: str = "paper", dynamic: bool = True, param_dtype=jnp.float32,
                 backend: str | None = None, rngs: nnx.Rngs):
        _op.check(bool(pattern) and set(pattern) <= set(MIXERS), "HybridLM", "pattern",
                  f"a non-empty string of {' and '.join(map(repr, MIXERS))}", repr(pattern))
        self.pattern, self.n_streams = pattern, n_streams
        common = dict(param_dtype=param_dtype, backend=backend, rngs=rngs)
        mamba = dict(dict(num_heads=2 * hidden_size // 16, head_dim=16, state_size=16),
                     **(mamba or {}))

        def block(layer):
            return MHCBlock(PreNorm(hidden_size, layer, param_dtype=param_dtype, rngs=rngs),
                            n_streams, hidden_size, dynamic=dynamic, preset=mhc_preset,
                            **common)

        def mixer(letter):
            if letter == "m":
                return Mamba2(hidden_size, **mamba, **common)
            return CausalSelfAttention(hidden_size, attention_heads,
                                       num_kv_heads=attention_kv_heads, **common)

        self.embed = nnx.Embed(vocab_size, hidden_size, param_dtype=param_dtype, rngs=rngs)
        self.mixers = nnx.List([block(mixer(letter)) for letter in pattern])
        self.mlps = nnx.List([
            block(GatedMLP(hidden_size, mlp_hidden or 4 * hidden_size, **common))
            for _ in pattern])
        self.final_norm = nnx.RMSNorm(hidden_size, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = nnx.Linear(hidden_size, vocab_size, use_bias=False,
                                  param_dtype=param_dtype, rngs=rngs)

    def init_caches(self, batch: int, max_len: int) -> list:
        """One empty cache per mixer (a :class:`Mamba2Cache` or a :class:`KVCache` of
        ``max_len`` tokens), for ``batch`` sequences."""
        caches = []
        for block in self.mixers:
            layer = block.sublayer.layer
            caches.append(layer.init_cache(batch, max_len) if isinstance(
                layer, CausalSelfAttention) else layer.init_cache(batch))
        return caches

    def __call__(self, tokens, *, caches: list | None = None):
        """Logits of every position; with ``caches`` (from :meth:`init_caches` or a previous
        call), the tokens continue those sequences and the call returns ``(logits,
        caches)``."""
        return self._run(self.embed(tokens), caches, step=False)

    def step(self, token, caches: list):
        """One token per sequence: ``token [b] -> (logits [b, vocab_size], caches)``."""
        return self._run(self.embed(token), caches, step=True)

    def _run(self, h, caches, *, step):
        x = expand_streams(h, self.n_streams)
        new_caches = []
        for i, (mixer, mlp) in enumerate(zip(self.mixers, self.mlps)):
            if caches is None:
                x = mixer(x)
            else:
                x, cache = mixer(x, caches[i], step=step)
                new_caches.append(cache)
            x = mlp(x)
        logits = self.lm_head(self.final_norm(reduce_streams(x)))
        return logits if caches is None else (logits, new_caches)
