"""Is the key the bottleneck? Variants scored with the edited layer's key, or its output, made exact.

REP moves a variant subject's key at the edited layer onto the edit's key. On zsRE that worked
(held-in keys pulled to a relative distance of 0.14, every pathway effective) and yet REP-ROME gained
only +3.7 rephrased (in) where CounterFact gained +16.4. This probe asks how much any key pathway
could give there. After a REP-ROME edit (seeded as the runner seeds it), each variant prompt
(the held-in and held-out rephrased and shuffled subjects, as the runner builds them) is scored
(the dataset's scoring: token accuracy for zsRE, exact match for CounterFact) five ways:

- `rep`: as edited (REP's pathway and REP-ROME's weights);
- `weights`: the same weights, no adapter firing (τ = 1): the backend's edit alone;
- `oracle_key`: no adapter firing, and the key at the variant's subject-last token replaced by the
  key the edit prompt's own subject-last token has (the best a key pathway can do at that token);
- `oracle_out`: no adapter firing, and the edited layer's whole output (the residual stream after
  that block) at the variant's subject-last token replaced by the edit prompt's;
- `oracle_all`: no adapter firing, and the residual stream after the edited block at every token
  from the subject's start to its last replaced by the edit prompt's subject tokens (only when the
  variant has as many subject tokens as the subject; otherwise not scored).

Where `oracle_key` stays low, no pathway at the key can close the gap; the other two say whether the
rest of the subject position, or the other subject tokens, carry what the answer is read from.
Rows (one per case) go to `--out` (JSONL, resumable); `--summarize` prints the table.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lab/probe_oracle_key.py --data data/zsre_dev.json \
        --limit 12 --out benchmarks/results/probe_oracle_key/zsre_smollm2.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
WAYS = ("rep", "weights", "oracle_key", "oracle_out", "oracle_all")
KINDS = ("rephrase_in", "rephrase_out", "shuffle_in", "shuffle_out")


@contextlib.contextmanager
def replaced_rows(module, rows: dict[int, torch.Tensor], where: str):
    """Replace rows of a module's input (`where="input"`) or output at the given token indices (batch of 1)."""
    def swap(t):
        t = t.clone()
        for i, v in rows.items():
            t[0, i] = v.to(t.dtype)
        return t

    if where == "input":
        handle = module.register_forward_pre_hook(lambda m, args: (swap(args[0]), *args[1:]))
    else:
        def out_hook(m, args, out):
            if isinstance(out, tuple):
                return (swap(out[0]), *out[1:])
            return swap(out)
        handle = module.register_forward_hook(out_hook)
    try:
        yield
    finally:
        handle.remove()


