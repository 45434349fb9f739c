"""Every benchmarked problem (``benchmarks/cases.py``) checked where it is timed, on
the GPU: the kernels against the XLA implementation, forward and the gradient of every
differentiated argument; copies bit for bit. The shapes are the benchmarks' (up to
gigabytes), so without a CUDA GPU these tests skip; the op test modules cover the same
code on small and awkward shapes everywhere."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.cases import CASES
from tests.conftest import KERNEL_BACKEND

pytestmark = pytest.mark.skipif(KERNEL_BACKEND != "pallas", reason="GPU-sized problems")

def _bound(args) -> float:
    """Relative norm error allowed, the op tests' bound for gradients (tests/test_ssd.py,
    GRAD_BOUND): with bf16 or f16 arrays, about four roundings of 2^-8 (operands of the
    matmuls and cotangents rounded to the input dtype, results returned in it; the two
    sides round at different places); float32 math on both sides elsewhere, 2e-5 (sums
    over long axes in other orders, and cancelling terms in a few gradients)."""
    narrow = any(jnp.dtype(a.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
                 for a in args)
    return 4 * 2.0**-8 if narrow else 2e-5


def _relative_error(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def _rows(a: np.ndarray, min_width: int = 64) -> np.ndarray:
    """``a`` as rows: its shortest run of trailing axes with at least ``min_width``
    elements (never the leading axis, so each row is at most one leading-axis entry).
    SSD's y ``[b, l, h, p]`` gives one row per (b, t, head); a ``[tokens, 24]`` gradient
    gives one per token."""
    width, axis = 1, a.ndim
    while axis > 1 and width < min_width:
        axis -= 1
        width *= a.shape[axis]
    return a.reshape(-1, width)


def _worst_row_error(out, ref) -> float:
    """The largest relative norm error of one row (:func:`_rows`), against that row's
    norm or the typical row's, whichever is larger (rows that cancel to nearly zero are
    not held to their own norm). A fault that sums some rows wrong hides in the whole
    array's norm: at 8192 x 4 x 7168, 2% of the mHC projection's rows wrong moved it by
    1%."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if out.ndim < 2:
        return _relative_error(out, ref)
    out, ref = _rows(out), _rows(ref)
    row_norms = np.linalg.norm(ref, axis=1)
    scale = np.maximum(row_norms, np.sqrt(np.mean(row_norms**2)))
    return float(np.max(np.linalg.norm(out - ref, axis=1) / np.maximum(scale, 1e-30)))


@pytest.mark.parametrize("name", CASES)
def test_benchmarked_problem(name):
    case = CASES[name]
    args = case.inputs()
    mine = case.op("pallas")
    if case.exact:
        out, ref = jax.jit(mine)(*args), jax.jit(case.reference)(*args)
        assert bool(jnp.all(out == ref)), "not equal bit for bit"
        return

    def vjp(fn):
        def run(args, cotangents):
            fixed = dict(enumerate(args))
            diff = [fixed.pop(i) for i in case.diff]

            def of_diff(*values):
                full = {**fixed, **dict(zip(case.diff, values))}
                return fn(*(full[i] for i in range(len(args))))
            out, pullback = jax.vjp(of_diff, *diff)
            return out, pullback(cotangents)
        return jax.jit(run)

    shapes = jax.eval_shape(mine, *args)
    keys = jax.random.split(jax.random.key(7), len(jax.tree.leaves(shapes)))
    cotangents = jax.tree.unflatten(jax.tree.structure(shapes), [
        jax.random.normal(k, s.shape, jnp.float32).astype(s.dtype)
        for k, s in zip(keys, jax.tree.leaves(shapes))])
    bound = _bound(args)
    results = vjp(mine)(args, cotangents)
    references = vjp(case.op("xla"))(args, cotangents)
    for index, (out, ref) in enumerate(zip(jax.tree.leaves(results),
                                           jax.tree.leaves(references))):
        error = _relative_error(out, ref)
        assert error <= bound, f"result {index} (outputs, then gradients): {error:.3g} > {bound}"
        row_error = _worst_row_error(out, ref)
        assert row_error <= bound, f"result {index}, worst row: {row_error:.3g} > {bound}"
