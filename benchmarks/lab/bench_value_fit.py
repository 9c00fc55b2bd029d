"""What `rep.value_on_variants` costs: the variant-aware value fit timed against ROME's own `compute_v`.

REP-ROME with `rep.value_on_variants: true` swaps ROME's `compute_v` (EasyEdit's: every prompt's
logits over the whole vocabulary, at every position) for `robust_value.optimise_value`, which adds
the in-domain variant prompts and runs the LM head only where the loss reads. Per case (the
dataset's first records, their variants built as the runner builds them) this times, with the same
context templates and hyperparameters:

- `rome`: EasyEdit's `compute_v` (ROME's prompts);
- `ours_plain`: `optimise_value` with no variants (ROME's prompts: the head saving alone);
- `ours_t1`, `ours_t3`: with the variants, each in 1 or 3 context templates
  (`rep.value_variant_templates`).

Both fits stop early once their loss is below 0.05, so a fit over more prompts may also run more
steps; the times are whole calls, as an edit pays them. The pathway is not installed (it changes
which keys the variants have, not the arithmetic). Prints medians and ratios to `rome`; `--out`
keeps the JSON, rewritten after every case, and a rerun skips the cases it holds (resumable).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lab/bench_value_fit.py --limit 5 \
        --out benchmarks/results/value_fit_cost/smollm2.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
WAYS = ("rome", "ours_plain", "ours_t1", "ours_t3")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="data/zsre_dev.json")
    ap.add_argument("--limit", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from rep_easyedit.compat.easyedit import installed_algorithm, shims_applied
    from rep_easyedit.core.perturbations import build_perturbations
    from rep_easyedit.corpus import load_corpus
    from rep_easyedit.editing import load_hparams
    from rep_easyedit.eval.datasets import load_records
    from rep_easyedit.eval.runner import perturbation_settings
    from rep_easyedit.model_loading import load_model_and_tokenizer
    from rep_easyedit.robust_value import optimise_value

    hp = load_hparams(ROOT / "hparams" / "REP-ROME" / f"{args.model}.yaml")
    base = hp.backend_hparams()
    model, tok = load_model_and_tokenizer(args.model)
    corpus = load_corpus(hp.rep.corpus, model, tok, seed=hp.rep.seed)
    settings = dict(perturbation_settings(hp))
    settings.pop("corpus", None)
    rome = importlib.import_module(installed_algorithm("ROME").__module__)
    rome_main = importlib.import_module(rome.__name__.rsplit(".", 1)[0] + ".rome_main")
    layer = int(list(base.layers)[0])
    records = load_records(ROOT / args.data, metrics=("success", "rephrase", "shuffle"))[:args.limit]

    out = Path(args.out) if args.out else None
    rows = json.loads(out.read_text())["rows"] if out and out.exists() else []
    done = {r["case_id"] for r in rows}
    with shims_applied():
        templates = rome_main.get_context_templates(model, tok, base.context_template_length_params)
        for record in records:
            if record["case_id"] in done:
                continue
            pert = build_perturbations(record, tok, list(corpus), **settings)
            variants = [v for v in dict.fromkeys(pert.rephrase_in + pert.shuffle_in) if v != record["subject"]]
            # as ROME's `execute_rome` hands it to `compute_v`: the target with a leading space
            request = {"prompt": record["prompt"].replace(record["subject"], "{}", 1),
                       "subject": record["subject"], "target_new": " " + record["target_new"].lstrip()}
            torch.manual_seed(0)
            left = torch.randn(model.config.intermediate_size)
            left = left / left.norm()
            calls = {
                "rome": lambda: rome.compute_v(model, tok, dict(request), base, layer, left, templates),
                "ours_plain": lambda: optimise_value(model, tok, dict(request), base, layer, left, templates, []),
                "ours_t1": lambda: optimise_value(model, tok, dict(request), base, layer, left, templates,
                                                  variants, 1),
                "ours_t3": lambda: optimise_value(model, tok, dict(request), base, layer, left, templates,
                                                  variants, 3),
            }
            row = {"case_id": record["case_id"], "variants": len(variants), "seconds": {}}
            vecs = {}
            for way, call in calls.items():
                t0 = time.perf_counter()
                vecs[way] = call().detach().float().cpu()
                row["seconds"][way] = time.perf_counter() - t0
            row["ours_plain_vs_rome_rel_diff"] = float((vecs["ours_plain"] - vecs["rome"]).norm()
                                                       / vecs["rome"].norm())
            rows.append(row)
            print(json.dumps(row), flush=True)
            summary = summarized(rows, args, len(templates))
            if out:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(summary, indent=1) + "\n")
    summary = summarized(rows, args, len(templates))
    print(json.dumps({k: summary[k] for k in ("median_seconds", "ratios")}, indent=1))


def summarized(rows: list[dict], args, templates: int) -> dict:
    med = {w: statistics.median(r["seconds"][w] for r in rows) for w in WAYS}
    ratios = {f"{w} / rome": med[w] / med["rome"] for w in WAYS[1:]}
    return {"model": args.model, "data": args.data, "cases": len(rows), "templates": templates,
            "threads": torch.get_num_threads(), "median_seconds": med, "ratios": ratios, "rows": rows}


if __name__ == "__main__":
    main()
