"""MEMIT on SmolLM2: which layers to edit, and how REP's per-layer adapters should be trained.

Three stages, each on a few dev cases (default 40-42 / 40-43 of data/counterfact_smollm2_dev.json),
each edit made from the unedited model and undone after its evaluation:

- ``layers``: plain MEMIT with each candidate layer set ([1,2,3], [2,3,4], [3,4,5]): success,
  paraphrase, locality, rephrased subject (in/out halves) and edit seconds per case.
- ``drift``: how much the lower layers' updates move the keys of the higher edited layers. For a
  plain MEMIT edit, at each edited layer: the subject key k* (MEMIT's `compute_ks`: the subject's
  last-token key averaged over MEMIT's context templates) before and after the edit, and the keys
  of REP's training variants (the same texts the adapter trains on); the relative change
  ‖k_after − k_before‖ / ‖k_before‖. A layer's own update never changes its own input, so the
  first edited layer reads 0 by construction.
- ``rep``: REP-MEMIT end to end (`apply_rep_to_model`: adapters trained on keys collected before
  the backend runs, then MEMIT through the pathway) with `aggregation: match` (pull onto the raw k*)
  and `aggregation: cosine` (the paper's loss, towards the whitened C⁻¹k* since mom2_adjustment is
  on), against plain MEMIT; per layer, how far the adapted training-variant keys land from the
  key MEMIT actually wrote at (collected after the lower layers' updates), against the key the
  adapter was trained towards (collected before).

    OMP_NUM_THREADS=1 python benchmarks/lab/probe_memit_layers.py --stage layers --cases 40:43
    OMP_NUM_THREADS=1 python benchmarks/lab/probe_memit_layers.py --stage drift --cases 40:44
    OMP_NUM_THREADS=1 python benchmarks/lab/probe_memit_layers.py --stage rep --cases 40:44

Covariance statistics for layers 1-5 must exist (`python -m rep_easyedit.stats --hparams
hparams/MEMIT/smollm2-135m.yaml --layers 1 2 3 4 5`). Results are printed and appended as JSON
lines to benchmarks/.cache/probe_memit_layers.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from rep_easyedit.eval.runner import edit_request

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "benchmarks" / ".cache" / "probe_memit_layers.jsonl"
# per model: its dev data and the layer sets the `layers` stage compares (--layer-sets overrides)
MODELS = {
    "smollm2-135m": ("counterfact_smollm2_dev.json", ([1, 2, 3], [2, 3, 4], [3, 4, 5])),
    "gemma3-270m": ("counterfact_gemma3_dev.json", ([1, 2, 3], [0, 1, 2], [2, 3, 4], [3, 4, 5])),
}
MODEL = "smollm2-135m"
DATA = ROOT / "data" / MODELS[MODEL][0]
MEMIT_YAML = ROOT / "hparams" / "MEMIT" / f"{MODEL}.yaml"
REP_YAML = ROOT / "hparams" / "REP-MEMIT" / f"{MODEL}.yaml"
LAYER_SETS = MODELS[MODEL][1]
METRICS = ("success", "paraphrase", "locality", "rephrase", "shuffle")


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def _fmt(x):
    return "  -  " if x is None else f"{x:5.2f}"


def _record(row: dict) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _perturbations(req, tok):
    from rep_easyedit.core.perturbations import build_perturbations

    return build_perturbations(req, tok, None, n_shuffles=10, n_long=0, long_tokens=0, base_seed=0)


def _evaluate(model, tok, case, pert, ref):
    from rep_easyedit.eval.metrics import evaluate_case

    return evaluate_case(model, tok, dict(case), pert, ref, fluency=False, metrics=METRICS)


def _print_table(title, rows, keys=("success", "paraphrase", "locality", "rephrase_in", "rephrase_out")):
    print(f"\n## {title}")
    print("setting".ljust(34) + "".join(k[:11].rjust(12) for k in keys) + "     sec")
    for label, cases in rows.items():
        line = label.ljust(34) + "".join(_fmt(_mean([c[k] for c in cases])).rjust(12) for k in keys)
        print(line + f"  {_mean([c['seconds'] for c in cases]):6.1f}")


# -- stage: layers -------------------------------------------------------------------------------

def stage_layers(model, tok, cases):
    from rep_easyedit.editing import apply_edit, load_hparams, restore

    base = load_hparams(MEMIT_YAML)
    rows = {}
    for case in cases:
        req = edit_request(case)
        pert = _perturbations(req, tok)
        from rep_easyedit.eval.metrics import locality_reference

        ref = locality_reference(model, tok, dict(case))
        for layers in LAYER_SETS:
            hp = copy.deepcopy(base)
            hp.layers = list(layers)
            t0 = time.perf_counter()
            wc = apply_edit(model, tok, [dict(req)], hp)
            seconds = time.perf_counter() - t0
            try:
                res = _evaluate(model, tok, case, pert, ref)
            finally:
                restore(model, wc)
            res = {k: res.get(k) for k in ("success", "paraphrase", "locality", "rephrase_in", "rephrase_out")}
            res.update(seconds=seconds, case_id=case["case_id"])
            label = f"MEMIT layers {layers}"
            rows.setdefault(label, []).append(res)
            _record({"stage": "layers", "model": MODEL, "setting": label, **res})
            print(f"case {case['case_id']} {label}: {res}", flush=True)
    _print_table("MEMIT layer sets (plain MEMIT)", rows)


# -- keys ------------------------------------------------------------------------------------------

def _memit_k_star(model, tok, req, hp, layer, templates):
    """MEMIT's own k* (compute_ks) for one request at one layer: (D,)."""
    import importlib

    from rep_easyedit.compat.easyedit import shims_applied

    compute_ks = importlib.import_module("easyeditor.models.memit.compute_ks")
    r = dict(req)
    r["prompt"] = r["prompt"].replace(r["subject"], "{}")
    with shims_applied(), torch.no_grad():
        return compute_ks.compute_ks(model, tok, [r], hp, layer, templates)[0].float()


