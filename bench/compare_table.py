#!/usr/bin/env python3
"""Markdown tables (peer vs lamplight, with ratios and the goals) from bench/compare.sh results.

usage: compare_table.py [--proto PATH] [--max-other CORES] OUT_DIR
Reads OUT_DIR/<target>/*.jsonl (one loadgen JSON line per run) for the targets socketio (the peer), grpc
(lamplight) and any other variant (grpc-1w: one worker thread; tonic-floor: the peers' bare tonic mock); every cell is the median over
repeats, with [min-max] when there were several. Goals are judged on grpc. Runs during which other
processes (e.g. someone's compiler) used more than --max-other cores are left out and listed.
"""
import argparse
import glob
import hashlib
import json
import os
import statistics

NAMES = {
    "socketio": "Socket.IO peer",
    "grpc": "lamplight",
    "grpc-1w": "lamplight, 1 worker",
    "tonic-floor": "bare tonic (mock)",
}


def targets_in(out):
    found = [d for d in sorted(os.listdir(out)) if glob.glob(os.path.join(out, d, "*.jsonl"))]
    order = ["socketio", "grpc"]
    return [t for t in order if t in found] + [t for t in found if t not in order]


def other_cores(run):
    """The most cores other processes used in any measured window of the run."""
    if run.get("mode") == "idle":
        return run["idle"]["machine_during_hold"]["other_cores"]
    steps = [run["result"]] if run.get("result") else run.get("steps", [])
    return max((s["machine"]["other_cores"] for s in steps), default=0.0)


def load(out, targets, max_other):
    runs, noisy = {}, []
    for target in targets:
        for path in sorted(glob.glob(os.path.join(out, target, "*.jsonl"))):
            name = os.path.basename(path)[: -len(".jsonl")]
            with open(path) as f:
                for line in f:
                    if not line.strip():
                        continue
                    run = json.loads(line)
                    if other_cores(run) > max_other:
                        noisy.append(f"{target}/{name} (other processes {other_cores(run):.2f} cores)")
                    else:
                        runs.setdefault((target, name), []).append(run)
    return runs, noisy


def fmt(v):
    if v is None:
        return "-"
    if float(v).is_integer() and abs(v) < 1000:
        return f"{v:.0f}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def cell(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return fmt(xs[0])
    return f"{fmt(statistics.median(xs))} [{fmt(min(xs))}-{fmt(max(xs))}]"


def step(run):
    """The fixed-rate result, or the best step of a saturation search."""
    return run.get("result") or run.get("best")


def server_cpu_us(s):
    cpu = [p.get("cpu_s") for p in s.get("servers") or []]
    if not cpu or None in cpu or not s.get("delivered"):
        return None
    return sum(cpu) * 1e6 / s["delivered"]


def servers_sum(s, key):
    vals = [p.get(key) for p in s.get("servers") or []]
    return None if not vals or None in vals else sum(vals)


def idle_kib(run):
    per = run.get("idle", {}).get("per_server") or []
    vals = [p.get("rss_growth_per_conn_kb") for p in per]
    return None if not vals or None in vals else sum(vals) / len(vals)


def knee(run, ms):
    ok = [s for s in run.get("steps", []) if s["pass"] and s["latency_ms"]["p99"] <= ms]
    return max((s["deliveries_per_s"] for s in ok), default=None)


# (scenario, label, metric name, extractor(run), goal: (op, factor) on lamplight / peer, or None)
GOALS = [
    ("sat-S1000-R10", "S=1000 R=10", "max sustained deliveries/s", lambda r: r.get("max_sustained_deliveries_per_s"), (">=", 4)),
    ("sat-S5000-R50", "S=5000 R=50", "max sustained deliveries/s", lambda r: r.get("max_sustained_deliveries_per_s"), (">=", 4)),
    ("sat-twonode-S2000-R20", "two-node S=2000 R=20", "max sustained deliveries/s", lambda r: r.get("max_sustained_deliveries_per_s"), (">=", 4)),
    ("sat-S1000-R10", "S=1000 R=10 at saturation", "server CPU µs per delivery (best step)", lambda r: server_cpu_us(step(r)), ("<=", 1 / 5)),
    ("fanout-S1000-R10-E500", "S=1000 R=10 @ 50k/s", "server CPU µs per delivery", lambda r: server_cpu_us(step(r)), ("<=", 1 / 5)),
    ("fanout-S5000-R50-E500", "S=5000 R=50 @ 50k/s", "server CPU µs per delivery", lambda r: server_cpu_us(step(r)), ("<=", 1 / 5)),
    ("twonode-S2000-R20-E500", "two-node @ 50k/s", "server CPU µs per delivery (both)", lambda r: server_cpu_us(step(r)), ("<=", 1 / 5)),
    ("fanout-S1000-R10-E500", "S=1000 R=10 @ 50k/s", "p99 ms", lambda r: step(r)["latency_ms"]["p99"], ("<=", 1 / 3)),
    ("fanout-S5000-R50-E500", "S=5000 R=50 @ 50k/s", "p99 ms", lambda r: step(r)["latency_ms"]["p99"], ("<=", 1 / 3)),
    ("twonode-S2000-R20-E500", "two-node @ 50k/s", "p99 ms", lambda r: step(r)["latency_ms"]["p99"], ("<=", 1 / 3)),
    ("idle-S5000", "idle S=5000, 4 rooms", "server RSS KiB per connection", idle_kib, ("<=", 1 / 2)),
    ("idle-S10000", "idle S=10000, 4 rooms", "server RSS KiB per connection", idle_kib, ("<=", 1 / 2)),
]

