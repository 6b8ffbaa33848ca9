#!/usr/bin/env bash
# Simulator throughput and memory: simulated client-rounds per second (tasks handed out, i.e. devices that ran
# a round's protocol and training) and host peak RSS for populations of 1,000 and 10,000 phones, plus the
# bytes the simulator keeps per idle device; then the MPI speed-up. Usage:
#   bench/simulate_bench.sh [build-dir] [all|population|mpi]
set -euo pipefail
BUILD="${1:-build}"
WHAT="${2:-all}"
case "$WHAT" in all|population|mpi) ;; *) echo "usage: $0 [build-dir] [all|population|mpi]" >&2; exit 2;; esac
SEEDLING="$BUILD/bin/seedling"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$SEEDLING" init-model --preset tiny --out "$WORK/model" --seed 1 >/dev/null
for devices in 1000 10000; do
  [ "$WHAT" = mpi ] && break
  out="$WORK/sim-$devices"
  /usr/bin/time -f "%e %M" -o "$WORK/time" "$SEEDLING" simulate --model "$WORK/model" --devices "$devices" \
    --rounds 10 --clients-per-round 50 --methods lora-bp,kseed --steps 5 --seq-len 64 --seed 3 --out "$out" \
    >"$WORK/stdout" 2>/dev/null
  read -r wall rss_kb <"$WORK/time"
  tasks=$(python3 -c "import json,sys; print(sum(json.loads(l)['selected'] for l in open('$out/rounds.jsonl')))")
  idle=$(sed -n 's/^bytes per idle device: //p' "$WORK/stdout")
  python3 -c "print(f'devices $devices: {$tasks} client-rounds in {$wall:.1f} s = {$tasks/$wall:.1f} client-rounds/s, peak RSS {$rss_kb/1024:.0f} MiB, {$idle} bytes per idle device')"
done

# MPI scale-out: the same simulation on 1 rank and on 2 ranks (`mpirun -np 2`), one training thread per rank,
# so the ratio is what a second rank (a second machine, or here the second core) adds; for comparison, one
# rank with 2 threads. The figures are identical by construction (tests/simulator/mpi_test.sh); only wall
# time differs. 10,000 phones, so that selected devices train at overlapping simulated times (the
# conservative event loop only runs devices in parallel when their simulated training windows overlap),
# 40 local steps, and 16 evaluation examples, so that the hub's serial evaluation does not dominate; 8 rounds,
# so that the fixed start-up (MPI_Init, each rank building the world) weighs as it would in a longer study
# (the line also gives the ratio within the rounds alone). RSS is that of the largest process.
if [ "$WHAT" != population ] && command -v mpirun >/dev/null; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
  printf '[simulation]\neval_examples = 16\n' >"$WORK/mpi.toml"
  args=(simulate --config "$WORK/mpi.toml" --model "$WORK/model" --devices 10000 --rounds 8 --clients-per-round 20
        --methods lora-bp --steps 40 --seq-len 64 --seed 3)
  /usr/bin/time -f "%e %M" -o "$WORK/time1" "$SEEDLING" "${args[@]}" --threads 1 --out "$WORK/mpi-1" >/dev/null 2>&1
  /usr/bin/time -f "%e %M" -o "$WORK/time2" mpirun --bind-to none -np 2 "$SEEDLING" "${args[@]}" --threads 1 --out "$WORK/mpi-2" >/dev/null 2>&1
  /usr/bin/time -f "%e %M" -o "$WORK/time3" "$SEEDLING" "${args[@]}" --threads 2 --out "$WORK/mpi-t2" >/dev/null 2>&1
  read -r wall3 rss3 <"$WORK/time3"
  read -r wall1 rss1 <"$WORK/time1"
  read -r wall2 rss2 <"$WORK/time2"
  tasks=$(python3 -c "import json; print(sum(json.loads(l)['selected'] for l in open('$WORK/mpi-1/rounds.jsonl')))")
  loop1=$(python3 -c "import json; print(sum(json.loads(l)['wall_seconds'] for l in open('$WORK/mpi-1/rounds.jsonl')))")
  loop2=$(python3 -c "import json; print(sum(json.loads(l)['wall_seconds'] for l in open('$WORK/mpi-2/rounds.jsonl')))")
  python3 -c "print(f'MPI, 10,000 devices, {$tasks} client-rounds, 1 thread per rank: 1 rank {$wall1:.1f} s (rounds {$loop1:.1f} s, {$rss1/1024:.0f} MiB), 2 ranks {$wall2:.1f} s (rounds {$loop2:.1f} s, {$rss2/1024:.0f} MiB per largest rank): speed-up {$wall1/$wall2:.2f}x overall, {$loop1/$loop2:.2f}x in the rounds; 1 rank with 2 threads {$wall3:.1f} s ({$wall1/$wall3:.2f}x)')"
fi