def _variant_texts(req, pert, flat_templates, rep):
    """REP's positive training texts (no long contexts) and the subject's last-token positions."""
    from rep_easyedit.core.keys import subject_last_index
    from rep_easyedit.rep_main import _variant_texts as texts_of, training_variants

    texts = texts_of(req, training_variants(req, pert, rep.train_on), flat_templates, [])
    return [t for t, _ in texts], [subject_last_index(tok_holder[0], t, end) for t, end in texts]


tok_holder: list = []


def _keys_seen_by(model, tok, texts, positions, paths, batch_size=32):
    """{path: [n, D]}: the input the down-projection actually receives (after any pathway)."""
    from rep_easyedit.core.pathway import get_module

    box, handles = {}, []
    for path in paths:
        handles.append(get_module(model, path).register_forward_hook(
            lambda m, a, o, path=path: box.__setitem__(path, a[0].detach().float())))
    out = {path: [] for path in paths}
    old = tok.padding_side
    tok.padding_side = "right"
    try:
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True)
                model(**enc)
                idx = torch.tensor(positions[i:i + batch_size])
                for path in paths:
                    out[path].append(box[path][torch.arange(len(idx)), idx])
    finally:
        tok.padding_side = old
        for h in handles:
            h.remove()
    return {path: torch.cat(v) for path, v in out.items()}


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# -- stage: drift ----------------------------------------------------------------------------------

