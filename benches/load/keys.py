#!/usr/bin/env python3
"""Memory with many keys: gatehouse's RSS with N distinct JWT principals tracked by the
rate limiter, and after idle-key eviction (stdlib only).

    python3 benches/load/keys.py                 # N = 100000 (about 1.5 minutes)
    python3 benches/load/keys.py -n 10000 --hold 40

Starts `gatehouse mock-upstream` and `gatehouse serve` (a generated config in a tempdir, both
on 127.0.0.1 port 0), reads VmRSS / VmHWM of the gateway from /proc/PID/status when idle,
then sends one `POST /runway/feed {"task_id":"x"}` for each of N distinct JWT subjects
(HS256 tokens minted here). Auth and the rate limit pass, the feed answers 404 (no such
task): that is enough, the subject is then tracked by the `[defaults]` keyed limiter.

How long a principal stays tracked: after its one request, governor's state for it stays
"recent" for 2 / rate_per_second; gatehouse's housekeeping (every 30 s, not configurable)
then evicts it and sets `gatehouse_ratelimit_tracked_keys`, the only place that gauge is
updated. With the production `[defaults] rate_per_second = 5`, a principal is idle 0.4 s
after its request, so the passes that run while the N requests are being sent would already
evict the earlier ones and N would never be tracked at once. The config therefore uses
rate_per_second = 2 / HOLD (HOLD seconds, `--hold`, longer than the send plus one
housekeeping period) and burst 10; a key's memory does not depend on its rate. The script
checks that the gauge reaches N at the first housekeeping pass after the send.

Then it waits for the pass that evicts them (gauge back to 0; deadline HOLD + 45 s) and reads
the RSS again. Prints a Markdown table on stdout; progress on stderr. Both processes are
stopped at exit (also on Ctrl-C / SIGTERM); logs stay in the tempdir with --keep.

Environment: GATEHOUSE_BIN (default target/release/gatehouse); RUST_LOG (default "warn":
no per-request access log).
"""

import argparse
import atexit
import base64
import collections
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
HOUSEKEEPING_S = 30  # src/server.rs spawn_housekeeping
UPSTREAM_TOKEN = "keys-bench-upstream-token"
JWT_SECRET = "keys-bench-jwt-secret-0123456789abcdef"
BODY = b'{"task_id":"x"}'

PROCS = []


def log(message):
    print(f"[keys] {message}", file=sys.stderr, flush=True)


def stop_all():
    # Newest first: the gateway before the mock it forwards to.
    for proc in reversed(PROCS):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    PROCS.clear()


def on_signal(signum, _frame):
    sys.exit(128 + signum)


def start(name, argv, workdir, env=None):
    out = open(os.path.join(workdir, f"{name}.out"), "w")
    err = open(os.path.join(workdir, f"{name}.log"), "w")
    proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
    PROCS.append(proc)
    log(f"started {name} (pid {proc.pid})")
    return proc


def wait_line(proc, path, pattern, timeout_s=20):
    """Waits until the file `path` (the process's stdout) has a line matching `pattern`."""
    deadline = time.monotonic() + timeout_s
    regex = re.compile(pattern)
    while time.monotonic() < deadline:
        with open(path) as f:
            for line in f:
                found = regex.search(line)
                if found:
                    return found
        if proc.poll() is not None:
            sys.exit(f"keys.py: {proc.args[0]} exited ({proc.returncode}) before printing {pattern!r}; see {path} and the .log next to it")
        time.sleep(0.05)
    sys.exit(f"keys.py: no line matching {pattern!r} in {path} after {timeout_s}s")


def proc_status(pid):
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])  # kB
    return values


def tracked_keys(base_url):
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith("gatehouse_ratelimit_tracked_keys "):
            return int(float(line.split()[1]))
    sys.exit("keys.py: /metrics has no gatehouse_ratelimit_tracked_keys")


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def mint_tokens(n, secret, exp):
    header = b64url(b'{"alg":"HS256","typ":"JWT"}')
    key = secret.encode()
    tokens = []
    for i in range(n):
        payload = b64url(b'{"sub":"bench-user-%07d","exp":%d}' % (i, exp))
        signing_input = header + b"." + payload
        signature = b64url(hmac.new(key, signing_input, hashlib.sha256).digest())
        tokens.append(signing_input + b"." + signature)
    return tokens


def request_bytes(host, token):
    return (
        b"POST /runway/feed HTTP/1.1\r\nhost: " + host + b"\r\nauthorization: Bearer " + token
        + b"\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(BODY) + BODY
    )


