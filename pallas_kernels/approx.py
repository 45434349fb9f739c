"""The GPU's approximate float32 instructions, for compiled kernel bodies only (inline
PTX through the Triton lowering; the interpreter and XLA have no such instruction)."""
import jax
from jax.experimental.pallas import triton as plgpu


def _inline_f32(instruction, u):
    return plgpu.elementwise_inline_asm(
        f"{instruction} $0, $1;", args=[u], constraints="=r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(u.shape, u.dtype)])[0]


def approx_reciprocal_f32(u):
    """1 / u by the GPU's ``rcp.approx`` (within 1 ulp; compiled float32 kernels only)."""
    return _inline_f32("rcp.approx.ftz.f32", u)


def approx_exp2_f32(u):
    """2^u by the GPU's ``ex2.approx`` (within 2 ulp; compiled float32 kernels only)."""
    return _inline_f32("ex2.approx.ftz.f32", u)
