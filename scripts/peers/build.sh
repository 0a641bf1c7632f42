#!/usr/bin/env bash
# Build the C++ peers (CPU, llama-bench + llama-quantize only) and make the models that
# scripts/peers/bench.sh compares us with: 2B-4T shapes, random ternary weights (issue 5).
#
# Peer sources are never committed here; check them out OUTSIDE this repository:
#   ik_llama.cpp  https://github.com/ikawrakow/ik_llama.cpp     tested at 8337e4cd3861 (2026-08-15)
#   bitnet.cpp    https://github.com/microsoft/BitNet           at c82b5e667482 (2024 version, builds
#                 offline) with its submodule 3rdparty/llama.cpp =
#                 https://github.com/Eddie-Wang1120/llama.cpp   at 406a5036f9a8
#   llama.cpp     https://github.com/ggml-org/llama.cpp         tested at d32676d77 (unslothai mirror)
# e.g. git clone https://github.com/microsoft/BitNet && cd BitNet && git checkout c82b5e6 &&
#      git submodule update --init 3rdparty/llama.cpp   (or, with the agent `fetch` tool:
#      github:ikawrakow/ik_llama.cpp, github:microsoft/BitNet, github:Eddie-Wang1120/llama.cpp,
#      then `git --git-dir=<mirror> archive <commit> | tar -x -C <dir>`; where a snapshot lacks
#      a few blobs (seen: ik_llama.cpp's and llama.cpp's web-server assets), `git archive` stops,
#      so write the files of `git ls-tree -r <commit>` one by one with `git cat-file`, skipping
#      the missing ones: llama-bench and llama-quantize need none of them).
#
# Env: IK_SRC, BITNET_SRC, LLAMA_SRC (default $PEERS_DIR/ik_llama.cpp, .../BitNet, .../llama.cpp),
#      PEERS_DIR (default /work/peers), JOBS (default 2), NICE (default 19),
#      SKIP_BUILD=1 (models only), FORCE=1 (rebuild even if the binaries exist).
# Needs cmake, gcc, clang (bitnet.cpp refuses other compilers), python3 with `gguf numpy`,
# ~12 GB of disk for the models. Build time on 2 Zen4 vCPUs at -j2 (machine shared, nice 19):
# ik_llama.cpp ~10.5 min, bitnet.cpp ~3 min, llama.cpp ~10-15 min (not re-timed here); then
# the F16 GGUF ~2 min and 10-60 s per quantized model.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PEERS_DIR=${PEERS_DIR:-/work/peers}
IK_SRC=${IK_SRC:-$PEERS_DIR/ik_llama.cpp}
BITNET_SRC=${BITNET_SRC:-$PEERS_DIR/BitNet}
LLAMA_SRC=${LLAMA_SRC:-$PEERS_DIR/llama.cpp}
JOBS=${JOBS:-2}
NICE="nice -n ${NICE:-19}"
M=$PEERS_DIR/models
mkdir -p "$M" "$PEERS_DIR/logs"

log() { echo "[build.sh $(date +%H:%M:%S)] $*" >&2; }

# run NAME CMD...: log to $PEERS_DIR/logs/NAME.log, report wall time.
run() {
    local name=$1; shift
    local t0=$SECONDS
    log "$name: $*"
    if ! $NICE "$@" >"$PEERS_DIR/logs/$name.log" 2>&1; then
        log "$name FAILED; tail of $PEERS_DIR/logs/$name.log:"
        tail -20 "$PEERS_DIR/logs/$name.log" >&2
        exit 1
    fi
    log "$name done in $((SECONDS - t0)) s"
}

have_bins() { [[ -x $1/build/bin/llama-bench && -x $1/build/bin/llama-quantize && -z ${FORCE:-} ]]; }

build_ik() {
    have_bins "$IK_SRC" && { log "ik_llama.cpp: already built"; return; }
    # GGML_IQK_FA_ALL_QUANTS=OFF only drops FlashAttention kernels for quantized KV caches
    # (the benchmark uses the default f16 cache); it roughly halves the build.
    run ik-cmake cmake -S "$IK_SRC" -B "$IK_SRC/build" -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DGGML_IQK_FA_ALL_QUANTS=OFF
    run ik-build cmake --build "$IK_SRC/build" -j"$JOBS" --target llama-bench llama-quantize
}

