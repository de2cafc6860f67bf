#!/usr/bin/env python3
"""Time from starting `peer run` to its "listening" log line, and its memory after
10 s idle, for a fresh data directory (identity and database created) and for an
existing one. Usage: peer-startup.py PATH/TO/peer [RUNS]"""
import os
import subprocess
import sys
import tempfile
import time

PEER = sys.argv[1]
RUNS = int(sys.argv[2]) if len(sys.argv) > 2 else 5
ARGS = ["run", "--listen", "/ip4/127.0.0.1/tcp/0", "--api", "127.0.0.1:0", "--no-mdns"]


def start(data_dir):
    """Starts a node; answers it and the seconds until it logged "listening"."""
    t0 = time.monotonic()
    node = subprocess.Popen(
        [PEER, *ARGS, "--data-dir", data_dir],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=dict(os.environ, RUST_LOG="info"),
    )
    for line in node.stderr:
        if "listening" in line:
            return node, time.monotonic() - t0
    raise SystemExit(f"the node exited without listening ({node.wait()})")


def memory_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def main():
    existing = tempfile.mkdtemp()
    node, _ = start(existing)  # creates its identity and database
    node.terminate()
    node.wait()
    for label, data_dir in [("fresh", None), ("existing", existing)]:
        for _ in range(RUNS):
            node, took = start(data_dir or tempfile.mkdtemp())
            time.sleep(10)
            rss, peak = memory_kib(node.pid)
            node.terminate()
            node.wait()
            print(f"{label} data dir: listening after {took * 1000:.0f} ms; "
                  f"after 10 s idle RSS {rss} KiB, peak {peak} KiB")


main()
