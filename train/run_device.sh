#!/usr/bin/env bash
# Runs on the GPU machine (via the device tool's `run`), from the repository root.
# Round 2 (shipped). Trains three dropout/step-count variants concurrently on one GPU (the model is tiny, so one
# process leaves the GPU mostly idle), keeps the one with the best validation loss, exports the
# HF checkpoint, verifies it against transformers (online mode) and tars it into $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
: "${OUT:=/tmp/out}"; mkdir -p "$OUT"
B=${BUDGET:-330}   # training seconds per run (all three run at the same time)
R=/tmp/runs
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, tokenizers, safetensors, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'tokenizers', tokenizers.__version__)"
T0=$(date +%s)
COMMON="--warmup 150 --min_lr 5e-5 --eval_every 100 --budget $B"
python3 train/train.py train --name d20_s1200 --dropout 0.2 --max_steps 1200 $COMMON --out $R/d20_s1200 > "$OUT/run_a.log" 2>&1 &
python3 train/train.py train --name d30_s1600 --dropout 0.3 --max_steps 1600 $COMMON --out $R/d30_s1600 > "$OUT/run_b.log" 2>&1 &
python3 train/train.py train --name d40_s2200 --dropout 0.4 --max_steps 2200 $COMMON --out $R/d40_s2200 > "$OUT/run_c.log" 2>&1 &
wait
echo "training wall: $(( $(date +%s) - T0 )) s"
for f in "$OUT"/run_*.log; do echo "== $f"; grep -E "ms/step|step .*/|done" "$f" | tail -n 8; done
python3 train/train.py export --runs $R/d20_s1200 $R/d30_s1600 $R/d40_s2200 --out $R/master \
  --log "$OUT/train_log.json" 2>&1 | tee "$OUT/export.log"
tar -C $R -czf "$OUT/master.tar.gz" master && ls -la "$OUT"
echo "total wall: $(( $(date +%s) - T0 )) s"
