#!/usr/bin/env bash
# FeS's few-shot experiment end to end with the `seedling` binary: a base model that half-knows the task (the tiny
# preset fine-tuned on 120 rows of data/sample/topics-3way.jsonl, standing in for a pretrained model, which this
# repository cannot ship), then configs/fes-few-shot.toml on the other 1080 rows with 1% of them labelled.
#
# Usage: scripts/fes-experiment.sh [out_dir]      (default out/fes)
#   SEEDLING_BIN   the binary (default build/bin/seedling; scripts/build.sh builds it)
#   FES_METHODS    comma-separated runs of the config (default: all of them)
# Prints the summary and where the report is. About 8 minutes on one core for all four runs.
set -euo pipefail
cd "$(dirname "$0")/.."
seedling="${SEEDLING_BIN:-build/bin/seedling}"
out="${1:-out/fes}"
[ -x "$seedling" ] || { echo "fes-experiment: no $seedling (build first: scripts/build.sh)" >&2; exit 1; }
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

step() { echo "fes-experiment: $*" >&2; }
mkdir -p "$out"
step "splitting data/sample/topics-3way.jsonl: 120 rows for the base, 1080 for the federation"
head -n 120 data/sample/topics-3way.jsonl > "$out/base-rows.jsonl"
tail -n +121 data/sample/topics-3way.jsonl > "$out/federation-rows.jsonl"
step "the base: tiny preset (seed 5), 40 lora-bp steps of 8 rows, merged"
rm -rf "$out/tiny" "$out/base-adapter" "$out/base"
"$seedling" init-model --preset tiny --seed 5 --out "$out/tiny" > /dev/null
"$seedling" finetune --model "$out/tiny" --data "$out/base-rows.jsonl" --method lora-bp --steps 40 --batch 8 \
  --seq-len 64 --lr 3e-3 --lora-targets all --lora-rank 8 --seed 0 --out "$out/base-adapter" > "$out/base-finetune.json"
"$seedling" export --model "$out/tiny" --adapter "$out/base-adapter" --out "$out/base" > /dev/null
methods=()
[ -n "${FES_METHODS:-}" ] && methods=(--methods "$FES_METHODS")
step "the federation: configs/fes-few-shot.toml"
"$seedling" simulate --config configs/fes-few-shot.toml --model "$out/base" --data "$out/federation-rows.jsonl" \
  --out "$out/sim" --threads 1 "${methods[@]}" > "$out/simulate.log"
cat "$out/sim/summary.txt"
echo "report: $out/sim/report.html"
