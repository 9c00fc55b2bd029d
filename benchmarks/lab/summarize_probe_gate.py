"""Tables from `probe_gate.py` rows: each setting against the first, paired over cases, and (with
`--real`) how well the probe's neighbour figures foretell the locality a real edit loses.

    python -m benchmarks.lab.summarize_probe_gate benchmarks/results/probe_gate/smollm2_activation.jsonl \
        --real benchmarks/results/dev100/ROME benchmarks/results/dev100/REP-ROME

Rates are in points (100 × share); the `*_act` columns are the edit's share a = uᵀk (× 100).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.paired_deltas import bootstrap_interval  # run with -m from the repository root

COLUMNS = ("in_fire", "out_fire", "neighbour_fire", "in_act", "out_act", "neighbour_act", "neighbour_hit")


def _rows(path: Path) -> dict[str, dict[int, dict]]:
    """setting label -> case_id -> row (first layer's figures)."""
    out: dict[str, dict[int, dict]] = {}
    for row in map(json.loads, path.read_text().splitlines()):
        label = ",".join(f"{k}={v}" for k, v in sorted(row["set"].items())) or "default"
        out.setdefault(label, {})[row["case_id"]] = {k: v[0] for k, v in row.items() if isinstance(v, list)}
    return out


def _fmt(values: np.ndarray) -> str:
    low, high = bootstrap_interval(values)
    return f"{values.mean():+.1f} [{low:+.1f}, {high:+.1f}]"


def setting_table(rows: dict[str, dict[int, dict]]) -> str:
    labels = list(rows)
    ref = labels[0]
    lines = [f"reference: {ref}", "",
             "| setting | cases | " + " | ".join(COLUMNS) + " | Δ out_act | Δ neighbour_act | Δ neighbour_hit |",
             "|---|---:|" + "---:|" * (len(COLUMNS) + 3)]
    base_line = ["without REP (base)", str(len(rows[ref]))]
    for col in COLUMNS:
        base = f"{col}_base"
        vals = [r[base] for r in rows[ref].values() if r.get(base) is not None]
        base_line.append(f"{100 * np.mean(vals):.1f}" if vals else "–")
    lines.append("| " + " | ".join(base_line + ["", "", ""]) + " |")
    for label in labels:
        shared = sorted(set(rows[label]) & set(rows[ref]))
        cells = [label, str(len(shared))]
        for col in COLUMNS:
            vals = [rows[label][c].get(col) for c in shared if rows[label][c].get(col) is not None]
            cells.append(f"{100 * np.mean(vals):.1f}" if vals else "–")
        for col in ("out_act", "neighbour_act", "neighbour_hit"):
            pairs = [(rows[label][c].get(col), rows[ref][c].get(col)) for c in shared]
            diffs = np.array([100 * (a - b) for a, b in pairs if a is not None and b is not None])
            cells.append(_fmt(diffs) if label != ref and len(diffs) > 1 else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def real_check(rows: dict[int, dict], base_dir: Path, rep_dir: Path) -> str:
    """Per case: the probe's rise in neighbour figures (pathway − none) against the real Δ locality."""
    def by_case(d: Path) -> dict[int, float]:
        out = {}
        for r in map(json.loads, (d / "cases.jsonl").read_text().splitlines()):
            if r["metrics"].get("locality") is not None:
                out[r["case_id"]] = r["metrics"]["locality"]
        return out
    base, rep = by_case(base_dir), by_case(rep_dir)
    shared = [c for c in rows if c in base and c in rep and rows[c].get("neighbour_act") is not None]
    real = np.array([100 * (rep[c] - base[c]) for c in shared])
    rise = np.array([100 * (rows[c]["neighbour_act"] - rows[c]["neighbour_act_base"]) for c in shared])
    hit = np.array([100 * (rows[c]["neighbour_hit"] - rows[c]["neighbour_hit_base"]) for c in shared])
    fire = np.array([100 * rows[c]["neighbour_fire"] for c in shared])
    lines = [f"real Δ locality ({rep_dir.name} − {base_dir.name}) on {len(shared)} probed cases: "
             f"mean {real.mean():+.1f}; {int((real < 0).sum())} lower, {int((real > 0).sum())} higher"]
    for name, x in (("rise of neighbour_act", rise), ("rise of neighbour_hit", hit), ("neighbour_fire", fire)):
        r = float(np.corrcoef(x, real)[0, 1]) if x.std() > 0 and real.std() > 0 else float("nan")
        touched = x > 0
        lines.append(f"- {name}: correlation with real Δ locality {r:+.2f}; real Δ where it is > 0: "
                     f"{real[touched].mean() if touched.any() else float('nan'):+.1f} ({int(touched.sum())} cases), "
                     f"elsewhere {real[~touched].mean() if (~touched).any() else float('nan'):+.1f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", type=Path)
    ap.add_argument("--real", nargs=2, type=Path, metavar=("BASE_RUN", "REP_RUN"),
                    help="runner output folders of the base method and its REP version")
    args = ap.parse_args(argv)
    rows = _rows(args.rows)
    print(setting_table(rows))
    if args.real:
        print()
        print(real_check(rows[next(iter(rows))], *args.real))


if __name__ == "__main__":
    main()
