"""Flax NNX modules built on bjax ops (needs ``pip install bjax[flax]``)."""
from bjax.nn.attention import (CausalSelfAttention, KVCache, attend,
                               cascade_attention)
from bjax.nn.gated_mlp import GatedMLP
from bjax.nn.hybrid import HybridLM
from bjax.nn.mamba2 import Mamba2, Mamba2Cache
from bjax.nn.mhc import MHCBlock, expand_streams, reduce_streams

__all__ = ["CausalSelfAttention", "GatedMLP", "HybridLM", "KVCache", "attend", "cascade_attention",
           "MHCBlock", "Mamba2", "Mamba2Cache", "expand_streams", "reduce_streams"]
