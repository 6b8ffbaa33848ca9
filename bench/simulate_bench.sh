#!/usr/bin/env bash
# Simulator throughput and memory: simulated client-rounds per second (tasks handed out, i.e. devices that ran
# a round's protocol and training) and host peak RSS for populations of 1,000 and 10,000 phones, plus the
# bytes the simulator keeps per idle device. Usage: bench/simulate_bench.sh [build-dir]
set -euo pipefail
BUILD="${1:-build}"
SEEDLING="$BUILD/bin/seedling"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$SEEDLING" init-model --preset tiny --out "$WORK/model" --seed 1 >/dev/null
for devices in 1000 10000; do
  out="$WORK/sim-$devices"
  /usr/bin/time -f "%e %M" -o "$WORK/time" "$SEEDLING" simulate --model "$WORK/model" --devices "$devices" \
    --rounds 10 --clients-per-round 50 --methods lora-bp,kseed --steps 5 --seq-len 64 --seed 3 --out "$out" \
    >"$WORK/stdout" 2>/dev/null
  read -r wall rss_kb <"$WORK/time"
  tasks=$(python3 -c "import json,sys; print(sum(json.loads(l)['selected'] for l in open('$out/rounds.jsonl')))")
  idle=$(sed -n 's/^bytes per idle device: //p' "$WORK/stdout")
  python3 -c "print(f'devices $devices: {$tasks} client-rounds in {$wall:.1f} s = {$tasks/$wall:.1f} client-rounds/s, peak RSS {$rss_kb/1024:.0f} MiB, {$idle} bytes per idle device')"
done
