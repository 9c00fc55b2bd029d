"""Where does a long context hurt the base method? Success by prefix length and kind.

For each dev case: the base method's edit (from the unedited model, seeded), then teacher-forced
success of prompt → target_new with no prefix and with a prefix of each kind
(`rep_easyedit.eval.contexts.long_context_of_kind`: unrelated corpus text; corpus text with
sentences naming the subject; corpus text with sentences naming the old object) at each length,
`--per-setting` prefixes each, fixed per case. Rows are appended to `--out` (JSON lines, resumable
by case), and a table of mean success per (kind, length) is printed: the setting where the
base method loses >= 10 points is the one to evaluate REP at.

    OMP_NUM_THREADS=1 python benchmarks/lab/probe_long_context.py --model smollm2-135m --alg ROME \
        --cases 0:10 --lengths 512 1024 2048 4096 --out benchmarks/results/long_context/smollm2_ROME.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from rep_easyedit.eval.runner import edit_request

ROOT = Path(__file__).resolve().parents[2]
DATA = {"smollm2-135m": "counterfact_smollm2_dev.json", "gemma3-270m": "counterfact_gemma3_dev.json"}


def main(argv=None) -> None:
    from rep_easyedit.core.perturbations import case_seed, with_context
    from rep_easyedit.corpus import load_corpus
    from rep_easyedit.editing import edited, load_hparams
    from rep_easyedit.eval.contexts import LONG_KINDS, long_context_of_kind
    from rep_easyedit.eval.metrics import exact_match
    from rep_easyedit.model_loading import load_model_and_tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(DATA), default="smollm2-135m")
    ap.add_argument("--alg", default="ROME")
    ap.add_argument("--cases", default="0:10")
    ap.add_argument("--lengths", nargs="+", type=int, default=[512, 1024, 2048, 4096])
    ap.add_argument("--kinds", nargs="+", default=list(LONG_KINDS))
    ap.add_argument("--per-setting", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    model, tok = load_model_and_tokenizer(args.model)
    hp = load_hparams(ROOT / "hparams" / args.alg / f"{args.model}.yaml")
    corpus = load_corpus(None, model, tok, seed=0)
    a, b = (int(x) for x in args.cases.split(":"))
    cases = json.loads((ROOT / "data" / DATA[args.model]).read_text())[a:b]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["case_id"] for line in out.read_text().splitlines()} if out.exists() else set()
    for case in cases:
        if case["case_id"] in done:
            continue
        rng = np.random.default_rng(case_seed(case) + 29)
        prefixes = {(kind, n): [long_context_of_kind(case, tok, corpus, n, kind, rng)
                                for _ in range(args.per_setting)]
                    for kind in args.kinds for n in args.lengths}
        torch.manual_seed(0)
        t0 = time.perf_counter()
        row = {"case_id": case["case_id"], "model": args.model, "alg": args.alg, "settings": {}}
        with edited(model, tok, [edit_request(case)], hp), torch.no_grad():
            row["edit_seconds"] = time.perf_counter() - t0
            row["success"] = exact_match(model, tok, [case["prompt"]], case["target_new"])[0]
            for (kind, n), texts in prefixes.items():
                prompts = [with_context(t, case["prompt"]) for t in texts]
                hits = exact_match(model, tok, prompts, case["target_new"], batch_size=1)
                row["settings"][f"{kind}@{n}"] = sum(hits) / len(hits)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"case {case['case_id']}: success {row['success']} {row['settings']}", flush=True)

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    print(f"\n{args.alg} on {args.model}, {len(rows)} cases: success with no prefix "
          f"{100 * statistics.mean(r['success'] for r in rows):.1f}")
    print("| kind | " + " | ".join(str(n) for n in args.lengths) + " |")
    print("|---|" + "---:|" * len(args.lengths))
    for kind in args.kinds:
        cells = []
        for n in args.lengths:
            vals = [r["settings"][f"{kind}@{n}"] for r in rows if f"{kind}@{n}" in r["settings"]]
            cells.append(f"{100 * statistics.mean(vals):.1f}" if vals else "–")
        print(f"| {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
