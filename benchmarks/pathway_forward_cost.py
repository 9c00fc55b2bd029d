"""What REP's pathway adds to a forward pass as edits accumulate: stacked adapters against merged ones.

A lifelong run keeps one adapter per edit and layer (stacked: every token runs all of them, in
turn) unless each layer's adapters are merged into one (`benchmarks/lifelong.py --merge-rank`). This
times the model's forward over a fixed batch with N edits' worth of adapters on AlphaEdit's layers,
stacked and merged, against the bare model. The adapters are freshly initialised: their gates sit
near 0.5, under τ, so every token pays each adapter's gate and none its low-rank map, which is what
a trained pathway costs on text that is not about an edited subject (nearly all of it). No edit is
needed to time that.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pathway_forward_cost.py --edits 0,10,50,100,200 \\
        --out benchmarks/results/lifelong/pathway_forward_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hparams", default="hparams/REP-AlphaEdit/smollm2-135m.yaml",
                    help="its layers and REP settings size the adapters")
    ap.add_argument("--edits", default="0,10,50,100,200", help="numbers of edits kept")
    ap.add_argument("--merge-rank", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from rep_easyedit.eval.runner import set_threads_from_env

    set_threads_from_env()
    from rep_easyedit.core.adapter import GatedLowRankAdapter
    from rep_easyedit.core.pathway import install, remove_pathways
    from rep_easyedit.editing import load_hparams
    from rep_easyedit.model_loading import load_model_and_tokenizer

    hp = load_hparams(ROOT / args.hparams)
    model, _ = load_model_and_tokenizer(args.model)
    paths = [hp.rewrite_module_tmp.format(layer) for layer in hp.layers]
    dim = model.get_submodule(paths[0]).in_features
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))

    def timed() -> float:
        with torch.no_grad():
            model(ids)  # warm-up
            runs = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                model(ids)
                runs.append(time.perf_counter() - t0)
        return statistics.median(runs)

    rows = []
    bare = timed()
    for n in sorted({int(x) for x in args.edits.split(",")}):
        row = {"edits": n, "bare_s": bare}
        for mode in ("stacked", "merged"):
            remove_pathways(model)
            if n:
                for path in paths:
                    if mode == "stacked":
                        for _ in range(n):
                            install(model, path, GatedLowRankAdapter(dim, hp.rep.rank, hp.rep.gate_ratio, hp.rep.tau))
                    else:
                        install(model, path, GatedLowRankAdapter(dim, min(dim, args.merge_rank),
                                                                 hp.rep.gate_ratio, hp.rep.tau))
            row[f"{mode}_s"] = timed()
            row[f"{mode}_adapters"] = n * len(paths) if mode == "stacked" else (len(paths) if n else 0)
            row[f"{mode} / bare"] = row[f"{mode}_s"] / bare
        remove_pathways(model)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"model": args.model, "layers": list(hp.layers), "rank": hp.rep.rank, "merge_rank": args.merge_rank,
              "batch": args.batch, "tokens": args.tokens, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
