"""Flax NNX modules built on bjax ops (needs ``pip install bjax[flax]``)."""
from bjax.nn.gated_mlp import GatedMLP

__all__ = ["GatedMLP"]