def stage_drift(model, tok, cases):
    from rep_easyedit.backends import get_backend, templates_keyed_by_model
    from rep_easyedit.editing import apply_edit, load_hparams, restore
    from rep_easyedit.hparams import REPHyperParams

    hp = load_hparams(MEMIT_YAML)
    rep = REPHyperParams.from_hparams(REP_YAML).rep
    backend = get_backend("MEMIT")
    with templates_keyed_by_model(model, backend):
        from rep_easyedit.compat.easyedit import shims_applied

        with shims_applied():
            import importlib

            grouped = importlib.import_module("easyeditor.models.memit.memit_main").get_context_templates(model, tok)
    flat = [t for g in grouped for t in g]
    table = {layer: {"k_star": [], "variants": []} for layer in hp.layers}
    for case in cases:
        req = edit_request(case)
        pert = _perturbations(req, tok)
        before, before_v = {}, {}
        with templates_keyed_by_model(model, backend):
            for layer in hp.layers:
                path = hp.rewrite_module_tmp.format(layer)
                before[layer] = _memit_k_star(model, tok, req, hp, layer, grouped)
                before_v[layer] = _keys_seen_by(model, tok, *_variant_texts(req, pert, flat, rep), [path])[path]
        wc = apply_edit(model, tok, [dict(req)], hp)
        try:
            with templates_keyed_by_model(model, backend):
                for layer in hp.layers:
                    path = hp.rewrite_module_tmp.format(layer)
                    after = _memit_k_star(model, tok, req, hp, layer, grouped)
                    after_v = _keys_seen_by(model, tok, *_variant_texts(req, pert, flat, rep), [path])[path]
                    d_star = _rel(after, before[layer])
                    d_var = ((after_v - before_v[layer]).norm(dim=1) / before_v[layer].norm(dim=1)).mean().item()
                    table[layer]["k_star"].append(d_star)
                    table[layer]["variants"].append(d_var)
                    row = {"stage": "drift", "case_id": case["case_id"], "layer": layer,
                           "rel_change_k_star": d_star, "rel_change_variant_keys_mean": d_var}
                    _record(row)
                    print(row, flush=True)
        finally:
            restore(model, wc)
    print(f"\n## key drift after a plain MEMIT edit, layers {hp.layers} (mean over {len(cases)} cases)")
    print("layer   ‖k*_after−k*_before‖/‖k*_before‖   variant keys (mean)")
    for layer, d in table.items():
        print(f"{layer:5d}   {_mean(d['k_star']):10.4f}                        {_mean(d['variants']):10.4f}")


# -- stage: rep ------------------------------------------------------------------------------------

def stage_rep(model, tok, cases, aggregations):
    from rep_easyedit.editing import apply_edit, load_hparams, restore
    from rep_easyedit.eval.metrics import locality_reference
    from rep_easyedit.hparams import REPHyperParams
    from rep_easyedit.core.pathway import installed_paths, remove_pathways

    memit_hp = load_hparams(MEMIT_YAML)
    rows = {}
    landing = {}
    for case in cases:
        req = edit_request(case)
        pert = _perturbations(req, tok)
        ref = locality_reference(model, tok, dict(case))
        settings = [("MEMIT", None)] + [(f"REP-MEMIT {a}", a) for a in aggregations]
        for label, agg in settings:
            if agg is None:
                hp = memit_hp
            else:
                hp = REPHyperParams.from_hparams(REP_YAML)
                hp.rep.aggregation = agg
            r = dict(req)
            t0 = time.perf_counter()
            wc = apply_edit(model, tok, [r], hp)
            seconds = time.perf_counter() - t0
            try:
                pert_eval = pert  # the same deterministic split REP trained on (seeded per case)
                res = _evaluate(model, tok, case, pert_eval, ref)
                res = {k: res.get(k) for k in ("success", "paraphrase", "locality", "rephrase_in",
                                               "rephrase_out", "shuffle_in", "shuffle_out")}
                if agg is not None:
                    res["landing"] = _landing(model, tok, r, hp, pert_eval)
                    for layer, v in res["landing"].items():
                        landing.setdefault((label, layer), []).append(v)
            finally:
                restore(model, wc)
                if installed_paths(model):
                    remove_pathways(model)
            res.update(seconds=seconds, case_id=case["case_id"])
            rows.setdefault(label, []).append(res)
            _record({"stage": "rep", "setting": label, **{k: v for k, v in res.items()}})
            print(f"case {case['case_id']} {label}: {res}", flush=True)
    keys = ("success", "paraphrase", "locality", "rephrase_in", "rephrase_out", "shuffle_in", "shuffle_out")
    _print_table("REP-MEMIT vs MEMIT", rows, keys)
    print("\n## where the adapted training-variant keys land (mean over cases), per edited layer")
    print("setting                 layer  ‖k̂_v−k*_before‖/‖k*_before‖  ‖k̂_v−k*_after‖/‖k*_after‖  ‖k*_after−k*_before‖/‖k*_before‖")
    for (label, layer), vs in sorted(landing.items()):
        print(f"{label:22s} {layer:5d}  {_mean([v['to_before'] for v in vs]):14.4f}"
              f"  {_mean([v['to_after'] for v in vs]):24.4f}  {_mean([v['target_shift'] for v in vs]):24.4f}")


