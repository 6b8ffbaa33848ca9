#!/usr/bin/env bash
# MPI scale-out (simulator/mpi.h): `mpirun -np 2 seedling simulate` must give the same rounds.jsonl as one
# process with the same seed (all fields but host time, including the SHA-256 of the global parameters).
# Usage: mpi_test.sh <seedling binary> <work dir>
set -uo pipefail
seedling="$1"; work="$2"
fail() { echo "FAIL: $*" >&2; exit 1; }
command -v mpirun >/dev/null || fail "mpirun not found (Debian package openmpi-bin)"
rm -rf "$work" && mkdir -p "$work"
"$seedling" init-model --preset tiny --out "$work/model" --seed 4 >/dev/null || fail "init-model failed"
args=(simulate --model "$work/model" --devices 80 --heldout-devices 4 --rounds 3 --clients-per-round 5
      --steps 2 --seq-len 32 --methods lora-bp,kseed --dropout 0.1 --seed 21 --threads 1)
"$seedling" "${args[@]}" --out "$work/one" >"$work/one.log" 2>&1 || { cat "$work/one.log"; fail "1 rank failed"; }
# Root in CI containers; slots may not match the core count there; ranks are multi-threaded (--bind-to none).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
strip() { sed -E 's/,"wall_seconds":[^,}]*//' "$1"; }
[ "$(wc -l <"$work/one/rounds.jsonl")" -eq 6 ] || fail "expected 6 rounds in $work/one/rounds.jsonl"
grep -q '"committed":true' "$work/one/rounds.jsonl" || fail "no committed round"
# auto: the ranks share this machine's work directory, so activations go to the least busy rank;
# static: device d runs on rank d % 2 with its state in that rank's own directory.
for placement in auto static; do
  want="shared work directory"
  [ "$placement" = static ] && want="no shared work directory"
  timeout 600 mpirun --bind-to none -np 2 "$seedling" "${args[@]}" --mpi-placement "$placement" \
    --out "$work/two-$placement" >"$work/two-$placement.log" 2>&1 ||
    { cat "$work/two-$placement.log"; fail "2 ranks ($placement) failed"; }
  grep -q "ranks: 2" "$work/two-$placement.log" || { cat "$work/two-$placement.log"; fail "$placement: not 2 ranks"; }
  grep -q "2 MPI ranks, $want" "$work/two-$placement.log" || { cat "$work/two-$placement.log"; fail "$placement: expected '$want'"; }
  if ! diff <(strip "$work/one/rounds.jsonl") <(strip "$work/two-$placement/rounds.jsonl"); then
    fail "1 rank and 2 ranks ($placement placement) differ"
  fi
done
# SecAgg+ rounds: devices on rank 1 wait for stages on their simulated clocks, which travel with their
# requests to rank 0.
printf '[secagg]\nenabled = true\nmax_dropout_fraction = 0.3\n' >"$work/secagg.toml"
sargs=(simulate --config "$work/secagg.toml" --model "$work/model" --devices 80 --heldout-devices 4 --rounds 3
       --clients-per-round 5 --steps 2 --seq-len 32 --methods lora-bp --dropout 0.1 --seed 21 --threads 1)
"$seedling" "${sargs[@]}" --out "$work/secagg-one" >"$work/secagg-one.log" 2>&1 ||
  { cat "$work/secagg-one.log"; fail "SecAgg+, 1 rank failed"; }
grep -q "SecAgg+, complete graph" "$work/secagg-one/report.html" || fail "the report does not show SecAgg+"
grep -q '"committed":true' "$work/secagg-one/rounds.jsonl" || fail "SecAgg+: no committed round"
timeout 600 mpirun --bind-to none -np 2 "$seedling" "${sargs[@]}" --out "$work/secagg-two" >"$work/secagg-two.log" 2>&1 ||
  { cat "$work/secagg-two.log"; fail "SecAgg+, 2 ranks failed"; }
if ! diff <(strip "$work/secagg-one/rounds.jsonl") <(strip "$work/secagg-two/rounds.jsonl"); then
  fail "SecAgg+: 1 rank and 2 ranks differ"
fi
echo "1 rank and 2 ranks (auto and static placement, and with SecAgg+): identical rounds.jsonl"
