"""bjax: fused GPU kernels for JAX, written in Pallas.

Every op is a plain function that works under ``jax.jit``, ``jax.grad``,
``jax.vmap`` and ``jax.checkpoint``, validates its arguments at trace time and
takes ``backend=None | "pallas" | "interpret" | "xla"``.
"""
import importlib

from bjax import errors
from bjax._op import BACKENDS, Plan, PrecisionGuarantee, plan
from bjax.cascade import (CascadeMergeDescriptor, MergeStateDescriptor, MergeStatesDescriptor,
                          merge_state, merge_states)
from bjax.conv import (CausalConv1dDescriptor, CausalConv1dStepDescriptor, causal_conv1d,
                       causal_conv1d_step)
from bjax.errors import BjaxError, InvalidProblemError, TuningCacheError, UnsupportedError
from bjax.hyper_connection import (DEEPSEEK_MHC_POST, DEEPSEEK_MHC_PRE,
                                    HyperConnectionDescriptor, MhcPostDescriptor,
                                    MhcPreDescriptor, SinkhornDescriptor, hyper_connection,
                                    mhc_post, mhc_pre, sinkhorn_knopp)
from bjax.gated import GatedActivationDescriptor, gated_activation, geglu, glu, reglu, swiglu
from bjax.ssd import SsdChunkScanDescriptor, SsdStepDescriptor, ssd_chunk_scan, ssd_step
from bjax.write_slice import WriteSliceDescriptor, write_slice

__version__ = "0.1.0"


def __getattr__(name):
    # bjax.nn needs flax, an optional dependency: import it on first use.
    if name == "nn":
        return importlib.import_module("bjax.nn")
    raise AttributeError(f"module 'bjax' has no attribute {name!r}")


__all__ = [
    "BACKENDS", "BjaxError", "CausalConv1dDescriptor", "CausalConv1dStepDescriptor",
    "causal_conv1d", "causal_conv1d_step", "CascadeMergeDescriptor", "DEEPSEEK_MHC_POST",
    "DEEPSEEK_MHC_PRE",
    "GatedActivationDescriptor", "MergeStateDescriptor", "MergeStatesDescriptor",
    "HyperConnectionDescriptor", "MhcPostDescriptor", "MhcPreDescriptor", "SinkhornDescriptor",
    "hyper_connection", "mhc_post", "mhc_pre", "sinkhorn_knopp",
    "InvalidProblemError", "Plan", "PrecisionGuarantee", "TuningCacheError", "UnsupportedError",
    "WriteSliceDescriptor", "errors", "gated_activation", "geglu", "glu", "merge_state",
    "merge_states", "plan", "reglu", "SsdChunkScanDescriptor", "SsdStepDescriptor",
    "ssd_chunk_scan", "ssd_step", "swiglu", "write_slice",
]
