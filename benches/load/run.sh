#!/usr/bin/env bash
# Load benchmark: the same simulated upstream (`gatehouse mock-upstream`) reached directly,
# through nginx (plain proxy_pass, keepalive upstream) and through gatehouse, driven by oha
# at fixed rates (with latency correction) and at maximum throughput. Prints one Markdown
# table on stdout; progress goes to stderr; raw results stay in a tempdir (printed at the end).
#
#   bash benches/load/run.sh            # full run: 6 targets x (500, 2000, 5000 req/s + max), 10 s each (~5 min)
#   bash benches/load/run.sh --quick    # smoke test: 1 s runs at 200 req/s + max (~15 s after the build)
#   bash benches/load/run.sh --soak     # also: gatehouse generate at SOAK_RATE for SOAK_SECONDS, RSS over time
#
# Environment (all optional):
#   GATEHOUSE_BIN      use this gatehouse binary instead of building target/release/gatehouse
#   LOAD_RATES         fixed rates, e.g. "500 2000 5000"     LOAD_DURATION  per run, e.g. 10s
#   LOAD_CONCURRENCY   oha connections (default 32)
#   SOAK_SECONDS       default 300 (10 with --quick)         SOAK_RATE      default 1000 (100 with --quick)
#   OHA, NGINX         paths of the tools; LOAD_NO_INSTALL=1 fails instead of installing missing ones
#   LOAD_SYNCHRONOUS   the ledger's [store] synchronous for gatehouse: full (default) or normal
#
# Everything listens on 127.0.0.1 on free ports; nothing else is contacted.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
LIB="$HERE/loadlib.py"

log() { echo "[load] $*" >&2; }
die() {
    echo "run.sh: error: $*" >&2
    exit 1
}
usage() { sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

MODE=full
SOAK=0
for arg in "$@"; do
    case "$arg" in
        --quick) MODE=quick ;;
        --soak) SOAK=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) die "unknown option '$arg' (expected --quick, --soak or --help)" ;;
    esac
done

if [[ $MODE == quick ]]; then
    RATES=${LOAD_RATES:-200}
    DURATION=${LOAD_DURATION:-1s}
    SOAK_SECONDS=${SOAK_SECONDS:-10}
    SOAK_RATE=${SOAK_RATE:-100}
    PAUSE=0.3
else
    RATES=${LOAD_RATES:-500 2000 5000}
    DURATION=${LOAD_DURATION:-10s}
    SOAK_SECONDS=${SOAK_SECONDS:-300}
    SOAK_RATE=${SOAK_RATE:-1000}
    # Between rows: connections close and the "after" RSS settles.
    PAUSE=1
fi
CONCURRENCY=${LOAD_CONCURRENCY:-32}
for rate in $RATES; do
    [[ $rate =~ ^[1-9][0-9]*$ ]] || die "LOAD_RATES: expected positive integers, got '$rate'"
done
[[ $CONCURRENCY =~ ^[1-9][0-9]*$ ]] || die "LOAD_CONCURRENCY: expected a positive integer, got '$CONCURRENCY'"
[[ $SOAK_SECONDS =~ ^[1-9][0-9]*$ ]] || die "SOAK_SECONDS: expected a positive integer, got '$SOAK_SECONDS'"
[[ $SOAK_RATE =~ ^[1-9][0-9]*$ ]] || die "SOAK_RATE: expected a positive integer, got '$SOAK_RATE'"

# ---- tools ------------------------------------------------------------------------------

command -v python3 >/dev/null || die "python3 not found (needed to parse oha's output; stdlib only)"

can_install() { [[ ${LOAD_NO_INSTALL:-0} != 1 ]]; }

NGINX=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}
if [[ ! -x $NGINX ]]; then
    if can_install && [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
        log "nginx not found: installing the Debian package (apt-get install nginx)"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx; } >&2 ||
            die "apt-get install nginx failed"
        NGINX=$(command -v nginx || echo /usr/sbin/nginx)
    fi
    [[ -x $NGINX ]] || die "nginx not found: install it (Debian: apt-get install nginx) or set NGINX=/path/to/nginx"
fi

