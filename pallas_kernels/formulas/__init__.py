"""The formulas the Pallas kernels and the XLA implementation share: ``jax.numpy`` on
arrays of any shape (a kernel's tiles, or whole arrays), with no Pallas in them.

The XLA implementation (``bjax.xla``) imports its math from here, never from the kernel
modules, and the kernels evaluate the very same functions on their tiles.
"""
