#!/usr/bin/env bash
# The main job: installs missing packages, builds, creates the `tiny` model, and simulates a federation of
# 1,000 phones fine-tuning it (LoRA backprop with int8 updates vs FedKSeed) with the real client and server
# code; prints the summary table and where the report is.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
scripts/build.sh
BUILD_DIR="${SEEDLING_BUILD_DIR:-build}"
SEEDLING="$BUILD_DIR/bin/seedling"
OUT="${SEEDLING_DEMO_DIR:-out/demo}"
mkdir -p "$OUT"

echo "== 1/2 init-model: a tiny Llama-family model with a learned byte-level BPE tokenizer"
"$SEEDLING" init-model --preset tiny --out "$OUT/tiny-model" --seed 1 --force

echo "== 2/2 simulate: 1,000 phones, lora-bp (int8 updates) vs kseed, configs/simulate-demo.toml"
"$SEEDLING" simulate --config configs/simulate-demo.toml --model "$OUT/tiny-model" --out "$OUT/sim"

echo
echo "Open $OUT/sim/report.html in a browser (per-round data: $OUT/sim/rounds.csv)."
