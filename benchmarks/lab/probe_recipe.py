"""Choosing REP's default recipe on both bundled models, from keys alone (no edit, no evaluation).

For each dev case: the perturbations, the backend's context templates and the training keys at
the edited layer exactly as a REP edit collects them (`rep_main.gather_training_keys`), plus keys
REP never trains on: the held-out ("out") rephrased and shuffled subjects inside the prompt
(their last subject token) and every token of the case's locality prompts. Each recipe trains an
adapter on the training keys and is scored on what predicts the edit's behaviour:

- `in_fire`, `in_dist`: held-in positives where the hard gate fires, and their mean relative
  distance ‖k̂ − k*‖/‖k*‖ after the adapter (before: `in_dist0`);
- `out_fire`, `out_dist`: the same for the held-out rephrases and shuffles (robustness out of domain);
- `loc_fire`: share of locality prompts with any token where the gate fires (what locality pays);
- `neg_fire`, `steps`, `train_s`.

    .venv/bin/python benchmarks/lab/probe_recipe.py --model gemma3-270m --data data/counterfact_gemma3_dev.json \
        --hparams hparams/REP-ROME/gemma3-270m.yaml --skip 80 --limit 10 --out benchmarks/results/recipe/gemma3.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

# recipe name -> REPConfig overrides (on top of the REPConfig defaults of the day: `default` rows in
# files written before issue 16 changed them ran with steps 200 and screen_negatives 0, `old_default`)
RECIPES = {
    "paper": dict(steps=10, lr=5e-4, alpha=5e4, gate_weight=0.0, aggregation="cosine", adaptive_stop=False),
    "fixed100_lr3e-3": dict(steps=100, lr=3e-3, adaptive_stop=False),
    "fixed200_lr3e-3": dict(steps=200, lr=3e-3, adaptive_stop=False),
    "fixed100_lr1e-3": dict(steps=100, lr=1e-3, adaptive_stop=False),
    "adaptive_lr3e-3": dict(steps=200, lr=3e-3, adaptive_stop=True),
    "adaptive_lr1e-2": dict(steps=200, lr=1e-2, adaptive_stop=True),
    "adaptive_lr3e-3_plateau0.03": dict(steps=200, lr=3e-3, adaptive_stop=True, stop_plateau=0.03),
    # issue 16: cheaper steps (a smaller gate, a sample of the negatives per step) or fewer (a higher lr)
    "default": dict(),
    "gate0.05": dict(gate_ratio=0.05),
    "gate0.025": dict(gate_ratio=0.025),
    "negstep256": dict(negatives_per_step=256),
    "negstep128": dict(negatives_per_step=128),
    "lr6e-3": dict(lr=6e-3),
    "gate0.025_negstep256": dict(gate_ratio=0.025, negatives_per_step=256),
    "gate0.05_negstep256": dict(gate_ratio=0.05, negatives_per_step=256),
    # issue 16: screening the negatives the gate already rejects, on the recipe before it
    "old_default": dict(steps=200, screen_negatives=0.0),
    "screen1e-3": dict(steps=200, screen_negatives=1e-3),
    "screen1e-2": dict(steps=200, screen_negatives=1e-2),
    "screen3e-2": dict(steps=200, screen_negatives=3e-2),
    "stopdist0.3": dict(stop_distance=0.3),
    "stopdist0.2": dict(stop_distance=0.2),
    "stopdist0.15": dict(stop_distance=0.15),
    "cap120": dict(steps=120),
    "cap150": dict(steps=150),
    "cap120_negstep256": dict(steps=120, negatives_per_step=256),
    "gate0.025_negstep256_lr6e-3": dict(gate_ratio=0.025, negatives_per_step=256, lr=6e-3),
}


def case_keys(model, tok, record, hp, backend, corpus):
    from rep_easyedit.core.keys import collect_keys, subject_last_index
    from rep_easyedit.core.perturbations import build_perturbations, with_subject
    from rep_easyedit.rep_main import edited_module_paths, gather_training_keys

    rep = hp.rep
    base_hp = hp.backend_hparams()
    (layer, path), = sorted(edited_module_paths(model, base_hp).items())[:1]
    request = {"case_id": record["case_id"], "prompt": record["prompt"], "subject": record["subject"],
               "target_new": record["target_new"], "subject_rephrase": record.get("subject_rephrase")}
    pert = build_perturbations(request, tok, corpus, n_shuffles=rep.n_shuffles, n_long=rep.n_long_contexts,
                               long_tokens=rep.long_context_tokens, base_seed=rep.seed)
    torch.manual_seed(0)
    templates = backend.context_templates(model, tok, base_hp)
    rng = np.random.default_rng(pert.seed + layer)
    keys = gather_training_keys(model, tok, request, pert, templates, path, rep, corpus, rng)
    prompt, subject = record["prompt"], record["subject"]
    start = prompt.index(subject)
    out_texts = [with_subject(prompt, subject, v) for v in pert.rephrase_out + pert.shuffle_out]
    out_pos = [subject_last_index(tok, t, start + len(v))
               for t, v in zip(out_texts, pert.rephrase_out + pert.shuffle_out)]
    out_keys = collect_keys(model, tok, out_texts, path, out_pos)[0] if out_texts else None
    _, loc_every = collect_keys(model, tok, list(record["locality_prompt"]), path, None, all_tokens=True)
    return keys, out_keys, loc_every


def score(adapter, keys, out_keys, loc_every, report):
    from rep_easyedit.core.training import fire_shares, relative_distance

    with torch.no_grad():
        tau = adapter.tau
        row = {"in_fire": report.gate_pos_fire, "in_dist0": report.distance_before,
               "in_dist": report.distance_after, "neg_fire": report.gate_neg_fire, "steps": report.steps,
               "negatives_kept": report.negatives_kept}
        if out_keys is not None and len(out_keys):
            row["out_fire"] = fire_shares(adapter, out_keys, out_keys[:0])[0]
            row["out_dist0"] = relative_distance(out_keys, keys.target)
            row["out_dist"] = relative_distance(adapter(out_keys, hard=True), keys.target)
        row["loc_fire"] = float(np.mean([bool((adapter.gate_prob(k).squeeze(-1) > tau).any())
                                         for k in loc_every]))
        # the edit's share a(k) = k·k*/k*·k* (ROME with C = I) through the adapter, and with a pathway
        # that would put a firing key exactly on k* ("snap"): what the learned move leaves on the table
        k_star = keys.target if keys.target.dim() == 1 else keys.target.mean(0)
        share = lambda k: (k @ k_star) / k_star.dot(k_star)  # noqa: E731
        if out_keys is not None and len(out_keys):
            fire = adapter.gate_prob(out_keys).squeeze(-1) > tau
            row["out_act0"] = float(share(out_keys).mean())
            row["out_act"] = float(share(adapter(out_keys, hard=True)).mean())
            row["out_act_snap"] = float(torch.where(fire, torch.ones_like(fire, dtype=torch.float32),
                                                    share(out_keys)).mean())
        loc = [(share(k), share(adapter(k, hard=True)), adapter.gate_prob(k).squeeze(-1) > tau) for k in loc_every]
        row["loc_act0"] = float(np.mean([float(a0.max()) for a0, _, _ in loc]))
        row["loc_act"] = float(np.mean([float(a.max()) for _, a, _ in loc]))
        row["loc_act_snap"] = float(np.mean([float(torch.where(f, torch.ones_like(a0), a0).max())
                                             for a0, _, f in loc]))
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="data/counterfact_smollm2_dev.json")
    ap.add_argument("--hparams", default="hparams/REP-ROME/smollm2-135m.yaml")
    ap.add_argument("--skip", type=int, default=80)
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES))
    ap.add_argument("--out", required=True)
    ap.add_argument("--summarize", action="store_true", help="print the tables of an existing --out file and stop")
    ap.add_argument("--base", default="default", help="the recipe the others are paired with")
    args = ap.parse_args(argv)
    if args.summarize:
        rows = [json.loads(line) for line in Path(args.out).read_text().splitlines() if line.strip()]
        print(summary(rows, list(dict.fromkeys(r["recipe"] for r in rows)), args.base))
        return

    import rep_easyedit  # noqa: F401
    from rep_easyedit.core.adapter import GatedLowRankAdapter
    from rep_easyedit.backends import get_backend, templates_keyed_by_model
    from rep_easyedit.compat.easyedit import shims_applied
    from rep_easyedit.core.config import REPConfig
    from rep_easyedit.corpus import load_corpus
    from rep_easyedit.eval.datasets import load_records
    from rep_easyedit.hparams import REPHyperParams
    from rep_easyedit.core.devices import padding_side
    from rep_easyedit.model_loading import load_model_and_tokenizer
    from rep_easyedit.core.training import train_adapter

    hp = REPHyperParams.from_hparams(args.hparams)
    model, tok = load_model_and_tokenizer(args.model)
    backend = get_backend(hp.backend_name)
    records = load_records(args.data)[args.skip:args.skip + args.limit]
    corpus = load_corpus(hp.rep.corpus, model, tok, seed=hp.rep.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with out.open("w", encoding="utf-8") as fh, padding_side(tok, "right"), shims_applied(), \
            templates_keyed_by_model(model, backend):
        for record in records:
            keys, out_keys, loc_every = case_keys(model, tok, record, hp, backend, corpus)
            for name in args.recipes:
                rep = dataclasses.replace(REPConfig(), **RECIPES[name])
                torch.manual_seed(0)
                adapter = GatedLowRankAdapter(keys.positives.shape[-1], rep.rank, rep.gate_ratio, rep.tau)
                t0 = time.perf_counter()
                report = train_adapter(adapter, keys, rep)
                row = {"case_id": record["case_id"], "recipe": name,
                       "train_s": time.perf_counter() - t0, **score(adapter, keys, out_keys, loc_every, report)}
                rows.append(row)
                fh.write(json.dumps(row) + "\n")
                fh.flush()
    print(f"model {args.model}, {len(records)} cases (dev {args.skip}..{args.skip + len(records) - 1})")
    print(summary(rows, args.recipes, args.base))


def summary(rows: list[dict], recipes: list[str], base_name: str = "default") -> str:
    """Means per recipe, then each recipe against `base_name` on the same cases: mean Δ of the scores,
    how many cases went lower / higher, and the training time as a ratio of the default's (median)."""
    cols = ["in_fire", "in_dist0", "in_dist", "out_fire", "out_dist0", "out_dist", "loc_fire", "neg_fire",
            "steps", "train_s", "negatives_kept", "out_act0", "out_act", "out_act_snap", "loc_act0", "loc_act",
            "loc_act_snap"]
    lines = ["| recipe | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name in recipes:
        mine = [r for r in rows if r["recipe"] == name]
        cells = []
        for c in cols:
            vals = [r[c] for r in mine if r.get(c) is not None]
            cells.append(f"{statistics.mean(vals):.3f}" if vals else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    base = {r["case_id"]: r for r in rows if r["recipe"] == base_name}
    if not base:
        return "\n".join(lines)
    paired = ["in_fire", "in_dist", "out_fire", "out_dist", "loc_fire", "neg_fire", "steps"]
    lines += ["", f"| recipe vs {base_name} | cases | " + " | ".join(f"Δ {c} (lower/higher)" for c in paired)
              + f" | train time / {base_name} (median) |", "|---|---:|" + "---:|" * (len(paired) + 1)]
    for name in recipes:
        pairs = [(base[r["case_id"]], r) for r in rows if r["recipe"] == name and r["case_id"] in base]
        if name == base_name or not pairs:
            continue
        cells = []
        for c in paired:
            d = [r[c] - b[c] for b, r in pairs if r.get(c) is not None and b.get(c) is not None]
            cells.append(f"{statistics.mean(d):+.4f} ({sum(x < 0 for x in d)}/{sum(x > 0 for x in d)})" if d else "-")
        ratio = statistics.median(r["train_s"] / b["train_s"] for b, r in pairs)
        lines.append(f"| {name} | {len(pairs)} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
