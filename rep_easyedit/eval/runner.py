"""Benchmark an editing method case by case: edit from the unedited model, evaluate, restore.

    python benchmarks/run_benchmark.py alg=REP-ROME model=smollm2-135m \
        data=counterfact_smollm2_dev limit=20 out=runs/rep-rome shard=0/1

Config groups (benchmarks/conf): `alg` (ROME, MEMIT, R-ROME, EMMET, AlphaEdit and their REP-
versions; hparams from `hparams/<ALG>/<model.hparams_name>.yaml`, or `hparams=FILE`), `model`
(`smollm2-135m`, or any local model: `model=/path/to/model` or `model.path=...`) and `data`
(`counterfact_smollm2_dev`, or any file: `data=FILE.json`, EasyEdit CounterFact/ZsRE included).

For each case: perturbations (the same function and settings REP trains with: the REP hparams'
`rep:` section, or `REPConfig` defaults for base methods, so base and REP runs see identical
variants), the pre-edit locality reference, the edit, every metric (rep_easyedit.eval.metrics),
the restore. One JSON line per case goes to `<out>/cases.jsonl` as soon as it is done; case_ids
already there are skipped (resume; a run whose settings (hparams, data metrics and scoring) differ
from the out dir's run.json, the device and seed aside, is refused; each line records both).
`shard=i/n` takes every n-th case starting at i; shards may share one out dir. At the end
`<out>/summary.json` and `<out>/summary.md` cover every case in cases.jsonl. `key_similarity=true` (REP methods) also
stores, per case, the whitened key similarities before/after the pathway, for
`benchmarks/compare_runs.py`.

This module is the runner itself; `benchmarks/run_benchmark.py` is its Hydra command line.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[2]   # the source tree: hparams/, data/ and benchmarks/conf/
CONF = REPO / "benchmarks" / "conf"


# -- helpers (importable without Hydra) -----------------------------------------------------

def set_threads_from_env() -> int | None:
    import torch

    for var in ("TORCH_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            torch.set_num_threads(int(value))
            return int(value)
    return None


def resolve_path(path: str | os.PathLike) -> Path:
    """A path as given (absolute, or relative to the working directory), else under the repo."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_absolute() or p.exists():
        return p
    if (REPO / p).exists():
        return REPO / p
    return p


def parse_shard(shard) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in str(shard).split("/"))
    except ValueError:
        raise ValueError(f"shard must look like i/n (e.g. 0/4), got {shard!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {shard!r}: need 0 <= i < n")
    return i, n


def is_rep(hparams) -> bool:
    return str(getattr(hparams, "alg_name", "")).startswith("REP-")


def perturbation_settings(hparams) -> dict:
    """build_perturbations' settings exactly as REP uses them (REPConfig defaults for base methods)."""
    from rep_easyedit.core.config import REPConfig

    rep = hparams.rep if is_rep(hparams) else REPConfig()
    return {"n_shuffles": rep.n_shuffles, "n_long": rep.n_long_contexts,
            "long_tokens": rep.long_context_tokens, "base_seed": rep.seed,
            "corpus": list(rep.corpus) if rep.corpus else None}


