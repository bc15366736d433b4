#!/usr/bin/env bash
# one-off: does the BLAS backend set the host time of a click / of a training step on the H200?
# Run as: run(command='bash probe/probe_blas.sh "$OUT"', carry=["data-cache"]) with probe/wheels = .whl-server less
# cryptography, google-auth and cffi (so that the call stayed under 64 MiB); 449 s on the nvidia-h200, 2026-12-02.
set -uo pipefail
OUT=$1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site probe/wheels/*.whl > "$OUT/install.txt" 2>&1
export PYTHONPATH=/tmp/site
python3 -c "import torch; print(torch.__version__, torch.backends.cuda.preferred_blas_library(), torch.cuda.get_device_name())" > "$OUT/env.txt" 2>&1
nproc >> "$OUT/env.txt"; lscpu | grep -i "model name" >> "$OUT/env.txt"
with_blas() {  # BACKEND SCRIPT ARGS...
  python3 -c "import sys, runpy, torch
torch.backends.cuda.preferred_blas_library(sys.argv[1]); print('blas', torch.backends.cuda.preferred_blas_library())
sys.argv = sys.argv[2:]; sys.path.insert(0, 'benchmarks'); runpy.run_path(sys.argv[0], run_name='__main__')" "$@"
}
for b in cublaslt cublas; do
  with_blas $b benchmarks/bench_session.py --device cuda --repeat 2 --profile 25 > "$OUT/session_$b.txt" 2>&1
done
DISABLE_ADDMM_CUDA_LT=1 with_blas cublas benchmarks/bench_session.py --device cuda --repeat 2 --profile 25 > "$OUT/session_cublas_noaddmmlt.txt" 2>&1
for b in cublaslt cublas; do
  with_blas $b benchmarks/bench_training_step.py --device cuda --training-cache data-cache/training_cache.npz --batch-size 160 --no-refinement --repeats 3 > "$OUT/train_$b.txt" 2>&1
done
