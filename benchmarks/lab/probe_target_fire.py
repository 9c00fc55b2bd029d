"""Does REP's gate fire inside the answer? Keys of `prompt + target_new` at the target's tokens.

Teacher-forced token accuracy (zsRE, EasyEdit's `rewrite_acc`) reads every target token with the
earlier ones in the input. Where `target_new` repeats a token of the subject ("Deportivo Garcilaso"
→ "Estadio Municipal Garcilaso"), the gate trained on the subject's last tokens may fire there and
pull that token's key onto k*. No edit is made: the adapters are fitted as a REP edit fits them
(lower layers installed while upper keys are read) and the gate is read at each target token.

    OMP_NUM_THREADS=1 python benchmarks/lab/probe_target_fire.py --alg REP-MEMIT --data data/zsre_dev.json \
        --cases 0-49 --out benchmarks/results/probe_target_fire/smollm2_zsre_memit.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from pathlib import Path

import torch

from probe_gate import ROOT, keys_at, probe_cases, probe_setup, rep_value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alg", default="REP-MEMIT")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(ROOT / "data/zsre_dev.json"))
    ap.add_argument("--cases", default="0-49", help="range a-b of data indices")
    ap.add_argument("--set", default="", help="rep fields for this run: field=value[,field=value]")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from rep_easyedit.core.pathway import pathway_installed
    from rep_easyedit.rep_main import fit_adapters

    hp, records, model, tok, backend, base_hp, paths = probe_setup(args.alg, args.model, args.data, args.cases)
    setting = dict(kv.split("=", 1) for kv in args.set.split(",")) if args.set else {}
    rep = dataclasses.replace(hp.rep, **{k: rep_value(getattr(hp.rep, k), v) for k, v in setting.items()})
    out = Path(args.out)
    for idx, record, request, pert, templates, corpus in probe_cases(rep, records, model, tok, backend, base_hp, out):
        fitted = fit_adapters(model, tok, dict(request), pert, templates, paths, rep, corpus,
                              negatives_cache=getattr(base_hp, "stats_dir", None))
        prompt, target = request["prompt"], request["target_new"]
        n_prompt = len(tok(prompt)["input_ids"])
        ids = tok(prompt + " " + target)["input_ids"]
        subject_ids = set(tok(" " + request["subject"], add_special_tokens=False)["input_ids"]) | \
            set(tok(request["subject"], add_special_tokens=False)["input_ids"])
        row = {"index": idx, "case_id": record["case_id"], "set": setting, "subject": request["subject"],
               "target_new": target, "target_tokens": [tok.decode([i]) for i in ids[n_prompt:]],
               "shares_subject_token": [i in subject_ids for i in ids[n_prompt:]], "gate": {}}
        with contextlib.ExitStack() as lower:
            for path, adapter, _report in fitted:
                adapter.eval()
                keys = keys_at(model, tok, path, [prompt + " " + target], [None])[0]
                with torch.no_grad():
                    row["gate"][path] = [round(float(g), 4) for g in adapter.gate_prob(keys[n_prompt:]).squeeze(-1)]
                lower.enter_context(pathway_installed(model, path, adapter))
        row["fires"] = any(g > rep.tau for gs in row["gate"].values() for g in gs)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(row["case_id"], row["subject"], "->", target, "fires" if row["fires"] else "")


if __name__ == "__main__":
    main()