def read_cases(path: Path) -> list[dict]:
    """Lines of cases.jsonl; a torn last line (a killed run) is dropped from the file."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    cases, bad = [], False
    for line in lines:
        if not line.strip():
            continue
        try:
            cases.append(json.loads(line))
        except json.JSONDecodeError:
            bad = True
    if bad:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in cases), encoding="utf-8")
        os.replace(tmp, path)
    return cases


def pair_cases(cases_a: Sequence[dict], cases_b: Sequence[dict]) -> list[tuple[dict, dict]]:
    """(a, b) for every case both runs finished, matched by case_id (shards finish out of order)."""
    by_id = {str(c["case_id"]): c for c in cases_b}
    return [(a, by_id[str(a["case_id"])]) for a in cases_a if str(a["case_id"]) in by_id]


def _jsonable(obj):
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


# run.json keys a resumed run may change (where it runs; the seed, shard and limit live in config)
_RUN_CONTROL = ("hparams.device",)


def _flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        flat = {}
        for key, value in obj.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: obj}


def _default_of(key: str):
    """The REPConfig default of a `hparams.rep.<field>` key, else None (a field a stored run predates)."""
    import dataclasses

    from rep_easyedit.core.config import CHANGED_DEFAULTS, REPConfig

    if key.startswith("hparams.rep."):
        for field in dataclasses.fields(REPConfig):
            if field.name == key[len("hparams.rep."):] and field.default is not dataclasses.MISSING:
                return CHANGED_DEFAULTS.get(field.name, field.default)
    return None


def settings_differences(stored: dict, current: dict) -> list[str]:
    """What differs between the run.json that wrote an out dir and this run's, as `key: was → now`.

    Compared: method, model (name, dtype), data (and its metrics and scoring), every hparams field
    but the device, and the perturbation settings. A field the stored run predates counts as its
    default."""
    def relevant(run: dict) -> dict:
        config = run.get("config") or {}
        model, data = config.get("model") or {}, config.get("data") or {}
        metrics = data.get("metrics")
        picked = {"alg": run.get("alg"), "model": run.get("model"), "data": run.get("data"),
                  "model_dtype": model.get("dtype"), "hparams": run.get("hparams") or {},
                  # a metric left out of some cases, or scored otherwise, would mix in one summary
                  "data_metrics": sorted(metrics) if metrics is not None else None,
                  "data_scoring": data.get("scoring"),
                  "perturbation_settings": run.get("perturbation_settings") or {}}
        return {k: v for k, v in _flatten(picked).items() if k not in _RUN_CONTROL}

    was, now = relevant(stored), relevant(json.loads(json.dumps(current, default=_jsonable)))
    diffs = []
    for key in sorted(set(was) | set(now)):
        old = was[key] if key in was else _default_of(key)
        new = now[key] if key in now else _default_of(key)
        if old != new:
            diffs.append(f"{key}: {old!r} → {new!r}")
    return diffs


def check_resumable(out_dir: Path, run: dict) -> None:
    """Refuse to add cases to an out dir whose finished cases ran with other settings."""
    stored_path = out_dir / "run.json"
    if not stored_path.exists() or not read_cases(out_dir / "cases.jsonl"):
        return
    diffs = settings_differences(json.loads(stored_path.read_text(encoding="utf-8")), run)
    if diffs:
        raise ValueError(
            f"{out_dir} already holds cases run with other settings, and a resumed run must not mix "
            f"them: " + "; ".join(diffs) + f". Pass another out=DIR, or delete {out_dir / 'cases.jsonl'} "
            f"to start that run over.")


def append_line(path: Path, obj: dict) -> None:
    """One case as one line, written with a single O_APPEND write (shards may share the file)."""
    data = (json.dumps(obj, ensure_ascii=False, default=_jsonable) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def edit_request(record: dict) -> dict:
    """The EasyEdit request of a record (with the fields REP's perturbations read)."""
    req = {"case_id": record["case_id"], "prompt": record["prompt"], "subject": record["subject"],
           "target_new": record["target_new"]}
    if record.get("target_true"):
        req["ground_truth"] = record["target_true"]
    if record.get("subject_rephrase"):
        req["subject_rephrase"] = list(record["subject_rephrase"])
    return req


def key_similarity_setup(model, hparams) -> tuple[str, object]:
    """(module path of the first edited layer, C⁻¹ or None when no covariance cache exists)."""
    layer = int(list(hparams.layers)[0])
    path = hparams.rewrite_module_tmp.format(layer)
    inv_cov = None
    try:
        from rep_easyedit.covariance import has_stats, load_inverse_covariance

        if has_stats(model, hparams, layer):
            inv_cov = load_inverse_covariance(model, hparams, layer, device="cpu")
    except (ImportError, ValueError, OSError):
        inv_cov = None
    return path, inv_cov


_POSTFIX = ("success", "paraphrase", "locality", "rephrase_out", "shuffle_out", "long_out")


def _postfix(cases: Sequence[dict]) -> dict:
    out = {}
    for key in _POSTFIX:
        values = [c["metrics"].get(key) for c in cases if c["metrics"].get(key) is not None]
        if values:
            out[key[:8]] = f"{100 * sum(values) / len(values):.0f}"
    return out


def run_cases(model, tok, records: Sequence[dict], hparams, out_dir: str | os.PathLike, *,
              corpus: Sequence[str] | None, settings: dict | None = None,
              metrics: Sequence[str] | None = None, shard: tuple[int, int] = (0, 1),
              key_similarity: bool = False, edit: Callable | None = None, batch_size: int = 16,
              fluency_tokens: int = 50, progress: bool = True, run_info: dict | None = None,
              first_index: int = 0, seed: int | None = 0, scoring: str = "exact") -> list[dict]:
    """The benchmark loop. Returns the case lines written by this call.

    `edit(model, tok, [request], hparams)` is a context manager that edits and restores
    (default `rep_easyedit.editing.edited`); tests pass a cheap one. `seed` seeds torch before
    every edit: EasyEdit's ROME-style backends sample their context templates on the first edit of
    a process, and without a seed each process (each shard, each resume) draws others, so a case's
    result would depend on the process that ran it.
    """
    import torch
    from tqdm.auto import tqdm

    from rep_easyedit.eval.metrics import (DEFAULT_METRICS, METRIC_KEYS, evaluate_case,
                                         key_similarities, locality_reference)
    from rep_easyedit.core.perturbations import build_perturbations
    from rep_easyedit.eval.contexts import distracting_contexts, hurting_long_contexts

    if edit is None:
        from rep_easyedit.editing import edited as edit
    settings = dict(settings or perturbation_settings(hparams))
    settings.pop("corpus", None)
    metrics = tuple(metrics or DEFAULT_METRICS)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases_path = out_dir / "cases.jsonl"
    done_cases = read_cases(cases_path)
    done = {str(c["case_id"]) for c in done_cases}
    i, n = shard
    todo = [(idx, r) for idx, r in list(enumerate(records, start=first_index))[i::n]
            if str(r["case_id"]) not in done]
    rep_method = is_rep(hparams)
    ks_setup = key_similarity_setup(model, hparams) if key_similarity and rep_method else None
    info = dict(run_info or {})
    written: list[dict] = []
    running = [c for c in done_cases]
    bar = tqdm(todo, desc=f"{hparams.alg_name} shard {i}/{n}", unit="case", disable=not progress,
               dynamic_ncols=True)
    for index, record in bar:
        t_case = time.perf_counter()
        pert = build_perturbations(record, tok, list(corpus or []), **settings)
        contexts = (distracting_contexts(record, base_seed=settings.get("base_seed", 0))
                    if "distract" in metrics else None)
        if "long_old" in metrics:
            contexts = {**(contexts or {}), **hurting_long_contexts(
                record, tok, list(corpus or []), base_seed=settings.get("base_seed", 0))}
        t0 = time.perf_counter()
        loc_ref = locality_reference(model, tok, record, batch_size) if "locality" in metrics else None
        t_ref = time.perf_counter() - t0
        request = edit_request(record)
        if seed is not None:
            torch.manual_seed(seed)
        t0 = time.perf_counter()
        with edit(model, tok, [request], hparams):
            t_edit = time.perf_counter() - t0
            rep_info = request.get("rep")
            if rep_method:
                if rep_info is None:
                    raise RuntimeError(f"{hparams.alg_name} left no request['rep'] for case "
                                       f"{record['case_id']}")
                if rep_info["perturbations"] != pert.to_dict():
                    raise AssertionError(
                        f"case {record['case_id']}: REP trained on other perturbations than the "
                        f"benchmark evaluates (seed/settings/corpus differ)")
            t0 = time.perf_counter()
            with torch.no_grad():
                result = evaluate_case(model, tok, record, pert, loc_ref,
                                       "fluency" in metrics and fluency_tokens > 0,
                                       metrics=metrics, batch_size=batch_size,
                                       fluency_tokens=fluency_tokens, scoring=scoring,
                                       contexts=contexts)
            t_eval = time.perf_counter() - t0
            ks = None
            if ks_setup is not None:
                ks = key_similarities(model, tok, record, pert, ks_setup[0], ks_setup[1],
                                      corpus=corpus, seed=pert.seed)
                ks["edit_mom2_adjustment"] = bool(getattr(hparams, "mom2_adjustment", False))
        rep_seconds = None
        if rep_info and isinstance(rep_info.get("seconds"), dict):
            rep_seconds = rep_info["seconds"].get("rep_total")
        line = {
            "case_id": record["case_id"], "index": index, **info,
            "inputs": record, "perturbations": pert.to_dict(), **({"contexts": contexts} if contexts else {}),
            "metrics": {k: result[k] for k in METRIC_KEYS},
            "details": result["details"],
            "seconds": {"edit": t_edit, "rep": rep_seconds, "eval": t_eval,
                        "locality_reference": t_ref, "case": time.perf_counter() - t_case},
        }
        if rep_info:
            line["rep"] = {"health": rep_info.get("health"), "training": rep_info.get("training"),
                           "seconds": rep_info.get("seconds")}
            for key in ("value_anchors", "value_anchor_shares", "value_anchors_left_out"):
                if rep_info.get(key) is not None:
                    line["rep"][key] = rep_info[key]
        if ks is not None:
            line["key_similarity"] = ks
        append_line(cases_path, line)
        written.append(line)
        running.append(line)
        bar.set_postfix(_postfix(running), refresh=False)
    bar.close()
    return written


def write_summary(out_dir: str | os.PathLike, title: str = "") -> dict:
    from rep_easyedit.eval.metrics import summarize, summary_markdown

    out_dir = Path(out_dir)
    cases = read_cases(out_dir / "cases.jsonl")
    summary = summarize(cases)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    (out_dir / "summary.md").write_text(summary_markdown(summary, title), encoding="utf-8")
    return summary


def rewrite_argv(argv: list[str]) -> list[str]:
    """`data=FILE` → `data=custom data.path=FILE`; `model=DIR` → `model=custom model.path=DIR`."""
    out = []
    for arg in argv:
        for group in ("data", "model"):
            prefix = f"{group}="
            if arg.startswith(prefix):
                value = arg[len(prefix):]
                if value and not (CONF / group / f"{value}.yaml").exists() and (
                        "/" in value or value.endswith((".json", ".jsonl")) or os.path.exists(value)):
                    out += [f"{group}=custom", f"{group}.path={value}"]
                    break
        else:
            out.append(arg)
    return out


# -- Hydra entry point ---------------------------------------------------------------------

def main(cfg) -> dict:
    from omegaconf import OmegaConf

    set_threads_from_env()
    from rep_easyedit.corpus import load_corpus
    from rep_easyedit.eval.datasets import load_records
    from rep_easyedit.editing import load_hparams
    from rep_easyedit.model_loading import load_model_and_tokenizer

    if cfg.hparams:
        hp_path = resolve_path(cfg.hparams)
    else:
        hp_path = resolve_path(Path(cfg.alg.hparams_dir) / cfg.alg.name / f"{cfg.model.hparams_name}.yaml")
    if not hp_path.is_file():
        raise FileNotFoundError(f"hparams file {hp_path} does not exist (alg={cfg.alg.name}, "
                                f"model={cfg.model.name}); write it or pass hparams=FILE")
    if cfg.get("set"):
        hp_path = _with_overrides(hp_path, cfg.set, Path(os.path.expanduser(str(cfg.out))))
    hparams = load_hparams(hp_path)
    if hparams.alg_name != cfg.alg.name:
        print(f"[run_benchmark] note: {hp_path} has alg_name {hparams.alg_name}, config alg {cfg.alg.name}")
    if cfg.device is not None:
        hparams.device = cfg.device
    metrics = list(cfg.data.metrics)
    skip = int(cfg.skip or 0)
    end = None if cfg.limit is None else skip + int(cfg.limit)
    records = load_records(resolve_path(cfg.data.path), cfg.data.format, metrics, end)[skip:]
    shard = parse_shard(cfg.shard)
    out_dir = Path(os.path.expanduser(str(cfg.out)))
    out_dir.mkdir(parents=True, exist_ok=True)

    settings = perturbation_settings(hparams)
    info = {"alg": hparams.alg_name, "model": cfg.model.name, "data": cfg.data.name}
    run = {**info, "hparams_path": str(hp_path), "hparams": _hparams_dict(hparams),
           "perturbation_settings": settings, "config": OmegaConf.to_container(cfg, resolve=True)}
    check_resumable(out_dir, run)

    model, tok = load_model_and_tokenizer(cfg.model.path, device=getattr(hparams, "device", "cpu"),
                                          dtype=cfg.model.dtype)
    corpus: list[str] = []
    if settings["n_long"] > 0 or cfg.key_similarity or "long_old" in metrics:
        seed = hparams.rep.seed if is_rep(hparams) else settings["base_seed"]
        corpus = load_corpus(settings["corpus"], model, tok, seed=seed)
    (out_dir / "run.json").write_text(json.dumps(run, indent=1, default=_jsonable) + "\n", encoding="utf-8")

    run_cases(model, tok, records, hparams, out_dir, corpus=corpus, settings=settings, metrics=metrics,
              shard=shard, key_similarity=bool(cfg.key_similarity), batch_size=int(cfg.batch_size),
              fluency_tokens=int(cfg.fluency_tokens), progress=bool(cfg.progress),
              run_info={**info, "device": str(getattr(hparams, "device", "cpu")), "seed": cfg.seed},
              first_index=skip, seed=cfg.seed, scoring=str(cfg.data.get("scoring", "exact")))
    summary = write_summary(out_dir, f"{hparams.alg_name} on {cfg.model.name}, {cfg.data.name}")
    print(json.dumps(summary, indent=1))
    print(f"[run_benchmark] wrote {out_dir / 'cases.jsonl'}, {out_dir / 'summary.json'}, "
          f"{out_dir / 'summary.md'}")
    return summary


def _with_overrides(hp_path: Path, overrides, out_dir: Path) -> Path:
    """The hparams YAML with `+set.<field>=value` overrides merged in, written to `<out>/hparams.yaml`
    (then validated like any hparams file)."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.load(hp_path), overrides)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "hparams.yaml"
    OmegaConf.save(merged, target)
    return target


def _hparams_dict(hparams) -> dict:
    if hasattr(hparams, "to_dict"):
        return hparams.to_dict()
    return {k: v for k, v in vars(hparams).items() if not k.startswith("_")}

