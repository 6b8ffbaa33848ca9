#!/usr/bin/env bash
# End-to-end checks of `seedling privacy`. Usage: privacy_cli_test.sh <case> <seedling binary>
set -uo pipefail
case_name="$1"; seedling="$2"

fail() { echo "FAIL: $*" >&2; exit 1; }
# expect_error <substring> <command...>: the command must exit non-zero with a "seedling: error:" line containing it.
expect_error() {
  local want="$1"; shift
  local err
  if err=$("$@" 2>&1 >/dev/null); then fail "expected failure: $*"; fi
  echo "$err" | grep -q "seedling: error:" || fail "no 'seedling: error:' line in: $err"
  echo "$err" | grep -qF -- "$want" || fail "error '$err' does not mention '$want'"
}
json_number() { sed -n "s/.*\"$1\":\([-0-9.e+]*\).*/\1/p"; }
# within <value> <expected> <relative tolerance>
within() { awk -v v="$1" -v e="$2" -v t="$3" 'BEGIN { d = v - e; if (d < 0) d = -d; exit !(v != "" && d <= t * e) }'; }

case "$case_name" in
  epsilon-opacus)
    # Opacus' reference: q = 0.04, σ = 1.5, 2250 steps, δ = 1e-5 → ε = 7.32911117143.
    out=$("$seedling" privacy epsilon --sampling-rate 0.04 --noise-multiplier 1.5 --steps 2250 --delta 1e-5) \
      || fail "privacy epsilon failed"
    [ "$(echo "$out" | wc -l)" -eq 1 ] || fail "expected one line: $out"
    eps=$(echo "$out" | json_number epsilon)
    order=$(echo "$out" | json_number order)
    within "$eps" 7.32911117143 0.01 || fail "epsilon $eps not within 1% of 7.3291: $out"
    [ -n "$order" ] || fail "no order: $out"
    classic=$("$seedling" privacy epsilon --sampling-rate 0.04 --noise-multiplier 1.5 --steps 2250 --delta 1e-5 \
              --conversion classic | json_number epsilon)
    awk -v c="$classic" -v b="$eps" 'BEGIN { exit !(c > b) }' || fail "classic $classic not above balle2020 $eps"
    ;;
  noise-for-round-trip)
    out=$("$seedling" privacy noise-for --epsilon 7.32911117143 --sampling-rate 0.04 --steps 2250 --delta 1e-5) \
      || fail "privacy noise-for failed"
    sigma=$(echo "$out" | json_number noise_multiplier)
    within "$sigma" 1.5 0.005 || fail "noise multiplier $sigma not within 0.5% of 1.5: $out"
    ;;
  bad-flags)
    expect_error "sampling rate must be in [0, 1], got 2" \
      "$seedling" privacy epsilon --sampling-rate 2 --noise-multiplier 1 --steps 10 --delta 1e-5
    expect_error "delta must be in (0, 1), got 0" \
      "$seedling" privacy epsilon --sampling-rate 0.1 --noise-multiplier 1 --steps 10 --delta 0
    expect_error "--noise-multiplier is required" \
      "$seedling" privacy epsilon --sampling-rate 0.1 --steps 10 --delta 1e-5
    expect_error "unknown epsilon conversion 'renyi'" \
      "$seedling" privacy epsilon --sampling-rate 0.1 --noise-multiplier 1 --steps 10 --delta 1e-5 --conversion renyi
    expect_error "target epsilon must be finite and > 0, got -1" \
      "$seedling" privacy noise-for --epsilon -1 --sampling-rate 0.1 --steps 10 --delta 1e-5
    ;;
  ftrl)
    # Hand-computed (docs/methods.md, "DP-FTRL"): R = 4, z = 2, 10 rounds → 8 levels, ρ = 1,
    # ε(1e-10) = 1 + 2√(ln 1e10) = 10.5970518; ε(1e-5) = 1 + 2√(ln 1e5) = 7.7861404.
    out=$("$seedling" privacy ftrl --steps 10 --tree-restart-rounds 4 --noise-multiplier 2 --delta 1e-5) \
      || fail "privacy ftrl failed"
    within "$(echo "$out" | json_number rho)" 1 1e-9 || fail "rho not 1: $out"
    within "$(echo "$out" | json_number epsilon)" 7.7861404 1e-6 || fail "epsilon not 7.7861: $out"
    within "$(echo "$out" | sed -n 's/.*"epsilon_delta_1e-10":\([-0-9.e+]*\).*/\1/p')" 10.5970518 1e-6 \
      || fail "epsilon at 1e-10 not 10.597: $out"
    k2=$("$seedling" privacy ftrl --steps 10 --tree-restart-rounds 4 --noise-multiplier 2 --participations 2 \
         --delta 1e-5 | json_number rho)
    within "$k2" 4 1e-9 || fail "rho with k = 2 not 4: $k2"
    expect_error "rounds per tree must be in [1," \
      "$seedling" privacy ftrl --steps 10 --tree-restart-rounds 0 --noise-multiplier 2 --delta 1e-5
    ;;
  *) fail "unknown case $case_name" ;;
esac
echo "ok: $case_name"
