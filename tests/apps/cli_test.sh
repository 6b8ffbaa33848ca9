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
  help)
    for cmd in init-model eval generate "bench forward"; do
      # shellcheck disable=SC2086
      "$seedling" $cmd --help | grep -q "Usage" || fail "no usage for $cmd"
    done
    ;;
  *) fail "unknown case $case_name" ;;
esac
echo "ok: $case_name"
