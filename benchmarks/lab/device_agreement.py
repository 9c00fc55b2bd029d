"""Do two runs of the same method agree case by case? (e.g. the H200 rows against CPU reruns)

Before a run is finished on another device than the one it started on, this says how much the
device alone moves the metrics: for every case both runs finished, each metric is compared, and
the script prints how many cases agree exactly and the largest and mean absolute difference.

    python benchmarks/lab/device_agreement.py benchmarks/results/gpu_h200/ROME /tmp/cpu/ROME
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

from rep_easyedit.eval.runner import pair_cases, read_cases


def agreement(cases_a: list[dict], cases_b: list[dict]) -> dict:
    """Per metric: cases compared, cases equal, max and mean |a - b| (metrics in [0, 1], fluency in bits)."""
    common = pair_cases(cases_a, cases_b)
    report = {"cases": len(common), "cases_identical": 0, "metrics": {}}
    for a, b in common:
        if a["metrics"] == b["metrics"]:
            report["cases_identical"] += 1
    keys = sorted({k for a, _ in common for k in a["metrics"]})
    for key in keys:
        diffs = [abs(a["metrics"][key] - b["metrics"][key]) for a, b in common
                 if a["metrics"].get(key) is not None and b["metrics"].get(key) is not None]
        if diffs:
            report["metrics"][key] = {"n": len(diffs), "equal": sum(d == 0 for d in diffs),
                                      "max_abs": max(diffs), "mean_abs": statistics.mean(diffs)}
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a")
    ap.add_argument("run_b")
    args = ap.parse_args()
    a, b = Path(args.run_a), Path(args.run_b)
    cases_a, cases_b = read_cases(a / "cases.jsonl"), read_cases(b / "cases.jsonl")
    report = agreement(cases_a, cases_b)
    devices = [sorted({str(c.get("device", "?")) for c in cases}) for cases in (cases_a, cases_b)]
    print(f"{a} ({', '.join(devices[0])}) vs {b} ({', '.join(devices[1])}): {report['cases']} common "
          f"cases, {report['cases_identical']} with every metric identical")
    print("| metric | cases | equal | max |a-b| | mean |a-b| |\n|---|---:|---:|---:|---:|")
    for key, row in report["metrics"].items():
        print(f"| {key} | {row['n']} | {row['equal']} | {row['max_abs']:.3f} | {row['mean_abs']:.4f} |")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
