"""Flax NNX modules built on bjax ops (needs ``pip install bjax[flax]``)."""
from bjax.nn.gated_mlp import GatedMLP
from bjax.nn.mamba2 import Mamba2, Mamba2Cache

__all__ = ["GatedMLP", "Mamba2", "Mamba2Cache"]
