#!/usr/bin/env bash
# The GPU suite, `python -m bench all --size gpu` (Qwen3-0.6B-shaped architecture, random weights), on
# what bench/gpu_carry.sh copied into .carry/. Run from the repository root on the GPU machine:
#   bash bench/gpu_suite.sh [RESULTS_DIR]      (default: bench/results; e.g. "$OUT" on the device)
# Each benchmark prints its table and writes <name>_gpu.json; one that fails does not stop the others.
# A device call runs at most 10 minutes: name one benchmark per call (e.g. ONLY=extract_speed) if needed.
set -uo pipefail
results="${1:-bench/results}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# gpu_carry.sh keeps the data files side by side; the entry point reads them in ../shared/data's
# layout, so give it that layout as links.
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/afqmc" "$root/financial_qa_10k" "$root/pii_zh"
ln -s "$PWD/.carry/data/afqmc_train.csv" "$root/afqmc/train.csv"
ln -s "$PWD/.carry/data/Financial-QA-10k.csv" "$root/financial_qa_10k/Financial-QA-10k.csv"
ln -s "$PWD/.carry/data/data_person_1000_zh.json" "$root/pii_zh/data_person_1000_zh.json"
"${PYTHON:-python3}" -m bench "${ONLY:-all}" --size gpu --data-root "$root" --tokenizer .carry/tokenizer \
    --output-dir "$results"
