#!/usr/bin/env bash
# On a CUDA machine with JAX installed: the whole test suite on the Pallas backend
# (8 pytest-xdist workers: about 7 minutes on an H200), then the benchmarks. Run it at
# the final commit of every change to pallas_kernels/ or an op's wrapper. Logs go to
# $OUT (or ./gpu_out); a short table is printed last.
set -u
out=${OUT:-gpu_out}; mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 BJAX_COMMIT=${BJAX_COMMIT:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
python3 -m pytest tests -q -n ${WORKERS:-8} -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tee "$out/pytest.log" | tail -25
for bench in ${BENCHES:-gated write_slice cascade ssd hyper_connection conv}; do
  python3 -m benchmarks.$bench ${BENCH_ARGS:-} > "$out/bench_$bench.log" 2>&1 || tail -30 "$out/bench_$bench.log"
done
echo; grep -h "passed\|failed" "$out/pytest.log" | tail -2
for bench in ${BENCHES:-gated write_slice cascade ssd hyper_connection conv}; do sed -n '/^20/,$p' "$out/bench_$bench.log"; done
