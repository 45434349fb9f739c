"""benchmarks.sharded_step: the collective count it reports (benchmarks.harness), and both
modes end to end on a mesh of two of this machine's devices (eight CPU devices without a
GPU)."""
import jax
import pytest

from benchmarks import harness, sharded_step
from tests.conftest import KERNEL_BACKEND

HLO = """
  %all-reduce-start.1 = (f32[4,8]{1,0}, bf16[16]{0}) all-reduce-start(f32[4,8]{1,0} %a, bf16[16]{0} %b), replica_groups={{0,1}}
  %all-reduce-done.1 = (f32[4,8]{1,0}, bf16[16]{0}) all-reduce-done(%all-reduce-start.1)
  %all-reduce.2 = f32[10]{0} all-reduce(f32[10]{0} %c), to_apply=%sum
  %all-gather.3 = f32[8]{0} all-gather(f32[4]{0} %d), dimensions={0}
"""


def test_collectives_counts_each_kind_and_the_bytes_reduced():
    """An async pair counts once; the all-reduces' bytes are their results'."""
    assert harness.collectives(HLO) == {"all-reduce": [2, 4 * 8 * 4 + 16 * 2 + 10 * 4],
                                             "all-gather": [1, 0]}
    assert harness.collectives("%add.1 = f32[4]{0} add(%a, %b)") == {}


@pytest.mark.skipif(jax.device_count() < 2, reason="needs two devices")
def test_both_modes_split_without_gathers_and_match_one_device():
    """Data parallel (HybridLM) and head parallel (SSD + GatedMLP blocks) on 2 devices:
    the compiled steps communicate by all-reduces only, and their losses equal one
    device's at the same batch (float32; the sharded sums run in another order). On a CPU
    the XLA backend: the interpreter's kernels would take minutes to compile here, and
    tests/test_sharding.py checks the kernels' own partitioning."""
    backend = KERNEL_BACKEND if KERNEL_BACKEND == "pallas" else "xla"
    rows = sharded_step.run(sharded_step.SIZES["tiny"], backend, 2, calls=1, rounds=1)
    assert [row[0] for row in rows] == ["data", "heads"]
    for row in rows:
        record = dict(zip(sharded_step.HEADER, row))
        assert "all-reduce" in record["sent"], record
        assert not any(kind in record["sent"] for kind in harness.COLLECTIVES[1:]), record
        assert float(record["loss diff"]) <= 1e-6, record
        assert float(record["scaling"]) > 0


def test_run_needs_devices_dividing_the_batch_and_groups():
    with pytest.raises(ValueError, match="--devices must be 2 or more"):
        sharded_step.run(sharded_step.SIZES["tiny"], "xla", 1)
    if jax.device_count() >= 8:
        with pytest.raises(ValueError, match="multiples of --devices"):
            sharded_step.run(sharded_step.SIZES["tiny"], "xla", 8)
