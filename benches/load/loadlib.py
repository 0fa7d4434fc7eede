#!/usr/bin/env python3
"""Helpers for benches/load/run.sh (stdlib only).

Subcommands:
  ports N                        print N free loopback TCP ports, one per line
  wait-port PORT TIMEOUT_S [PID] wait until 127.0.0.1:PORT accepts; fail early if PID exits
  post URL TOKEN BODY            POST JSON with a Bearer token; print the response body
  task-id URL TOKEN BODY         POST a generate; print data.task_id (fails without one)
  proc PID...                    print "RSS_KB CPU_SECONDS" summed over the PIDs and their
                                 descendants (from /proc/PID/status VmRSS, /proc/PID/stat)
  sample OUT INTERVAL_S PID...   append "UNIX_TIME RSS_KB CPU_SECONDS" lines until SIGTERM
  achieved FILE RATE             print the achieved rate of one oha JSON result; exit 3 when
                                 it is below 90% of RATE (the target or oha saturated)
  table WORKDIR                  print the Markdown table for a run (see run.sh)
  soak WORKDIR                   print the soak summary
"""

import json
import os
import signal
import socket
import sys
import time
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")
SATURATED_BELOW = 0.9


def ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        for s in socks:
            print(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            # A zombie has exited; it only waits for its parent to reap it.
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_port(port, timeout_s, pid=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pid is not None and not alive(pid):
            sys.exit(f"process {pid} exited before listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")


def post(url, token, body):
    request = urllib.request.Request(
        url,
        data=body.encode(),
        method="POST",
        headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read().decode()
    except urllib.error.HTTPError as err:
        sys.exit(f"POST {url}: HTTP {err.code}: {err.read().decode(errors='replace')}")


def task_id(url, token, body):
    text = post(url, token, body)
    try:
        value = json.loads(text)["data"]["task_id"]
    except (ValueError, KeyError, TypeError):
        value = None
    if not isinstance(value, str) or not value:
        sys.exit(f"POST {url} answered without data.task_id: {text}")
    return value


def descendants(pids):
    """The PIDs and all their descendants (nginx: master and workers)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def proc(pids):
    rss_kb, ticks = 0, 0
    for pid in descendants(pids):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss_kb += int(line.split()[1])
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
                # utime and stime are fields 14 and 15 of stat; fields[0] is field 3.
                ticks += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            continue
    return rss_kb, ticks / CLK_TCK


def sample(out, interval_s, pids):
    # Every line is flushed as written, so stopping at any point loses nothing.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with open(out, "a") as f:
        while True:
            rss_kb, cpu_s = proc(pids)
            f.write(f"{time.time():.3f} {rss_kb} {cpu_s:.2f}\n")
            f.flush()
            time.sleep(interval_s)


def load(path):
    with open(path) as f:
        return json.load(f)


def counts(result):
    """(requests with an HTTP answer, 2xx answers, transport errors, non-2xx by status)."""
    statuses = result.get("statusCodeDistribution") or {}
    answered = sum(statuses.values())
    ok = sum(n for code, n in statuses.items() if str(code).startswith("2"))
    errors = sum((result.get("errorDistribution") or {}).values())
    bad = {code: n for code, n in statuses.items() if not str(code).startswith("2")}
    return answered, ok, errors, bad


def achieved_rate(result):
    """Answered requests per second of the run (oha's own requestsPerSec counts the same)."""
    return float(result["summary"].get("requestsPerSec") or 0.0)


def achieved(path, rate):
    value = achieved_rate(load(path))
    print(f"{value:.0f}")
    if value < SATURATED_BELOW * float(rate):
        sys.exit(3)


def ms(seconds):
    value = seconds * 1000.0
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def percentiles(result):
    p = result.get("latencyPercentiles") or {}
    return p.get("p50"), p.get("p99"), p.get("p99.9")


def read_kv(path):
    values = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.strip().partition("=")
            if key:
                values[key] = value
    return values


def mib(kb):
    return f"{int(kb) / 1024:.0f}"


def table(workdir):
    meta = read_kv(os.path.join(workdir, "meta.env"))
    rates = [int(r) for r in meta["rates"].split()]
    rows = []
    with open(os.path.join(workdir, "rows.tsv")) as f:
        for line in f:
            name, kind, label, measured = line.rstrip("\n").split("\t")
            rows.append({"name": name, "kind": kind, "label": label, "measured": measured})

    raw = os.path.join(workdir, "raw")
    problems = []
    for row in rows:
        row["at"] = {}
        total = 0
        for rate in rates + ["max"]:
            path = os.path.join(raw, f"{row['name']}-{rate}.json")
            if not os.path.exists(path):
                continue
            result = load(path)
            answered, ok, errors, bad = counts(result)
            total += answered + errors
            if errors or bad:
                what = ", ".join(f"{n}x HTTP {c}" for c, n in sorted(bad.items()))
                if errors:
                    what = ", ".join(filter(None, [what, f"{errors} transport errors"]))
                problems.append(f"{row['label']} @{rate}: {what} of {answered + errors}")
            row["at"][rate] = result
        row["total"] = total
        stats = os.path.join(workdir, f"proc-{row['name']}.env")
        row["proc"] = read_kv(stats) if os.path.exists(stats) else None

    def base(row, name):
        for other in rows:
            if other["kind"] == row["kind"] and other["name"].startswith(name):
                return other
        return None

    def lowest_p(row):
        # The lowest fixed rate is below saturation for every target.
        result = row["at"].get(rates[0])
        return percentiles(result) if result else (None, None, None)

    def max_rps(row):
        result = row["at"].get("max")
        return achieved_rate(result) if result else None

    header = ["target"]
    header += [f"@{r}/s p50 / p99 / p99.9 ms" for r in rates]
    header += [
        "max req/s",
        f"added p50 / p99 vs direct @{rates[0]}/s (ms)",
        "max vs nginx",
        "RSS idle / load / after (MiB)",
        "CPU s per 10k req",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["label"]]
        for rate in rates:
            result = row["at"].get(rate)
            if result is None:
                cells.append("skipped (saturated)")
                continue
            p50, p99, p999 = percentiles(result)
            cell = " / ".join(ms(v) if v is not None else "?" for v in (p50, p99, p999))
            got = achieved_rate(result)
            if got < SATURATED_BELOW * rate:
                cell += f" (sat: {got:.0f}/s)"
            cells.append(cell)
        top = max_rps(row)
        cells.append(f"{top:.0f}" if top is not None else "?")

        direct = base(row, "direct")
        if direct is not None and direct is not row:
            mine, theirs = lowest_p(row), lowest_p(direct)
            if None not in mine[:2] and None not in theirs[:2]:
                cells.append(
                    f"+{ms(mine[0] - theirs[0])} / +{ms(mine[1] - theirs[1])}".replace("+-", "-")
                )
            else:
                cells.append("?")
        else:
            cells.append("(baseline)")

        nginx = base(row, "nginx")
        if nginx is not None and nginx is not row and top and max_rps(nginx):
            cells.append(f"{top / max_rps(nginx):.2f}x")
        else:
            cells.append("(baseline)" if nginx is row else "-")

        p = row["proc"]
        if p:
            cells.append(f"{mib(p['rss_before_kb'])} / {mib(p['rss_peak_kb'])} / {mib(p['rss_after_kb'])}")
            cpu = float(p["cpu_after_s"]) - float(p["cpu_before_s"])
            cells.append(f"{cpu / row['total'] * 10000:.2f}" if row["total"] else "?")
        else:
            cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")

    print(
        f"gatehouse load benchmark ({meta['mode']}): oha -c {meta['concurrency']}, "
        f"{meta['duration']} per run, fixed rates with --latency-correction; "
        f"{meta['cpus']} CPUs, {meta['gatehouse']}"
    )
    print()
    print("\n".join(lines))
    print()
    print(
        "RSS and CPU are of the process measured (gatehouse; nginx master + workers); "
        "'load' is the peak while the row ran. 'sat' = achieved below 90% of the requested "
        "rate (the target or oha, which share the CPUs, saturated); higher rates are then skipped."
    )
    if problems:
        print()
        print("Non-2xx answers or errors (these runs' latencies include them):")
        for problem in problems:
            print(f"- {problem}")


def soak(workdir):
    meta = read_kv(os.path.join(workdir, "meta.env"))
    result = load(os.path.join(workdir, "raw", "soak.json"))
    answered, ok, errors, bad = counts(result)
    samples = []
    with open(os.path.join(workdir, "soak-samples.txt")) as f:
        for line in f:
            t, rss, cpu = line.split()
            samples.append((float(t), int(rss), float(cpu)))
    p50, p99, p999 = percentiles(result)
    print()
    print(
        f"Soak: gatehouse {meta['soak_target']} at {meta['soak_rate']}/s for "
        f"{meta['soak_seconds']}s: achieved {achieved_rate(result):.0f}/s, "
        f"{ok}/{answered + errors} 2xx, p50/p99/p99.9 {ms(p50)}/{ms(p99)}/{ms(p999)} ms"
    )
    if samples:
        n = len(samples)
        picks = [samples[0], samples[n // 4], samples[n // 2], samples[3 * n // 4], samples[-1]]
        print(
            "RSS over time (MiB): "
            + " → ".join(f"{mib(s[1])} (t+{s[0] - samples[0][0]:.0f}s)" for s in picks)
        )


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    command, args = argv[1], argv[2:]
    if command == "ports":
        ports(int(args[0]))
    elif command == "wait-port":
        wait_port(int(args[0]), float(args[1]), int(args[2]) if len(args) > 2 else None)
    elif command == "post":
        print(post(*args))
    elif command == "task-id":
        print(task_id(*args))
    elif command == "proc":
        rss_kb, cpu_s = proc([int(a) for a in args])
        print(f"{rss_kb} {cpu_s:.2f}")
    elif command == "sample":
        sample(args[0], float(args[1]), [int(a) for a in args[2:]])
    elif command == "achieved":
        achieved(args[0], args[1])
    elif command == "table":
        table(args[0])
    elif command == "soak":
        soak(args[0])
    else:
        sys.exit(f"unknown subcommand {command!r}\n{__doc__}")


if __name__ == "__main__":
    main(sys.argv)
