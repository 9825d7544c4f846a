#!/usr/bin/env python3
"""Turn the fault suite's JSON lines (NODEWATCH_FAULT_RESULTS) into a Markdown table.

    python scripts/fault_table.py faults.jsonl > table.md

One row per scenario: runs (passed/all), false confirmations, missed and late detections,
detection time p50/p99 over every detection of every run, actions run twice, commands and
events lost, wrong answers (neither 2xx nor a bounded 503 naming the store), unexpected reviews.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = max(0, math.ceil(q / 100 * len(ordered)) - 1)
    return ordered[rank]


def table(rows: list[dict[str, Any]]) -> str:
    by_scenario: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_scenario[row["scenario"]].append(row)
    out = ["| scenario | runs passed | false confirmations | missed / late | detection p50 / p99 "
           "| actions twice | commands / events lost | wrong answers | reviews |",
           "|---|---|---|---|---|---|---|---|---|"]
    for scenario in sorted(by_scenario):
        runs = by_scenario[scenario]
        detections = [d for r in runs for d in r["detections"]]
        timing = (f"{percentile(detections, 50):.2f} s / {percentile(detections, 99):.2f} s"
                  if detections else "–")

        def total(key: str, runs: list[dict[str, Any]] = runs) -> int:
            return sum(int(r[key]) for r in runs)

        out.append(
            f"| {scenario} | {sum(1 for r in runs if r['passed'])}/{len(runs)} "
            f"| {total('false_confirmations')} | {total('missed')} / {total('late')} "
            f"| {timing} | {total('actions_twice')} "
            f"| {total('commands_lost')} / {total('events_lost')} | {total('wrong_answers')} "
            f"| {total('reviews')} |")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: fault_table.py RESULTS.jsonl", file=sys.stderr)
        return 2
    lines = Path(argv[1]).read_text().splitlines()
    print(table([json.loads(line) for line in lines if line.strip()]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
