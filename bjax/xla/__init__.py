"""Pure ``jax.numpy`` implementations of every op: the ``"xla"`` backend.

They run on any device and serve CPU/TPU users and GPUs where a kernel does not
apply. Each module mirrors the op family of the same name in ``bjax``.
"""
