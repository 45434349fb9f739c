"""bjax._checks.report_unless: free outside checkify, reported under it."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from bjax._checks import report_unless

_MESSAGE = "entry {row} is {value}"


def _checked(x, limit):
    return report_unless(x, x < limit, x, _MESSAGE)


def test_outside_checkify_it_is_the_identity_and_adds_no_effect():
    x = jnp.array([1.0, 5.0, 2.0])
    jaxpr = jax.make_jaxpr(_checked)(x, 3.0)
    assert not jaxpr.effects
    np.testing.assert_array_equal(jax.jit(_checked)(x, 3.0), x)
    assert "custom_call" not in jax.jit(_checked).lower(x, 3.0).as_text()


def test_checkify_reports_the_first_failure():
    err, out = checkify.checkify(jax.jit(_checked))(jnp.array([1.0, 5.0, 2.0, 7.0]), 3.0)
    assert err.get().startswith("entry 1 is 5.0")
    np.testing.assert_array_equal(out, [1.0, 5.0, 2.0, 7.0])
    err, _ = checkify.checkify(_checked)(jnp.array([1.0, 2.0]), 3.0)
    assert err.get() is None


def test_vmap_grad_and_scan():
    xs = jnp.array([[1.0, 2.0], [1.0, 4.0]])
    err, _ = checkify.checkify(jax.vmap(_checked, in_axes=(0, None)))(xs, 3.0)
    assert err.get().startswith("entry 1 is 4.0")
    err, _ = jax.vmap(checkify.checkify(_checked), in_axes=(0, None))(xs, 3.0)
    assert err.get().startswith("at mapped index 1: entry 1 is 4.0")
    grad = jax.grad(lambda x: (_checked(x, 3.0) ** 2).sum())(xs[0])
    np.testing.assert_allclose(grad, 2 * xs[0])

    def scan(x):
        return jax.lax.scan(lambda c, _: (_checked(c + 1.0, 3.0), None), x, length=3)[0]
    err, _ = checkify.checkify(jax.jit(scan))(jnp.zeros(2))
    assert err.get().startswith("entry 0 is 3.0")