class Responses:
    """Reads HTTP/1.1 responses (Content-Length bodies) from a keep-alive socket."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def _fill(self):
        chunk = self.sock.recv(262144)
        if not chunk:
            raise ConnectionError("the gateway closed the connection")
        self.buf += chunk

    def next_status(self):
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            self._fill()
        head = self.buf[:end].decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        length = None
        for line in head[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value.strip())
            elif name == "transfer-encoding" or (name == "connection" and "close" in value.lower()):
                raise ConnectionError(f"unexpected response header {line!r}")
        if length is None:
            raise ConnectionError(f"response without content-length: {head}")
        while len(self.buf) < end + 4 + length:
            self._fill()
        self.buf = self.buf[end + 4 + length:]
        return status


def send_all(addr, requests, connections, pipeline):
    """Sends every request once over `connections` keep-alive connections, `pipeline`
    requests in flight on each. Returns a Counter of status codes."""
    statuses = collections.Counter()
    lock = threading.Lock()
    errors = []

    def worker(part):
        mine = collections.Counter()
        try:
            with socket.create_connection(addr, timeout=60) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                responses = Responses(sock)
                for start in range(0, len(part), pipeline):
                    batch = part[start:start + pipeline]
                    sock.sendall(b"".join(batch))
                    for _ in batch:
                        mine[responses.next_status()] += 1
        except Exception as err:  # reported below; the run is then invalid
            errors.append(err)
        with lock:
            statuses.update(mine)

    threads = [
        threading.Thread(target=worker, args=(requests[i::connections],), daemon=True)
        for i in range(connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        sys.exit(f"keys.py: sending failed: {errors[0]!r}")
    return statuses


def mib(kb):
    return f"{kb / 1024:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--principals", type=int, default=100_000, help="distinct JWT subjects (default 100000)")
    parser.add_argument("--hold", type=float, default=60.0, help="seconds a principal stays tracked after its request (default 60; rate_per_second = 2/HOLD)")
    parser.add_argument("--connections", type=int, default=4, help="keep-alive connections (default 4)")
    parser.add_argument("--pipeline", type=int, default=16, help="HTTP/1.1 requests in flight per connection (default 16; 1 = none)")
    parser.add_argument("--keep", action="store_true", help="keep the tempdir (config, logs)")
    args = parser.parse_args()
    if args.principals < 1 or args.connections < 1 or args.pipeline < 1 or args.hold <= 0:
        sys.exit("keys.py: -n, --connections, --pipeline and --hold must be positive")

    binary = os.environ.get("GATEHOUSE_BIN") or os.path.join(ROOT, "target", "release", "gatehouse")
    if not os.access(binary, os.X_OK):
        sys.exit(f"keys.py: {binary} not found: cargo build --release --bin gatehouse (or set GATEHOUSE_BIN)")

    workdir = tempfile.mkdtemp(prefix="gatehouse-keys.")
    # atexit runs last-registered first: the processes stop before their tempdir goes.
    if args.keep:
        atexit.register(lambda: log(f"config and logs: {workdir}"))
    else:
        atexit.register(shutil.rmtree, workdir, True)
    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    mock = start("mock", [binary, "mock-upstream", "--listen", "127.0.0.1:0", "--token", UPSTREAM_TOKEN, "--no-callbacks"], workdir)
    mock_addr = wait_line(mock, os.path.join(workdir, "mock.out"), r"listening on http://(\S+)").group(1)

    rate = 2.0 / args.hold
    config = os.path.join(workdir, "gatehouse.toml")
    with open(config, "w") as f:
        f.write(f"""# Generated by benches/load/keys.py.
[server]
listen = "127.0.0.1:0"

[upstream]
base_url = "http://{mock_addr}"
token = "{UPSTREAM_TOKEN}"
# The global limit is not what is measured.
rate_per_second = 1000000000
burst = 1000000000

[auth.jwt]
algorithms = ["HS256"]
secret = "{JWT_SECRET}"

# Every subject is an unlisted JWT principal: tracked by the [defaults] keyed limiter.
# One request keeps it tracked for 2 / rate_per_second = {args.hold:g} s (see keys.py).
[defaults]
rate_per_second = {rate!r}
burst = 10
quota_period = "none"

[store]
path = "{os.path.join(workdir, 'ledger.db')}"
synchronous = "normal"

