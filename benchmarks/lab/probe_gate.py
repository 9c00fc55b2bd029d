"""What the gate fires on, with no edit made: held-out variants (it should) and neighbours (it should not).

REP's adapters are trained before the backend runs (`fit_after_update: false`), on the unedited
model, so the gate's reach can be read without the backend's edit (the slow part). For each case
and each `rep` setting: the adapters are fitted as a REP-<ALG> edit fits them, and

- `out_fire`: share of the held-out rephrased and shuffled subjects (in the edit prompt) whose
  subject-last-token key fires a gate (τ) — what robustness out of domain needs;
- `in_fire`: the same for the trained variants;
- `neighbour_fire`: share of the case's locality prompts on which any token fires a gate — a
  neighbour the pathway touches, where locality can be lost (the locality prompts are only read
  here, never trained on).

With `--activation`, also what the edit would do there, still without making it: ROME-style
backends write ΔW = (v* − Wk*) uᵀ with u = C⁻¹k* / (k*ᵀC⁻¹k*) (C = I without `mom2_adjustment`), so
a token with key k gets the share a(k) = uᵀk of the edit (1 at k*). Per case, with the pathway (k̂)
and without it (k, the base method): `in_act` / `out_act` = mean a at the subject's last token of
the trained / held-out variants (robustness wants it near 1), `neighbour_act` = mean over the
locality prompts of the largest a over their tokens (locality wants it as without the pathway),
`neighbour_hit` = share of locality prompts where some token's a exceeds 0.5.

    OMP_NUM_THREADS=1 python benchmarks/lab/probe_gate.py --cases 0-49 --set sibling_negatives=0 \
        --set sibling_negatives=8 --out benchmarks/results/probe_gate/smollm2.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]


def keys_at(model, tok, path, texts, positions):
    """Per text: its key at `positions[i]` ([1, D]), or every token's key (None), at `path`."""
    from rep_easyedit.core.keys import collect_keys_flat

    flat = collect_keys_flat(model, tok, texts, path, None, all_tokens=True)
    return [keys if pos is None else keys[pos:pos + 1] for keys, pos in zip(flat.per_text(), positions)]


def rep_value(default, text: str):
    """A --set value as the field's type; a list field takes its items joined by "+"
    (`train_on=subject+rephrase+shuffle+long+forms`); a field whose default is None reads it as YAML."""
    if default is None:
        import yaml

        return yaml.safe_load(text)
    if isinstance(default, list):
        return [item for item in text.split("+") if item]
    if isinstance(default, bool):
        if text.lower() not in ("true", "false"):
            raise ValueError(f"a true/false field got {text!r}")
        return text.lower() == "true"
    return type(default)(text)


def fires(adapter, keys) -> bool:
    """Does the adapter's gate exceed τ at any of these keys?"""
    return bool((adapter.gate_prob(keys) > adapter.tau).any())


def edit_shares(adapter, keys, u) -> tuple[float, float]:
    """The largest a = uᵀk over these keys, with the adapter applied (hard gate) and without it."""
    return float((adapter(keys, hard=True).float() @ u).max()), float((keys.float() @ u).max())


def edit_direction(model, tok, request, template_groups, path, base_hp, layer):
    """u = C⁻¹k* / (k*ᵀC⁻¹k*), k* the subject's key over the backend's templates, as REP computes it."""
    from rep_easyedit.core.keys import collect_keys_flat, subject_last_indices
    from rep_easyedit.rep_main import _variant_texts, template_mean

    pairs = _variant_texts(request, [request["subject"]], [t for g in template_groups for t in g], [])
    texts = [t for t, _ in pairs]
    positions, enc = subject_last_indices(tok, texts, [e for _, e in pairs])
    k_star = template_mean(collect_keys_flat(model, tok, texts, path, positions, encoded=enc).picked, template_groups)
    if getattr(base_hp, "mom2_adjustment", False):
        from rep_easyedit.covariance import load_inverse_covariance

        w = load_inverse_covariance(model, base_hp, layer, device=k_star.device) @ k_star
    else:
        w = k_star
    return w / (k_star @ w)


