#!/usr/bin/env bash
# Builds the CUDA binaries (feature `cuda`, release: the kernel tests and bench, the parity tests,
# the CLI) on a machine without a GPU, then strips and gzips them into .gpu/ (docs/CUDA.md).
#
#   scripts/cuda-pack.sh            # prints the command to run on the GPU machine
#
# Env: CARGO_TARGET_DIR (default /work/cuda-target, kept apart from the CPU build's target/),
#      CUDA_SETUP (default ../shared/cuda/setup-toolchain.sh; skipped when nvcc is on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/cuda-target}
mkdir -p "$CARGO_TARGET_DIR"
# The shared setup script reads cudarc's sources from the registry for its libcuda stub.
cargo fetch --locked >/dev/null
if ! command -v nvcc >/dev/null; then
  setup=${CUDA_SETUP:-../shared/cuda/setup-toolchain.sh}
  [ -x "$setup" ] || { echo "no nvcc on PATH and no $setup: install the CUDA toolkit" >&2; exit 1; }
  eval "$("$setup")"
fi
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} # candle-kernels' target; our PTX is sm_80 (build.rs)

# One cargo invocation builds all of them (the same package set every time: another set
# resolves other features and rebuilds candle-kernels, ~15 min); --message-format=json names
# the produced executables.
cargo build --release --features cuda -p bitnet-cli -p bitnet-kernels -p bitnet-tests \
  --bin bitnet --test cuda --test parity --bench cuda \
  --message-format=json-render-diagnostics >"$CARGO_TARGET_DIR/cuda-pack.json"
mapfile -t rows < <(jq -r 'select(.reason == "compiler-artifact" and .executable != null)
  | "\(.target.kind[0]) \(.target.name) \(.executable)"' "$CARGO_TARGET_DIR/cuda-pack.json")

mkdir -p .gpu
grep -qsx '/.gpu/' .gitignore .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
rm -f .gpu/bitnet .gpu/bitnet.gz .gpu/bitnet-cuda-*
packed=0
for row in "${rows[@]}"; do
  read -r kind target exe <<<"$row"
  case "$kind $target" in
    "test cuda") name=bitnet-cuda-tests ;;
    "test parity") name=bitnet-cuda-parity ;;
    "bench cuda") name=bitnet-cuda-bench ;;
    "bin bitnet") name=bitnet ;;
    *) continue ;;
  esac
  strip -o ".gpu/$name" "$exe"
  gzip -9f ".gpu/$name"
  packed=$((packed + 1))
done
[ "$packed" -eq 4 ] || { echo "expected 4 executables, packed $packed: ${rows[*]}" >&2; exit 1; }
ls -l .gpu/
cat <<'RUN'

Run on the GPU machine (device tool: carry [".gpu"], timeout_s 400; ~90 s on an H200). The
parity binary reads tests/fixtures from the working directory (the repository root there):

gunzip -f .gpu/*.gz && chmod +x .gpu/bitnet* && export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib PATH=/usr/local/cuda-13.0/bin:$PATH && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee $OUT/gpu.txt; T=./.gpu/bitnet-cuda-tests; timeout 200 $T --test-threads 1 2>&1 | tee $OUT/tests.log | tail -25; timeout 100 ./.gpu/bitnet-cuda-parity cuda_ --test-threads 1 2>&1 | tee -a $OUT/tests.log | tail -8; timeout 150 ./.gpu/bitnet-cuda-bench 2>&1 | tee $OUT/bench.md; timeout 45 compute-sanitizer --tool memcheck $T sanitizer_smoke --exact 2>&1 | tail -12 | tee $OUT/memcheck.log; timeout 45 compute-sanitizer --tool racecheck $T sanitizer_smoke --exact 2>&1 | tail -8 | tee $OUT/racecheck.log; grep -h "test result\|FAIL\|panicked" $OUT/tests.log

The whole-model checks and timings against transformers: also build the CPU xtask
(`cargo build --release -p xtask`; strip and gzip it into .gpu/xtask.gz), then run
`python3 scripts/gpu_e2e.py .gpu/bitnet .gpu/xtask` there (timeout_s 600; ~340 s).
RUN
