"""Can one screening gate in front of the stacked adapters keep their quality at a merged pathway's cost?

After a `lifelong.py --merge-rank` run, each layer holds one merged adapter, and the state keeps
every edit's training keys. This probe scores every edit so far on that model three ways:

- ``merged``: the pathway as the run left it (one adapter per layer; reproduces its checkpoint);
- ``stacked``: one adapter per edit and layer, retrained on that edit's kept keys as an edit
  trains it (what a run without merging stacks, up to the kept keys' slimmed negatives);
- ``screened``: the same stack behind the merged adapter's gate: a token passes through the stack
  only where that one gate fires, so a token about no edited subject (nearly every token) pays one
  gate, as with the merged pathway.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lab/probe_screen.py \\
        --state /tmp/state_merged50 --n 50   # a copy of the run's 50-edit state \\
        --out benchmarks/results/lifelong/probe_screen.json
"""

from __future__ import annotations

import argparse
import json
import runpy
import types
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state", required=True, help="a --merge-rank run's state folder")
    ap.add_argument("--alg", default="REP-AlphaEdit")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, required=True, help="edits the state holds (the run's first n cases)")
    ap.add_argument("--fluency-cases", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from rep_easyedit.core.pathway import RobustEditPathway, get_module, install, pathway_of, remove_pathways
    from rep_easyedit.core.training import freeze, fresh_adapter, train_adapter

    lifelong = types.SimpleNamespace(**runpy.run_path(str(ROOT / "benchmarks" / "lifelong.py")))
    hp, records, model, tok, perts, refs = lifelong.state_for_scoring(args.alg, args.model, args.n, args.state)
    rep = hp.rep
    state = Path(args.state)
    groups = lifelong._load_keys(state)
    results = {}

    def check(name: str) -> None:
        t0 = time.perf_counter()
        results[name] = lifelong._check(model, tok, records, perts, refs, args.fluency_cases)
        print(name, json.dumps(results[name]["summary"]), f"{time.perf_counter() - t0:.0f} s", flush=True)

    check("merged")
    screens = {path: pathway_of(get_module(model, path)).adapters[0] for path in groups}
    remove_pathways(model)
    t0 = time.perf_counter()
    for path, kept in groups.items():
        device = get_module(model, path).weight.device
        for i, keys in enumerate(kept):
            adapter = fresh_adapter(keys.positives.shape[-1], rep.rank, rep, rep.seed + i, device)
            train_adapter(adapter, keys, rep)
            install(model, path, freeze(adapter))
    retrain_s = time.perf_counter() - t0
    check("stacked")

    real_forward = RobustEditPathway.forward
    by_pathway = {id(pathway_of(get_module(model, path))): screen for path, screen in screens.items()}

    def screened(self, keys):
        screen = by_pathway[id(self)]
        fire = (screen.gate_prob(keys) > screen.tau).squeeze(-1)
        if not bool(fire.any()):
            return keys
        out = keys.clone()
        out[fire] = real_forward(self, keys[fire])
        return out

    RobustEditPathway.forward = screened
    try:
        check("screened")
    finally:
        RobustEditPathway.forward = real_forward
    summary = {name: r["summary"] for name, r in results.items()}
    Path(args.out).write_text(json.dumps({"state": args.state, "n": args.n, "stacked_retrain_seconds": retrain_s,
                                          "summary": summary,
                                          "cases": {name: r["cases"] for name, r in results.items()}}, indent=1))


if __name__ == "__main__":
    main()
