"""How much of ROME's update each value anchor's key receives, read off a finished run.

ROME's rank-one update gives a key k the shift δ · uᵀk / uᵀk*; with `mom2_adjustment` u ∝ C⁻¹k*,
without it u ∝ k*. A value anchor whose share is near 1 cannot be told from the subject by the
update, so protecting it in the value fit works against the edit itself. This reads the anchor
names a run recorded (`rep.value_anchors` in its case lines), computes each share from the
unedited model's keys at the edit prompt (the subject's key there stands for ROME's averaged k*),
and prints them beside the case's success and locality.

    OMP_NUM_THREADS=1 python benchmarks/lab/probe_anchor_shares.py --run benchmarks/results/gemma3_value_recipe/REP-ROME --model gemma3-270m
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a runner output directory (cases.jsonl with value anchors)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=None, help="JSON lines, one per case (default: <run>/anchor_shares.jsonl)")
    args = ap.parse_args()

    import rep_easyedit  # noqa: F401
    from rep_easyedit.covariance import load_inverse_covariance
    from rep_easyedit.editing import load_hparams
    from rep_easyedit.model_loading import load_model_and_tokenizer
    from rep_easyedit.robust_value import _subject_io, _template
    from rep_easyedit.core.pathway import get_module

    model, tok = load_model_and_tokenizer(args.model)
    hp = load_hparams(ROOT / f"hparams/ROME/{args.model}.yaml")
    layer = hp.layers[0]
    down = get_module(model, hp.rewrite_module_tmp.format(layer))
    inv = load_inverse_covariance(model, hp, layer) if hp.mom2_adjustment else None
    out = Path(args.out or Path(args.run) / "anchor_shares.jsonl")
    out.unlink(missing_ok=True)
    for line in open(Path(args.run) / "cases.jsonl"):
        case = json.loads(line)
        names = case.get("rep", {}).get("value_anchors") or []
        if not names:
            continue
        request = {"prompt": case["inputs"]["prompt"], "subject": case["inputs"]["subject"]}
        tpl = _template(request)
        texts = [tpl.replace("{}", n) for n in [request["subject"]] + names]
        ends = [tpl.index("{}") + len(n) for n in [request["subject"]] + names]
        keys, _ = _subject_io(model, tok, texts, ends, down)
        u = keys[0] if inv is None else inv @ keys[0]
        shares = (keys[1:] @ u / torch.dot(keys[0], u)).tolist()
        cos = torch.nn.functional.cosine_similarity(keys[1:], keys[:1]).tolist()
        row = {"index": case["index"], "subject": request["subject"], "names": names,
               "shares": [round(s, 3) for s in shares], "cosine": [round(c, 3) for c in cos],
               "success": case["metrics"]["success"], "locality": case["metrics"]["locality"]}
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(row["index"], row["subject"], "success", row["success"], "locality", row["locality"],
              "shares", row["shares"], flush=True)


if __name__ == "__main__":
    main()
