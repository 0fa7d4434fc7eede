#!/usr/bin/env bash
# Checks the Prometheus side of the deploy kit with promtool, and lints a live scrape:
#   - promtool check rules / test rules on deploy/prometheus/alerts.yml (+ alerts.test.yml)
#   - promtool check config on deploy/compose/prometheus.yml
#   - promtool check metrics on /metrics of a real gateway (target/debug/gatehouse) in front
#     of the simulator (`gatehouse mock-upstream`), after real traffic.
# Installs Debian's prometheus package (which ships promtool) when promtool is missing.
# Runs from any directory, as root on a clean Debian machine; leaves no process behind.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '==> %s\n' "$*"; }
die() {
    printf 'promtool.sh: %s\n' "$*" >&2
    exit 1
}

install_promtool() {
    say "promtool not found: installing Debian's prometheus package"
    command -v apt-get >/dev/null || die "promtool is missing and apt-get is not available to install it"
    # The package starts prometheus.service on install. Without a policy forbidding that
    # (containers usually have one), add one for the install, so no server is left running.
    local policy=/usr/sbin/policy-rc.d added_policy=""
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        added_policy=1
    fi
    local status=0
    {
        apt-get update &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus
    } || status=$?
    if [[ -n $added_policy ]]; then
        rm -f "$policy"
        # We installed the package only for promtool: the server must not start at boot either.
        if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
            systemctl disable --now prometheus.service >/dev/null 2>&1 || true
        fi
    fi
    [[ $status -eq 0 ]] || die "apt-get install prometheus failed (exit $status); promtool is required"
    command -v promtool >/dev/null || die "the prometheus package is installed but promtool is not on PATH"
}

command -v promtool >/dev/null || install_promtool
promtool --version 2>&1 | head -n 1

say "promtool check rules deploy/prometheus/alerts.yml"
promtool check rules deploy/prometheus/alerts.yml
say "promtool test rules deploy/prometheus/alerts.test.yml"
promtool test rules deploy/prometheus/alerts.test.yml
say "promtool check config deploy/compose/prometheus.yml"
promtool check config deploy/compose/prometheus.yml

# ---- live scrape ---------------------------------------------------------------------------
command -v curl >/dev/null || die "curl is required for the live scrape"
say "cargo build --bin gatehouse"
cargo build --quiet --bin gatehouse
bin=${CARGO_TARGET_DIR:-$PWD/target}/debug/gatehouse
[[ -x $bin ]] || die "$bin was not built"

