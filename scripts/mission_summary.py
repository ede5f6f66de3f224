"""Summarises `scripts/bench.sh mission`: for each subscriber count, the highest zero-loss rate with
p99 < 250 ms for client, API and backend publishes on 2 nodes + Redis against the baseline; the
moderate-load latencies (and the nodes' own delivery-lag and Redis-hop histograms over those
runs); the latency at one steady rate; one connection's publish rate; idle memory per connection."""

import json
import os
import re
import statistics
import sys


def load(out, name):
    path = f"{out}/mission-{name}.txt"
    if not os.path.exists(path):
        return None
    for line in open(path):
        if line.startswith("{"):
            return json.loads(line)
    return None


def buckets(path, metric):
    """A histogram's cumulative buckets, {le: count}, from a /metrics scrape."""
    found = {}
    if not os.path.exists(path):
        return found
    pattern = re.compile(rf'^{metric}_bucket\{{le="([^"]+)"\}} (\S+)$')
    for line in open(path):
        m = pattern.match(line.strip())
        if m:
            found[float(m.group(1))] = float(m.group(2))
    return found


def quantile(q, cumulative):
    """Like PromQL's histogram_quantile: linear within the bucket that holds the rank."""
    bounds = sorted(cumulative)
    if not bounds or cumulative[bounds[-1]] <= 0:
        return None
    rank = q * cumulative[bounds[-1]]
    lower, below = 0.0, 0.0
    for le in bounds:
        if cumulative[le] >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * (rank - below) / max(cumulative[le] - below, 1e-9)
        lower, below = le, cumulative[le]
    return None


def node_latency(out, via):
    """The nodes' delivery lag (n1, n2) and Redis hop (n2) over the moderate runs of `via`,
    from the scrapes before and after each run."""
    parts = []
    for node, metric, label in (
        ("n1", "pushgate_delivery_lag_seconds", "lag n1"),
        ("n2", "pushgate_delivery_lag_seconds", "lag n2"),
        ("n2", "pushgate_redis_hop_seconds", "hop n2"),
    ):
        total = {}
        for f in os.listdir(out):
            m = re.match(rf"mission-moderate-{via}-(\d+)-after-{node}\.metrics$", f)
            if not m:
                continue
            after = buckets(f"{out}/{f}", metric)
            before = buckets(f"{out}/mission-moderate-{via}-{m.group(1)}-before-{node}.metrics", metric)
            for le, n in after.items():
                total[le] = total.get(le, 0.0) + n - before.get(le, 0.0)
        p50, p99 = quantile(0.5, total), quantile(0.99, total)
        if p50 is not None:
            parts.append(f"{label} p50 {p50 * 1000:.1f} p99 {p99 * 1000:.1f}")
    return "; ".join(parts)


def searches(out, subs, via):
    """The find-max results of `via` for `subs` subscribers, by round: {round: (msg/s, deliveries/s)}."""
    found = {}
    for f in os.listdir(out):
        m = re.match(rf"mission-{subs}-{via}-(\d+)\.txt$", f)
        if m and (r := load(out, f[len("mission-"):-len(".txt")])) is not None:
            found[int(m.group(1))] = (r.get("max_ok_rate") or 0.0, r.get("max_ok_deliveries_per_sec") or 0.0)
    return found


def main(out):
    subs_seen = sorted(
        {int(f.split("-")[1]) for f in os.listdir(out) if f.startswith("mission-") and f.split("-")[1].isdigit()}
    )
    print("highest rate with zero loss and p99 < 250 ms (2 nodes + Redis, publisher on n1):")
    for subs in subs_seen:
        base = searches(out, subs, "baseline")
        if not base:
            continue
        base_dps = statistics.median(dps for _, dps in base.values())
        each = ", ".join(f"{dps:,.0f}" for _, (_, dps) in sorted(base.items()))
        print(f"  {subs} subscribers: baseline (1 process) {base_dps:,.0f} deliveries/s (median; per round: {each})")
        for via in ("ws", "http", "redis"):
            found = searches(out, subs, via)
            if not found:
                continue
            rate = statistics.median(rate for rate, _ in found.values())
            dps = statistics.median(dps for _, dps in found.values())
            share = dps / base_dps if base_dps else 0.0
            pairs = ", ".join(
                f"{d / base[r][1]:.2f}" if base.get(r, (0, 0))[1] else "-" for r, (_, d) in sorted(found.items())
            )
            print(
                f"    via {via:<5} {rate:>8,.0f} msg/s  {dps:>10,.0f} deliveries/s  {share:.2f}x baseline"
                f"  (medians of {len(found)}; each round against its baseline: {pairs})"
            )
    print("moderate load, 25 msg/s x 2,000 subscribers, latency ms (median of the rounds' p50/p99):")
    for name in ("ws", "http", "redis", "baseline"):
        rounds = sorted(
            f for f in os.listdir(out) if f.startswith(f"mission-moderate-{name}-") and f.endswith(".txt")
        )
        runs = [load(out, f[len("mission-"):-len(".txt")]) for f in rounds]
        runs = [r["result"] for r in runs if r is not None]
        if not runs:
            continue
        p50 = statistics.median(r["latency"]["p50_ms"] for r in runs)
        p99 = statistics.median(r["latency"]["p99_ms"] for r in runs)
        each = ", ".join(f"{r['latency']['p99_ms']:.1f}" for r in runs)
        loss = sum(r["loss"] for r in runs)
        print(f"  {name:<8} p50 {p50:.2f}  p99 {p99:.2f}  (p99 per round: {each})  loss {loss}")
        if name != "baseline" and (nodes := node_latency(out, name)):
            print(f"           node histograms, ms (ts has 1 ms resolution): {nodes}")
    steady = {}
    for f in sorted(os.listdir(out)):
        m = re.match(r"mission-steady-(\d+)-(\w+)-(\d+)\.txt$", f)
        if m and (r := load(out, f[len("mission-"):-len(".txt")])) is not None:
            steady.setdefault((int(m.group(1)), m.group(2)), []).append(r)
    for (subs, via), runs in sorted(steady.items(), key=lambda kv: (kv[0][0], kv[0][1] == "baseline", kv[0][1])):
        steps = [s for r in runs for s in r["steps"]]
        p99s = [s["latency"]["p99_ms"] for s in steps]
        loss = sum(s["loss"] for s in steps)
        print(
            f"steady {steps[0]['rate']:.0f} msg/s x {subs:,} subscribers, via {via:<8} p50 "
            f"{statistics.median(s['latency']['p50_ms'] for s in steps):.1f}  p99 {statistics.median(p99s):.1f} "
            f"(median of {len(steps)} runs; range {min(p99s):.1f}-{max(p99s):.1f})  loss {loss}"
        )
    r = load(out, "one-connection")
    if r is not None:
        print(
            f"one publishing connection: {r.get('max_ok_rate') or 0:,.0f} msg/s in order, zero loss, p99 < 250 ms"
        )
    for n in ("n1", "n2"):
        r = load(out, f"idle-{n}")
        if r is not None:
            print(
                f"idle {n}: {r['rss_per_connection_bytes'] / 1024:.2f} KiB per connection at {r['opened']} connections"
            )


if __name__ == "__main__":
    main(sys.argv[1])
