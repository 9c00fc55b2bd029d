"""Where REP-ROME's (or REP-<alg>'s, `--alg`) locality loss comes from: the gate, or a different weight update.

For each case: ROME's edit and REP-ROME's edit (same seed) are scored on the neighbourhood
prompts (locality against the unedited model, per prompt); REP-ROME is scored three ways:
as edited, with its pathway off (its weight update alone), and with the pathway on ROME's
weights. Where REP loses a neighbour, the pathway's max gate over that prompt's tokens says
whether the gate fired there.

    OMP_NUM_THREADS=1 python benchmarks/lab/probe_locality.py --cases 18,27,57,97 --out benchmarks/results/probe_locality.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]


def per_prompt_locality(model, tok, case, ref):
    from rep_easyedit.eval import metrics as m

    preds = m.teacher_forced_predictions(model, tok, [tuple(p) for p in ref["pairs"]])
    return m._locality_scores(ref, [p for _, p in preds])


@contextlib.contextmanager
def pathway_off(model):
    """No adapter fires for the block: τ = 1 (a sigmoid never exceeds it). Switching adapters off
    through `active` would make the pathway's hook take itself off the module for good."""
    from rep_easyedit.core.pathway import get_module, installed_paths, pathway_of

    adapters = [a for p in installed_paths(model) for a in pathway_of(get_module(model, p)).adapters]
    saved = [a.tau for a in adapters]
    try:
        for a in adapters:
            a.tau = 1.0
        yield
    finally:
        for a, tau in zip(adapters, saved):
            a.tau = tau


def max_gates(model, tok, prompts):
    """Per prompt: the highest gate probability of any adapter at any prompt token (None without a pathway)."""
    from rep_easyedit.core.pathway import get_module, installed_paths, pathway_of

    seen = []

    def hook(adapters):
        def pre(module, args):
            keys = args[0]
            seen.append(max(a.gate_prob(keys).max().item() for a in adapters))
        return pre

    # prepended: the gates see the keys before the pathway changes them
    handles = [get_module(model, p).register_forward_pre_hook(hook(list(pathway_of(get_module(model, p)).adapters)),
                                                              prepend=True)
               for p in installed_paths(model)]
    out = []
    try:
        for prompt in prompts:
            seen.clear()
            with torch.no_grad():
                model(**tok(prompt, return_tensors="pt"))
            out.append(max(seen) if seen else None)
    finally:
        for h in handles:
            h.remove()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="18,27,57,97", help="indices into the dev file")
    ap.add_argument("--alg", default="ROME", help="the base method; REP-<alg> is probed against it (ROME, R-ROME, EMMET)")
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m or gemma3-270m (hparams/<ALG>/<model>.yaml)")
    ap.add_argument("--data", default=None, help="default: the model's CounterFact dev set")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/probe_locality.jsonl"))
    ap.add_argument("--rep-set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="REP-ROME's rep: fields changed for the probe, e.g. value_on_variants=true")
    args = ap.parse_args()

    import rep_easyedit  # noqa: F401
    from rep_easyedit.core.pathway import remove_pathways
    from rep_easyedit.editing import apply_edit, load_hparams, restore_snapshot, snapshot
    from rep_easyedit.eval.metrics import locality_reference
    from rep_easyedit.eval.runner import edit_request
    from rep_easyedit.model_loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(args.model)
    data = args.data or str(ROOT / f"data/counterfact_{args.model.split('-')[0]}_dev.json")
    records = json.loads(Path(data).read_text())
    base, rep_alg = args.alg, f"REP-{args.alg}"
    hps = {a: load_hparams(ROOT / f"hparams/{a}/{args.model}.yaml") for a in (base, rep_alg)}
    for change in args.rep_set:
        field, value = change.split("=", 1)
        if not hasattr(hps[rep_alg].rep, field):
            raise SystemExit(f"--rep-set: REPConfig has no field {field!r}")
        setattr(hps[rep_alg].rep, field, yaml.safe_load(value))
    hps[rep_alg].rep.check()
    for idx in [int(i) for i in args.cases.split(",")]:
        case = records[idx]
        ref = locality_reference(model, tok, case)
        state = snapshot(model)
        torch.manual_seed(0)
        apply_edit(model, tok, [edit_request(case)], hps[base])
        rome = per_prompt_locality(model, tok, case, ref)
        rome_weights = {n: p.detach().clone() for n, p in model.named_parameters()
                        if not torch.equal(p, state[n])}
        restore_snapshot(model, state)
        torch.manual_seed(0)
        apply_edit(model, tok, [edit_request(case)], hps[rep_alg])
        rep = per_prompt_locality(model, tok, case, ref)
        gates = max_gates(model, tok, [p for p, _ in ref["pairs"]])
        with pathway_off(model):
            rep_weights_only = per_prompt_locality(model, tok, case, ref)
        rep_w = {n: p.detach().clone() for n, p in model.named_parameters() if n in rome_weights}
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in rome_weights:
                    p.copy_(rome_weights[n])
        rome_weights_rep_pathway = per_prompt_locality(model, tok, case, ref)
        update_gap = max((rep_w[n] - rome_weights[n]).norm().item() /
                         (rome_weights[n] - state[n]).norm().item() for n in rome_weights)
        remove_pathways(model)
        restore_snapshot(model, state)
        row = {"index": idx, "case_id": case["case_id"], "model": args.model, "alg": base, "rep_set": args.rep_set,
               "rome": rome, "rep": rep,
               "rep_weights_only": rep_weights_only, "rome_weights_rep_pathway": rome_weights_rep_pathway,
               "max_gate": gates, "update_gap": update_gap,
               "neighbours": [p for p, _ in ref["pairs"]]}
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        mean = lambda xs: round(100 * sum(xs) / len(xs), 1)
        print(idx, {k: mean(row[k]) for k in ("rome", "rep", "rep_weights_only", "rome_weights_rep_pathway")},
              "gate max", round(max(g for g in gates if g is not None), 3), "update gap", round(update_gap, 3), flush=True)


if __name__ == "__main__":
    main()
