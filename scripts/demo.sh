#!/usr/bin/env bash
# Installs missing packages, builds, and runs the demo: create a small random model in Hugging Face format,
# evaluate it on the bundled JSONL sample, and generate a few tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
scripts/build.sh
BUILD_DIR="${SEEDLING_BUILD_DIR:-build}"
SEEDLING="$BUILD_DIR/bin/seedling"
OUT="${SEEDLING_DEMO_DIR:-out/demo}"
mkdir -p "$OUT"

echo "== 1/3 init-model: a tiny Llama-family model with a learned byte-level BPE tokenizer"
"$SEEDLING" init-model --preset tiny --out "$OUT/tiny-model" --seed 1 --force

echo "== 2/3 eval on data/sample/eval.jsonl"
"$SEEDLING" eval --model "$OUT/tiny-model" --data data/sample/eval.jsonl | tee "$OUT/eval.json"

echo "== 3/3 generate (random weights, so the text is noise from the learned vocabulary)"
"$SEEDLING" generate --model "$OUT/tiny-model" --prompt "The weather in Zürich" --max-new-tokens 24 --seed 7 \
  | tee "$OUT/generate.txt"

echo
echo "Demo outputs are in $OUT/: the model (tiny-model/), eval.json, generate.txt"
