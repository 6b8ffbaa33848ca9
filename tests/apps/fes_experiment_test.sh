#!/usr/bin/env bash
# FeS's claim on this machine (scripts/fes-experiment.sh, configs/fes-few-shot.toml): with 1% of the rows labelled
# and a base that half-knows the task, pseudo-labels raise held-out accuracy clearly above training on the labelled
# rows alone. Measured: 0.83 against 0.63 (base 0.67). A device that ignored its pseudo-labels, or labelled at
# random, stays near the labelled-only run.
# Usage: fes_experiment_test.sh <seedling binary> <work dir> <source dir>
set -euo pipefail
seedling="$1"; work="$2"; source="$3"
rm -rf "$work"
SEEDLING_BIN="$seedling" FES_METHODS=labelled-only,pseudo-labels "$source/scripts/fes-experiment.sh" "$work" \
  > "$work.out" 2>&1 || { cat "$work.out"; echo "FAIL: scripts/fes-experiment.sh failed" >&2; exit 1; }
cat "$work.out"
accuracy() { awk -v run="$1" '$1 == run { print $NF }' "$work/sim/summary.txt" | head -n 1; }
labelled=$(accuracy labelled-only)
pseudo=$(accuracy pseudo-labels)
[ -n "$labelled" ] && [ -n "$pseudo" ] || { echo "FAIL: no accuracy for both runs in summary.txt" >&2; exit 1; }
awk -v p="$pseudo" -v l="$labelled" 'BEGIN { exit !(p >= l + 0.1) }' \
  || { echo "FAIL: pseudo-labels accuracy $pseudo is not 0.1 above labelled-only $labelled" >&2; exit 1; }
echo "ok: pseudo-labels $pseudo, labelled rows alone $labelled"
