#!/usr/bin/env bash
# Every GPU benchmark of the speed targets, in one go, on the Qwen3-0.6B-shaped architecture
# (random weights). Run from the repository root on the GPU machine, after bench/gpu_carry.sh here:
#   bash bench/gpu_suite.sh [RESULTS_DIR]      (default: bench/results; e.g. "$OUT" on the device)
# Each benchmark prints its table and writes <name>_h200.json; one that fails does not stop the others.
# A device call runs at most 10 minutes: name one benchmark per call (e.g. ONLY=extract_speed) if needed.
set -uo pipefail
results="${1:-bench/results}"
mkdir -p "$results"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
tok=.carry/tokenizer
data=.carry/data
status=0
only="${ONLY:-}"
run() {  # run MODULE ARGS...: python -m MODULE ARGS...
  [[ -n "$only" && "$1" != *"$only"* ]] && return 0
  echo "== python -m $*"
  "${PYTHON:-python3}" -m "$@" || { echo "FAILED: python -m $*"; status=1; }
}
run bench.pair_cls_train --data "$data/afqmc_train.csv" --tokenizer "$tok" --arch qwen3-embedding-0.6b \
    --batch-size 128 --steps 40 --full-baseline --output "$results/pair_cls_train_h200.json"
run bench.embedding_speed --data "$data/Financial-QA-10k.csv" --arch qwen3-embedding-0.6b --tokenizer "$tok" \
    --num-texts 4096 --batch-size 64 --qtune-batch-size 1024 --max-tokens 65536 \
    --train-batch-size 64 --train-steps 30 --warmup 5 \
    --output "$results/embedding_speed_h200.json"
run bench.extract_speed --data "$data/data_person_1000_zh.json" --tokenizer "$tok" --arch qwen3-embedding-0.6b \
    --num-records 512 --baseline-records 64 --batch-size 64 --max-new-tokens 128 \
    --output "$results/extract_speed_h200.json"
run bench.rerank_speed --data "$data/Financial-QA-10k.csv" --tokenizer "$tok" --arch qwen3-embedding-0.6b \
    --num-pairs 2048 --batch-size 32 --max-length 512 --output "$results/rerank_speed_h200.json"
exit $status
