"""Does a longer merge give back the edits a `rep.merge_rank` run lost? (under-training vs stale keys)

After `lifelong.py --set rep.merge_rank=R`, each layer holds one merged adapter carrying every edit's
kept keys. Per edit, this probe measures on those kept keys how far the merged adapter puts the
held-in variants from their own `k*` (hard gate) and how many of them fire, first as the run left
it, then after retraining the merged adapter on the same keys for `--steps` steps without the
adaptive stop; then it scores every edit on the retrained pathway (the lifelong check). If the
longer merge gives the lost edits back, the merge was under-trained; if their kept keys already sat
on target and the edits stay lost, what broke them is not on the kept keys (e.g. the keys moved
since they were read).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lab/probe_merge_steps.py \\
        --state benchmarks/results/lifelong/smollm2_merged_in_edit/REP-AlphaEdit/state --n 50 \\
        --steps 600 --out benchmarks/results/lifelong/probe_merge_steps.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import runpy
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def per_edit(adapter, groups) -> list[dict]:
    """Per kept edit: median relative distance of its variants to its k* (hard gate), share firing."""
    out = []
    with torch.no_grad():
        for keys in groups:
            pos = keys.positives.float()
            target = keys.target.float()
            moved = adapter(pos, hard=True)
            dist = (moved - target).norm(dim=-1) / target.norm()
            fire = (adapter.gate_prob(pos).squeeze(-1) > adapter.tau).float().mean()
            out.append({"distance": round(float(dist.median()), 3), "fire": round(float(fire), 3)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state", required=True, help="a `rep.merge_rank` lifelong run's state folder")
    ap.add_argument("--alg", default="REP-AlphaEdit")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, required=True, help="edits the state holds (the run's first n cases)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from rep_easyedit.core.merging import KEPT, _trained_on
    from rep_easyedit.core.pathway import detach_adapter, get_module, install, installed_paths, pathway_of

    lifelong = types.SimpleNamespace(**runpy.run_path(str(ROOT / "benchmarks" / "lifelong.py")))
    hp, records, model, tok, perts, refs = lifelong.state_for_scoring(args.alg, args.model, args.n, args.state)
    longer = dataclasses.replace(hp.rep, adaptive_stop=False)
    layers = {}
    for path in installed_paths(model):
        live = [a for a in pathway_of(get_module(model, path)).adapters if float(a.active) != 0.0]
        if len(live) != 1 or getattr(live[0], KEPT, None) is None:
            raise SystemExit(f"{path}: expected one merged adapter with kept keys, found {len(live)}")
        old = live[0]
        groups = getattr(old, KEPT)
        t0 = time.perf_counter()
        new, report = _trained_on(groups, longer, old.rank, args.steps, None, get_module(model, path).weight.device)
        layers[path] = {"edits": len(groups), "retrain_seconds": time.perf_counter() - t0,
                        "retrain_steps": report.steps, "retrain_pos_fire": report.gate_pos_fire,
                        "retrain_neg_fire": report.gate_neg_fire,
                        "as_left": per_edit(old, groups), "retrained": per_edit(new, groups)}
        detach_adapter(model, path, old)
        install(model, path, new)
        print(path, {k: v for k, v in layers[path].items() if k not in ("as_left", "retrained")}, flush=True)
    t0 = time.perf_counter()
    result = lifelong._check(model, tok, records, perts, refs, 0)
    print("retrained", json.dumps(result["summary"]), f"{time.perf_counter() - t0:.0f} s", flush=True)
    Path(args.out).write_text(json.dumps({"state": args.state, "n": args.n, "steps": args.steps,
                                          "case_ids": [r["case_id"] for r in records], "layers": layers,
                                          "summary": result["summary"], "cases": result["cases"]}, indent=1))


if __name__ == "__main__":
    main()