OHA=${OHA:-$(command -v oha || echo "${CARGO_HOME:-$HOME/.cargo}/bin/oha")}
if [[ ! -x $OHA ]]; then
    command -v cargo >/dev/null && can_install ||
        die "oha not found: install it with 'cargo install oha --locked' or set OHA=/path/to/oha"
    log "oha not found: 'cargo install oha --locked' (a release build: about 10 minutes on 2 cores)"
    cargo install oha --locked >&2 || die "cargo install oha failed"
    OHA="${CARGO_HOME:-$HOME/.cargo}/bin/oha"
fi
"$OHA" --help | grep -q -- '--output-format' ||
    die "$OHA is too old: it has no --output-format (cargo install oha --locked --force)"

if [[ -n ${GATEHOUSE_BIN:-} ]]; then
    BIN=$GATEHOUSE_BIN
    [[ -x $BIN ]] || die "GATEHOUSE_BIN=$BIN is not an executable"
else
    command -v cargo >/dev/null || die "cargo not found (or set GATEHOUSE_BIN to a built gatehouse)"
    log "building gatehouse (cargo build --release --locked --bin gatehouse)"
    (cd "$ROOT" && cargo build --release --locked --bin gatehouse >&2) || die "the release build failed"
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/gatehouse"
fi

# ---- processes and cleanup --------------------------------------------------------------

# The original stderr, for cleanup's last words whatever redirection is active when it runs.
exec 9>&2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gatehouse-load.XXXXXX")
RAW="$WORK/raw"
mkdir -p "$RAW" "$WORK/nginx"
PIDS=()

stop_pid() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    # Newest first: the load generator and samplers before the servers they measure.
    local i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        stop_pid "${PIDS[i]}"
    done
    if [[ $status -ne 0 ]]; then
        echo "run.sh: failed (exit $status); logs and raw results in $WORK" >&9
    else
        log "raw results and logs: $WORK" 2>&9
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Runs a command in the background with stdout/stderr to files, remembered for cleanup, and
# waits for it (interruptibly: a signal's trap runs at once, not when the command ends).
run_tracked() { # OUT ERR CMD...
    "${@:3}" >"$1" 2>"$2" 9>&- &
    local pid=$!
    PIDS+=("$pid")
    local status=0
    wait "$pid" || status=$?
    unset 'PIDS[-1]'
    return "$status"
}

start() { # start NAME LOGFILE CMD... : sets STARTED_PID
    "${@:3}" >"$2" 2>&1 9>&- &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
    log "started $1 (pid $STARTED_PID)"
}

wait_listening() { # NAME PORT PID LOG
    python3 "$LIB" wait-port "$2" 20 "$3" || {
        tail -n 20 "$4" >&2 || true
        die "$1 did not start listening on 127.0.0.1:$2 (log: $4)"
    }
}

mapfile -t PORTS < <(python3 "$LIB" ports 3)
MOCK_PORT=${PORTS[0]}
GH_PORT=${PORTS[1]}
NGINX_PORT=${PORTS[2]}

# ---- the mock upstream --------------------------------------------------------------------

UPSTREAM_TOKEN="bench-upstream-$(python3 -c 'import secrets; print(secrets.token_hex(8))')"
# Tasks progress on their own; no callbacks (nothing listens for them).
start mock-upstream "$WORK/mock.log" "$BIN" mock-upstream --listen "127.0.0.1:$MOCK_PORT" \
    --token "$UPSTREAM_TOKEN" --no-callbacks --task-seconds 30
MOCK_PID=$STARTED_PID
wait_listening mock-upstream "$MOCK_PORT" "$MOCK_PID" "$WORK/mock.log"

# ---- gatehouse ----------------------------------------------------------------------------

API_KEY="bench_$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
KEY_HASH=$(printf '%s' "$API_KEY" | "$BIN" hash-key)
export GATEHOUSE_BENCH_UPSTREAM_TOKEN=$UPSTREAM_TOKEN
cat >"$WORK/gatehouse.toml" <<EOF
# Generated by benches/load/run.sh for one load run.
[server]
listen = "127.0.0.1:$GH_PORT"
public_url = "http://127.0.0.1:$GH_PORT"
request_timeout_ms = 30000

[upstream]
base_url = "http://127.0.0.1:$MOCK_PORT"
token = "\${GATEHOUSE_BENCH_UPSTREAM_TOKEN}"
connect_timeout_ms = 1000
timeout_ms = 20000
# Limits are not what is measured: high enough never to refuse.
rate_per_second = 1000000000
burst = 1000000000
pool_max_idle = 256

