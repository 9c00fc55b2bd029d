"""How much of the edited layers' key energy AlphaEdit's null space holds, per threshold.

AlphaEdit projects its update onto the eigenvectors of E[k kᵀ] whose eigenvalue is below
`nullspace_threshold` (an absolute value: upstream's 2e-2 was set on 7B models). The energy share
printed here is what a projected update may still disturb; the settings themselves were chosen
with `benchmarks/lifelong.py run --set nullspace_threshold=... L2=...` (docs/results.md "AlphaEdit").

    python benchmarks/lab/probe_alphaedit.py --hparams hparams/AlphaEdit/smollm2-135m.yaml
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hparams", default="hparams/AlphaEdit/smollm2-135m.yaml")
    ap.add_argument("--thresholds", default="2e-3,5e-3,1e-2,2e-2")
    args = ap.parse_args()

    from rep_easyedit.covariance import load_second_moment
    from rep_easyedit.editing import load_hparams
    from rep_easyedit.model_loading import load_model_and_tokenizer

    hp = load_hparams(args.hparams)
    model, _tok = load_model_and_tokenizer(hp.model_name)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    print("layer | trace E[kk^T] | " + " | ".join(f"t={t:g}: null rank, energy" for t in thresholds))
    for layer in hp.layers:
        moment, _count = load_second_moment(model, hp, layer)
        evals = torch.linalg.eigvalsh(moment.double())
        total = evals.sum().item()
        cells = [f"{int((evals < t).sum())}/{len(evals)}, {100 * evals[evals < t].sum().item() / total:.1f} %"
                 for t in thresholds]
        print(f"{layer} | {total:.1f} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
