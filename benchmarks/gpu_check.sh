#!/usr/bin/env bash
# One prepared GPU check of segkd's fused channel_kl kernel (issue 3), for a session that is lent a GPU:
#   1. the Triton backend's and the fused loss's tests on CUDA (TRITON_INTERPRET unset: compiled kernels run;
#      includes the launch count of a CWD/HWD forward+backward),
#   2. the ops and loss tests on CUDA (backend="auto" picks Triton there; not the sm_90 compile-only test,
#      which the kernels' real compilation in 1. supersedes),
#   3. the benchmark on all shapes, fp32 and bf16, CWD and HWD: a. without torch.compile, b. torch.compile,
#      c. rows not a multiple of 16 long (8x21x65x65), if time is left.
# Outputs go under $OUT (default ./gpu_out): env.txt, pytest_triton.log, pytest_ops_losses.log,
# bench_gpu.log / .json (3a), bench_gpu_compile.log / .json (3b) and bench_gpu_unaligned.log / .json (3c).
# Run from anywhere: `bash benchmarks/gpu_check.sh`.
#
# It assumes a machine whose python3 already has a CUDA build of torch and Triton (the lent GPU
# machines do, and cannot download anything). segkd is used from the source tree (PYTHONPATH=src),
# so no install is needed; on a machine with internet, `pip install -e ".[test,triton]"` works too.
# Steps that fail are reported and the script goes on, so one run gives every figure it can; the caps
# (170 + 60 + 130 + 180 s, then 3c in what is left of the device tool's 600 s per command) keep the whole run
# within it, and the benchmark rewrites its JSON after every row, so a run cut short still leaves the rows it
# measured.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
status=0

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  "$PY" - <<'EOF'
import torch, platform
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as error:
    print("triton missing:", error)
import segkd
from segkd.ops import available_backends, resolve_backend
print("segkd", segkd.__version__, "from", segkd.__file__, "backends", available_backends(),
      "auto on cuda ->", resolve_backend("auto", torch.device("cuda")))
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if ! "$PY" -c "import torch, triton, pytest, hypothesis, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "This check needs python3 with CUDA torch, triton, pytest and hypothesis (pip install -e '.[test,triton]')."
  exit 2
fi

# The two files run side by side: counted on CPU (the launches specialised as on a GPU), they ask Triton for
# 139 and 233 distinct kernel specialisations (353 together), each compiled on first use, about 0.25 s each
# on one core of the CPU where this was measured (324 compiled for sm_90 in 79 s).
echo "== 1. Triton backend tests on CUDA"
for name in channel_kl_triton weighted_kl; do
  timeout -k 10 170 "$PY" -m pytest "tests/ops/test_$name.py" -q -rs -p no:cacheprovider \
    > "$OUT/pytest_$name.log" 2>&1 &
done
for job in $(jobs -p); do wait "$job" || status=1; done
cat "$OUT/pytest_channel_kl_triton.log" "$OUT/pytest_weighted_kl.log" > "$OUT/pytest_triton.log"
tail -n 8 "$OUT/pytest_channel_kl_triton.log" "$OUT/pytest_weighted_kl.log"

echo "== 2. ops and loss tests on CUDA (auto -> Triton)"
timeout -k 10 60 "$PY" -m pytest tests/ops tests/losses -q -rs -p no:cacheprovider \
  --ignore=tests/ops/test_channel_kl_triton.py --ignore=tests/ops/test_weighted_kl.py \
  --ignore=tests/ops/test_triton_compiles.py \
  > "$OUT/pytest_ops_losses.log" 2>&1 || status=1
tail -n 15 "$OUT/pytest_ops_losses.log"

# The benchmark in two parts, so that a run cut short has every Triton figure: first everything but the
# Inductor compilations (one per shape and dtype, the slow part), then torch.compile alone.
echo "== 3a. benchmark, all shapes, without torch.compile"
timeout -k 10 "${BENCH_TIMEOUT:-130}" "$PY" benchmarks/bench_channel_kl.py --device cuda --shapes all \
  --impls eager,segkd-torch,segkd-triton,segkd-triton-whole \
  --out "$OUT/bench_gpu.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_gpu.log" || status=1

echo "== 3b. benchmark, all shapes, torch.compile"
timeout -k 10 "${COMPILE_TIMEOUT:-180}" "$PY" benchmarks/bench_channel_kl.py --device cuda --shapes all \
  --impls compile,segkd-torch --out "$OUT/bench_gpu_compile.json" 2>&1 | tee "$OUT/bench_gpu_compile.log" || status=1

echo "== 3c. benchmark, rows not a multiple of 16 long, Triton and eager"
timeout -k 5 "${UNALIGNED_TIMEOUT:-40}" "$PY" benchmarks/bench_channel_kl.py --device cuda --shapes unaligned \
  --impls eager,segkd-triton,segkd-triton-whole --out "$OUT/bench_gpu_unaligned.json" 2>&1 \
  | tee "$OUT/bench_gpu_unaligned.log" || status=1

echo "gpu_check finished with status $status; outputs in $OUT"
exit $status