def captured(model, tok, text: str, key_module, block) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, dim) input of `key_module` and output of `block` for one text, from one forward."""
    seen = {}

    def keep_key(module, args):  # returns None: the input goes on unchanged
        seen["key"] = args[0][0].detach().clone()

    def keep_out(module, args, out):
        seen["out"] = (out[0] if isinstance(out, tuple) else out)[0].detach().clone()

    hooks = [key_module.register_forward_pre_hook(keep_key), block.register_forward_hook(keep_out)]
    try:
        with torch.no_grad():
            model(**tok(text, return_tensors="pt"))
    finally:
        for h in hooks:
            h.remove()
    return seen["key"], seen["out"]


def subject_span(tok, text: str, start: int, end: int) -> list[int]:
    """Token indices covering characters [start, end) of text."""
    offsets = tok(text, return_offsets_mapping=True)["offset_mapping"]
    return [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]


def score_one(model, tok, prompt: str, target: str, scoring: str) -> float:
    from rep_easyedit.eval import metrics as m

    (t_ids, pred), = m.teacher_forced_predictions(model, tok, [(prompt, target)], batch_size=1)
    return float(m._SCORING[scoring](t_ids, pred))


def probe_case(model, tok, record: dict, hp, corpus, scoring: str) -> dict:
    from rep_easyedit.core.keys import subject_last_index
    from rep_easyedit.core.pathway import get_module
    from rep_easyedit.core.perturbations import build_perturbations, with_subject
    from rep_easyedit.editing import edited
    from rep_easyedit.eval.runner import edit_request, perturbation_settings
    from probe_locality import pathway_off  # a sibling: run as a script, benchmarks/lab is sys.path[0]

    settings = dict(perturbation_settings(hp))
    settings.pop("corpus", None)
    pert = build_perturbations(record, tok, list(corpus), **settings).to_dict()
    prompt, subject, target = record["prompt"], record["subject"], record["target_new"]
    start = prompt.index(subject)
    layer = int(list(hp.layers)[0])
    key_module = get_module(model, hp.rewrite_module_tmp.format(layer))
    block = get_module(model, hp.layer_module_tmp.format(layer))
    request = edit_request(record)
    torch.manual_seed(0)
    row = {"case_id": record["case_id"], "subject": subject}
    with edited(model, tok, [request], hp):
        with pathway_off(model):
            own_last = subject_last_index(tok, prompt, start + len(subject))
            own_span = subject_span(tok, prompt, start, start + len(subject))
            own_key, own_out = captured(model, tok, prompt, key_module, block)
            row["success"] = {"weights": score_one(model, tok, prompt, target, scoring)}
        row["success"]["rep"] = score_one(model, tok, prompt, target, scoring)
        for kind in KINDS:
            scores = {w: [] for w in WAYS}
            for variant in pert.get(kind, []):
                text = with_subject(prompt, subject, variant)
                last = subject_last_index(tok, text, start + len(variant))
                span = subject_span(tok, text, start, start + len(variant))
                scores["rep"].append(score_one(model, tok, text, target, scoring))
                with pathway_off(model):
                    scores["weights"].append(score_one(model, tok, text, target, scoring))
                    with replaced_rows(key_module, {last: own_key[own_last]}, "input"):
                        scores["oracle_key"].append(score_one(model, tok, text, target, scoring))
                    with replaced_rows(block, {last: own_out[own_last]}, "output"):
                        scores["oracle_out"].append(score_one(model, tok, text, target, scoring))
                    if len(span) == len(own_span) and span and span[-1] == last:
                        with replaced_rows(block, {i: own_out[j] for i, j in zip(span, own_span)}, "output"):
                            scores["oracle_all"].append(score_one(model, tok, text, target, scoring))
            row[kind] = {w: (statistics.mean(v) if v else None) for w, v in scores.items()}
            row[kind]["n"] = len(scores["rep"])
            row[kind]["n_all"] = len(scores["oracle_all"])
    return row


def summarize(rows: list[dict]) -> str:
    lines = [f"{len(rows)} cases; mean over cases of each case's mean score, in %",
             "", "| variants | " + " | ".join(WAYS) + " |", "|---|" + "---:|" * len(WAYS)]
    for kind in KINDS:
        cells = []
        for w in WAYS:
            vals = [r[kind][w] for r in rows if r[kind].get(w) is not None]
            cells.append(f"{100 * statistics.mean(vals):.1f} ({len(vals)})" if vals else "–")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines += ["", "paired over cases: mean Δ in points (cases higher / lower)", "",
              "| variants | rep − weights | oracle_key − rep | oracle_out − oracle_key |", "|---|---:|---:|---:|"]
    for kind in KINDS:
        cells = []
        for a, b in (("rep", "weights"), ("oracle_key", "rep"), ("oracle_out", "oracle_key")):
            d = [r[kind][a] - r[kind][b] for r in rows if r[kind].get(a) is not None and r[kind].get(b) is not None]
            cells.append(f"{100 * statistics.mean(d):+.1f} ({sum(x > 1e-9 for x in d)} / {sum(x < -1e-9 for x in d)})"
                         if d else "–")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    succ = [r["success"]["rep"] for r in rows]
    lines.append(f"\nsuccess (edit prompt, REP as edited): {100 * statistics.mean(succ):.1f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="data/zsre_dev.json")
    ap.add_argument("--alg", default="REP-ROME")
    ap.add_argument("--skip", type=int, default=0)
    ap.add_argument("--limit", type=int, default=12)
    ap.add_argument("--scoring", default=None, help="token or exact (default: token for zsRE, else exact)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--summarize", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if args.summarize:
        print(summarize(rows))
        return
    from rep_easyedit.corpus import load_corpus
    from rep_easyedit.editing import load_hparams
    from rep_easyedit.eval.datasets import load_records
    from rep_easyedit.model_loading import load_model_and_tokenizer

    scoring = args.scoring or ("token" if "zsre" in args.data else "exact")
    records = load_records(ROOT / args.data, metrics=("success", "rephrase", "shuffle"))[args.skip:args.skip + args.limit]
    hp = load_hparams(ROOT / "hparams" / args.alg / f"{args.model}.yaml")
    model, tok = load_model_and_tokenizer(args.model)
    corpus = load_corpus(hp.rep.corpus, model, tok, seed=hp.rep.seed)
    done = {r["case_id"] for r in rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    for record in records:
        if record["case_id"] in done:
            continue
        row = probe_case(model, tok, record, hp, corpus, scoring)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        print(record["case_id"], {k: row[k] for k in KINDS}, flush=True)
    print(summarize(rows))


if __name__ == "__main__":
    main()