work=$(mktemp -d)
pids=()
cleanup() {
    local status=$?
    # Only the processes started here, by pid. SIGTERM: the gateway drains; the simulator
    # has no SIGTERM handler, so the default action ends it.
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "promtool.sh: pid $pid ignored SIGTERM for 10 s; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    if [[ $status -ne 0 ]]; then
        for log in "$work"/*.log; do
            [[ -s $log ]] || continue
            echo "---- $(basename "$log") (last 40 lines)" >&2
            tail -n 40 "$log" >&2
        done
    fi
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Waits until FILE has a line starting with PREFIX; prints the http://ADDR that follows.
wait_for_address() {
    local file=$1 prefix=$2 pid=$3 line
    for _ in $(seq 300); do
        line=$(grep -m1 "^$prefix" "$file" 2>/dev/null || true)
        if [[ -n $line ]]; then
            line=${line#"$prefix"}
            printf '%s\n' "${line%% *}"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || die "$(basename "$file" .out) exited before it was listening"
        sleep 0.1
    done
    die "$(basename "$file" .out) did not report its address within 30 s"
}

token="promtool-upstream-token-$RANDOM$RANDOM"
key="promtool-key-$RANDOM$RANDOM"

# Port 0 everywhere: each process prints the address it got, so there is no port race.
"$bin" mock-upstream --listen 127.0.0.1:0 --token "$token" --no-callbacks \
    >"$work/mock-upstream.out" 2>"$work/mock-upstream.log" &
pids+=($!)
upstream=$(wait_for_address "$work/mock-upstream.out" "mock upstream listening on " "${pids[0]}")
say "mock upstream on $upstream"

cat >"$work/config.toml" <<EOF
[server]
listen = "127.0.0.1:0"
public_url = "http://127.0.0.1:9"

[upstream]
base_url = "$upstream"
token = "\${PROMTOOL_UPSTREAM_TOKEN}"

[defaults]
quota_points = 100000
quota_period = "monthly"

[store]
path = "$work/ledger.db"

[[keys]]
id = "promtool"
key_sha256 = "$(printf %s "$key" | "$bin" hash-key)"
EOF
PROMTOOL_UPSTREAM_TOKEN=$token "$bin" check --config "$work/config.toml" >/dev/null

PROMTOOL_UPSTREAM_TOKEN=$token RUST_LOG=info \
    "$bin" serve --config "$work/config.toml" --log-format json \
    >"$work/gatehouse.out" 2>"$work/gatehouse.log" &
pids+=($!)
gateway=$(wait_for_address "$work/gatehouse.out" "gatehouse listening on " "${pids[1]}")
say "gatehouse on $gateway"

# request METHOD PATH EXPECTED_STATUS [curl args...]: fails unless the status matches
# (EXPECTED "any" accepts every status); the body goes to $work/body.
request() {
    local method=$1 path=$2 expected=$3 status
    shift 3
    status=$(curl -sS -o "$work/body" -w '%{http_code}' -X "$method" "$gateway$path" "$@")
    if [[ $expected != any && $status != "$expected" ]]; then
        die "$method $path: expected HTTP $expected, got $status: $(cat "$work/body")"
    fi
    printf '  %s %s -> %s\n' "$method" "$path" "$status"
}
json=(-H 'Content-Type: application/json')
generate='{"callback_url":"http://127.0.0.1:9/hook","ratio":"16:9","prompt":"a kitten","style":"cinematic","model":"gen3","options":{"seconds":10,"motion_vector":{"x":0,"y":0.4,"z":0,"r":-6,"bg_x_pan":0,"bg_y_pan":0}}}'

say "traffic"
request POST /runway/pro/generate 200 -H "Authorization: Bearer $key" "${json[@]}" -d "$generate"
task_id=$(sed -n 's/.*"task_id":"\([^"]*\)".*/\1/p' "$work/body")
[[ -n $task_id ]] || die "generate answered no task_id: $(cat "$work/body")"
# The simulator answers task_not_exist to a task's first feed, as the real upstream does.
request POST /runway/feed any -H "Authorization: Bearer $key" "${json[@]}" -d "{\"task_id\":\"$task_id\"}"
request POST /runway/feed 200 -H "Authorization: Bearer $key" "${json[@]}" -d "{\"task_id\":\"$task_id\"}"
request POST /runway/pro/generate 401 -H "Authorization: Bearer wrong-$key" "${json[@]}" -d "$generate"
request GET /no-such-route 404
request GET /healthz 200

say "scrape $gateway/metrics"
curl -sS -f -o "$work/metrics.txt" "$gateway/metrics"
for series in 'gatehouse_requests_total{.*status="200"' 'gatehouse_requests_total{.*status="401"' \
    'gatehouse_requests_total{.*status="404"' 'gatehouse_auth_failures_total{' \
    'gatehouse_upstream_duration_seconds_bucket{' 'gatehouse_quota_remaining_points{'; do
    grep -q "^$series" "$work/metrics.txt" || die "the scrape has no $series series after the traffic"
done
printf '  %s samples, %s families\n' "$(grep -vc '^#' "$work/metrics.txt")" "$(grep -c '^# TYPE' "$work/metrics.txt")"

# promtool check metrics exits 0 when clean, 3 when it only found lint problems (naming,
# HELP, units: printed, not fatal here) and 1 when the text could not be parsed.
say "promtool check metrics"
lint=0
promtool check metrics <"$work/metrics.txt" >"$work/lint.txt" 2>&1 || lint=$?
cat "$work/lint.txt"
case $lint in
    0) echo "  no lint problems" ;;
    3) echo "promtool.sh: WARNING: promtool check metrics reported lint problems (above)" >&2 ;;
    *) die "promtool check metrics failed (exit $lint): the exposition did not parse" ;;
esac
say "promtool checks passed"
