"""Summarises the alternating fan-out rounds of `scripts/bench.sh fanout`: per round, pushgate's
deliveries/s against the baseline's, and the medians. A run that lost messages (or, for find-max,
found no passing rate) counts as 0."""

import glob
import json
import re
import statistics
import sys


def result(path):
    for line in open(path):
        if line.startswith("{"):
            r = json.loads(line)["result"]
            ok = r["loss"] == 0 and r.get("pass", True)
            return r["deliveries_per_sec"] if ok else 0.0
    return 0.0


def main(out):
    for kind in ("saturated", "findmax"):
        rounds = sorted(
            int(re.search(r"-(\d+)\.txt$", p).group(1))
            for p in glob.glob(f"{out}/fanout-{kind}-pushgate-*.txt")
        )
        if not rounds:
            continue
        pg = [result(f"{out}/fanout-{kind}-pushgate-{i}.txt") for i in rounds]
        base = [result(f"{out}/fanout-{kind}-baseline-{i}.txt") for i in rounds]
        print(f"{kind}:")
        for i, p, b in zip(rounds, pg, base):
            print(f"  round {i}: pushgate {p:>12,.0f}/s  baseline {b:>12,.0f}/s  {p / b if b else 0:.0%}")
        mp, mb = statistics.median(pg), statistics.median(base)
        print(f"  median:  pushgate {mp:>12,.0f}/s  baseline {mb:>12,.0f}/s  {mp / mb if mb else 0:.0%}")


if __name__ == "__main__":
    main(sys.argv[1])
