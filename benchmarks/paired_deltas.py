"""How sure is a Δ (REP − base)? Paired bootstrap intervals over the cases both runs finished.

A table's Δ is a difference of two means over ~100 cases; with per-case scores that move by 0.2-1.0
it can be noise. This pairs the runs case by case and, per metric, prints the mean difference, a
95 % bootstrap interval (cases resampled with replacement, 10 000 draws, fixed seed) and on how many
cases REP scored higher / lower / the same.

    python benchmarks/paired_deltas.py benchmarks/results/cpu/MEMIT benchmarks/results/cpu/REP-MEMIT
    python benchmarks/paired_deltas.py BASE REP [BASE REP ...] [--out deltas.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

METRICS = ("success", "paraphrase", "locality", "rephrase_in", "rephrase_out", "shuffle_in",
           "shuffle_out", "long_in", "long_out", "distract_in", "distract_out", "long_old",
           "generation_new", "generation_old", "reversion")


def paired_differences(base_cases: list[dict], rep_cases: list[dict], metric: str) -> np.ndarray:
    """REP − base per case, in percentage points, over cases both runs scored on `metric`."""
    from rep_easyedit.eval.runner import pair_cases

    diffs = [100.0 * (r["metrics"][metric] - b["metrics"][metric]) for b, r in pair_cases(base_cases, rep_cases)
             if b["metrics"].get(metric) is not None and r["metrics"].get(metric) is not None]
    return np.asarray(diffs, dtype=float)


def bootstrap_interval(diffs: np.ndarray, draws: int = 10_000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(draws, len(diffs)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def pair_table(base_dir: Path, rep_dir: Path) -> str:
    from rep_easyedit.eval.runner import read_cases

    base, rep = read_cases(base_dir / "cases.jsonl"), read_cases(rep_dir / "cases.jsonl")
    lines = [f"### {rep_dir.name} − {base_dir.name} ({base_dir} vs {rep_dir})", "",
             "| metric | cases | Δ (points) | 95 % interval | REP higher | REP lower | same |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for metric in METRICS:
        d = paired_differences(base, rep, metric)
        if len(d) == 0:
            continue
        low, high = bootstrap_interval(d)
        lines.append(f"| {metric} | {len(d)} | {d.mean():+.1f} | [{low:+.1f}, {high:+.1f}] | "
                     f"{int((d > 0).sum())} | {int((d < 0).sum())} | {int((d == 0).sum())} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run dirs in pairs: BASE REP [BASE REP ...]")
    ap.add_argument("--out", default=None, help="also write the tables to this Markdown file")
    args = ap.parse_args(argv)
    if len(args.runs) % 2:
        ap.error("give the run dirs in pairs: BASE REP [BASE REP ...]")
    dirs = [Path(p) for p in args.runs]
    text = "\n".join(pair_table(dirs[i], dirs[i + 1]) for i in range(0, len(dirs), 2))
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