build_bitnet() {
    have_bins "$BITNET_SRC" && { log "bitnet.cpp: already built"; return; }
    [[ -f $BITNET_SRC/3rdparty/llama.cpp/CMakeLists.txt ]] ||
        { log "bitnet.cpp: $BITNET_SRC/3rdparty/llama.cpp is empty (submodule)"; exit 1; }
    # setup_env.py always generates include/bitnet-lut-kernels.h with codegen_tl2.py on x86,
    # also for --quant-type i2_s; the header is all under #if GGML_BITNET_X86_TL2, so with
    # TL2 off only its presence matters. These are setup_env.py's arguments for the
    # bitnet_b1_58-3B model (the old codegen knows no 2B-4T shapes).
    (cd "$BITNET_SRC" && run bitnet-codegen python3 utils/codegen_tl2.py --model bitnet_b1_58-3B \
        --BM 160,320,320 --BK 96,96,96 --bm 32,32,32)
    # setup_env.py: cmake -B build -DBITNET_X86_TL2=<ON for tl2> -DCMAKE_C_COMPILER=clang
    # -DCMAKE_CXX_COMPILER=clang++. I2_S uses the MAD kernels (ggml-bitnet-mad.cpp), so TL2
    # off. llama.cpp is a subproject there, so its examples must be asked for.
    run bitnet-cmake cmake -S "$BITNET_SRC" -B "$BITNET_SRC/build" -DCMAKE_BUILD_TYPE=Release \
        -DBITNET_X86_TL2=OFF -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
        -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_EXAMPLES=ON
    run bitnet-build cmake --build "$BITNET_SRC/build" -j"$JOBS" --target llama-bench llama-quantize
}

build_llama() {
    have_bins "$LLAMA_SRC" && { log "llama.cpp: already built"; return; }
    run llama-cmake cmake -S "$LLAMA_SRC" -B "$LLAMA_SRC/build" -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
    run llama-build cmake --build "$LLAMA_SRC/build" -j"$JOBS" --target llama-bench llama-quantize
}

if [[ -z ${SKIP_BUILD:-} ]]; then
    build_ik
    build_bitnet
    build_llama
fi

# ---- models ----------------------------------------------------------------------------
F16=$M/bitnet-2b4t-f16.gguf
if [[ ! -s $F16 ]]; then
    python3 -c 'import gguf, numpy' 2>/dev/null || pip install gguf numpy
    run make-gguf python3 "$REPO/scripts/peers/make_gguf.py" "$F16.tmp"
    mv "$F16.tmp" "$F16"
fi

# quant NAME SRC_DIR ARGS...: $M/NAME.gguf from the F16 GGUF with that peer's llama-quantize.
# The embedding is tied, so every quantizer stores the shared token_embd/output tensor with
# the *output* type (--output-tensor-type); the token-embedding flag is passed too for
# quantizers that check it.
quant() {
    local name=$1 src=$2; shift 2
    local out=$M/$name.gguf
    [[ -s $out ]] && { log "$name.gguf: present"; return; }
    run "quantize-$name" "$src/build/bin/llama-quantize" "$@"
    [[ -s $out.tmp ]] && mv "$out.tmp" "$out"
}
head_args() { echo "--output-tensor-type $1 --token-embedding-type $1"; }

# ik_llama.cpp: IQ2_BN; its default head for a tied IQ2_BN model is Q6_K (said explicitly).
# shellcheck disable=SC2046
quant ik-iq2_bn-q6k "$IK_SRC" $(head_args q6_K) "$F16" "$M/ik-iq2_bn-q6k.gguf.tmp" IQ2_BN 2
# shellcheck disable=SC2046
quant ik-iq2_bn-f16 "$IK_SRC" $(head_args f16) "$F16" "$M/ik-iq2_bn-f16.gguf.tmp" IQ2_BN 2
# bitnet.cpp: I2_S (one per-tensor scale, so one thread as setup_env.py uses); its default
# head for I2_S is F16.
# shellcheck disable=SC2046
quant bitnetcpp-i2_s-q6k "$BITNET_SRC" $(head_args q6_K) "$F16" "$M/bitnetcpp-i2_s-q6k.gguf.tmp" I2_S 1
# shellcheck disable=SC2046
quant bitnetcpp-i2_s-f16 "$BITNET_SRC" $(head_args f16) "$F16" "$M/bitnetcpp-i2_s-f16.gguf.tmp" I2_S 1
# llama.cpp: TQ2_0; default head Q6_K.
# shellcheck disable=SC2046
quant llamacpp-tq2_0-q6k "$LLAMA_SRC" $(head_args q6_K) "$F16" "$M/llamacpp-tq2_0-q6k.gguf.tmp" TQ2_0 2
# shellcheck disable=SC2046
quant llamacpp-tq2_0-f16 "$LLAMA_SRC" $(head_args f16) "$F16" "$M/llamacpp-tq2_0-f16.gguf.tmp" TQ2_0 2

# ours: the packed safetensors checkpoint with the same shapes.
if [[ ! -f $M/synth-2b4t/config.json ]]; then
    (cd "$REPO" && run synth cargo xtask synth "$M/synth-2b4t" --preset 2b4t)
fi
(cd "$REPO" && run cargo-build cargo build --release -p bitnet-cli -j"$JOBS")

log "models:"
ls -l "$M"/*.gguf >&2
du -sh "$M/synth-2b4t" >&2
