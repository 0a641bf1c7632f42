#!/usr/bin/env bash
# CPU throughput of our engine against C++ peers on 2B-4T shapes (issue 5).
#
#   scripts/peers/bench.sh [THREADS...]        default threads: 1 2
#
# First run scripts/peers/build.sh (peers, models, target/release/bitnet). Use a quiet
# machine: nothing else running, fixed clocks if you can. For each thread count and each peer
# configuration it runs the peer's llama-bench, then immediately our `bitnet bench` with the
# matching head (Q6_K head <-> our --head q4, F16 head <-> our --head exact), so drift hits
# both sides of every ratio alike. Raw outputs go to $OUT (default
# $PEERS_DIR/results/<date>-<time>/); the markdown table (scripts/peers/summarize.py) goes to
# stdout and $OUT/table.md.
#
# Env: PEERS_DIR (default /work/peers); QUICK=1 (smoke test: -r 1, pp32, tg8);
#      ONLY=REGEX (configs whose id matches, e.g. ONLY='ik|llamacpp-q6k');
#      R, PP (comma list), N to override repetitions / prompt lengths / generated tokens.
# A full run (7 configs x 2 thread counts, -r 3) takes roughly 1-1.5 h on 2 Zen4 vCPUs.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PEERS_DIR=${PEERS_DIR:-/work/peers}
M=$PEERS_DIR/models
if [[ -n ${QUICK:-} ]]; then
    R=${R:-1} PP=${PP:-32} N=${N:-8}
else
    R=${R:-3} PP=${PP:-128,512} N=${N:-64}
fi
THREADS=("$@")
[[ ${#THREADS[@]} -gt 0 ]] || THREADS=(1 2)
OUT=${OUT:-$PEERS_DIR/results/$(date +%Y%m%d-%H%M%S)}
OURS=$REPO/target/release/bitnet
SYNTH=$M/synth-2b4t

log() { echo "[bench.sh $(date +%H:%M:%S)] $*" >&2; }

[[ -x $OURS ]] || { log "no $OURS: cargo build --release -p bitnet-cli"; exit 1; }
[[ -f $SYNTH/config.json ]] || { log "no $SYNTH: run scripts/peers/build.sh"; exit 1; }
mkdir -p "$OUT"

IK=$PEERS_DIR/ik_llama.cpp/build/bin/llama-bench
BN=$PEERS_DIR/BitNet/build/bin/llama-bench
LC=$PEERS_DIR/llama.cpp/build/bin/llama-bench
# id | engine | weights+head | llama-bench | model | extra llama-bench args | our --head
CONFIGS=(
    "ik-q6k|ik_llama.cpp|IQ2_BN + Q6_K|$IK|ik-iq2_bn-q6k.gguf||q4"
    "ik-q6k-rtr|ik_llama.cpp -rtr 1|IQ2_BN + Q6_K|$IK|ik-iq2_bn-q6k.gguf|-rtr 1|q4"
    "ik-f16-rtr|ik_llama.cpp -rtr 1|IQ2_BN + F16|$IK|ik-iq2_bn-f16.gguf|-rtr 1|exact"
    "bitnetcpp-q6k|bitnet.cpp|I2_S + Q6_K|$BN|bitnetcpp-i2_s-q6k.gguf||q4"
    "bitnetcpp-f16|bitnet.cpp|I2_S + F16|$BN|bitnetcpp-i2_s-f16.gguf||exact"
    "llamacpp-q6k|llama.cpp|TQ2_0 + Q6_K|$LC|llamacpp-tq2_0-q6k.gguf||q4"
    "llamacpp-f16|llama.cpp|TQ2_0 + F16|$LC|llamacpp-tq2_0-f16.gguf||exact"
)

# Our bench takes one prompt length per call: the first with the generation test, the rest
# alone. --json when this build has it, else summarize.py reads the markdown table.
OUR_JSON=()
"$OURS" bench --help 2>/dev/null | grep -q -- '--json' && OUR_JSON=(--json)
IFS=, read -r -a PPS <<<"$PP"

peer_commit() {
    local d=$1
    # a checkout's own commit (not a parent repository's), else a note left by whoever
    # unpacked an archive there
    if [[ -e $d/.git ]]; then git -C "$d" rev-parse HEAD; return; fi
    cat "$d/.peer-commit" 2>/dev/null || echo unknown
}
{
    echo "date: $(date -Is)"
    echo "host: $(uname -srm); $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-); $(nproc) cpus"
    echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "ours: $(git -C "$REPO" rev-parse HEAD)$(git -C "$REPO" diff --quiet HEAD -- crates || echo ' (+ local changes)')"
    echo "ik_llama.cpp: $(peer_commit "$PEERS_DIR/ik_llama.cpp")"
    echo "bitnet.cpp: $(peer_commit "$PEERS_DIR/BitNet")"
    echo "llama.cpp: $(peer_commit "$PEERS_DIR/llama.cpp")"
    echo "settings: threads=${THREADS[*]} r=$R pp=$PP n=$N"
} >"$OUT/meta.txt"
load=$(cut -d' ' -f1 /proc/loadavg)
awk -v l="$load" 'BEGIN { exit !(l > 0.5) }' && log "warning: load average $load; the machine is not quiet"

MANIFEST=$OUT/manifest.tsv
printf 'threads\tid\tengine\tlabel\tmodel\tpeer_json\thead\tours_files\n' >"$MANIFEST"
for t in "${THREADS[@]}"; do
    for c in "${CONFIGS[@]}"; do
        IFS='|' read -r id engine label bin model extra head <<<"$c"
        [[ -n ${ONLY:-} && ! $id =~ $ONLY ]] && continue
        if [[ ! -x $bin || ! -s $M/$model ]]; then
            log "skip $id: missing $bin or $M/$model"
            continue
        fi
        pj=t$t-$id.json
        log "t=$t $id: llama-bench"
        # shellcheck disable=SC2086
        "$bin" -m "$M/$model" -p "$PP" -n "$N" -t "$t" -r "$R" -o json $extra \
            >"$OUT/$pj" 2>"$OUT/t$t-$id.log" || { log "$id failed: see $OUT/t$t-$id.log"; pj=; }
        ours=()
        for i in "${!PPS[@]}"; do
            n=0
            [[ $i -eq 0 ]] && n=$N
            f=t$t-$id-ours-$head-pp${PPS[$i]}.out
            log "t=$t $id: ours --head $head -p ${PPS[$i]} -n $n"
            "$OURS" bench --model "$SYNTH" --head "$head" -p "${PPS[$i]}" -n "$n" -r "$R" -t "$t" \
                "${OUR_JSON[@]}" >"$OUT/$f" 2>"$OUT/${f%.out}.log" || log "ours failed: see $OUT/${f%.out}.log"
            ours+=("$f")
        done
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$id" "$engine" "$label" "$M/$model" "$pj" \
            "$head" "$(IFS=,; echo "${ours[*]}")" >>"$MANIFEST"
    done
done

python3 "$REPO/scripts/peers/summarize.py" "$OUT" | tee "$OUT/table.md"
log "raw results in $OUT"