[[routes]]
name = "runway_feed"
path = "/runway/feed"
kind = "runway_feed"
""")
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "warn")
    gateway = start("gatehouse", [binary, "serve", "--config", config], workdir, env)
    addr = wait_line(gateway, os.path.join(workdir, "gatehouse.out"), r"gatehouse listening on http://(\S+)").group(1)
    base_url = f"http://{addr}"
    host, port = addr.rsplit(":", 1)

    n = args.principals
    log(f"minting {n} HS256 tokens")
    tokens = mint_tokens(n, JWT_SECRET, int(time.time()) + 3600)
    requests = [request_bytes(addr.encode(), token) for token in tokens]
    del tokens

    time.sleep(2)
    idle = proc_status(gateway.pid)
    idle_keys = tracked_keys(base_url)
    log(f"idle: VmRSS {mib(idle['VmRSS'])} MiB, VmHWM {mib(idle['VmHWM'])} MiB")

    log(f"sending {n} requests, one per principal ({args.connections} connections x {args.pipeline} pipelined)")
    started = time.monotonic()
    statuses = send_all((host, int(port)), requests, args.connections, args.pipeline)
    sent_s = time.monotonic() - started
    del requests
    sent = proc_status(gateway.pid)
    log(f"sent in {sent_s:.1f}s ({n / sent_s:.0f} req/s); statuses {dict(statuses)}; VmRSS {mib(sent['VmRSS'])} MiB")
    if statuses.get(404, 0) != n:
        log(f"warning: expected {n} x 404 (auth and rate limit passed, no such task), got {dict(statuses)}")

    # The gauge changes only at a housekeeping pass; wait for the first one after the send.
    before = tracked_keys(base_url)
    deadline = time.monotonic() + HOUSEKEEPING_S + 5
    seen = before
    while time.monotonic() < deadline:
        seen = tracked_keys(base_url)
        if seen >= n:
            break
        time.sleep(0.5)
    tracked = proc_status(gateway.pid)
    tracked_at = time.monotonic() - started
    if seen < n:
        log(f"warning: the gauge shows {seen}, not {n}: principals were evicted during the send (raise --hold above {sent_s + HOUSEKEEPING_S:.0f})")
    log(f"tracked: {seen} keys, VmRSS {mib(tracked['VmRSS'])} MiB (t+{tracked_at:.0f}s)")

    # Eviction: the first pass at least HOLD s after the last request.
    deadline = time.monotonic() + args.hold + HOUSEKEEPING_S + 15
    after_keys = seen
    while seen > 0 and time.monotonic() < deadline:
        after_keys = tracked_keys(base_url)
        if after_keys < seen:
            break
        time.sleep(1)
    evicted_at = time.monotonic() - started
    # The pass evicted, shrank the map, then set the gauge; give the allocator a moment.
    time.sleep(1)
    evicted = proc_status(gateway.pid)
    if seen > 0 and after_keys >= seen:
        log(f"warning: no eviction within {args.hold + HOUSEKEEPING_S + 15:.0f}s")
    log(f"after eviction: {after_keys} keys, VmRSS {mib(evicted['VmRSS'])} MiB (t+{evicted_at:.0f}s)")

    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
    print(
        f"gatehouse memory with many keys: {n} distinct JWT principals, one `POST /runway/feed` each "
        f"(sent in {sent_s:.0f} s, {n / sent_s:.0f} req/s, {statuses.get(404, 0)} x 404); "
        f"`[defaults]` rate {rate:g}/s (tracked {args.hold:g} s), burst 10; {version}, {os.cpu_count()} CPUs"
    )
    print()
    print("| gateway state | VmRSS MiB | VmHWM (peak) MiB | tracked keys (gauge) | t (s) |")
    print("|---|---|---|---|---|")
    print(f"| idle, after start | {mib(idle['VmRSS'])} | {mib(idle['VmHWM'])} | {idle_keys} | - |")
    print(f"| right after the {n} requests | {mib(sent['VmRSS'])} | {mib(sent['VmHWM'])} | (not yet counted) | {sent_s:.0f} |")
    print(f"| first housekeeping pass after the send | {mib(tracked['VmRSS'])} | {mib(tracked['VmHWM'])} | {seen} | {tracked_at:.0f} |")
    print(f"| after idle eviction | {mib(evicted['VmRSS'])} | {mib(evicted['VmHWM'])} | {after_keys} | {evicted_at:.0f} |")
    print()
    # Targets in MB (10^6 bytes); VmRSS is in KiB.
    ok_idle = idle["VmRSS"] * 1024 <= 30e6
    peak = max(sent["VmRSS"], tracked["VmRSS"])
    if seen < n:
        keys_verdict = f"not verified: the gauge showed {seen} of {n} tracked (raise --hold)"
    else:
        keys_verdict = "met" if peak * 1024 <= 100e6 else "NOT met"
    print(
        f"Targets: idle <= 30 MB: {'met' if ok_idle else 'NOT met'} ({mib(idle['VmRSS'])} MiB); "
        f"<= 100 MB with {n} keys tracked: {keys_verdict} ({mib(peak)} MiB; VmHWM {mib(tracked['VmHWM'])} MiB)"
    )


if __name__ == "__main__":
    main()
