"""Lifelong editing: N edits in sequential batches, every edit so far re-checked at checkpoints.

Each batch is edited into the model as the earlier batches left it (never restored); ROME-style
backends take a batch one request at a time. At each checkpoint every edit made so far is scored
on the current model: efficacy (success), generalisation (paraphrase), specificity (locality
against the unedited model), rephrased and shuffled subjects (in and out of REP's training half)
and fluency (on the first `--fluency-cases` edits). The model state (edited weights, REP pathway,
AlphaEdit's cumulative term) is saved after every batch under `<out>/<alg>/state/` (not kept in
git), so a killed run resumes where it stopped, and a finished one goes on to a larger `--n`. With
`--merge-rank R` each layer's adapters are swapped after every batch for one adapter of rank R
retrained on every edit's keys so far (`rep_easyedit.core.merging`, keys kept by
`rep_easyedit.recording_training_keys`), so the pathway's forward cost
stays one adapter per layer; the keys are kept in the state too. `--set rep.merge_rank=R` merges
inside each edit instead, before the backend's update (`rep.merge_rank`), so the update is fitted
through the pathway the model keeps.

    OMP_NUM_THREADS=1 python benchmarks/lifelong.py run --alg AlphaEdit --n 200 --batch 10 \\
        --checkpoints 10,50,100,200 --out benchmarks/results/lifelong/smollm2
    python benchmarks/lifelong.py report --runs benchmarks/results/lifelong/smollm2/AlphaEdit \\
        benchmarks/results/lifelong/smollm2/REP-AlphaEdit --out benchmarks/results/lifelong/smollm2
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("success", "paraphrase", "locality", "rephrase_in", "rephrase_out", "shuffle_in",
           "shuffle_out", "fluency")
METRICS = ("success", "paraphrase", "locality", "rephrase", "shuffle", "fluency")
# the model's own dev cases first, then the other model's (24 shared cases dropped): 176 CounterFact cases
MERGE_NEGATIVES_PER_EDIT = 256
DATA = {"smollm2-135m": ["data/counterfact_smollm2_dev.json", "data/counterfact_gemma3_dev.json"],
        "gemma3-270m": ["data/counterfact_gemma3_dev.json", "data/counterfact_smollm2_dev.json"]}


def run(args) -> None:
    from rep_easyedit.eval.runner import set_threads_from_env

    set_threads_from_env()
    import rep_easyedit  # noqa: F401
    from rep_easyedit.backends import get_backend
    from rep_easyedit.rep_main import recording_training_keys
    from rep_easyedit.core.perturbations import build_perturbations
    from rep_easyedit.editing import load_hparams
    from rep_easyedit.eval.metrics import locality_reference
    from rep_easyedit.eval.runner import perturbation_settings
    from rep_easyedit.model_loading import load_model_and_tokenizer

    hp_path = ROOT / f"hparams/{args.alg}/{args.model}.yaml"
    hp = load_hparams(hp_path)
    hp.device = args.device
    overrides = dict(kv.split("=", 1) for kv in args.set)
    for key, value in overrides.items():
        owner, field = (hp.rep, key[len("rep."):]) if key.startswith("rep.") else (hp, key)
        if not hasattr(owner, field):
            raise SystemExit(f"--set {key}=...: {hp_path} has no field {key!r}")
        setattr(owner, field, type(getattr(owner, field))(value))
    out = Path(args.out) / args.alg
    out.mkdir(parents=True, exist_ok=True)
    config = {"alg": args.alg, "model": args.model, "data": args.data or DATA[args.model],
              "start": args.start, "n": args.n, "batch": args.batch, "hparams": str(hp_path.relative_to(ROOT)), "set": overrides}
    if args.merge_rank:
        config["merge_rank"] = args.merge_rank
    if hasattr(hp, "rep"):  # REP's resolved recipe: a default changed later must not mix into a resumed run
        config["rep"] = dataclasses.asdict(hp.rep)
    progress_file = out / "progress.json"
    progress = json.loads(progress_file.read_text()) if progress_file.exists() else None
    if progress is not None and _settings(progress["config"], config) != _settings(config):
        raise SystemExit(f"{out} holds a run with other settings {progress['config']}; use another --out")
    progress = progress or {"config": config, "batches_done": 0, "batch_seconds": []}
    progress["config"]["n"] = args.n  # a finished run goes on to a larger --n
    if "rep" in config:
        progress["config"]["rep"] = config["rep"]  # recorded from now on

    records = _records(config["data"])[args.start:args.start + args.n]
    if len(records) < args.n:
        raise SystemExit(f"{config['data']} hold only {len(records)} distinct cases from {args.start}")
    model, tok = load_model_and_tokenizer(args.model, device=args.device)
    settings = {**perturbation_settings(hp), "n_long": 0}
    settings.pop("corpus")
    perts = [build_perturbations(r, tok, [], **settings) for r in records]
    refs = [locality_reference(model, tok, r) for r in records]      # on the unedited model
    groups: dict[str, list] = {}  # --merge-rank: every edit's training keys so far, per layer
    if progress["batches_done"]:
        _load_state(model, out / "state")
        if args.merge_rank:
            groups = _load_keys(out / "state")
        print(f"resumed after {progress['batches_done']} batches", flush=True)

    backend = get_backend(getattr(hp, "backend_name", hp.alg_name))
    per_call = backend.max_batch or args.batch
    checkpoints = sorted({int(c) for c in args.checkpoints.split(",") if c.strip()} | {args.n})
    n_batches = -(-args.n // args.batch)
    for b in range(progress["batches_done"], n_batches):
        batch = records[b * args.batch:(b + 1) * args.batch]
        torch.manual_seed(b)
        t0 = time.perf_counter()
        edited = set(progress.get("edited_params", []))
        with recording_training_keys() if args.merge_rank else contextlib.nullcontext() as captured:
            for i in range(0, len(batch), per_call):
                names, merged = _edit(model, tok, batch[i:i + per_call], hp)
                edited |= names
            if merged:
                progress.setdefault("merges_in_edit", []).append(merged)
        progress["batch_seconds"].append(time.perf_counter() - t0)
        if args.merge_rank:
            progress.setdefault("merges", []).append(_merge(model, hp.rep, groups, captured, args.merge_rank))
            print(f"merged: {json.dumps(progress['merges'][-1])}", flush=True)
            _save_keys(groups, out / "state")
        progress["batches_done"] = b + 1
        progress["edited_params"] = sorted(edited)
        _save_state(model, out / "state", progress["edited_params"])
        progress_file.write_text(json.dumps(progress, indent=1))
        done = min((b + 1) * args.batch, args.n)
        print(f"batch {b + 1}/{n_batches}: {progress['batch_seconds'][-1]:.1f} s, {done} edits", flush=True)
        if done in checkpoints and not (out / f"checkpoint_{done}.json").exists():
            result = _check(model, tok, records[:done], perts, refs, args.fluency_cases)
            result["summary"].update(alg=args.alg, model=args.model, n_edits=done, batch=args.batch,
                                     batch_seconds_median=statistics.median(progress["batch_seconds"]))
            if args.merge_rank:
                result["summary"].update(method=f"{args.alg} (merged, rank {args.merge_rank})",
                                         merge_seconds_last=progress["merges"][-1]["seconds"])
            elif getattr(getattr(hp, "rep", None), "merge_rank", 0):
                result["summary"].update(method=f"{args.alg} (merged in the edit, rank {hp.rep.merge_rank})")
            (out / f"checkpoint_{done}.json").write_text(json.dumps(result, indent=1))
            print(json.dumps(result["summary"]), flush=True)


def _settings(config: dict, current: dict | None = None) -> dict:
    """What must match for a run to resume: everything but the number of edits it goes to.

    A stored `config` recorded before runs kept REP's resolved recipe ran with the REPConfig defaults
    of its day: today's `current` ones, except those in `CHANGED_DEFAULTS` that its `--set` did not name.
    A recorded recipe that lacks a field added since ran with that field's default of its day.
    """
    from rep_easyedit.core.config import CHANGED_DEFAULTS

    settings = {k: v for k, v in config.items() if k != "n"}
    if current is not None and "rep" in current and "rep" not in settings:
        named = {key[len("rep."):] for key in settings.get("set", {}) if key.startswith("rep.")}
        settings["rep"] = {**current["rep"], **{k: v for k, v in CHANGED_DEFAULTS.items() if k not in named}}
    elif current is not None and "rep" in current:  # a field added since the recipe was recorded
        added = {k: CHANGED_DEFAULTS.get(k, v) for k, v in current["rep"].items() if k not in settings["rep"]}
        settings["rep"] = {**settings["rep"], **added}
    return settings


def _merge(model, rep, groups: dict[str, list], captured: dict[str, list], rank: int) -> dict:
    """Each layer's adapters swapped for one of `rank`, retrained on every edit's keys so far.

    The forward cost then stays one adapter per layer however many edits are kept. Each new edit's
    keys are slimmed to `MERGE_NEGATIVES_PER_EDIT` negatives (a merge caps the union's anyway).
    """
    from rep_easyedit.core.merging import merge_adapters, slimmed

    t0 = time.perf_counter()
    gate = {}
    for path, new in captured.items():
        kept = groups.setdefault(path, [])
        kept.extend(slimmed(k, MERGE_NEGATIVES_PER_EDIT, seed=len(kept) + i) for i, k in enumerate(new))
    for path, kept in groups.items():
        _, report = merge_adapters(model, path, kept, rep, rank=rank)
        gate[path] = {"pos": report.gate_pos_fire, "neg": report.gate_neg_fire, "steps": report.steps}
    return {"seconds": time.perf_counter() - t0, "edits": len(next(iter(groups.values()), [])), "gate": gate}


def _save_keys(groups: dict[str, list], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = {path: [dataclasses.asdict(k) for k in kept] for path, kept in groups.items()}
    torch.save(state, directory / "keys.tmp")
    os.replace(directory / "keys.tmp", directory / "training_keys.pt")


def _load_keys(directory: Path) -> dict[str, list]:
    from rep_easyedit.core.training import TrainingKeys

    state = torch.load(directory / "training_keys.pt")
    return {path: [TrainingKeys(**k) for k in kept] for path, kept in state.items()}


def _records(files: list[str]) -> list[dict]:
    """The cases of `files` in order, each (prompt, subject, target) once."""
    from rep_easyedit.eval.datasets import load_records

    seen, out = set(), []
    for f in files:
        for r in load_records(ROOT / f, "auto", METRICS):
            key = (r["prompt"], r["subject"], r["target_new"])
            if key not in seen:
                seen.add(key)
                out.append(r)
    return out


def _edit(model, tok, records, hp) -> tuple[set[str], dict]:
    """Edit `records` into the model for good: the names of the weights it changed, and what
    `rep.merge_rank` merged in the edit (per layer: steps, gate fire, seconds; empty otherwise)."""
    from rep_easyedit.editing import apply_edit
    from rep_easyedit.eval.runner import edit_request

    requests = [edit_request(r) for r in records]
    weights_copy = apply_edit(model, tok, requests, hp)
    return set(weights_copy), requests[-1].get("rep", {}).get("merge", {})


def _save_state(model, directory: Path, edited: list[str]) -> None:
    from safetensors.torch import save_file

    from rep_easyedit.backends_extra.alphaedit import history_state
    from rep_easyedit.core.persistence import pathways_detached, save_pathway

    directory.mkdir(parents=True, exist_ok=True)
    with pathways_detached(model):  # the model's own weights; REP's adapters go to `pathway/`
        params = dict(model.named_parameters())
    save_file({n: params[n].detach().cpu().contiguous() for n in edited if n in params},
              str(directory / "weights.tmp"))
    os.replace(directory / "weights.tmp", directory / "weights.safetensors")
    save_pathway(model, directory / "pathway")
    torch.save(history_state(model), directory / "alphaedit_history.pt")


def _load_state(model, directory: Path) -> None:
    from safetensors.torch import load_file

    from rep_easyedit.backends_extra.alphaedit import load_history_state
    from rep_easyedit.core.persistence import load_pathway

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in load_file(str(directory / "weights.safetensors")).items():
            if ".rep_pathway." in name:  # a state saved before 34afcfd8 holds the adapters' switches too
                continue
            params[name].copy_(value.to(params[name].device))
    load_pathway(model, directory / "pathway")
    load_history_state(model, torch.load(directory / "alphaedit_history.pt"))


def state_for_scoring(alg: str, model_name: str, n: int, state: Path):
    """For probes of a run's saved state: (hparams, records, model with the state loaded, tok,
    perturbations, locality references read before loading), as `run` scores its checkpoints."""
    from rep_easyedit.eval.runner import set_threads_from_env

    set_threads_from_env()
    import rep_easyedit  # noqa: F401
    from rep_easyedit.core.perturbations import build_perturbations
    from rep_easyedit.editing import load_hparams
    from rep_easyedit.eval.metrics import locality_reference
    from rep_easyedit.eval.runner import perturbation_settings
    from rep_easyedit.model_loading import load_model_and_tokenizer

    hp = load_hparams(ROOT / f"hparams/{alg}/{model_name}.yaml")
    records = _records(DATA[model_name])[:n]
    model, tok = load_model_and_tokenizer(model_name)
    settings = {**perturbation_settings(hp), "n_long": 0}
    settings.pop("corpus")
    perts = [build_perturbations(r, tok, [], **settings) for r in records]
    refs = [locality_reference(model, tok, r) for r in records]
    _load_state(model, Path(state))
    return hp, records, model, tok, perts, refs


def _check(model, tok, records, perts, refs, fluency_cases: int) -> dict:
    """Score every edit made so far on the model as it is now."""
    from rep_easyedit.core.pathway import get_module, installed_paths, pathway_of
    from rep_easyedit.eval.metrics import evaluate_case

    t0 = time.perf_counter()
    rows = []
    with torch.no_grad():
        for i, (record, pert, ref) in enumerate(zip(records, perts, refs)):
            scores = evaluate_case(model, tok, record, pert, ref, fluency=i < fluency_cases, metrics=METRICS)
            rows.append({"case_id": record["case_id"], **{k: scores.get(k) for k in COLUMNS}})
    # live adapters only: those a merge switched off stay installed until the next edit prunes them
    summary = {"adapters_installed": sum(float(a.active) != 0.0 for p in installed_paths(model)
                                         for a in pathway_of(get_module(model, p)).adapters),
               "check_seconds": time.perf_counter() - t0}
    for key in COLUMNS:
        values = [r[key] for r in rows if r[key] is not None]
        scale = 1 if key == "fluency" else 100
        summary[key] = round(scale * statistics.mean(values), 2 if key == "fluency" else 1) if values else None
    return {"summary": summary, "cases": rows}


def report(args) -> None:
    """A table (lifelong.md) and one plot per column against N (lifelong.png) for the runs given."""
    rows = []
    for run_dir in map(Path, args.runs):
        for f in sorted(run_dir.glob("checkpoint_*.json"), key=lambda p: int(p.stem.split("_")[1])):
            rows.append(json.loads(f.read_text())["summary"])
    if not rows:
        raise SystemExit("no checkpoint_*.json in the runs given")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for r in rows:
        r.setdefault("method", r["alg"])
    head = "| method | N | " + " | ".join(COLUMNS) + " | adapters | s / batch |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 4)]
    for r in rows:
        cells = ["–" if r.get(c) is None else f"{r[c]}" for c in COLUMNS]
        lines.append(f"| {r['method']} | {r['n_edits']} | " + " | ".join(cells)
                     + f" | {r['adapters_installed']} | {r['batch_seconds_median']:.0f} |")
    (out / "lifelong.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, col in zip(axes.flat, COLUMNS):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = [(r["n_edits"], r[col]) for r in rows if r["method"] == method and r.get(col) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.set_title(col)
        ax.set_xlabel("edits so far (N)")
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(out / "lifelong.png", dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--alg", required=True)
    r.add_argument("--model", default="smollm2-135m", choices=sorted(DATA))
    r.add_argument("--data", nargs="+", default=None,
                   help="dataset files, edited in order (default: both models' CounterFact dev sets)")
    r.add_argument("--start", type=int, default=0, help="first case of the data file")
    r.add_argument("--n", type=int, default=200)
    r.add_argument("--batch", type=int, default=10)
    r.add_argument("--checkpoints", default="10,50,100,200")
    r.add_argument("--fluency-cases", type=int, default=10, help="edits scored for fluency at a checkpoint")
    r.add_argument("--device", default="cpu")
    r.add_argument("--merge-rank", type=int, default=0,
                   help="after each batch, swap each layer's adapters for one of this rank retrained on every "
                        "edit's keys so far (0: keep one adapter per edit and layer)")
    r.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="hparams fields to override (e.g. nullspace_threshold=5e-3 L2=10 rep.merge_rank=128)")
    r.add_argument("--out", default=str(ROOT / "benchmarks/results/lifelong"))
    p = sub.add_parser("report")
    p.add_argument("--runs", nargs="+", required=True)
    p.add_argument("--out", required=True)
    args = ap.parse_args()
    run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    main()
