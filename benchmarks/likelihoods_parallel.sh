#!/usr/bin/env bash
# The likelihood matrix (benchmarks/likelihoods.py), one process per family and design, run
# side by side on the CPU cores (each process is single-threaded work): 32 cells at once on
# a 16-core machine. Usage: bash benchmarks/likelihoods_parallel.sh OUT_DIR [extra args]
set -uo pipefail
out=${1:?output folder}; shift
mkdir -p "$out"
export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
fams=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import likelihoods; print(' '.join(likelihoods.FAMILIES))")
for slope in "" "--slope"; do
  for f in $fams; do
    python3 benchmarks/likelihoods.py --families "$f" $slope --out "$out/cell_${f}${slope:+_slope}.json" "$@" \
      > "$out/cell_${f}${slope:+_slope}.log" 2>&1 &
  done
done
wait
python3 benchmarks/likelihoods.py --merge "$out"
