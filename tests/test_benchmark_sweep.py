"""benchmarks.ssd_sweep on the CPU: its grid is the Mamba-2 family the SSD goal names, and
a row times a (tiny) problem end to end through the interpreter; the probes' config
variants."""
import os

import pytest

import bjax

from benchmarks import cases, harness, ssd_sweep
from pallas_kernels import ssd_backward as pallas_ssd_backward
from tests.conftest import KERNEL_BACKEND


def test_the_grid_covers_the_family():
    shapes = cases.ssd_sweep_shapes()
    assert len(set(shapes)) == len(shapes) == 72
    assert {s[3] for s in shapes} == {64, 128} and {s[5] for s in shapes} == {64, 128, 256}
    assert {s[4] for s in shapes} == {1, 8} and {s[6] for s in shapes} == {128, 256}
    assert {(s[0], s[1]) for s in shapes} == {(16, 512), (4, 4096), (1, 131072)}
    assert all(s[2] % s[4] == 0 and s[2] * s[3] == 4096 for s in shapes)
    parts = [ssd_sweep.part_of(shapes, f"{k}/5") for k in range(1, 6)]
    assert sum(parts, []) == shapes
    with pytest.raises(ValueError, match="K/N"):
        ssd_sweep.part_of(shapes, "6/5")


def test_a_row_times_a_problem():
    row = ssd_sweep.shape_row((1, 40, 4, 16, 2, 16, 16), KERNEL_BACKEND, None, 1.0, 1.0, True)
    assert row[0] == "b1 l40 h4 p16 g2 n16 Q16" and row[1] == "heuristic"
    assert float(row[2]) > 0 and row[3] == "-" and float(row[4]) > 0


def test_the_config_column_names_passed_states():
    """32 chunks of 2 heads: the heuristics pass the states along and their gradients
    back."""
    row = ssd_sweep.shape_row((1, 32 * 16, 2, 16, 1, 16, 16), KERNEL_BACKEND, None, 1.0, 1.0,
                              False)
    assert row[1] == "heuristic, fwd passed, bwd passed"
    xla = bjax.plan(bjax.ssd_chunk_scan, *cases.ssd_inputs((1, 16, 2, 16, 1, 16, 16)),
                    chunk_size=16, backend="xla")
    assert ssd_sweep.config_text(xla) == "-"


def test_match_keeps_the_shapes_holding_every_token_of_a_pattern():
    shapes = cases.ssd_sweep_shapes()
    assert ssd_sweep.matching(shapes, []) == shapes
    long_wide = ssd_sweep.matching(shapes, ["l131072 n256"])
    assert len(long_wide) == 8 and all(s[1] == 131072 and s[5] == 256 for s in long_wide)
    # Tokens match whole: "n25" is no token of any row, and a run that would time nothing
    # is an error.
    with pytest.raises(ValueError, match=r"--match must name tokens.*\['n25'\]"):
        ssd_sweep.matching(shapes, ["n25"])
    either = ssd_sweep.matching(shapes, ["l131072 n256", "l512 p128 n64 g1"])
    assert len(either) == 10 and either == [s for s in shapes if s in either]


def test_keep_compiled_points_triton_and_jax_at_the_directory(tmp_path, monkeypatch):
    """--keep-compiled: Triton keeps its autotuning winners, both caches live under DIR."""
    import jax
    monkeypatch.delenv("TRITON_CACHE_AUTOTUNING", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    before = (jax.config.jax_compilation_cache_dir,
              jax.config.jax_persistent_cache_min_compile_time_secs)
    try:
        ssd_sweep.keep_compiled(str(tmp_path))
        assert os.environ["TRITON_CACHE_AUTOTUNING"] == "1"
        assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "triton")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax")
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


def test_a_config_takes_fields_from_text():
    """The probes' variants (``benchmarks.harness.with_fields``): ints, bools as 0 / 1 /
    false / true, and a clear error for a field the config lacks or a bool it cannot
    read."""
    base = pallas_ssd_backward.SsdBackwardConfig(block_q=16, block=16, block_p=16, block_h=1)
    config = harness.with_fields(base, "block_h=4,shared_scores=1,state_passing=false")
    assert (config.block_h, config.shared_scores, config.state_passing) == (4, True, False)
    assert harness.with_fields(base, "") == base
    with pytest.raises(ValueError, match="SsdBackwardConfig has no field 'shared'"):
        harness.with_fields(base, "shared=1")
    with pytest.raises(ValueError, match="shared_scores takes 0, 1, false or true; got '2'"):
        harness.with_fields(base, "shared_scores=2")
