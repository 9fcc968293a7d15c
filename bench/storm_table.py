#!/usr/bin/env python3
"""Connect-storm figures of a bench/compare.sh run directory (issue 12).

Usage: python3 bench/storm_table.py DIR

Prints, per scenario and target, the loadgen's `connect_s` (seconds until every user is subscribed) of
each run and their median, with the other processes' cores during the run (a run with more than 0.3 is
noise); then one line per `lamplight bench --workload storm` run (DIR/<target>/storm/*.jsonl): time until
the watcher's online set converged, whether it equals the truth, status events and changes received,
server CPU and peak RSS, and the mass reconnect.
"""
import glob
import json
import os
import statistics
import sys


def lines(path):
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except ValueError:
                continue


def main(directory):
    runs = {}
    for path in sorted(glob.glob(os.path.join(directory, "*", "storm*.jsonl"))):
        target = os.path.basename(os.path.dirname(path))
        for j in lines(path):
            name = j.get("label") or os.path.basename(path)[: -len(".jsonl")]
            other = j.get("result", {}).get("machine", {}).get("other_cores")
            runs.setdefault((name, target), []).append((j.get("connect_s"), j.get("connected"), other))
    print("scenario | target | connect_s per run | median | connected | other cores")
    for (name, target), v in sorted(runs.items()):
        secs = [r[0] for r in v if r[0] is not None]
        median = f"{statistics.median(secs):.2f}" if secs else "-"
        print(f"{name} | {target} | {secs} | {median} | {[r[1] for r in v]} | {[r[2] for r in v]}")
    print()
    for path in sorted(glob.glob(os.path.join(directory, "*", "storm", "*.jsonl"))):
        for j in lines(path):
            r = j.get("reconnect") or {}
            print(
                f"{j.get('label')}: converged {j.get('statuses_converged_secs', j.get('connect_secs'))} s, "
                f"online set right {j.get('online_set_ok')}, status events {j.get('status_events_received')}, "
                f"changes {j.get('status_changes_received')}, server cpu {j.get('server_cpu_secs')} s, "
                f"peak rss {j.get('server_rss_peak_mib')} MiB; reconnect {r.get('reconnect_secs')} s, "
                f"online set right {r.get('online_set_ok')}"
            )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
