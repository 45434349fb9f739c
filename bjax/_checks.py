"""Run-time checks reported under ``jax.experimental.checkify`` and free outside it.

``checkify.debug_check`` is dropped from the compiled program outside
checkify, but it leaves an error effect on the jaxpr of every function that
calls it, and a jitted function with an effect is dispatched on JAX's slow
path with runtime tokens (about 100 us more per call on CPU, and 8% of a
jitted decode loop on an H200). :func:`report_unless` carries the check in a
primitive of its own instead: without effects, lowered to nothing, and turned
into a ``FailedCheckError`` by checkify's rule for it.
"""
import jax.numpy as jnp
from jax._src import checkify as _checkify  # its rule registry: no public API registers one
from jax.extend import core
from jax.interpreters import ad, batching, mlir

_report_p = core.Primitive("bjax_report_unless")


def report_unless(passthrough, ok, values, message: str):
    """``passthrough``, unchanged; under checkify, an error if any ``ok`` is False.

    Args:
      passthrough: the array the caller goes on with (so the check is never
        dead code ahead of checkify).
      ok: bool array; False marks a failure.
      values: array of ``ok``'s shape, the value reported for a failure.
      message: the error text, with ``{value}`` (the first failing entry of
        ``values``) and ``{row}`` (its index along ``ok``'s last axis).
    """
    return _report_p.bind(passthrough, ok, jnp.broadcast_to(values, ok.shape), message=message)


@_report_p.def_impl
def _impl(passthrough, ok, values, *, message):
    del ok, values, message
    return passthrough


@_report_p.def_abstract_eval
def _abstract_eval(passthrough, ok, values, *, message):
    del ok, values, message
    return passthrough


mlir.register_lowering(_report_p, mlir.lower_fun(_impl, multiple_results=False))


def _jvp(primals, tangents, *, message):
    return _report_p.bind(*primals, message=message), tangents[0]


ad.primitive_jvps[_report_p] = _jvp


def _batch(args, dims, *, message):
    passthrough, ok, values = args
    _, ok_dim, values_dim = dims
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)

    def batched_first(x, d):
        if d is None:  # not mapped
            return jnp.broadcast_to(x, (size, *x.shape))
        return jnp.moveaxis(x, d, 0)

    out = _report_p.bind(passthrough, batched_first(ok, ok_dim),
                         batched_first(values, values_dim), message=message)
    return out, dims[0]


batching.primitive_batchers[_report_p] = _batch


def _checkify_rule(*args, message):
    # JAX 0.11 passes a CheckifyContext first, which its assert_func takes too; 0.10 does not.
    context = args[:-5]
    error, enabled_errors, passthrough, ok, values = args[-5:]
    if _checkify.FailedCheckError not in enabled_errors:
        return error, passthrough
    first = jnp.argmin(ok.reshape(-1))
    failure = _checkify.FailedCheckError(
        _checkify.get_traceback(), message, value=values.reshape(-1)[first],
        row=first % max(ok.shape[-1:] or (1,)))
    return _checkify.assert_func(*context, error, ~jnp.all(ok), failure), passthrough


_checkify.error_checks[_report_p] = _checkify_rule