[store]
path = "$WORK/ledger/ledger.db"
synchronous = "${LOAD_SYNCHRONOUS:-full}"

[[keys]]
id = "bench"
key_sha256 = "$KEY_HASH"
rate_per_second = 1000000000
burst = 1000000000
# Every generate reserves points; this covers any run.
quota_points = 1000000000000
quota_period = "monthly"
EOF
"$BIN" check --config "$WORK/gatehouse.toml" >&2 || die "the generated gatehouse config does not validate: $WORK/gatehouse.toml"
start gatehouse "$WORK/gatehouse.log" "$BIN" serve --config "$WORK/gatehouse.toml"
GH_PID=$STARTED_PID
wait_listening gatehouse "$GH_PORT" "$GH_PID" "$WORK/gatehouse.log"

# ---- nginx --------------------------------------------------------------------------------

NGINX_USER=""
# As root, nginx would switch its workers to an unprivileged user that may not exist here.
[[ $EUID -eq 0 ]] && NGINX_USER="user root;"
cat >"$WORK/nginx/nginx.conf" <<EOF
# Generated by benches/load/run.sh: a plain reverse proxy, the baseline for gatehouse.
$NGINX_USER
worker_processes auto;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    # gatehouse writes an access log line per request; so does nginx, for a fair comparison.
    access_log $WORK/nginx/access.log;
    client_body_temp_path $WORK/nginx/client_body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    upstream mock {
        server 127.0.0.1:$MOCK_PORT;
        keepalive 256;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
start nginx "$WORK/nginx/stderr.log" "$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" \
    -e "$WORK/nginx/error.log" -g 'daemon off;'
NGINX_PID=$STARTED_PID
wait_listening nginx "$NGINX_PORT" "$NGINX_PID" "$WORK/nginx/error.log"

# ---- requests -----------------------------------------------------------------------------

GENERATE_BODY='{"callback_url":"http://127.0.0.1:9/hook","ratio":"16:9","prompt":"一只小猫","style":"cinematic","model":"gen3","options":{"seconds":10,"motion_vector":{"x":0,"y":0.4,"z":0,"r":-6,"bg_x_pan":0,"bg_y_pan":0}}}'
MOCK_URL="http://127.0.0.1:$MOCK_PORT"
NGINX_URL="http://127.0.0.1:$NGINX_PORT"
GH_URL="http://127.0.0.1:$GH_PORT"

# One task each to poll: gatehouse answers a feed only for a task its key submitted.
DIRECT_TASK=$(python3 "$LIB" task-id "$MOCK_URL/runway/pro/generate" "$UPSTREAM_TOKEN" "$GENERATE_BODY") ||
    die "the mock upstream refused a generate"
GH_TASK=$(python3 "$LIB" task-id "$GH_URL/runway/pro/generate" "$API_KEY" "$GENERATE_BODY") ||
    die "gatehouse refused a generate (log: $WORK/gatehouse.log)"
DIRECT_FEED="{\"task_id\":\"$DIRECT_TASK\"}"
GH_FEED="{\"task_id\":\"$GH_TASK\"}"
# The mock answers task_not_exist to the first feed of every task, like the real upstream.
python3 "$LIB" post "$MOCK_URL/runway/feed" "$UPSTREAM_TOKEN" "$DIRECT_FEED" >/dev/null
python3 "$LIB" post "$GH_URL/runway/feed" "$API_KEY" "$GH_FEED" >/dev/null

cat >"$WORK/meta.env" <<EOF
mode=$MODE
rates=$RATES
duration=$DURATION
concurrency=$CONCURRENCY
cpus=$(nproc)
gatehouse=$("$BIN" --version)
soak_target=POST /runway/pro/generate
soak_rate=$SOAK_RATE
soak_seconds=$SOAK_SECONDS
EOF

run_oha() { # FILE URL TOKEN BODY RATE(0 = as fast as possible) DURATION
    local args=(--no-tui --output-format json -z "$6" -c "$CONCURRENCY" -w
        -m POST -H "authorization: Bearer $3" -H "content-type: application/json" -d "$4")
    [[ $5 != 0 ]] && args+=(-q "$5" --latency-correction)
    run_tracked "$RAW/$1.json" "$RAW/$1.err" "$OHA" "${args[@]}" "$2" ||
        die "oha failed for $1: $(tail -n 5 "$RAW/$1.err")"
}

peak_rss() { awk 'BEGIN { m = 0 } $2 > m { m = $2 } END { print m }' "$1"; }

run_row() { # NAME KIND LABEL MEASURED_PID|- URL TOKEN BODY
    local name=$1 kind=$2 label=$3 pid=$4 url=$5 token=$6 body=$7
    printf '%s\t%s\t%s\t%s\n' "$name" "$kind" "$label" "$pid" >>"$WORK/rows.tsv"
    local before sampler
    if [[ $pid != - ]]; then
        before=$(python3 "$LIB" proc "$pid")
        python3 "$LIB" sample "$WORK/samples-$name.txt" 0.25 "$pid" 9>&- &
        sampler=$!
        PIDS+=("$sampler")
    fi
    local rate got
    for rate in $RATES; do
        log "$label: $rate req/s for $DURATION"
        run_oha "$name-$rate" "$url" "$token" "$body" "$rate" "$DURATION"
        if ! got=$(python3 "$LIB" achieved "$RAW/$name-$rate.json" "$rate"); then
            log "$label: achieved only $got req/s of $rate: saturated; higher rates skipped"
            break
        fi
    done
    log "$label: max throughput for $DURATION"
    run_oha "$name-max" "$url" "$token" "$body" 0 "$DURATION"
    if [[ $pid != - ]]; then
        stop_pid "$sampler"
        unset 'PIDS[-1]'
        sleep "$PAUSE"
        local after
        after=$(python3 "$LIB" proc "$pid")
        {
            echo "rss_before_kb=${before% *}"
            echo "cpu_before_s=${before#* }"
            echo "rss_peak_kb=$(peak_rss "$WORK/samples-$name.txt")"
            echo "rss_after_kb=${after% *}"
            echo "cpu_after_s=${after#* }"
        } >"$WORK/proc-$name.env"
    fi
    sleep "$PAUSE"
}

: >"$WORK/rows.tsv"
run_row direct-feed feed "direct → mock, feed" - "$MOCK_URL/runway/feed" "$UPSTREAM_TOKEN" "$DIRECT_FEED"
run_row nginx-feed feed "nginx → mock, feed" "$NGINX_PID" "$NGINX_URL/runway/feed" "$UPSTREAM_TOKEN" "$DIRECT_FEED"
run_row gatehouse-feed feed "gatehouse /runway/feed" "$GH_PID" "$GH_URL/runway/feed" "$API_KEY" "$GH_FEED"
run_row direct-generate generate "direct → mock, generate" - "$MOCK_URL/runway/pro/generate" "$UPSTREAM_TOKEN" "$GENERATE_BODY"
run_row nginx-generate generate "nginx → mock, generate" "$NGINX_PID" "$NGINX_URL/runway/pro/generate" "$UPSTREAM_TOKEN" "$GENERATE_BODY"
run_row gatehouse-generate generate "gatehouse /runway/pro/generate (full stack)" "$GH_PID" "$GH_URL/runway/pro/generate" "$API_KEY" "$GENERATE_BODY"

python3 "$LIB" table "$WORK" | tee "$WORK/table.md"

if [[ $SOAK -eq 1 ]]; then
    log "soak: gatehouse generate at $SOAK_RATE req/s for ${SOAK_SECONDS}s"
    python3 "$LIB" sample "$WORK/soak-samples.txt" 5 "$GH_PID" 9>&- &
    SOAK_SAMPLER=$!
    PIDS+=("$SOAK_SAMPLER")
    run_oha soak "$GH_URL/runway/pro/generate" "$API_KEY" "$GENERATE_BODY" "$SOAK_RATE" "${SOAK_SECONDS}s"
    stop_pid "$SOAK_SAMPLER"
    unset 'PIDS[-1]'
    read -r rss cpu < <(python3 "$LIB" proc "$GH_PID")
    echo "$(date +%s) $rss $cpu" >>"$WORK/soak-samples.txt"
    python3 "$LIB" soak "$WORK" | tee -a "$WORK/table.md"
fi