DETAILS = [
    ("delivered/expected %", lambda s: 100 * s["delivery_ratio"]),
    ("lost", lambda s: s["loss"]),
    ("deliveries/s", lambda s: s["deliveries_per_s"]),
    ("p50 ms", lambda s: s["latency_ms"]["p50"]),
    ("p90 ms", lambda s: s["latency_ms"]["p90"]),
    ("p99 ms", lambda s: s["latency_ms"]["p99"]),
    ("max ms", lambda s: s["latency_ms"]["max"]),
    ("server CPU cores", lambda s: servers_sum(s, "cpu_util")),
    ("server RSS MiB", lambda s: servers_sum(s, "rss_mb")),
    ("redis CPU cores", lambda s: (s.get("redis") or {}).get("cpu_util")),
    ("loadgen CPU cores", lambda s: s["loadgen"]["cpu_util"]),
    ("other processes, cores", lambda s: s["machine"]["other_cores"]),
]


def storm_tables(out, targets, runs, name):
    """The connect storm (issue 12): the loadgen's connect time per target beside the bare tonic floor, and
    what `lamplight bench --workload storm` saw (OUT/<target>/storm/*.jsonl)."""
    lines = []
    scenarios = sorted({sc for (_, sc) in runs if sc.startswith("storm-")}, key=lambda sc: (("twonode" in sc), int(sc.rsplit("-S", 1)[1])))
    if scenarios:
        lines.append("#### connect storm: seconds until all users of one tenant are subscribed (loadgen `connect_s`)\n")
        head = ["scenario"] + [name(t) for t in targets] + [f"{name(t)} ÷ bare tonic" for t in targets if t != "tonic-floor"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        connect = lambda t, sc: [r.get("connect_s") for r in runs.get((t, sc), [])]
        for sc in scenarios:
            floor = med(connect("tonic-floor", sc))
            row = [sc] + [cell(connect(t, sc)) for t in targets]
            for t in targets:
                if t == "tonic-floor":
                    continue
                o = med(connect(t, sc))
                row.append(f"{o / floor:.2f}×" if floor and o is not None else "-")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("\nGoals (issue 12): lamplight at S=10000 ≤ 2× the bare tonic floor; S=20000 ≤ 2.2× S=10000.\n")
    rows = []
    for t in targets:
        for path in sorted(glob.glob(os.path.join(out, t, "storm", "*.jsonl"))):
            with open(path) as f:
                for line in f:
                    if line.strip():
                        rows.append((t, json.loads(line)))
    if rows:
        lines.append("#### `lamplight bench --workload storm` (one line per run)\n")
        head = ["target", "run", "users", "subscribed s", "statuses converged s", "online set ok", "server CPU s",
                "peak RSS MiB", "status events / changes received", "reconnect: all back s", "reconnect: online set ok",
                "reconnect: server CPU s"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for t, r in rows:
            rc = r.get("reconnect") or {}
            lines.append("| " + " | ".join(str(x) for x in [
                name(t), r.get("label"), r.get("connections"), r.get("connect_secs"), r.get("statuses_converged_secs"),
                r.get("online_set_ok"), r.get("server_cpu_secs"), r.get("server_rss_peak_mib"),
                f"{r.get('status_events_received')} / {r.get('status_changes_received')}",
                rc.get("reconnect_secs") if rc.get("all_back") else f"not all back ({rc.get('streams_back')}/{rc.get('streams_ended')})" if rc else "-",
                rc.get("online_set_ok", "-"), rc.get("server_cpu_secs", "-"),
            ]) + " |")
        lines.append("")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--proto", help="warn when the loadgen was built from another proto")
    ap.add_argument("--max-other", type=float, default=0.3, help="leave out runs noisier than this (cores)")
    a = ap.parse_args()
    targets = targets_in(a.out)
    runs, noisy = load(a.out, targets, a.max_other)
    ours = [t for t in targets if t != "socketio"]
    name = lambda t: NAMES.get(t, t)
    lines = []
    if a.proto:
        want = hashlib.sha256(open(a.proto, "rb").read()).hexdigest()
        other = {r.get("proto_sha256") for rs in runs.values() for r in rs} - {want}
        if other:
            lines.append(f"**WARNING: the loadgen was built from another proto ({', '.join(sorted(other))})**\n")

    def values(target, scenario, fn):
        out = []
        for r in runs.get((target, scenario), []):
            try:
                out.append(fn(r))
            except (KeyError, TypeError):
                out.append(None)
        return out

    head = ["scenario", "metric", name("socketio")]
    for t in ours:
        head += [name(t), f"{name(t)} ÷ peer"]
    head += ["goal", "met (lamplight)"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))

    def ratio_text(ratio):
        if ratio is None:
            return "-"
        if ratio >= 1:
            return f"{ratio:.2f}×"
        return f"{ratio:.3f} (1/{1 / ratio:.1f})" if ratio > 0 else "0"

    for scenario, label, metric, fn, goal in GOALS:
        peer = values("socketio", scenario, fn)
        cols = {t: values(t, scenario, fn) for t in ours}
        if not any(x is not None for x in peer + sum(cols.values(), [])):
            continue
        p = med(peer)
        op, factor = goal
        goal_text = f"{'≥' if op == '>=' else '≤'} {factor:g}×" if factor >= 1 else f"≤ 1/{round(1 / factor)}"
        row = [label, metric, cell(peer)]
        met = "-"
        for t in ours:
            o = med(cols[t])
            ratio = o / p if p and o is not None else None
            row += [cell(cols[t]), ratio_text(ratio)]
            if t == "grpc" and ratio is not None:
                met = "yes" if (ratio >= factor if op == ">=" else ratio <= factor) else "**no**"
        row += [goal_text, met]
        lines.append("| " + " | ".join(row) + " |")

    # loss over every fixed-rate run and every passing saturation step
    def total_loss(target):
        n, lost = 0, 0
        for (t, _), rs in runs.items():
            if t != target:
                continue
            for r in rs:
                steps = [r["result"]] if r.get("result") else [s for s in r.get("steps", []) if s["pass"]]
                for s in steps:
                    n += 1
                    lost += s["loss"]
        return n, lost

    pn, pl = total_loss("socketio")
    row = ["all fixed runs and passing saturation steps", "lost deliveries", f"{pl:,} in {pn} runs/steps"]
    for t in ours:
        n, lost = total_loss(t)
        row += [f"{lost:,} in {n} runs/steps", ""]
    ol = total_loss("grpc")[1]
    row += ["0", "yes" if ol == 0 else "**no**"]
    lines.append("| " + " | ".join(row) + " |")
    lines.append("")

    lines += storm_tables(a.out, targets, runs, name)

    if noisy:
        lines.append(f"Left out (other processes above {a.max_other} cores in a measured window): " + "; ".join(noisy) + "\n")
    scenarios = sorted({s for (_, s) in runs})
    for scenario in scenarios:
        sample = next(rs[0] for (t, sc), rs in runs.items() if sc == scenario)
        mode = sample.get("mode")
        counts = " / ".join(str(len(runs.get((t, scenario), []))) for t in targets)
        lines.append(f"#### {scenario} ({mode}; runs: {counts})\n")
        lines.append("| metric | " + " | ".join(name(t) for t in targets) + " |")
        lines.append("|---|" + "---|" * len(targets))
        rows = []
        if mode == "idle":
            per = lambda r: (r["idle"]["per_server"] or [{}])[0]
            rows = [
                ("connected", lambda r: r["connected"]),
                ("connect time s", lambda r: r["connect_s"]),
                ("server RSS before MiB", lambda r: per(r).get("rss_before_mb")),
                ("server RSS after MiB", lambda r: per(r).get("rss_after_mb")),
                ("server RSS KiB per connection", idle_kib),
                ("server idle CPU cores", lambda r: servers_sum({"servers": r["idle"]["servers_during_hold"]}, "cpu_util")),
                ("loadgen RSS KiB per connection", lambda r: r["idle"]["loadgen_rss_growth_per_conn_kb"]),
                ("disconnects", lambda r: r["idle"]["disconnects"]),
            ]
        else:
            if mode == "saturate":
                rows += [
                    ("max sustained deliveries/s", lambda r: r.get("max_sustained_deliveries_per_s")),
                    ("at events/s", lambda r: r.get("max_sustained_rate")),
                    ("first failing events/s", lambda r: r.get("first_fail_rate")),
                    ("highest step with p99 ≤ 50 ms, deliveries/s", lambda r: knee(r, 50.0)),
                    ("highest step with p99 ≤ 20 ms, deliveries/s", lambda r: knee(r, 20.0)),
                    ("first failing step's reason", None),
                ]
            rows.append(("connect time s", lambda r: r["connect_s"]))
            prefix = "@best " if mode == "saturate" else ""
            rows += [(prefix + name, (lambda f: lambda r: f(step(r)))(f)) for name, f in DETAILS]
            rows.append((prefix + "server CPU µs per delivery", lambda r: server_cpu_us(step(r))))
        for metric_name, fn in rows:
            if fn is None:
                def reason(target):
                    out = []
                    for r in runs.get((target, scenario), []):
                        fails = [s for s in r.get("steps", []) if not s["pass"]]
                        out.append(fails[-1]["fail_reason"] if fails else "-")
                    return "; ".join(out) or "-"
                lines.append(f"| {metric_name} | " + " | ".join(reason(t) for t in targets) + " |")
                continue
            lines.append(f"| {metric_name} | " + " | ".join(cell(values(t, scenario, fn)) for t in targets) + " |")
        lines.append("")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
