"""Where the sampled kin names' keys sit, next to the subject's own variants: can a key test tell the
names that cost held-out shuffles (near-spellings of the subject) from siblings?

Per case, at the edited layer of the unedited model, the key at the subject's last token in the edit
prompt for: the trained variants (`in`), the held-out ones (`out`) and each kin name
(`rep_main.request_kin_names`, as `rep.kin_negatives: 8` samples them). For each: the cosine to k*
and the edit's share a = uᵀk (u = C⁻¹k* / k*ᵀC⁻¹k*, C = I without covariance), and per name its
nearest-variant cosine. One row per case.

    OMP_NUM_THREADS=1 python benchmarks/lab/probe_kin_keys.py --model smollm2-135m --cases 0-29 \
        --out benchmarks/results/probe_gate/smollm2_kin_keys.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alg", default="REP-ROME")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--cases", default="0-29")
    ap.add_argument("--kin", type=int, default=8)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import rep_easyedit  # noqa: F401
    from rep_easyedit.core.keys import subject_last_indices
    from rep_easyedit.core.perturbations import with_subject
    from rep_easyedit.rep_main import request_kin_names

    from probe_gate import edit_direction, keys_at, probe_cases, probe_setup  # run as a script, its folder is on sys.path

    hp, records, model, tok, backend, base_hp, paths = probe_setup(args.alg, args.model, None, args.cases)
    layer, path = next(iter(paths.items()))
    rep = dataclasses.replace(hp.rep, kin_negatives=args.kin)
    out = Path(args.out)
    for idx, record, request, pert, templates, _corpus in probe_cases(rep, records, model, tok, backend, base_hp, out):
        prompt, subject = request["prompt"], request["subject"]
        start = prompt.index(subject)
        kin = request_kin_names(model, tok, request, pert, rep)
        u = edit_direction(model, tok, request, templates, path, base_hp, layer)
        groups = {"in_reph": pert.rephrase_in, "in_shuf": pert.shuffle_in, "out_reph": pert.rephrase_out,
                  "out_shuf": pert.shuffle_out, "kin": kin, "subject": [subject]}
        keys = {}
        for name, variants in groups.items():
            texts = [with_subject(prompt, subject, v) for v in variants]
            positions, _ = subject_last_indices(tok, texts, [start + len(v) for v in variants])
            keys[name] = torch.cat(keys_at(model, tok, path, texts, positions)) if texts else None
        k_star = keys["subject"][0].float()
        cos = lambda k: torch.nn.functional.cosine_similarity(k.float(), k_star[None], dim=1)  # noqa: E731
        row = {"index": idx, "case_id": record["case_id"], "subject": subject, "kin": kin}
        for name in ("in_reph", "in_shuf", "out_reph", "out_shuf", "kin"):
            k = keys[name]
            if k is None:
                continue
            row[f"{name}_cos"] = [round(x, 3) for x in cos(k).tolist()]
            row[f"{name}_share"] = [round(x, 3) for x in (k.float() @ u).tolist()]
        if keys["kin"] is not None:
            pos = torch.cat([keys["in_reph"], keys["in_shuf"]]).float()
            pn = torch.nn.functional.normalize(pos, dim=1)
            kn = torch.nn.functional.normalize(keys["kin"].float(), dim=1)
            row["kin_nearest_in_cos"] = [round(x, 3) for x in (kn @ pn.T).max(1).values.tolist()]
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: row[k] for k in ("case_id", "subject", "kin")}), flush=True)


if __name__ == "__main__":
    main()
