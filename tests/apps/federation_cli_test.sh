#!/usr/bin/env bash
# End-to-end federation through the command line: `seedling serve` and device processes on loopback TLS.
# Usage: federation_cli_test.sh <case> <seedling binary> <work dir> <repo> [client_c binary]
#   federation  init-model, certs init, devices add (x2), serve a one-round config, two `seedling client`
#               processes; the round commits and serve exits 0 by itself. Restarted, it reports the
#               committed round over HTTP (/api/status, /healthz), the same devices complete round 2
#               (/api/status, /metrics), a device added while it runs is counted at once, and serve exits
#               0 on SIGTERM.
#   client-cancel  SIGINT to a training `seedling client` cancels the run at the next step: it exits 0
#               promptly, prints the cancelled outcome and leaves a checkpoint to resume from.
#   client-straggler  with over-selection, a device stopped mid-training while another completes the
#               round gets STALE for its late upload: `seedling client` prints the dropped outcome, checks in
#               again, uploads in round 2 and exits 0 (a straggler's fate is routine, not an error).
#   client-c    the examples/client_c program (the C SDK) completes a one-client round against serve, and
#               reports a wrong token as UNAUTHENTICATED with exit status 1.
#   client-jvm  org.seedling.Client (bindings/jvm) on the host JVM: a bad config throws with the SDK's message,
#               cancel() from another thread stops a running runOnce, and runOnce completes a round.
#   gguf-model  serve with a Q8_0 GGUF export of the model as its base ([model] weights = "q8_0"): a device
#               holding the GGUF and one holding the source directory (which builds its q8_0 cache) both
#               train and upload, and the round commits.
# Every case uses its own work directory and the OS's choice of TLS port (port 0 + --port-file), so
# parallel ctest runs do not clash; everything runs under `timeout`.
set -uo pipefail
case_name="$1"; seedling="$2"; work="$3/$1"; repo="$4"; client_c="${5:-}"

