"""Shared fixtures: the backends this machine can run, tolerances, random data."""
import importlib.util
import os
import re
import shutil
import tempfile
import uuid

# Several pytest-xdist workers share one GPU: each allocates what it uses, rather than
# JAX's default of most of the device up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# Tests see the tuned configs that ship with bjax, never a user's own tuning cache
# (tests/test_tune.py points it at files of its own).
os.environ["BJAX_TUNING_CACHE"] = os.path.join(tempfile.gettempdir(),
                                               f"bjax-test-no-user-cache-{uuid.uuid4().hex}.json")


# Without a CUDA plugin the kernels run through the Pallas interpreter, where a test's
# programs compile for seconds and run for milliseconds: compile them without LLVM's
# optimisation passes (a third less time; the same IEEE arithmetic, no fast-math). And
# eight CPU devices, over which tests/test_sharding.py partitions programs (every other
# test runs on the first).
# With BJAX_TEST_FAST_COMPILE=1 (`make test`), XLA's older CPU fusion emitters too: a third
# less compile time again, but then the sharded and the unsharded program of the masked
# merge_state kernel differ in the last ulp of a few elements (tests/test_sharding.py
# compares them within 1e-6 there, bit for bit elsewhere). BJAX_TEST_DEVICES=2 gives two
# CPU devices instead, the meshes of a machine of two GPUs.
FAST_COMPILE = False
if not any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13)):
    FAST_COMPILE = os.environ.get("BJAX_TEST_FAST_COMPILE") == "1"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0"
                               + (" --xla_cpu_use_fusion_emitters=false" if FAST_COMPILE else "")
                               + " --xla_force_host_platform_device_count="
                               + os.environ.get("BJAX_TEST_DEVICES", "8")).strip()


def _run_cache(run_id: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"bjax-test-cache-{run_id}")


# The workers of one pytest-xdist run also share their compiled programs (many tests
# compile the same kernels) through a cache that lives as long as the run.
if "PYTEST_XDIST_TESTRUNUID" in os.environ:
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                          _run_cache(os.environ["PYTEST_XDIST_TESTRUNUID"]))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bjax._op import cuda_available

jax.config.update("jax_enable_x64", True)  # f64 cases; every test names its dtypes.

# On a CUDA GPU the kernels run compiled; elsewhere through the Pallas interpreter.
KERNEL_BACKEND = "pallas" if cuda_available() else "interpret"
BACKENDS = (KERNEL_BACKEND, "xla")

FLOAT_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16, jnp.float64)

# Relative tolerance per output dtype, applied elementwise as
# |out - ref| <= rtol * (|ref| + max|ref|): rounding of the output to its dtype
# costs half an ulp; math in float32 (float64 for float64) adds a few ulp of the
# math dtype (transcendentals, and the erfc fit for GeGLU). One ulp: bf16 2^-8,
# f16 2^-11, f32 2^-24 (x a few tens for exp/erfc), f64 2^-53 (likewise).
RTOL = {
    jnp.dtype(jnp.bfloat16): 2**-8,
    jnp.dtype(jnp.float16): 2**-11,
    jnp.dtype(jnp.float32): 2e-6,
    jnp.dtype(jnp.float64): 1e-13,
}


def assert_close(out, ref, dtype, scale=1.0):
    """Elementwise check against the float64 oracle, plus the relative norm error."""
    out = np.asarray(out, np.float64)   # on the host: no compile per shape
    ref = np.asarray(ref, np.float64)
    assert out.shape == ref.shape
    assert not np.isnan(out).any(), "NaN in output"
    rtol = RTOL[jnp.dtype(dtype)] * scale
    bound = rtol * (np.abs(ref) + np.max(np.abs(ref), initial=0.0))
    bad = np.abs(out - ref) > bound
    assert not bad.any(), (
        f"{bad.sum()} of {bad.size} elements off; worst |out-ref| = "
        f"{np.max(np.abs(out - ref))}, rtol={rtol}")
    if ref.size:
        norm_err = np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-300)
        assert norm_err <= rtol, norm_err


# Test data is drawn on the host with NumPy's generator: jax.random compiles its generator
# for every new shape (about 0.2 s each on a CPU, thousands of shapes over the suite).
def host_array(values, dtype):
    """``values`` (NumPy) as a device array of ``dtype``, through float32 unless float64."""
    wide = np.float64 if jnp.dtype(dtype) == jnp.float64 else np.float32
    return jnp.asarray(np.asarray(values, wide).astype(jnp.dtype(dtype)))


def random(key, shape, dtype, scale=2.0):
    """Random normal data (never zeros) in ``dtype``; the oracle sees the rounded values.
    ``key``: NumPy's seed, an int or a tuple of ints (one per array of a problem)."""
    return host_array(scale * np.random.default_rng(key).standard_normal(shape), dtype)


def jax_random_normal(seed, shape, scale=1.0):
    """jax.random's normal data in float32, for the tests whose inputs exposed a case (or
    set a measured tolerance) with it."""
    return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def uniform(key, shape, low, high, dtype=jnp.float32):
    """Uniform data in ``[low, high)`` in ``dtype``."""
    return host_array(np.random.default_rng(key).uniform(low, high, shape), dtype)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def copies_of(hlo_text, shape, dtype):
    """Instructions of a compiled program's text that copy an array of ``shape`` and ``dtype``."""
    name = jnp.dtype(dtype).name.replace("bfloat16", "bf16").replace("float", "f")
    shape_text = f"{name}[{','.join(map(str, shape))}]"
    return [line for line in hlo_text.splitlines()
            if re.search(r"= " + re.escape(shape_text) + r"\S* copy\(", line)]


def pytest_configure(config):
    # The controller of an xdist run names the run, so that it can remove the run's cache.
    if not hasattr(config, "workerinput") and getattr(config.option, "numprocesses", None):
        config.option.testrunuid = config.option.testrunuid or uuid.uuid4().hex


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput") and getattr(config.option, "testrunuid", None):
        shutil.rmtree(_run_cache(config.option.testrunuid), ignore_errors=True)
