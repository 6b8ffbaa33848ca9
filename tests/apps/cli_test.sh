#!/usr/bin/env bash
# End-to-end checks of the `seedling` command. Usage: cli_test.sh <case> <seedling binary> <work dir> <repo>
# Each case is one CTest test; "setup" creates the model the others share (a CTest fixture).
set -uo pipefail
case_name="$1"; seedling="$2"; work="$3"; repo="$4"
model="$work/model"

fail() { echo "FAIL: $*" >&2; exit 1; }
# expect_error <substring> <command...>: the command must fail with one "seedling: error:" line containing it.
expect_error() {
  local want="$1"; shift
  local err
  if err=$("$@" 2>&1 >/dev/null); then fail "expected failure: $*"; fi
  echo "$err" | grep -q "seedling: error:" || fail "no 'seedling: error:' line in: $err"
  echo "$err" | grep -qF -- "$want" || fail "error '$err' does not mention '$want'"
  [ "$(echo "$err" | grep -c "seedling: error:")" -eq 1 ] || fail "more than one error line: $err"
}
json_number() { sed -n "s/.*\"$1\":\([-0-9.e+]*\).*/\1/p"; }

case "$case_name" in
  setup)
    rm -rf "$work" && mkdir -p "$work"
    out=$("$seedling" init-model --preset tiny --out "$model" --seed 3) || fail "init-model failed"
    echo "$out" | grep -q "wrote tiny" || fail "unexpected output: $out"
    for f in config.json model.safetensors tokenizer.json tokenizer_config.json; do
      [ -s "$model/$f" ] || fail "missing $f"
    done
    ;;
  init-refuses-overwrite)
    expect_error "already holds a model" "$seedling" init-model --preset tiny --out "$model"
    ;;
  init-unknown-preset)
    expect_error "unknown preset 'huge'" "$seedling" init-model --preset huge --out "$work/x"
    ;;
  eval-prints-json)
    out=$("$seedling" eval --model "$model" --data "$repo/data/sample/eval.jsonl") || fail "eval failed"
    tokens=$(echo "$out" | json_number tokens)
    loss=$(echo "$out" | json_number loss)
    ppl=$(echo "$out" | json_number perplexity)
    [ -n "$tokens" ] && [ "$tokens" -gt 500 ] || fail "tokens: $out"
    # Random init (std 0.02) gives near-uniform predictions: loss close to ln(2048) = 7.62.
    awk -v l="$loss" 'BEGIN { exit !(l > 7.0 && l < 8.3) }' || fail "loss $loss not near ln(2048): $out"
    awk -v l="$loss" -v p="$ppl" 'BEGIN { d = exp(l) - p; exit !(d < 1e-3 * p && d > -1e-3 * p) }' \
      || fail "perplexity $ppl != exp(loss $loss)"
    ;;
  eval-bad-line)
    printf '{"text": "fine"}\n{"text": 3}\n' > "$work/bad.jsonl"
    expect_error "bad.jsonl:2" "$seedling" eval --model "$model" --data "$work/bad.jsonl"
    ;;
  eval-missing-model)
    expect_error "config.json" "$seedling" eval --model "$work/nowhere" --data "$repo/data/sample/eval.jsonl"
    ;;
  eval-truncated-weights)
    rm -rf "$work/cut" && cp -r "$model" "$work/cut"
    size=$(stat -c %s "$work/cut/model.safetensors")
    truncate -s $((size / 2)) "$work/cut/model.safetensors"
    expect_error "truncated" "$seedling" eval --model "$work/cut" --data "$repo/data/sample/eval.jsonl"
    ;;
  generate-deterministic)
    a=$("$seedling" generate --model "$model" --prompt "Hello there" --max-new-tokens 12 --seed 5 2>/dev/null) || fail "generate failed"
    b=$("$seedling" generate --model "$model" --prompt "Hello there" --max-new-tokens 12 --seed 5 2>/dev/null) || fail "generate failed"
    [ -n "$a" ] || fail "no text generated"
    [ "$a" = "$b" ] || fail "same seed, different text: '$a' vs '$b'"
    stats=$("$seedling" generate --model "$model" --prompt "Hello" --max-new-tokens 4 --greedy 2>&1 >/dev/null)
    echo "$stats" | grep -q "generated" || fail "no statistics line: $stats"
    ;;
  generate-bad-top-p)
    expect_error "top_p" "$seedling" generate --model "$model" --prompt "Hi" --top-p 1.5
    ;;
  finetune-lora-bp)
    out=$("$seedling" finetune --model "$model" --data "$repo/data/sample/instructions.jsonl" --method lora-bp \
      --steps 8 --batch 2 --seq-len 96 --lr 3e-3 --out "$work/ft-bp" 2>/dev/null) || fail "finetune failed"
    for key in loss_start loss_end steps skipped_steps peak_rss_bytes planned_peak_bytes plan; do
      echo "$out" | grep -q "\"$key\"" || fail "no $key in: $out"
    done
    [ "$(echo "$out" | json_number steps)" = 8 ] || fail "steps: $out"
    # The program links tcmalloc when the build found it, and the plan's slack is sized for that heap.
    # (ldd's output is read whole first: with pipefail, 'ldd | grep -q' fails when grep exits early.)
    libs=$(ldd "$seedling") || fail "ldd failed"
    if grep -q libtcmalloc <<< "$libs"; then heap=tcmalloc; else heap=system; fi
    echo "$out" | grep -q "\"heap\":\"$heap\"" || fail "plan not sized for the $heap heap: $out"
    # Throughput counts processed tokens, prompts included: instruction rows mask their prompts, so fewer
    # are scored. tokens_per_second = tokens / seconds, and the MFU is a fraction.
    tokens=$(echo "$out" | json_number tokens); scored=$(echo "$out" | json_number scored_tokens)
    tps=$(echo "$out" | json_number tokens_per_second); secs=$(echo "$out" | json_number seconds)
    mfu=$(echo "$out" | json_number mfu)
    awk -v t="$tokens" -v s="$scored" 'BEGIN { exit !(s > 0 && t > s && t <= 8 * 2 * 96) }' \
      || fail "tokens $tokens should exceed scored_tokens $scored: $out"
    awk -v t="$tokens" -v r="$tps" -v s="$secs" 'BEGIN { d = r - t / s; exit !(d < 0.01 * r && -d < 0.01 * r) }' \
      || fail "tokens_per_second $tps is not tokens / seconds: $out"
    awk -v m="$mfu" 'BEGIN { exit !(m > 0 && m <= 1) }' || fail "mfu $mfu: $out"
    start=$(echo "$out" | json_number loss_start); end=$(echo "$out" | json_number loss_end)
    awk -v s="$start" -v e="$end" 'BEGIN { exit !(e < s) }' || fail "held-out loss did not drop: $start -> $end"
    [ -s "$work/ft-bp/adapter_config.json" ] && [ -s "$work/ft-bp/adapter_model.safetensors" ] || fail "no PEFT adapter"
    ;;
  finetune-zeroth-order)
    for method in fwdgrad mezo kseed; do
      out=$("$seedling" finetune --model "$model" --data "$repo/data/sample/instructions.jsonl" --method $method \
        --steps 4 --seq-len 64 --out "$work/ft-$method" 2>/dev/null) || fail "finetune $method failed"
      [ "$(echo "$out" | json_number steps)" = 4 ] || fail "$method steps: $out"
    done
    pairs=$(grep -o '\[[0-9]*,[-0-9.e+]*\]' "$work/ft-kseed/kseed_update.json" | wc -l)
    [ "$pairs" = 4 ] || fail "kseed_update.json has $pairs pairs, expected 4"
    # q = 3 probes per step, batched by the planner: three pairs per kseed step.
    for method in mezo kseed; do
      out=$("$seedling" finetune --model "$model" --data "$repo/data/sample/instructions.jsonl" --method $method \
        --perturbations 3 --steps 2 --seq-len 64 --out "$work/ft-q3-$method" 2>/dev/null) || fail "$method q=3 failed"
      echo "$out" | grep -q '"variant":"batched"' || fail "$method q=3 not batched: $out"
    done
    pairs=$(grep -o '\[[0-9]*,[-0-9.e+]*\]' "$work/ft-q3-kseed/kseed_update.json" | wc -l)
    [ "$pairs" = 6 ] || fail "kseed q=3: $pairs pairs, expected 6"
    # A variant the method does not have is refused, naming the ones it has.
    err=$("$seedling" finetune --model "$model" --data "$repo/data/sample/instructions.jsonl" --method mezo \
      --variant batched-jvp --steps 1 --seq-len 64 --out "$work/ft-bad" 2>&1 >/dev/null) && fail "bad variant accepted"
    echo "$err" | grep -q "not one of mezo's: batched, in-place-restore" || fail "bad variant message: $err"
    # Benchmark timing: the warm-up step is left out of the tokens (packed blocks of 64 tokens each) ...
    out=$("$seedling" finetune --model "$model" --data "$repo/data/sample/instructions.jsonl" --method mezo \
      --steps 3 --untimed-steps 1 --seq-len 64 --out "$work/ft-timed" 2>/dev/null) || fail "finetune --untimed-steps failed"
    [ "$(echo "$out" | json_number steps)" = 3 ] || fail "untimed steps: $out"
    [ "$(echo "$out" | json_number tokens)" = 128 ] || fail "two timed steps of 64 tokens expected: $out"
    # ... and --min-seconds keeps stepping past --steps until the timed steps took that long.
    out=$("$seedling" finetune --model "$model" --data "$repo/data/sample/instructions.jsonl" --method mezo \
      --steps 2 --untimed-steps 1 --min-seconds 1 --seq-len 64 --out "$work/ft-timed" 2>/dev/null) || fail "--min-seconds failed"
    awk -v s="$(echo "$out" | json_number seconds)" -v n="$(echo "$out" | json_number steps)" \
      'BEGIN { exit !(s >= 1 && n > 2) }' || fail "--min-seconds 1: $out"
    ;;
  finetune-budget)
    # The planner's lightest plan for this model, from the refusal of an impossible budget...
    err=$("$seedling" finetune --model "$model" --data "$repo/data/sample/instructions.jsonl" --method lora-bp \
      --steps 2 --batch 4 --seq-len 128 --memory-budget 1M --out "$work/ft-budget" 2>&1 >/dev/null) && fail "1M fit"
    echo "$err" | grep -q "does not fit a budget of 1.0 MiB" || fail "no refusal: $err"
    need=$(echo "$err" | sed -n 's/.*the lightest plan needs \([0-9.]*\) MiB.*/\1/p')
    [ -n "$need" ] || fail "no smallest budget in: $err"
    # Each run measures its own runtime baseline, which varies by up to about 2 MiB between runs (what the
    # heap keeps after the warm-up): the budget leaves 4 MiB for that, and the run must still keep it.
    budget=$(awk -v n="$need" 'BEGIN { printf "%d", (n + 4) * 1048576 }')
    # ...is then a budget it keeps: the measured peak RSS stays within it.
    out=$("$seedling" finetune --model "$model" --data "$repo/data/sample/instructions.jsonl" --method lora-bp \
      --steps 2 --batch 4 --seq-len 128 --memory-budget "$budget" --out "$work/ft-budget" 2>/dev/null) \
      || fail "finetune at the lightest budget failed"
    peak=$(echo "$out" | json_number peak_rss_bytes)
    [ "$peak" -le "$budget" ] || fail "peak RSS $peak exceeds the budget $budget: $out"
    echo "$out" | grep -q '"recompute":true' || fail "the lightest plan should recompute: $out"
    # --recompute N recomputes the first N layers; the tiny model's other 3 keep their activations.
    out=$("$seedling" finetune --model "$model" --data "$repo/data/sample/instructions.jsonl" --method lora-bp \
      --steps 1 --seq-len 64 --recompute 1 --out "$work/ft-budget" 2>/dev/null) || fail "--recompute 1 failed"
    { echo "$out" | grep -q '"recompute":true' && echo "$out" | grep -q '"stored_layers":3'; } \
      || fail "--recompute 1 should store 3 layers: $out"
    for bad in 5 -1 some; do
      expect_error "--recompute must be auto, on, off or a number of layers in [0, 4], got '$bad'" "$seedling" finetune \
        --model "$model" --data "$repo/data/sample/instructions.jsonl" --method lora-bp --steps 1 --recompute "$bad" \
        --out "$work/ft-budget"
    done
    ;;
  planner-smollm2)
    "$seedling" init-model --preset smollm2-135m --out "$work/smol" --seed 2 --force >/dev/null || fail "init smollm2"
    for method in lora-bp mezo; do
      out=$("$seedling" finetune --model "$work/smol" --data "$repo/data/sample/instructions.jsonl" --method $method \
        --steps 2 --seq-len 128 --heldout 0.01 --out "$work/smol-$method" 2>/dev/null) || fail "finetune $method"
      peak=$(echo "$out" | json_number peak_rss_bytes); planned=$(echo "$out" | json_number planned_peak_bytes)
      awk -v p="$peak" -v e="$planned" 'BEGIN { d = (e - p) / p; exit !(d < 0.25 && d > -0.25) }' \
        || fail "$method: planned $planned vs measured $peak is off by more than 25%"
      echo "$method: planned $planned, measured $peak"
    done
    rm -rf "$work/smol" "$work/smol-lora-bp" "$work/smol-mezo"
    ;;
  export-merged)
    "$seedling" finetune --model "$model" --data "$repo/data/sample/instructions.jsonl" --steps 4 --lr 3e-3 \
      --seq-len 64 --out "$work/ft-export" >/dev/null 2>&1 || fail "finetune for export failed"
    "$seedling" export --model "$model" --adapter "$work/ft-export" --format safetensors --out "$work/merged" >/dev/null \
      || fail "export safetensors"
    with_adapter=$("$seedling" eval --model "$model" --adapter "$work/ft-export" --data "$repo/data/sample/eval.jsonl" | json_number loss)
    merged=$("$seedling" eval --model "$work/merged" --data "$repo/data/sample/eval.jsonl" | json_number loss)
    base=$("$seedling" eval --model "$model" --data "$repo/data/sample/eval.jsonl" | json_number loss)
    awk -v a="$with_adapter" -v m="$merged" 'BEGIN { d = a - m; exit !(d < 1e-4 && d > -1e-4) }' \
      || fail "merged model loss $merged != model + adapter loss $with_adapter"
    [ "$with_adapter" != "$base" ] || fail "the adapter changed nothing"
    "$seedling" export --model "$model" --adapter "$work/ft-export" --format gguf --out "$work/merged.gguf" >/dev/null \
      || fail "export gguf"
    [ "$(head -c 4 "$work/merged.gguf")" = "GGUF" ] || fail "not a GGUF file"
    ;;
  export-quantized)
    # Block formats shrink the file: Q4_0 (18 bytes per 32 weights) < Q8_0 (34) < F16 (64).
    for dtype in f16 q8_0 q4_0; do
      out=$("$seedling" export --model "$model" --format gguf --dtype $dtype --out "$work/model-$dtype.gguf") \
        || fail "export gguf $dtype"
      echo "$out" | grep -qF "wrote gguf ($dtype)" || fail "unexpected output: $out"
      [ "$(head -c 4 "$work/model-$dtype.gguf")" = "GGUF" ] || fail "$dtype: not a GGUF file"
    done
    f16=$(stat -c %s "$work/model-f16.gguf"); q8=$(stat -c %s "$work/model-q8_0.gguf")
    q4=$(stat -c %s "$work/model-q4_0.gguf")
    [ "$q4" -lt "$q8" ] && [ "$q8" -lt "$f16" ] || fail "sizes: q4_0 $q4, q8_0 $q8, f16 $f16"
    grep -qa "general.quantization_version" "$work/model-q4_0.gguf" || fail "no quantization version"
    rm -f "$work"/model-*.gguf
    ;;
  export-gguf-lora)
    "$seedling" finetune --model "$model" --data "$repo/data/sample/instructions.jsonl" --steps 2 --lr 3e-3 \
      --seq-len 64 --lora-targets q_proj,k_proj,v_proj --out "$work/ft-lora" >/dev/null 2>&1 \
      || fail "finetune for the adapter failed"
    out=$("$seedling" export --model "$model" --adapter "$work/ft-lora" --format gguf-lora --out "$work/adapter.gguf") \
      || fail "export gguf-lora"
    echo "$out" | grep -qF "wrote gguf-lora (f32, adapter only)" || fail "unexpected output: $out"
    [ "$(head -c 4 "$work/adapter.gguf")" = "GGUF" ] || fail "not a GGUF file"
    for s in general.type adapter adapter.type lora adapter.lora.alpha blk.0.attn_q.weight.lora_a \
      blk.0.attn_k.weight.lora_b blk.1.attn_v.weight.lora_b; do
      grep -qaF "$s" "$work/adapter.gguf" || fail "no '$s' in the adapter file"
    done
    ! grep -qaF "attn_output.weight.lora" "$work/adapter.gguf" || fail "o_proj was not adapted"
    ;;
  gguf-input)
    # A Q8_0 GGUF export and `--weights q8_0` on its source hold the same numbers, so they evaluate alike.
    "$seedling" export --model "$model" --format gguf --dtype q8_0 --out "$work/input-q8_0.gguf" >/dev/null \
      || fail "export q8_0"
    data="$repo/data/sample/eval.jsonl"
    gguf=$("$seedling" eval --model "$work/input-q8_0.gguf" --data "$data" | json_number loss)
    cached=$("$seedling" eval --model "$model" --weights q8_0 --cache-dir "$work/input-cache" --data "$data" \
      | json_number loss)
    fp32=$("$seedling" eval --model "$model" --data "$data" | json_number loss)
    [ -n "$gguf" ] && [ -n "$cached" ] && [ -n "$fp32" ] || fail "eval failed: gguf '$gguf' cached '$cached'"
    awk -v a="$gguf" -v b="$cached" 'BEGIN { d = (a - b) / b; exit !(d < 1e-4 && d > -1e-4) }' \
      || fail "GGUF q8_0 loss $gguf != --weights q8_0 loss $cached"
    [ "$gguf" != "$fp32" ] || fail "q8_0 changed nothing: $gguf"
    # LoRA training on the GGUF base writes a PEFT adapter that works on the source model too.
    "$seedling" finetune --model "$work/input-q8_0.gguf" --data "$repo/data/sample/instructions.jsonl" --steps 3 \
      --lr 3e-3 --seq-len 64 --out "$work/gguf-adapter" >/dev/null 2>&1 || fail "finetune on the GGUF base"
    [ -s "$work/gguf-adapter/adapter_config.json" ] || fail "no PEFT adapter"
    on_gguf=$("$seedling" eval --model "$work/input-q8_0.gguf" --adapter "$work/gguf-adapter" --data "$data" \
      | json_number loss)
    on_source=$("$seedling" eval --model "$model" --weights q8_0 --cache-dir "$work/input-cache" \
      --adapter "$work/gguf-adapter" --data "$data" | json_number loss)
    awk -v a="$on_gguf" -v b="$on_source" 'BEGIN { d = (a - b) / b; exit !(d < 1e-4 && d > -1e-4) }' \
      || fail "adapter on the GGUF base $on_gguf != on the source $on_source"
    [ "$on_gguf" != "$gguf" ] || fail "the adapter changed nothing"
    # The GGUF's matrices are used in place from a read-only mapping, so they can be streamed.
    out=$("$seedling" finetune --model "$work/input-q8_0.gguf" --data "$repo/data/sample/instructions.jsonl" \
      --steps 2 --seq-len 64 --stream-weights on --out "$work/gguf-streamed" 2>/dev/null) || fail "streamed GGUF"
    grep -q '"stream_weights":true' <<< "$out" || fail "the GGUF's weights were not streamed: $out"
    # Outputs that are Hugging Face directories need the tokenizer files a GGUF file does not have.
    expect_error "--format safetensors writes a Hugging Face model directory" "$seedling" export \
      --model "$work/input-q8_0.gguf" --format safetensors --out "$work/x"
    expect_error "--full writes a Hugging Face model directory" "$seedling" finetune --model "$work/input-q8_0.gguf" \
      --full --weights fp32 --method mezo --data "$repo/data/sample/instructions.jsonl" --out "$work/x"
    [ ! -e "$work/x" ] || fail "a refused command wrote $work/x"
    ;;
  simulate-gguf)
    # A simulation on a Q8_0 GGUF export and one on its source directory with q8_0 weights hold the same
    # numbers: identical rounds (losses, global SHA-256), wall-clock time aside.
    "$seedling" export --model "$model" --format gguf --dtype q8_0 --out "$work/sim-q8_0.gguf" >/dev/null \
      || fail "export q8_0"
    printf '[model]\nweights = "q8_0"\nweight_cache_dir = "%s"\n' "$work/sim-cache" > "$work/sim-q8_0.toml"
    args=(simulate --config "$work/sim-q8_0.toml" --devices 40 --heldout-devices 4 --rounds 2 --clients-per-round 4
          --steps 2 --seq-len 32 --methods lora-bp,kseed --seed 5 --threads 1)
    "$seedling" "${args[@]}" --model "$work/sim-q8_0.gguf" --out "$work/sim-gguf" > "$work/sim-gguf.log" 2>&1 \
      || fail "simulate on the GGUF: $(tail -5 "$work/sim-gguf.log")"
    "$seedling" "${args[@]}" --model "$model" --out "$work/sim-dir" \
      > "$work/sim-dir.log" 2>&1 || fail "simulate on the directory: $(tail -5 "$work/sim-dir.log")"
    grep -q '"committed":true' "$work/sim-gguf/rounds.jsonl" || fail "no committed round on the GGUF"
    strip() { sed -E 's/,"wall_seconds":[^,}]*//' "$1"; }
    diff <(strip "$work/sim-gguf/rounds.jsonl") <(strip "$work/sim-dir/rounds.jsonl") \
      || fail "the GGUF and its source with q8_0 weights simulate differently"
    ;;
  simulate-pepita)
    # A federation of forward-only PEPITA devices: the server assigns pepita, devices upload dense LoRA deltas,
    # fedavg aggregates them, and rounds commit.
    "$seedling" simulate --model "$model" --devices 20 --heldout-devices 2 --rounds 2 --clients-per-round 3 \
      --steps 2 --seq-len 32 --methods pepita --seed 5 --threads 1 --out "$work/sim-pepita" > "$work/sim-pepita.log" \
      2>&1 || fail "simulate pepita: $(tail -5 "$work/sim-pepita.log")"
    [ "$(grep -c '"committed":true' "$work/sim-pepita/rounds.jsonl")" -eq 2 ] \
      || fail "pepita rounds did not commit: $(cat "$work/sim-pepita/rounds.jsonl")"
    ;;
  weights-planner)
    # Every representation: the planner's estimate is within 20% of the measured peak (on this 3.5M-parameter
    # model the measured runtime baseline is most of the total; docs/memory.md has 0.5B and 1.1B figures)...
    for weights in fp32 stored q8_0 q4_0; do
      for method in lora-bp mezo; do
        out=$("$seedling" finetune --model "$model" --data "$repo/data/sample/instructions.jsonl" --method $method \
          --weights $weights --cache-dir "$work/planner-cache" --steps 2 --seq-len 128 --heldout 0.02 \
          --out "$work/planner-$weights-$method" 2>/dev/null) || fail "finetune $method --weights $weights"
        peak=$(echo "$out" | json_number peak_rss_bytes); planned=$(echo "$out" | json_number planned_peak_bytes)
        awk -v p="$peak" -v e="$planned" 'BEGIN { d = (e - p) / p; exit !(d < 0.20 && d > -0.20) }' \
          || fail "$method --weights $weights: planned $planned vs measured $peak is off by more than 20%"
        echo "$method --weights $weights: planned $planned, measured $peak"
      done
    done
    # ...and the lightest plan with q4_0 weights keeps its budget.
    err=$("$seedling" finetune --model "$model" --data "$repo/data/sample/instructions.jsonl" --weights q4_0 \
      --cache-dir "$work/planner-cache" --steps 2 --batch 4 --seq-len 128 --memory-budget 1M --out "$work/x" 2>&1 \
      >/dev/null) && fail "1M fit"
    need=$(echo "$err" | sed -n 's/.*the lightest plan needs \([0-9.]*\) MiB.*/\1/p')
    [ -n "$need" ] || fail "no smallest budget in: $err"
    # Each run measures its own runtime baseline, which varies by up to about 2 MiB between runs (what the
    # heap keeps after the warm-up): the budget leaves 4 MiB for that, and the run must still keep it.
    budget=$(awk -v n="$need" 'BEGIN { printf "%d", (n + 4) * 1048576 }')
    out=$("$seedling" finetune --model "$model" --data "$repo/data/sample/instructions.jsonl" --weights q4_0 \
      --cache-dir "$work/planner-cache" --steps 2 --batch 4 --seq-len 128 --memory-budget "$budget" \
      --out "$work/planner-budget" 2>/dev/null) || fail "finetune at the lightest q4_0 budget failed"
    peak=$(echo "$out" | json_number peak_rss_bytes)
    [ "$peak" -le "$budget" ] || fail "peak RSS $peak exceeds the budget $budget: $out"
    # Streamed weights: the plan says so, counts less than the resident weights, and the run trains.
    for stream in off on; do
      out=$("$seedling" finetune --model "$model" --data "$repo/data/sample/instructions.jsonl" --weights q4_0 \
        --cache-dir "$work/planner-cache" --steps 2 --seq-len 128 --stream-weights $stream \
        --out "$work/planner-stream-$stream" 2>/dev/null) || fail "finetune --stream-weights $stream failed"
      expected=false; [ $stream = on ] && expected=true
      grep -q "\"stream_weights\":$expected" <<< "$out" || fail "--stream-weights $stream: $out"
      eval "weights_$stream=$(echo "$out" | json_number weight_bytes)"
      eval "loss_$stream=$(echo "$out" | json_number loss_end)"
    done
    [ "$weights_on" -lt "$weights_off" ] || fail "streamed weights $weights_on not below resident $weights_off"
    [ "$loss_on" = "$loss_off" ] || fail "streaming changed the loss: $loss_off -> $loss_on"
    rm -rf "$work"/planner-*
    ;;
  weights-bad-flags)
    expect_error "--weights must be fp32, stored, q8_0 or q4_0, got 'q5_0'" "$seedling" eval --model "$model" \
      --weights q5_0 --data "$repo/data/sample/eval.jsonl"
    expect_error "--full trains the weights themselves" "$seedling" finetune --model "$model" --method mezo --full \
      --weights q4_0 --data "$repo/data/sample/instructions.jsonl" --out "$work/x"
    expect_error "--stream-weights on: --weights fp32 cannot be streamed" "$seedling" finetune --model "$model" \
      --stream-weights on --data "$repo/data/sample/instructions.jsonl" --out "$work/x"
    ;;
  export-bad-flags)
    expect_error "--format must be safetensors, gguf or gguf-lora" "$seedling" export --model "$model" \
      --format onnx --out "$work/x"
    expect_error "q8_0 and q4_0 are for --format gguf" "$seedling" export --model "$model" --format safetensors \
      --dtype q4_0 --out "$work/x"
    expect_error "--format gguf-lora takes --dtype f32, f16, got 'q8_0'" "$seedling" export --model "$model" \
      --adapter "$work/x" --format gguf-lora --dtype q8_0 --out "$work/x.gguf"
    expect_error "--format gguf takes --dtype f16, f32, q8_0, q4_0, got 'bf16'" "$seedling" export \
      --model "$model" --format gguf --dtype bf16 --out "$work/x.gguf"
    expect_error "give --adapter DIR" "$seedling" export --model "$model" --format gguf-lora --out "$work/x.gguf"
    [ ! -e "$work/x" ] && [ ! -e "$work/x.gguf" ] || fail "a refused export wrote something"
    ;;
  finetune-full-parameters)
    out=$("$seedling" finetune --model "$model" --data "$repo/data/sample/instructions.jsonl" --method mezo --full \
      --steps 3 --seq-len 64 --out "$work/ft-full" 2>/dev/null) || fail "full-parameter mezo failed"
    [ -s "$work/ft-full/model.safetensors" ] && [ -s "$work/ft-full/config.json" ] || fail "no model written"
    "$seedling" eval --model "$work/ft-full" --data "$repo/data/sample/eval.jsonl" >/dev/null || fail "cannot eval it"
    expect_error "full parameters" "$seedling" finetune --model "$model" --data "$repo/data/sample/instructions.jsonl" \
      --method lora-bp --full --steps 1 --out "$work/ft-x"
    expect_error "full parameters" "$seedling" finetune --model "$model" --data "$repo/data/sample/instructions.jsonl" \
      --method pepita --full --steps 1 --out "$work/ft-x"
    ;;
  finetune-bad-data)
    printf '{"text": 1}\nnot json\n' > "$work/allbad.jsonl"
    expect_error "no usable row" "$seedling" finetune --model "$model" --data "$work/allbad.jsonl" --steps 1 \
      --out "$work/ft-bad"
    expect_error "unknown method" "$seedling" finetune --model "$model" --data "$work/allbad.jsonl" --method sgd \
      --steps 1 --out "$work/ft-bad"
    expect_error "--pepita-variant is for --method pepita" "$seedling" finetune --model "$model" \
      --data "$work/allbad.jsonl" --method mezo --pepita-variant mem --steps 1 --out "$work/ft-bad"
    expect_error "--feedback-scale must be > 0" "$seedling" finetune --model "$model" --data "$work/allbad.jsonl" \
      --method pepita --feedback-scale 0 --steps 1 --out "$work/ft-bad"
    expect_error "contradicts --variant" "$seedling" finetune --model "$model" --data "$work/allbad.jsonl" \
      --method pepita --pepita-variant mem --variant pepita --steps 1 --out "$work/ft-bad"
    ;;
  bench-finetune-json)
    out=$("$seedling" bench finetune --preset tiny --seq 32 --steps 1 --seconds 0 --perturbations 2 --work-dir "$work/bench-ft" \
      --data "$repo/data/sample/instructions.jsonl" --json 2>/dev/null) || fail "bench finetune failed"
    lines=$(echo "$out" | grep '^{')
    [ "$(echo "$lines" | wc -l)" -eq 11 ] || fail "expected 11 JSON rows: $out"
    echo "$out" | grep -q "lora-bp (recompute every layer)" || fail "without a budget lora-bp recomputes every layer: $out"
    for name in inference lora-bp lora-bp-no-recompute fwdgrad mezo mezo-in-place mezo-q4 kseed kseed-q4 pepita \
        mempepita; do
      row=$(echo "$lines" | grep "\"name\":\"$name\"") || fail "no row $name: $out"
      for key in tokens_per_second mfu peak_rss_bytes planned_peak_bytes step_tensor_peak_bytes; do
        v=$(echo "$row" | json_number "$key")
        awk -v v="$v" 'BEGIN { exit !(v ~ /^[-0-9.e+]+$/ && v >= 0) }' || fail "$name $key = '$v': $row"
      done
      # The inference row: the warm held-out forward's speed and MFU; nothing trained.
      awk -v v="$(echo "$row" | json_number tokens_per_second)" -v m="$(echo "$row" | json_number mfu)" \
        'BEGIN { exit !(v > 0 && m > 0 && m <= 1) }' || fail "$name has no throughput: $row"
    done
    ;;
  tokenize-round-trip)
    printf 'Hello world, this is Seedling.\n\nZürich: 3 × 4 = 12 — ok?\n  two  spaces\n' > "$work/tok.txt"
    ids=$("$seedling" tokenize --model "$model" --text-file "$work/tok.txt") || fail "tokenize failed"
    [ "$(echo "$ids" | wc -l)" -eq 4 ] || fail "expected one id list per input line: $ids"
    if echo "$ids" | grep -qvE '^\[([0-9]+(,[0-9]+)*)?\]$'; then fail "not JSON lists of ids: $ids"; fi
    [ "$(echo "$ids" | sed -n 2p)" = "[]" ] || fail "an empty line is not []: $ids"
    [ "$(echo "$ids" | sed -n 1p | tr ',' '\n' | wc -l)" -gt 3 ] || fail "too few tokens for line 1: $ids"
    text=$(echo "$ids" | "$seedling" tokenize --model "$model" --decode) || fail "decode failed"
    [ "$text" = "$(cat "$work/tok.txt")" ] || fail "decode(encode(text)) differs: '$text'"
    # The same ids from stdin, from --text and from the tokenizer file alone.
    [ "$("$seedling" tokenize --model "$model" < "$work/tok.txt")" = "$ids" ] || fail "stdin gives other ids"
    [ "$("$seedling" tokenize --tokenizer "$model/tokenizer.json" --text-file "$work/tok.txt")" = "$ids" ] \
      || fail "--tokenizer gives other ids"
    [ "$("$seedling" tokenize --model "$model" --text "Hello world, this is Seedling.")" = "$(echo "$ids" | head -1)" ] \
      || fail "--text gives other ids"
    [ "$("$seedling" tokenize --model "$model" --text "")" = "[]" ] || fail "an empty --text is not []"
    ;;
  tokenize-special)
    # The tiny model's tokenizer (SmolLM2 style) adds no special tokens; a Phi-3-style one prepends <s>.
    [ "$("$seedling" tokenize --model "$model" --text "Hello" --special)" = \
      "$("$seedling" tokenize --model "$model" --text "Hello")" ] || fail "--special changed a tokenizer without BOS"
    "$seedling" init-model --preset tiny-phi3 --out "$work/tok-phi3" --force >/dev/null || fail "init-model tiny-phi3"
    plain=$("$seedling" tokenize --model "$work/tok-phi3" --text "Hello world") || fail "tokenize failed"
    special=$("$seedling" tokenize --model "$work/tok-phi3" --text "Hello world" --special) || fail "--special failed"
    bos=$(echo "$special" | sed -n 's/^\[\([0-9]*\),.*/\1/p')
    [ -n "$bos" ] && [ "$special" = "[$bos,${plain#[}" ] || fail "--special should prepend one id: $plain vs $special"
    [ "$(echo "[$bos]" | "$seedling" tokenize --model "$work/tok-phi3" --decode --special)" = "<s>" ] \
      || fail "id $bos is not <s>"
    [ "$(echo "$special" | "$seedling" tokenize --model "$work/tok-phi3" --decode)" = "Hello world" ] \
      || fail "decode without --special keeps the special token"
    ;;
  tokenize-bad-input)
    expect_error "give --tokenizer FILE or --model DIR" "$seedling" tokenize --text hi
    expect_error "--tokenizer excludes --model" "$seedling" tokenize --model "$model" \
      --tokenizer "$model/tokenizer.json" --text hi
    expect_error "--text excludes --text-file" "$seedling" tokenize --model "$model" --text hi --text-file "$work/x"
    expect_error "--text-file: cannot open '$work/nowhere.txt'" "$seedling" tokenize --model "$model" \
      --text-file "$work/nowhere.txt"
    expect_error "is a directory" "$seedling" tokenize --tokenizer "$model" --text hi
    expect_error "tokenizer.json" "$seedling" tokenize --model "$work/nowhere" --text hi
    printf '[1, 2]\n[3,\n' > "$work/ids.txt"
    expect_error "ids.txt line 2: not valid JSON" "$seedling" tokenize --model "$model" --decode --text-file "$work/ids.txt"
    expect_error "--text line 1: expected a JSON list of token ids, got a JSON object" "$seedling" tokenize \
      --model "$model" --decode --text '{"ids": [1]}'
    expect_error "--text line 2: expected integer token ids, got a JSON string at position 1" "$seedling" tokenize \
      --model "$model" --decode --text $'[1]\n[2, "3"]'
    expect_error "stdin line 3: token id 2048 is out of range (the vocabulary has ids 0 to 2047)" \
      bash -c "printf '[1]\n[]\n[5, 2048]\n' | '$seedling' tokenize --model '$model' --decode"
    expect_error "token id -1 is out of range" "$seedling" tokenize --model "$model" --decode --text "[-1]"
    expect_error "--text line 1: " "$seedling" tokenize --model "$model" --text $'\xff\xfe'
    ;;
  serve-check-config)
    dir="$work/check-config"
    rm -rf "$dir" && mkdir -p "$dir"
    "$seedling" certs init --dir "$dir/certs" --names localhost >/dev/null || fail "certs init failed"
    "$seedling" certs init --dir "$dir/other-certs" --names localhost >/dev/null || fail "certs init failed"
    cat > "$dir/server.toml" <<TOML
