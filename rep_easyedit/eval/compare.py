"""Compare benchmark runs side by side: base method vs its REP version, with deltas.

    python benchmarks/compare_runs.py --runs runs/ROME runs/REP-ROME runs/EMMET runs/REP-EMMET \
        --out runs/compare [--first 20]

Reads each run dir written by `benchmarks/run_benchmark.py` (cases.jsonl, run.json) and writes to
`--out`:

- `comparison.md`: a table like the paper's Table 1: per backend a row for the base method, one
  for +REP and one for the difference (REP − base), computed over the cases both runs finished;
  runs without a partner are listed on their own.
- `robustness.png`: bars of every rate per run.
- `key_similarity_<run>.png` for REP runs made with `key_similarity=true`: the distribution of
  ``k_sᵀC⁻¹k* / k*ᵀC⁻¹k*`` for rephrased, shuffled, long-context and random (corpus) keys, before
  and after the pathway (paper Fig. 3); the title says when C = identity (no covariance cache).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

COLUMNS = ("success", "paraphrase", "locality", "rephrase_in", "rephrase_out", "shuffle_in",
           "shuffle_out", "long_in", "long_out", "distract_in", "distract_out", "long_old", "generation_new",
           "generation_old", "reversion", "fluency", "edit_seconds_median", "rep_seconds_median")
# shown only where some run measured them
OPTIONAL = ("distract_in", "distract_out", "long_old", "generation_new", "generation_old")
HEADERS = {"edit_seconds_median": "edit s", "rep_seconds_median": "REP s", "fluency": "fluency (bits)",
           "rephrase_in": "reph. in", "rephrase_out": "reph. out", "shuffle_in": "shuf. in",
           "shuffle_out": "shuf. out", "long_in": "long in", "long_out": "long out",
           "paraphrase": "paraphr.", "reversion": "reversion", "distract_in": "distr. in",
           "distract_out": "distr. out", "long_old": "long, old fact", "generation_new": "says new",
           "generation_old": "says old"}
BAR_KEYS = ("success", "paraphrase", "locality", "rephrase_in", "rephrase_out", "shuffle_in",
            "shuffle_out", "long_in", "long_out", "distract_in", "distract_out", "long_old", "generation_new",
            "generation_old")
KS_GROUPS = ("rephrase_in", "rephrase_out", "shuffle_in", "shuffle_out", "long_in", "long_out", "random")


def load_run(path: str | Path) -> dict:
    from .runner import read_cases

    path = Path(path)
    cases = read_cases(path / "cases.jsonl")
    if not cases:
        raise SystemExit(f"{path}: no cases.jsonl lines (is it a run_benchmark.py out dir?)")
    info = {}
    if (path / "run.json").exists():
        info = json.loads((path / "run.json").read_text(encoding="utf-8"))
    alg = info.get("alg") or cases[0].get("alg") or path.name
    model = info.get("model") or cases[0].get("model") or ""
    data = info.get("data") or cases[0].get("data") or ""
    return {"path": path, "alg": alg, "model": model, "data": data, "cases": cases,
            "label": f"{alg}" + (f" ({path.name})" if path.name != alg else "")}


def backend_of(alg: str) -> str:
    return alg[4:] if alg.startswith("REP-") else alg


def _cell(key: str, value, delta: bool = False) -> str:
    if value is None:
        return "–"
    digits = 2 if key in ("fluency", "edit_seconds_median", "rep_seconds_median") else 1
    return f"{value:+.{digits}f}" if delta else f"{value:.{digits}f}"


def columns_for(runs: list[dict], keys: tuple[str, ...] = COLUMNS) -> tuple[str, ...]:
    """`keys` without the optional columns that no case of any run measured."""
    measured = {k for run in runs for c in run["cases"] for k, v in c["metrics"].items() if v is not None}
    return tuple(k for k in keys if k not in OPTIONAL or k in measured)


def _row(name: str, summary: dict, delta: bool = False, columns: tuple[str, ...] = COLUMNS) -> str:
    cells = [_cell(k, summary.get(k), delta) for k in columns]
    n = "" if delta else str(summary.get("n_cases", ""))
    return f"| {name} | {n} | " + " | ".join(cells) + " |"


def device_counts(cases: list[dict]) -> str:
    """Which device ran how many cases, e.g. 'cpu 40, not recorded 60' (lines before the runner
    recorded the device have none): a run finished on another device than it started on says so."""
    counts = Counter(str(c["device"]) if c.get("device") is not None else "not recorded" for c in cases)
    return ", ".join(f"{name} {n}" for name, n in counts.most_common())


def comparison_table(runs: list[dict]) -> str:
    from .metrics import summarize
    from .runner import pair_cases

    columns = columns_for(runs)
    header = "| method | n | " + " | ".join(HEADERS.get(k, k) for k in columns) + " |"
    sep = "|---|---:|" + "---:|" * len(columns)
    lines = ["# Base vs REP", "",
             "Rates in %, fluency in bits (ROME's generation entropy), seconds are medians per edit. "
             "Paired rows use only the cases both runs finished; Δ = REP − base.", "",
             header, sep]
    used = set()
    groups: dict[tuple, dict] = {}
    for i, run in enumerate(runs):
        groups.setdefault((run["model"], run["data"], backend_of(run["alg"])), {}).setdefault(
            "rep" if run["alg"].startswith("REP-") else "base", i)
    for (model, data, backend), pair in groups.items():
        if "base" in pair and "rep" in pair:
            base, rep = runs[pair["base"]], runs[pair["rep"]]
            pairs = pair_cases(base["cases"], rep["cases"])
            sb, sr = summarize([b for b, _ in pairs]), summarize([r for _, r in pairs])
            diff = {k: (sr[k] - sb[k]) if sr.get(k) is not None and sb.get(k) is not None else None
                    for k in columns}
            tag = f" [{model}]" if model else ""
            lines += [_row(f"{base['alg']}{tag}", sb, columns=columns),
                      _row(f"+REP ({rep['alg']})", sr, columns=columns),
                      _row("Δ", diff, delta=True, columns=columns)]
            used |= {pair["base"], pair["rep"]}
    for i, run in enumerate(runs):
        if i not in used:
            lines.append(_row(run["label"], summarize(run["cases"]), columns=columns))
    lines += ["", "Cases per device (each case line records the device that ran it):", ""]
    lines += [f"- {run['label']}: {device_counts(run['cases'])}" for run in runs]
    return "\n".join(lines) + "\n"


def plot_robustness(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .metrics import summarize

    bar_keys = columns_for(runs, BAR_KEYS)
    width = 0.8 / max(1, len(runs))
    x = np.arange(len(bar_keys))
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(bar_keys) + 0.4 * len(runs)), 4.5))
    for j, run in enumerate(runs):
        s = summarize(run["cases"])
        values = [s[k] if s[k] is not None else 0.0 for k in bar_keys]
        bars = ax.bar(x + (j - (len(runs) - 1) / 2) * width, values, width, label=f"{run['label']} (n={s['n_cases']})")
        for b, k in zip(bars, bar_keys):
            if s[k] is None:
                b.set_hatch("//")
    ax.set_xticks(x, [HEADERS.get(k, k) for k in bar_keys], rotation=20)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title("Edit success, generalisation and robustness per method")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, not on them
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_key_similarity(run: dict, path: Path) -> bool:
    """Boxes of k_sᵀC⁻¹k*/k*ᵀC⁻¹k* per key group, before and after REP. False if no data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [c["key_similarity"] for c in run["cases"] if c.get("key_similarity")]
    if not ks:
        return False
    groups = [g for g in KS_GROUPS if any(g in (k.get("before") or {}) for k in ks)]
    before = {g: [v for k in ks for v in (k["before"] or {}).get(g, [])] for g in groups}
    after = {g: [v for k in ks for v in (k.get("after") or {}).get(g, [])] for g in groups}
    whitening = {k.get("whitening") for k in ks}
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(groups)), 4.5))
    pos_b = [3 * i for i in range(len(groups))]
    pos_a = [p + 1 for p in pos_b]
    kw = dict(widths=0.8, patch_artist=True, showfliers=False)
    bb = ax.boxplot([before[g] or [float("nan")] for g in groups], positions=pos_b, **kw)
    ba = ax.boxplot([after[g] or [float("nan")] for g in groups], positions=pos_a, **kw)
    for b in bb["boxes"]:
        b.set_facecolor("#9ecae1")
    for b in ba["boxes"]:
        b.set_facecolor("#fdae6b")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks([p + 0.5 for p in pos_b], groups)
    ax.legend([bb["boxes"][0], ba["boxes"][0]], ["before REP", "after REP"], fontsize=8)
    if whitening == {"identity"}:
        note = "C = identity: no covariance cache, plain dot product"
    elif whitening == {"C^-1"}:
        note = "C⁻¹ from the covariance cache"
    else:
        note = "C mixed: " + ", ".join(sorted(map(str, whitening)))
    adj = {k.get("edit_mom2_adjustment") for k in ks}
    if adj == {False}:
        note += " (the edit itself used mom2_adjustment: false, i.e. the plain dot product)"
    ax.set_title(f"{run['label']}: key similarity $k_s^T C^{{-1}} k^* / k^{{*T}} C^{{-1}} k^*$ "
                 f"({len(ks)} cases)\n{note}", fontsize=10)
    ax.set_ylabel("similarity to the edit key (1 = k*)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def compare(run_dirs: list[str], out: str | Path, first: int | None = None) -> dict:
    """`first`: only the cases among the data file's first N (by their index in it)."""
    runs = [load_run(p) for p in run_dirs]
    if first is not None:
        for run in runs:
            run["cases"] = [c for c in run["cases"] if c["index"] < first]
            if not run["cases"]:
                raise SystemExit(f"{run['path']}: no finished case among the first {first}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = comparison_table(runs)
    (out / "comparison.md").write_text(table, encoding="utf-8")
    written = {"table": out / "comparison.md", "plots": []}
    plot_robustness(runs, out / "robustness.png")
    written["plots"].append(out / "robustness.png")
    for run in runs:
        name = f"key_similarity_{run['alg']}_{run['path'].name}.png".replace("/", "_")
        if plot_key_similarity(run, out / name):
            written["plots"].append(out / name)
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="run dirs of benchmarks/run_benchmark.py")
    ap.add_argument("--out", default="runs/compare", help="where to write comparison.md and the PNGs")
    ap.add_argument("--first", type=int, default=None,
                    help="compare only cases among the data file's first N (e.g. a 20-case table "
                         "from 100-case runs)")
    args = ap.parse_args(argv)
    written = compare(args.runs, args.out, args.first)
    print((Path(written["table"])).read_text(encoding="utf-8"))
    for p in written["plots"]:
        print(f"[compare_runs] wrote {p}")

