"""Sequential editing: N edits kept one after another, then every edited fact is re-checked.

Each edit is applied to the model as the previous ones left it (EasyEdit's
`keep_original_weight=False` / `sequential_edit=True`); REP adds one adapter per edit to the
pathway of the edited layer, earlier adapters stay frozen. After the last edit, each case is
scored on the final model: success, rephrased/shuffled subjects (in and out of domain), and
locality against the unedited model's predictions. Compare base and REP methods on the same cases.

    OMP_NUM_THREADS=1 python benchmarks/sequential_edits.py --alg REP-ROME --n 5 --out benchmarks/results/seq
    OMP_NUM_THREADS=1 python benchmarks/sequential_edits.py --alg ROME --n 5 --out benchmarks/results/seq
    python benchmarks/sequential_edits.py --alg REP-ROME --n 100 --eval-at 5,20,50 --device cuda
    python benchmarks/sequential_edits.py --alg REP-ROME --n 20 --eval-at 5,10 --merge   # merged vs stacked
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("success", "locality", "rephrase_in", "rephrase_out", "shuffle_in", "shuffle_out",
        "long_in", "long_out")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alg", default="REP-ROME")
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--start", type=int, default=0, help="first dev case")
    ap.add_argument("--data", default=str(ROOT / "data/counterfact_smollm2_dev.json"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/sequential"))
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--eval-at", default="",
                    help="comma-separated edit counts after which every edit so far is re-checked "
                         "and written (e.g. 5,20,50); the last edit is always checked")
    ap.add_argument("--merge", action="store_true",
                    help="REP: at each check also score the edits with each layer's adapters merged "
                         "into one retrained on all their keys (rep_easyedit.core.merging), then go on stacked")
    ap.add_argument("--merge-rank", type=int, default=64, help="rank of the merged adapter")
    args = ap.parse_args()

    import rep_easyedit  # noqa: F401
    from rep_easyedit.corpus import load_corpus
    from rep_easyedit.editing import apply_edit, load_hparams
    from rep_easyedit.eval.metrics import locality_reference
    from rep_easyedit.model_loading import load_model_and_tokenizer
    from rep_easyedit.rep_main import recording_training_keys
    from rep_easyedit.core.perturbations import build_perturbations

    hp = load_hparams(ROOT / f"hparams/{args.alg}/smollm2-135m.yaml")
    rep_cfg = load_hparams(ROOT / "hparams/REP-ROME/smollm2-135m.yaml").rep
    hp.device = args.device
    model, tok = load_model_and_tokenizer("smollm2-135m", device=args.device)
    corpus = load_corpus(None, model, tok, seed=rep_cfg.seed)
    cases = json.loads(Path(args.data).read_text())[args.start:args.start + args.n]
    perts, refs = [], []
    for case in cases:
        perts.append(build_perturbations(case, tok, corpus, n_shuffles=rep_cfg.n_shuffles,
                                         n_long=rep_cfg.n_long_contexts,
                                         long_tokens=rep_cfg.long_context_tokens, base_seed=rep_cfg.seed))
        refs.append(locality_reference(model, tok, case))
    merging = recording_training_keys() if args.merge else contextlib.nullcontext()
    with merging as captured:  # each edit's keys per layer, kept for the merge
        milestones = sorted({int(m) for m in args.eval_at.split(",") if m.strip()} | {len(cases)})
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        seconds = []
        for i, case in enumerate(cases):
            request = {"prompt": case["prompt"], "subject": case["subject"], "target_new": case["target_new"],
                       "ground_truth": case["target_true"], "subject_rephrase": case["subject_rephrase"],
                       "case_id": case["case_id"]}
            torch.manual_seed(i)
            t0 = time.perf_counter()
            apply_edit(model, tok, [request], hp)  # kept: never restored
            seconds.append(time.perf_counter() - t0)
            print(f"edit {i + 1}/{len(cases)} ({case['case_id']}): {seconds[-1]:.1f} s", flush=True)
            if i + 1 in milestones:
                summary = _check_edits_so_far(model, tok, cases[:i + 1], perts, refs, args.alg, seconds)
                if captured:
                    with _merged(model, captured, rep_cfg, args.merge_rank) as reports:
                        merged = _check_edits_so_far(model, tok, cases[:i + 1], perts, refs, args.alg, seconds)
                    merged["summary"]["merge_rank"] = args.merge_rank
                    merged["summary"]["merge_seconds"] = reports["seconds"]
                    merged["summary"]["merge_gate_fire"] = reports["gate"]
                    summary["merged"] = merged
                name = f"{args.alg}_n{i + 1}_s{args.start}"
                (out / f"{name}.json").write_text(json.dumps(summary, indent=1))
                print(json.dumps(summary["summary"]), flush=True)


@contextlib.contextmanager
def _merged(model, captured: dict[str, list], rep_cfg, rank: int):
    """Each layer's stacked adapters swapped for one merged adapter, then put back."""
    from rep_easyedit.core.merging import merge_adapters
    from rep_easyedit.core.pathway import detach_adapter, get_module, install, pathway_of

    stacked = {path: list(pathway_of(get_module(model, path)).adapters) for path in captured}
    reports, merged = {"seconds": 0.0, "gate": {}}, {}
    t0 = time.perf_counter()
    try:
        for path, groups in captured.items():
            merged[path], report = merge_adapters(model, path, groups, rep_cfg, rank=rank)
            reports["gate"][path] = {"pos": report.gate_pos_fire, "neg": report.gate_neg_fire}
        reports["seconds"] = time.perf_counter() - t0
        yield reports
    finally:
        for path, adapters in stacked.items():
            if path in merged:
                detach_adapter(model, path, merged[path])
            module = get_module(model, path)
            current = list(pathway_of(module).adapters) if pathway_of(module) is not None else []
            for adapter in adapters:
                if not any(adapter is a for a in current):
                    install(model, path, adapter)


def _check_edits_so_far(model, tok, cases, perts, refs, alg, seconds) -> dict:
    """Score every edit made so far on the model as it is now."""
    from rep_easyedit.eval.metrics import evaluate_case
    from rep_easyedit.core.pathway import installed_paths, pathway_of, get_module

    adapters = sum(len(pathway_of(get_module(model, p)).adapters) for p in installed_paths(model))
    rows = []
    with torch.no_grad():
        for case, pert, ref in zip(cases, perts, refs):
            scores = evaluate_case(model, tok, case, pert, ref, fluency=False)
            rows.append({"case_id": case["case_id"], **{k: scores[k] for k in KEYS}})
    summary = {"alg": alg, "n_edits": len(cases), "adapters_installed": adapters,
               "edit_seconds_median": statistics.median(seconds)}
    for key in KEYS:
        values = [r[key] for r in rows if r[key] is not None]
        summary[key] = round(100 * statistics.mean(values), 1) if values else None
    return {"summary": summary, "cases": rows}

if __name__ == "__main__":
    main()