[server]
state_dir = "state"
port = 0
http_port = 0
cert_file = "certs/server.crt"
key_file = "certs/server.key"
[model]
dir = "$model"
[training]
method = "lora-bp"
clients_per_round = 2
[lora]
rank = 2
TOML
    out=$("$seedling" serve --config "$dir/server.toml" --check-config) || fail "a valid config failed the check"
    [ "$(echo "$out" | wc -l)" -eq 1 ] || fail "not one summary line: $out"
    echo "$out" | grep -q "server.toml: ok: lora-bp with fedavg, model [0-9a-f]\{12\}, adapter of [1-9][0-9]* parameters" \
      || fail "summary: $out"
    [ ! -e "$dir/state" ] || fail "--check-config created the state directory"
    # Each broken variant fails with the message serve would give, and creates nothing.
    check_broken() {  # <message> <sed expression>
      sed "$2" "$dir/server.toml" > "$dir/broken.toml"
      expect_error "$1" "$seedling" serve --config "$dir/broken.toml" --check-config
    }
    check_broken "[lora] rnak: is not a known key" 's/^rank = 2/rnak = 2/'
    check_broken "does not match the certificate" 's#key_file = "certs/#key_file = "other-certs/#'
    check_broken "cert_file '$dir/certs/ca.key' holds no PEM certificate" 's#certs/server.crt#certs/ca.key#'
    check_broken "[server] key_file: cannot open '$dir/certs/nokey.pem'" 's#certs/server.key#certs/nokey.pem#'
    check_broken "[model] dir: cannot open '$work/nowhere/config.json'" "s#^dir = .*#dir = \"$work/nowhere\"#"
    check_broken "unknown LoRA target 'nothing'" 's/^rank = 2/targets = ["nothing"]/'
    touch "$dir/afile"
    check_broken "'$dir/afile' exists and is not a directory" 's#state_dir = "state"#state_dir = "afile/state"#'
    [ ! -e "$dir/state" ] || fail "a failed check created the state directory"
    rm -rf "$dir"
    ;;
  ops-grafana-dashboard)
    # Every seedling_* metric the example dashboard queries is one the server registers, and it shows them all.
    dashboard="$repo/examples/ops/grafana-dashboard.json"
    if command -v python3 >/dev/null 2>&1; then
      python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$dashboard" || fail "not valid JSON: $dashboard"
    fi
    [ "$(grep -c '"expr": *"[^"]*seedling_' "$dashboard")" -ge 10 ] || fail "too few queries in $dashboard"
    exported=$(cat "$repo"/server/*.cpp | tr -d ' \n' | grep -oE 'Add(Counter|Gauge|Histogram)\("seedling_[a-z0-9_]+"' \
      | grep -oE 'seedling_[a-z0-9_]+' | sort -u)
    [ "$(echo "$exported" | wc -l)" -ge 10 ] || fail "found too few registered metrics in server/: $exported"
    used=$(grep -oE 'seedling_[a-z0-9_]+' "$dashboard" | sort -u)
    for metric in $used; do
      base=$(echo "$metric" | sed -E 's/_(bucket|sum|count)$//')
      grep -qx "$metric" <<< "$exported" || grep -qx "$base" <<< "$exported" \
        || fail "the dashboard queries $metric, which the server does not export (server/*.cpp)"
    done
    for metric in $exported; do
      grep -qx "$metric" <<< "$used" || fail "the server exports $metric but the dashboard does not show it"
    done
    ;;
  ops-systemd-unit)
    # The example unit checks the config before starting and passes only flags the binary takes.
    unit="$repo/examples/ops/seedling-server.service"
    grep -q '^ExecStartPre=.* serve .*--check-config' "$unit" || fail "no ExecStartPre running serve --check-config"
    for key in User StateDirectory Restart NoNewPrivileges ProtectSystem PrivateTmp; do
      grep -q "^$key=" "$unit" || fail "the unit does not set $key"
    done
    help_text=$("$seedling" serve --help && "$seedling" --help) || fail "--help failed"
    for flag in $(grep -E '^Exec' "$unit" | grep -oE -- '--[a-z-]+' | sort -u); do
      grep -qF -- "$flag" <<< "$help_text" || fail "the unit passes $flag, which seedling does not take"
    done
    if command -v systemd-analyze >/dev/null 2>&1; then
      sed "s#/usr/local/bin/seedling#$seedling#g" "$unit" > "$work/seedling-server.service"
      err=$(systemd-analyze verify "$work/seedling-server.service" 2>&1) || fail "systemd-analyze verify: $err"
      [ -z "$err" ] || fail "systemd-analyze verify: $err"
    fi
    ;;
  help)
    for cmd in init-model eval generate finetune export "bench forward" tokenize serve; do
      # shellcheck disable=SC2086
      grep -q "Usage" <<< "$("$seedling" $cmd --help)" || fail "no usage for $cmd"
    done
    ;;
  *) fail "unknown case $case_name" ;;
esac
echo "ok: $case_name"
