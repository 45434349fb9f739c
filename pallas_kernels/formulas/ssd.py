"""The SSD scan's step-size formula, shared by the kernels and the XLA implementation."""
import jax.numpy as jnp


def process_dt(dt, bias, softplus: bool, limit: tuple[float, float]):
    """Step sizes in float32: ``clip(softplus?(dt + bias), *limit)``.

    Softplus is ``log1p(exp(u))``, and ``u`` itself above 20 (where the two agree
    in float32).
    """
    u = dt.astype(jnp.float32)
    if bias is not None:
        u = u + bias.astype(jnp.float32)
    if softplus:
        u = jnp.where(u > 20.0, u, jnp.log1p(jnp.exp(jnp.minimum(u, 20.0))))
    return jnp.minimum(jnp.maximum(u, limit[0]), limit[1])
