#!/usr/bin/env bash
# Builds the CUDA test and benchmark binaries of bitnet-kernels (feature `cuda`, release) on a
# machine without a GPU, then strips and gzips them into .gpu/ for a GPU machine (docs/CUDA.md).
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

# One cargo invocation builds both; --message-format=json names the produced executables.
cargo build --release --features cuda -p bitnet-kernels --test cuda --bench cuda \
  --message-format=json-render-diagnostics >"$CARGO_TARGET_DIR/cuda-pack.json"
mapfile -t exes < <(jq -r 'select(.reason == "compiler-artifact" and .executable != null)
  | select(.target.name == "cuda") | .executable' "$CARGO_TARGET_DIR/cuda-pack.json")
[ "${#exes[@]}" -eq 2 ] || { echo "expected 2 executables, got: ${exes[*]}" >&2; exit 1; }

mkdir -p .gpu
grep -qsx '/.gpu/' .gitignore .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
rm -f .gpu/bitnet-cuda-*
for exe in "${exes[@]}"; do
  case "$(jq -r --arg e "$exe" 'select(.executable == $e) | .target.kind[0]' "$CARGO_TARGET_DIR/cuda-pack.json" | head -1)" in
    test) name=bitnet-cuda-tests ;;
    bench) name=bitnet-cuda-bench ;;
    *) echo "unexpected artifact $exe" >&2; exit 1 ;;
  esac
  strip -o ".gpu/$name" "$exe"
  gzip -9f ".gpu/$name"
done
ls -l .gpu/
cat <<'RUN'

Run on the GPU machine (device tool: carry [".gpu"], timeout_s 400; ~35 s on an H200):

gunzip -f .gpu/*.gz && chmod +x .gpu/bitnet-cuda-* && export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib PATH=/usr/local/cuda-13.0/bin:$PATH && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee $OUT/gpu.txt; T=./.gpu/bitnet-cuda-tests; for t in quantization_matches_cpu bitlinear_kernels_match_cpu_bit_exact bitlinear_handles_offsets_batches_and_reuse bf16_head_matches_cpu greedy_next_and_embed_row_match_the_host sanitizer_smoke; do timeout 100 $T $t --exact --nocapture 2>&1 | tail -45 | tee -a $OUT/tests.log; done; timeout 150 ./.gpu/bitnet-cuda-bench 2>&1 | tee $OUT/bench.md; timeout 45 compute-sanitizer --tool memcheck $T sanitizer_smoke --exact 2>&1 | tail -12 | tee $OUT/memcheck.log; timeout 45 compute-sanitizer --tool racecheck $T sanitizer_smoke --exact 2>&1 | tail -8 | tee $OUT/racecheck.log; grep -h "test result\|FAIL\|panicked" $OUT/tests.log
RUN
