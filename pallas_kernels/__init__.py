"""Pallas GPU kernels of bjax: arrays and static configuration in, arrays out.

No validation, no autodiff and no public API live here (see ``bjax``). Kernels use the
Triton lowering, selected through ``triton.CompilerParams``; ``*_mosaic`` modules hold
kernels lowered through Mosaic GPU (``plgpu.kernel``: TMA and wgmma, Hopper GPUs).
"""