def _landing(model, tok, request, hp, pert):
    """With the edit and the pathway in place, per edited layer:

    - to_before: mean ‖k̂_v − k*_before‖/‖k*_before‖ for the adapted training-variant keys, k*_before
      being the adapter's training target (REP's flat template mean, collected before the backend);
    - to_after: the same against k*_after, MEMIT's own k* (`compute_ks`, through the pathway) on the
      edited model, i.e. the key MEMIT wrote at for this layer (after the lower layers' updates);
    - target_shift: ‖k*_after − k*_before‖/‖k*_before‖;
    - rep_vs_memit_target: ‖k*_before − compute_ks before‖/‖·‖: REP averages the templates flat,
      MEMIT averages each template group first (plain prompt weighted 1/2 instead of 1/6).
    """
    import importlib

    from rep_easyedit.backends import get_backend, templates_keyed_by_model
    from rep_easyedit.compat.easyedit import shims_applied

    out = {}
    base_hp = hp.backend_hparams()
    with templates_keyed_by_model(model, get_backend("MEMIT")):
        with shims_applied():
            grouped = importlib.import_module("easyeditor.models.memit.memit_main").get_context_templates(model, tok)
        flat = [t for g in grouped for t in g]
        paths = {layer: base_hp.rewrite_module_tmp.format(layer) for layer in base_hp.layers}
        texts, positions = _variant_texts(request, pert, flat, hp.rep)
        adapted = _keys_seen_by(model, tok, texts, positions, list(paths.values()))
        for layer, path in paths.items():
            k_before, k_memit_before = _TARGETS[(request["case_id"], layer)]
            k_after = _memit_k_star(model, tok, request, base_hp, layer, grouped)
            a = adapted[path]
            out[layer] = {
                "to_before": ((a - k_before).norm(dim=1) / k_before.norm()).mean().item(),
                "to_after": ((a - k_after).norm(dim=1) / k_after.norm()).mean().item(),
                "target_shift": _rel(k_after, k_before),
                "rep_vs_memit_target": _rel(k_before, k_memit_before),
            }
    return out


_TARGETS: dict = {}


def _record_targets(memit_hp):
    """Wrap REP's key gathering so each layer's training target (and MEMIT's k* then) is kept."""
    import importlib

    import rep_easyedit.rep_main as rep_main

    original = rep_main.gather_training_keys

    def gather(model_, tok_, request, pert, templates, path, rep, corpus, rng):
        keys = original(model_, tok_, request, pert, templates, path, rep, corpus, rng)
        layer = int(path.split(".")[2])
        grouped = importlib.import_module("easyeditor.models.memit.memit_main").CONTEXT_TEMPLATES_CACHE
        k_memit = _memit_k_star(model_, tok_, request, memit_hp, layer, grouped)
        _TARGETS[(request["case_id"], layer)] = (keys.target.float().clone(), k_memit)
        return keys

    rep_main.gather_training_keys = gather


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("layers", "drift", "rep"), required=True)
    parser.add_argument("--cases", default="40:43")
    parser.add_argument("--aggregations", nargs="+", default=["match", "cosine"])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2-135m")
    parser.add_argument("--layer-sets", nargs="+", default=None,
                        help='layer sets for --stage layers, e.g. "1,2,3" "2,3,4"')
    args = parser.parse_args(argv)
    global MODEL, DATA, MEMIT_YAML, REP_YAML, LAYER_SETS
    MODEL = args.model
    DATA = ROOT / "data" / MODELS[MODEL][0]
    MEMIT_YAML = ROOT / "hparams" / "MEMIT" / f"{MODEL}.yaml"
    REP_YAML = ROOT / "hparams" / "REP-MEMIT" / f"{MODEL}.yaml"
    LAYER_SETS = ([[int(x) for x in s.split(",")] for s in args.layer_sets] if args.layer_sets
                  else MODELS[MODEL][1])
    torch.set_num_threads(1)
    from rep_easyedit.model_loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(MODEL, device="cpu")
    tok_holder.append(tok)
    a, b = (int(x) for x in args.cases.split(":"))
    cases = json.loads(DATA.read_text())[a:b]
    if args.stage == "layers":
        stage_layers(model, tok, cases)
    elif args.stage == "drift":
        stage_drift(model, tok, cases)
    else:
        from rep_easyedit.editing import load_hparams

        _record_targets(load_hparams(MEMIT_YAML))
        stage_rep(model, tok, cases, args.aggregations)


if __name__ == "__main__":
    main()
