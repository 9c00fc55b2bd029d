"""Why does REP-ROME lose an edit ROME makes? (dev cases 33 and 39 in the 100-case table)

For each case: edit with REP-ROME (torch seeded as the runner does) and score the edit prompt
(teacher-forced exact match of target_new) twice, with the adapters on and with them passing every
key unchanged (ROME's weight update alone, the same update). At the prompt's last subject token it also reports
the adapter's gate and how far the adapter moves the key, relative to the key's norm. If success
comes back with the adapters off, the adapter's move of the prompt's own key costs the edit.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/lab/probe_lost_edits.py --cases 33 39 0 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def probe(model, tok, hparams, record: dict, index: int) -> dict:
    from rep_easyedit.eval.runner import edit_request

    from rep_easyedit.editing import edited
    from rep_easyedit.eval.metrics import exact_match
    from rep_easyedit.core.keys import collect_keys, subject_last_index
    from rep_easyedit.core.pathway import get_module, pathway_of

    request = edit_request(record)
    prompt = record["prompt"]
    path = hparams.rewrite_module_tmp.format(int(list(hparams.layers)[0]))
    torch.manual_seed(0)
    with edited(model, tok, [request], hparams):
        module = get_module(model, path)
        adapters = list(pathway_of(module).adapters)
        on = exact_match(model, tok, [prompt], record["target_new"])[0]
        taus = [a.tau for a in adapters]
        for a in adapters:  # a gate never exceeds 1: every key passes unchanged (switching `active`
            a.tau = 2.0     # off instead would make the pathway remove itself mid-edit)
        try:
            off = exact_match(model, tok, [prompt], record["target_new"])[0]
            end = subject_last_index(tok, prompt, prompt.index(record["subject"]) + len(record["subject"]))
            k = collect_keys(model, tok, [prompt], path, positions=[end])[0][0]  # raw: adapters pass
        finally:
            for a, tau in zip(adapters, taus):
                a.tau = tau
        k = k.to(adapters[-1].active.device)
        with torch.no_grad():  # the raw key through the adapter, hard gate as at inference
            gate = float(adapters[-1].gate_prob(k)[..., 0])
            moved = float((adapters[-1](k, hard=True) - k).norm() / k.norm())
    return {"index": index, "case_id": record["case_id"], "prompt": prompt, "target_new": record["target_new"],
            "success_adapters_on": on, "success_adapters_off": off, "gate_at_prompt": round(gate, 4),
            "key_moved_rel": round(moved, 4)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, nargs="+", default=[33, 39, 0, 1], help="dev case indices")
    ap.add_argument("--hparams", default=str(ROOT / "hparams/REP-ROME/smollm2-135m.yaml"))
    ap.add_argument("--data", default=str(ROOT / "data/counterfact_smollm2_dev.json"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/probe_lost_edits.jsonl"))
    args = ap.parse_args(argv)

    from rep_easyedit.eval.datasets import load_records
    from rep_easyedit.editing import load_hparams
    from rep_easyedit.model_loading import load_model_and_tokenizer

    hparams = load_hparams(args.hparams)
    records = load_records(args.data)
    model, tok = load_model_and_tokenizer(hparams.model_name, device=getattr(hparams, "device", "cpu"))
    rows = [probe(model, tok, hparams, records[i], i) for i in args.cases]
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