def probe_setup(alg: str, model_name: str, data: str | None, cases: str):
    """(hparams, [(dev index, record)] for a..b, model, tokenizer, backend, backend hparams, edited module paths)."""
    from rep_easyedit.backends import get_backend
    from rep_easyedit.editing import load_hparams
    from rep_easyedit.eval.datasets import load_records
    from rep_easyedit.model_loading import load_model_and_tokenizer
    from rep_easyedit.rep_main import edited_module_paths

    hp = load_hparams(ROOT / f"hparams/{alg}/{model_name}.yaml")
    data = data or str(ROOT / f"data/counterfact_{model_name.split('-')[0]}_dev.json")
    a, b = (int(x) for x in cases.split("-"))
    # any format the runner reads (CounterFact dev files come back as they are; zsRE is normalised)
    records = list(zip(range(a, b + 1), load_records(data, metrics=("success",))[a:b + 1]))
    model, tok = load_model_and_tokenizer(hp.model_name)
    backend = get_backend(hp.backend_name)
    base_hp = hp.backend_hparams(backend)
    return hp, records, model, tok, backend, base_hp, edited_module_paths(model, base_hp)


def probe_cases(rep, records, model, tok, backend, base_hp, out: Path):
    """(dev index, record, request, perturbations, templates) for each case `out` does not hold yet,
    inside the setting every probe reads keys in: right padding, EasyEdit's shims, the backend's
    context templates (drawn once, seeded as the runner's first edit draws them)."""
    from rep_easyedit.backends import templates_keyed_by_model
    from rep_easyedit.compat.easyedit import shims_applied
    from rep_easyedit.core.devices import padding_side
    from rep_easyedit.core.perturbations import build_perturbations
    from rep_easyedit.corpus import load_corpus
    from rep_easyedit.eval.runner import edit_request

    corpus = load_corpus(rep.corpus, model, tok, seed=rep.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(l)["case_id"] for l in out.read_text().splitlines()} if out.exists() else set()
    with padding_side(tok, "right"), shims_applied(), templates_keyed_by_model(model, backend):
        torch.manual_seed(0)
        templates = backend.context_templates(model, tok, base_hp)
        for idx, record in records:
            if record["case_id"] in done:
                continue
            request = edit_request(record)
            pert = build_perturbations(request, tok, corpus, n_shuffles=rep.n_shuffles, n_long=rep.n_long_contexts,
                                       long_tokens=rep.long_context_tokens, base_seed=rep.seed)
            yield idx, record, request, pert, templates, corpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alg", default="REP-ROME")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=None, help="default: the model's CounterFact dev set")
    ap.add_argument("--cases", default="0-19", help="range a-b of dev indices")
    ap.add_argument("--set", action="append", default=[], help="rep field=value; one setting per --set "
                                                              "(comma-separated fields within one)")
    ap.add_argument("--activation", action="store_true", help="also the edit's share a = uᵀk (see above)")
    ap.add_argument("--kin-fire", type=int, default=0, metavar="N",
                    help="also `kin_fire`: share of N names of the subject's kind (sampled as rep.kin_negatives "
                         "samples them, in the edit prompt, last token) on which the gate fires")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import rep_easyedit  # noqa: F401
    from rep_easyedit.backends import templates_keyed_by_model
    from rep_easyedit.compat.easyedit import shims_applied
    from rep_easyedit.core.devices import padding_side
    from rep_easyedit.core.keys import subject_last_indices
    from rep_easyedit.core.perturbations import build_perturbations, with_subject
    from rep_easyedit.corpus import load_corpus
    from rep_easyedit.eval.runner import edit_request
    from rep_easyedit.rep_main import fit_adapters

    hp, records, model, tok, backend, base_hp, paths = probe_setup(args.alg, args.model, args.data, args.cases)
    settings = [dict(kv.split("=", 1) for kv in s.split(",")) for s in args.set] or [{}]
    corpus = load_corpus(hp.rep.corpus, model, tok, seed=hp.rep.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["case_id"], json.dumps(r["set"], sort_keys=True))
            for r in map(json.loads, out.read_text().splitlines())} if out.exists() else set()

    with padding_side(tok, "right"), shims_applied(), templates_keyed_by_model(model, backend):
        torch.manual_seed(0)  # as the runner (`seed: 0`) before the edit that first samples them
        templates = backend.context_templates(model, tok, base_hp)
        for idx, record in records:
            request = edit_request(record)
            prompt = request["prompt"]
            start = prompt.index(request["subject"])
            neighbours = list(record.get("locality_prompt") or [])
            keys_cache, u_cache = {}, {}  # the unedited model's keys and k* do not depend on the setting
            for setting in settings:
                key = (record["case_id"], json.dumps(setting, sort_keys=True))
                if key in done:
                    continue
                rep = dataclasses.replace(hp.rep, **{k: rep_value(getattr(hp.rep, k), v) for k, v in setting.items()})
                pert = build_perturbations(request, tok, corpus, n_shuffles=rep.n_shuffles,
                                           n_long=rep.n_long_contexts, long_tokens=rep.long_context_tokens,
                                           base_seed=rep.seed)
                fitted = fit_adapters(model, tok, dict(request), pert, templates, paths, rep, corpus,
                                      negatives_cache=getattr(base_hp, "stats_dir", None))
                probes = {}
                for name, variants in (("in", pert.rephrase_in + pert.shuffle_in),
                                       ("out", pert.rephrase_out + pert.shuffle_out)):
                    texts = [with_subject(prompt, request["subject"], v) for v in variants]
                    positions, _ = subject_last_indices(tok, texts, [start + len(v) for v in variants])
                    probes[name] = (texts, positions)
                probes["neighbour"] = (neighbours, [None] * len(neighbours))
                if args.kin_fire:
                    if "kin" not in keys_cache:
                        from rep_easyedit.rep_main import request_kin_names
                        keys_cache["kin"] = request_kin_names(model, tok, dict(request), pert, rep, count=args.kin_fire)
                    kin = keys_cache["kin"]
                    texts = [with_subject(prompt, request["subject"], v) for v in kin]
                    positions, _ = subject_last_indices(tok, texts, [start + len(v) for v in kin])
                    probes["kin"] = (texts, positions)
                row = {"index": idx, "case_id": record["case_id"], "set": setting}
                if args.kin_fire:
                    row["kin_names"] = keys_cache["kin"]
                mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
                for path, adapter, report in fitted:
                    adapter.eval()
                    if args.activation and path not in u_cache:
                        layer = next(l for l, p in paths.items() if p == path)
                        u_cache[path] = edit_direction(model, tok, request, templates, path, base_hp, layer)
                    for name, (texts, positions) in probes.items():
                        cached = (path, tuple(texts))
                        if cached not in keys_cache:
                            keys_cache[cached] = keys_at(model, tok, path, texts, positions)
                        keys = keys_cache[cached]
                        row.setdefault(f"{name}_fire", []).append(mean([fires(adapter, k) for k in keys]))
                        if not args.activation:
                            continue
                        act, base = zip(*[edit_shares(adapter, k, u_cache[path]) for k in keys]) if keys else ((), ())
                        row.setdefault(f"{name}_act", []).append(mean(act))
                        row.setdefault(f"{name}_act_base", []).append(mean(base))
                        if name == "neighbour":
                            row.setdefault("neighbour_hit", []).append(mean([x > 0.5 for x in act]))
                            row.setdefault("neighbour_hit_base", []).append(mean([x > 0.5 for x in base]))
                    row.setdefault("steps", []).append(report.steps)
                    row.setdefault("train_s", []).append(round(report.seconds_train, 3))
                with open(out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