server_pid=""
client_pid=""
# On any exit: stop a client and a server still running. $server_pid is the `timeout` wrapper, which passes
# TERM on.
cleanup() {
  [ -n "$client_pid" ] && kill -KILL "$client_pid" 2>/dev/null
  [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null || return 0
  kill -TERM "$server_pid" 2>/dev/null
  for _ in $(seq 1 100); do kill -0 "$server_pid" 2>/dev/null || return 0; sleep 0.1; done
  pkill -KILL -P "$server_pid" 2>/dev/null
  kill -KILL "$server_pid" 2>/dev/null
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*" >&2
  for f in "$work"/*.log; do [ -f "$f" ] && { echo "--- $f" >&2; tail -n 30 "$f" >&2; }; done
  exit 1
}

# A free TCP port for the HTTP server (http_port = 0 turns HTTP off, so the port is chosen here).
free_port() {
  if command -v python3 >/dev/null 2>&1; then
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
  else
    echo $((20000 + RANDOM % 40000))
  fi
}

# write_server_config <file> <clients_per_round> <rounds> <http_port>
write_server_config() {
  cat > "$1" <<EOF
[server]
state_dir = "$work/state"
port = 0
http_port = $4
cert_file = "$work/certs/server.crt"
key_file = "$work/certs/server.key"
tick_ms = 50
[model]
dir = "${server_model:-$work/model}"
[training]
method = "lora-bp"
rounds = $3
clients_per_round = $2
over_selection = 1.0
selection_window_s = 60  # selection closes early once every task is handed out
round_deadline_s = 120
steps = 2
batch = 1
seq_len = 32
codec = "int8"
[lora]
rank = 2
[retry]
base_seconds = 1
jitter = 0.0
EOF
}

# start_server <config> <log>: starts serve in the background and waits for its port file.
start_server() {
  rm -f "$work/ports.json"
  timeout -s KILL 150 "$seedling" serve --config "$1" --port-file "$work/ports.json" > "$2" 2>&1 &
  server_pid=$!
  for _ in $(seq 1 200); do
    [ -s "$work/ports.json" ] && break
    kill -0 "$server_pid" 2>/dev/null || fail "serve exited before writing its port file"
    sleep 0.05
  done
  [ -s "$work/ports.json" ] || fail "no port file from serve"
  port=$(jq -r .port "$work/ports.json")
  http_port=$(jq -r .http_port "$work/ports.json")
  [ "$port" -gt 0 ] 2>/dev/null || fail "bad TLS port in $(cat "$work/ports.json")"
}

# wait_server <seconds>: waits for serve to exit and sets server_rc.
wait_server() {
  local deadline=$((SECONDS + $1))
  while kill -0 "$server_pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
  kill -0 "$server_pid" 2>/dev/null && fail "serve did not exit within $1 s"
  wait "$server_pid"; server_rc=$?
  server_pid=""
}

# register <device>: prints the device's token.
register() {
  local out
  out=$(timeout 30 "$seedling" devices add --config "$work/server.toml" --id "$1" --json) || fail "devices add $1"
  echo "$out" | jq -er --arg d "$1" '.[$d]' || fail "no token for $1 in: $out"
}

setup() {
  rm -rf "$work" && mkdir -p "$work"
  timeout 60 "$seedling" init-model --preset tiny --out "$work/model" --seed 3 > /dev/null || fail "init-model"
  timeout 30 "$seedling" certs init --dir "$work/certs" > "$work/certs.out" || fail "certs init"
  for f in ca.crt server.crt server.key; do [ -s "$work/certs/$f" ] || fail "certs init wrote no $f"; done
}

# write_client_config <i> [model]: $work/client<i>.toml for device dev<i> with token $tok<i>.
write_client_config() {
  local i="$1" tok_var="tok$1" model="${2:-$work/model}"
  cat > "$work/client$i.toml" <<EOF
[client]
host = "127.0.0.1"
port = $port
ca_file = "$work/certs/ca.crt"
server_name = "localhost"
device_id = "dev$i"
token = "${!tok_var}"
state_dir = "$work/client$i"
model_dir = "$model"
data_path = "$repo/data/sample/instructions.jsonl"
backoff_base_s = 0.05
backoff_max_s = 0.5
EOF
}

# run_clients <round> [model of dev0] [model of dev1]: one `seedling client --rounds 1` process per device;
# each must upload in <round>.
run_clients() {
  local pids=() i models=("${2:-$work/model}" "${3:-$work/model}")
  for i in 0 1; do
    write_client_config "$i" "${models[$i]}"
    timeout 120 "$seedling" client --config "$work/client$i.toml" --rounds 1 --max-wait 60 \
      > "$work/client$i-r$1.out" 2> "$work/client$i-r$1.log" &
    pids+=($!)
  done
  for i in 0 1; do
    wait "${pids[$i]}" || fail "client $i exited with an error in round $1: $(cat "$work/client$i-r$1.out")"
    grep '"outcome":"uploaded"' "$work/client$i-r$1.out" | grep -q "\"round\":$1[,}]" \
      || fail "client $i did not upload in round $1: $(cat "$work/client$i-r$1.out")"
    [ "$(wc -l < "$work/client$i/acks.jsonl")" -eq "$1" ] || fail "client $i: acks.jsonl should hold $1 line(s)"
  done
}

case "$case_name" in
  federation)
    setup
    write_server_config "$work/server.toml" 2 1 "$(free_port)"
    tok0=$(register dev0) || exit 1
    tok1=$(register dev1) || exit 1
    [ -n "$tok0" ] && [ "$tok0" != "$tok1" ] || fail "tokens: '$tok0' '$tok1'"
    # A device id can be registered once.
    timeout 30 "$seedling" devices add --config "$work/server.toml" --id dev0 > /dev/null 2>&1 \
      && fail "registering dev0 twice succeeded"

    # rounds = 1: once both devices reported, the round commits and serve stops by itself.
    start_server "$work/server.toml" "$work/serve1.log"
    run_clients 1
    wait_server 60
    [ "$server_rc" -eq 0 ] || fail "serve exited with $server_rc"
    grep -q "stopped at global version 1" "$work/serve1.log" || fail "serve did not commit version 1"

    # Restarted (rounds = 0: until stopped), the server still holds the committed round ...
    write_server_config "$work/server-again.toml" 2 0 "$(free_port)"
    start_server "$work/server-again.toml" "$work/serve2.log"
    [ "$http_port" -gt 0 ] 2>/dev/null || fail "no HTTP port in $(cat "$work/ports.json")"
    status=$(timeout 10 curl -sf "http://127.0.0.1:$http_port/api/status") || fail "GET /api/status"
    echo "$status" | jq -e '.global_version == 1' > /dev/null || fail "global_version is not 1: $status"
    echo "$status" | jq -e '[.recent[] | select(.round_id == 1 and .state == "committed" and .accepted == 2)] | length == 1' \
      > /dev/null || fail "round 1 is not committed with 2 updates: $status"
    echo "$status" | jq -e '.devices_registered == 2' > /dev/null || fail "devices_registered: $status"
    timeout 10 curl -sf "http://127.0.0.1:$http_port/healthz" > /dev/null || fail "GET /healthz"
    # ... the same devices (synced to version 1) complete the next round ...
    run_clients 2
    for _ in $(seq 1 100); do
      status=$(timeout 10 curl -sf "http://127.0.0.1:$http_port/api/status") || fail "GET /api/status"
      echo "$status" | jq -e '.global_version == 2' > /dev/null && break
      sleep 0.1
    done
    echo "$status" | jq -e '.global_version == 2' > /dev/null || fail "round 2 did not commit: $status"
    metrics=$(timeout 10 curl -sf "http://127.0.0.1:$http_port/metrics") || fail "GET /metrics"
    for want in 'seedling_global_version 2' 'seedling_updates_accepted_total 2' \
                'seedling_rounds_total{outcome="committed"} 1'; do
      echo "$metrics" | grep -qxF "$want" || fail "no '$want' in /metrics: $(echo "$metrics" | grep -v '^#')"
    done
    # ... a device registered while it runs is known to it at once (no restart) ...
    tok2=$(register dev2) || exit 1
    [ -n "$tok2" ] || fail "no token for dev2"
    status=$(timeout 10 curl -sf "http://127.0.0.1:$http_port/api/status") || fail "GET /api/status"
    echo "$status" | jq -e '.devices_registered == 3' > /dev/null || fail "dev2 not seen by the running server: $status"
    grep -qx dev2 <<< "$(timeout 30 "$seedling" devices list --config "$work/server.toml")" || fail "devices list lacks dev2"
    grep -qx "dev2 revoked" <<< "$(timeout 30 "$seedling" devices revoke --config "$work/server.toml" --id dev2)" \
      || fail "devices revoke dev2"
    grep -qx "dev2 revoked" <<< "$(timeout 30 "$seedling" devices list --config "$work/server.toml")" || fail "dev2 not listed as revoked"
    timeout 30 "$seedling" devices revoke --config "$work/server.toml" --id nosuch > /dev/null 2>&1 \
      && fail "revoking an unknown device succeeded"
    rotated=$(timeout 30 "$seedling" devices rotate --config "$work/server.toml" --id dev0 --json) || fail "devices rotate dev0"
    new0=$(echo "$rotated" | jq -er '.dev0') || fail "no new token in: $rotated"
    [ "$new0" != "$tok0" ] || fail "rotate returned the old token"
    timeout 30 "$seedling" devices rotate --config "$work/server.toml" --id dev2 > /dev/null 2>&1 \
      && fail "rotating a revoked device succeeded"
    # ... and SIGTERM stops it cleanly.
    kill -TERM "$server_pid"
    wait_server 30
    [ "$server_rc" -eq 0 ] || fail "serve exited with $server_rc after SIGTERM"
    grep -q "stopped at global version 2" "$work/serve2.log" || fail "serve did not stop cleanly at version 2"
    ;;
  client-straggler)
    setup
    write_server_config "$work/server.toml" 1 2 0
    sed -i 's/^over_selection = 1.0$/over_selection = 2.0/; s/^steps = 2$/steps = 40/' "$work/server.toml"
    tok0=$(register dev0) || exit 1
    tok1=$(register dev1) || exit 1
    start_server "$work/server.toml" "$work/serve.log"
    write_client_config 0
    write_client_config 1
    # dev1 takes one of round 1's two tasks and is frozen while it trains ...
    timeout 120 "$seedling" client --config "$work/client1.toml" --rounds 1 --max-wait 60 \
      > "$work/client1.out" 2> "$work/client1.log" &
    client_pid=$!
    for _ in $(seq 1 1000); do
      jq -e '.phase == "training"' "$work/client1/state.json" > /dev/null 2>&1 && break
      sleep 0.01
    done
    pkill -STOP -P "$client_pid"  # the client itself: $client_pid is its `timeout`, which does not pass STOP on
    jq -e '.phase == "training"' "$work/client1/state.json" > /dev/null 2>&1 || fail "dev1 never started training"
    # ... dev0 takes the other task and completes the round alone (1 report wanted) ...
    timeout 120 "$seedling" client --config "$work/client0.toml" --rounds 1 --max-wait 60 \
      > "$work/client0.out" 2> "$work/client0.log" || fail "dev0 failed: $(cat "$work/client0.out")"
    grep '"outcome":"uploaded"' "$work/client0.out" | grep -q '"round":1[,}]' || fail "dev0: $(cat "$work/client0.out")"
    # ... so dev1's upload comes after round 1 closed: dropped, then it checks in and uploads in round 2.
    pkill -CONT -P "$client_pid"
    wait "$client_pid"; rc=$?; client_pid=""
    [ "$rc" -eq 0 ] || fail "the straggler exited with $rc: $(cat "$work/client1.out")"
    grep '"outcome":"dropped"' "$work/client1.out" | grep -q 'STALE' || fail "no dropped outcome: $(cat "$work/client1.out")"
    grep '"outcome":"uploaded"' "$work/client1.out" | grep -q '"round":2[,}]' || fail "dev1 did not upload in round 2: $(cat "$work/client1.out")"
    grep '"outcome":"uploaded"' "$work/client1.out" | grep -q '"weights":"fp32"' || fail "no weights in: $(cat "$work/client1.out")"
    wait_server 60
    [ "$server_rc" -eq 0 ] || fail "serve exited with $server_rc"
    grep -q "stopped at global version 2" "$work/serve.log" || fail "serve did not commit version 2"
    ;;
  client-c)
    [ -x "$client_c" ] || fail "no client_c binary: '$client_c'"
    setup
    write_server_config "$work/server.toml" 1 1 0
    tok=$(register phone) || exit 1
    start_server "$work/server.toml" "$work/serve.log"
    config=$(jq -cn --arg port "$port" --arg ca "$work/certs/ca.crt" --arg tok "$tok" --arg state "$work/phone" \
      --arg model "$work/model" --arg data "$repo/data/sample/instructions.jsonl" \
      '{host: "127.0.0.1", port: ($port | tonumber), ca_file: $ca, server_name: "localhost", device_id: "phone",
        token: $tok, state_dir: $state, model_dir: $model, data_path: $data, backoff_base_s: 0.05}')
    out=$(timeout 120 "$client_c" "$config" 1 2> "$work/client_c.log") || fail "client_c exited with $?: $out"
    echo "$out" | grep -Eq '^round 1: uploaded [1-9][0-9]* bytes, loss [0-9.]+ -> [0-9.]+$' || fail "client_c printed: $out"
    wait_server 60
    [ "$server_rc" -eq 0 ] || fail "serve exited with $server_rc"
    grep -q "stopped at global version 1" "$work/serve.log" || fail "serve did not commit version 1"
    # A wrong token: client_c reports the SDK's error and exits 1.
    bad=$(echo "$config" | jq -c '.token = "wrong" | .state_dir += "-bad"')
    write_server_config "$work/server-again.toml" 1 0 0
    start_server "$work/server-again.toml" "$work/serve2.log"
    bad=$(echo "$bad" | jq -c --arg port "$port" '.port = ($port | tonumber)')
    timeout 60 "$client_c" "$bad" 1 > /dev/null 2> "$work/client_c_bad.log" && fail "client_c with a wrong token succeeded"
    grep -q "UNAUTHENTICATED" "$work/client_c_bad.log" || fail "no UNAUTHENTICATED error: $(cat "$work/client_c_bad.log")"
    kill -TERM "$server_pid"
    wait_server 30
    [ "$server_rc" -eq 0 ] || fail "serve exited with $server_rc after SIGTERM"
    ;;
  client-jvm)
    # org.seedling.Client on the host JVM (bindings/jvm/test/ClientTest.java): $5 is the class path (seedling.jar
    # and the tests' jar), $6 the folder holding libseedling_jni.so and libseedling_client.so.
    classpath="${5:-}"; libpath="${6:-}"
    [ -n "$classpath" ] && [ -d "$libpath" ] || fail "client-jvm needs a class path and a library folder"
    jvm() { timeout 120 java -Djava.library.path="$libpath" -cp "$classpath" ClientTest "$@"; }
    out=$(jvm bad-config 2>&1) || fail "bad-config: $out"
    setup
    # A round long enough to interrupt: cancel() from another thread stops runOnce mid-run.
    write_server_config "$work/server.toml" 1 1 0
    sed -i 's/^steps = 2$/steps = 3000/' "$work/server.toml"
    tok=$(register phone) || exit 1
    start_server "$work/server.toml" "$work/serve.log"
    config=$(jq -cn --arg port "$port" --arg ca "$work/certs/ca.crt" --arg tok "$tok" --arg state "$work/phone" \
      --arg model "$work/model" --arg data "$repo/data/sample/instructions.jsonl" \
      '{host: "127.0.0.1", port: ($port | tonumber), ca_file: $ca, server_name: "localhost", device_id: "phone",
        token: $tok, state_dir: $state, model_dir: $model, data_path: $data, backoff_base_s: 0.05,
        checkpoint_every: 2}')
    out=$(jvm cancel "$config" 2>&1) || fail "cancel: $out"
    echo "$out" | grep -q "^cancel: ok" || fail "cancel printed: $out"
    kill -TERM "$server_pid"
    wait_server 30
    # A short round on a fresh server: runOnce uploads.
    rm -rf "$work/state"
    write_server_config "$work/server.toml" 1 1 0
    tok=$(register phone) || exit 1
    start_server "$work/server.toml" "$work/serve2.log"
    config=$(echo "$config" | jq -c --arg port "$port" --arg tok "$tok" --arg state "$work/phone2" \
      '.port = ($port | tonumber) | .token = $tok | .state_dir = $state')
    out=$(jvm round "$config" 2>&1) || fail "round: $out"
    echo "$out" | grep -Eq '^round 1: uploaded [1-9][0-9]* bytes, loss [0-9.]+ -> [0-9.]+$' || fail "round printed: $out"
    wait_server 60
    [ "$server_rc" -eq 0 ] || fail "serve exited with $server_rc"
    grep -q "stopped at global version 1" "$work/serve2.log" || fail "serve did not commit version 1"
    ;;
  client-cancel)
    setup
    write_server_config "$work/server.toml" 1 1 0
    sed -i 's/^steps = 2$/steps = 3000/' "$work/server.toml"  # a round long enough to interrupt
    tok=$(register phone) || exit 1
    start_server "$work/server.toml" "$work/serve.log"
    cat > "$work/phone.toml" <<EOF
[client]
host = "127.0.0.1"
port = $port
ca_file = "$work/certs/ca.crt"
server_name = "localhost"
device_id = "phone"
token = "$tok"
state_dir = "$work/phone"
model_dir = "$work/model"
data_path = "$repo/data/sample/instructions.jsonl"
backoff_base_s = 0.05
checkpoint_every = 2
EOF
    timeout 120 "$seedling" client --config "$work/phone.toml" --rounds 1 > "$work/phone.out" 2> "$work/phone.log" &
    client_pid=$!
    for _ in $(seq 1 600); do [ -s "$work/phone/checkpoint.json" ] && break; sleep 0.05; done
    [ -s "$work/phone/checkpoint.json" ] || fail "the client wrote no training checkpoint"
    # Ctrl-C: the client cancels the run at the next step (checkpointed) and exits 0 well before 3,000 steps.
    kill -INT "$client_pid"
    deadline=$((SECONDS + 20))
    while kill -0 "$client_pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    kill -0 "$client_pid" 2>/dev/null && fail "the client did not stop within 20 s of SIGINT"
    wait "$client_pid"; rc=$?; client_pid=""
    [ "$rc" -eq 0 ] || fail "the client exited with $rc after SIGINT"
    grep -q '"outcome":"cancelled"' "$work/phone.out" || fail "no cancelled outcome: $(cat "$work/phone.out")"
    jq -e '.phase == "training"' "$work/phone/state.json" > /dev/null || fail "state after cancel: $(cat "$work/phone/state.json")"
    steps=$(jq -r .steps "$work/phone/checkpoint.json")
    [ "$steps" -ge 2 ] && [ "$steps" -lt 3000 ] || fail "checkpoint at step $steps"
    kill -TERM "$server_pid"
    wait_server 30
    ;;
  gguf-model)
    setup
    timeout 60 "$seedling" export --model "$work/model" --format gguf --dtype q8_0 --out "$work/model-q8_0.gguf" \
      > /dev/null || fail "export q8_0"
    server_model="$work/model-q8_0.gguf"
    write_server_config "$work/server.toml" 2 1 0
    sed -i 's/^\[model\]$/[model]\nweights = "q8_0"/' "$work/server.toml"
    tok0=$(register dev0) || exit 1
    tok1=$(register dev1) || exit 1
    start_server "$work/server.toml" "$work/serve.log"
    run_clients 1 "$work/model-q8_0.gguf" "$work/model"
    for i in 0 1; do
      grep '"outcome":"uploaded"' "$work/client$i-r1.out" | grep -q '"weights":"q8_0"' \
        || fail "client $i did not train with q8_0 weights: $(cat "$work/client$i-r1.out")"
    done
    [ -s "$work/client1/model-cache/weights-q8_0.safetensors" ] || fail "the directory's device built no q8_0 cache"
    [ -e "$work/client0/model-cache" ] && fail "the GGUF's device built a cache it does not need"
    wait_server 60
    [ "$server_rc" -eq 0 ] || fail "serve exited with $server_rc"
    grep -q "stopped at global version 1" "$work/serve.log" || fail "serve did not commit version 1"
    ;;
  *)
    fail "unknown case '$case_name'"
    ;;
esac
echo "ok: $case_name"
