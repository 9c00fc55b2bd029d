"""Cost of one edit, stage by stage: ROME, REP-ROME, MEMIT, REP-MEMIT, and a reference loop.

For each mode, one worker process (this script re-invoked with `--worker MODE`) loads the model,
makes one warm-up edit (not counted), then edits `--cases` dev cases one at a time, each from the
unedited model (`editing.apply_edit` + `editing.restore`, `torch.manual_seed(0)` before each), and
records per edit:

- wall: the whole `apply_edit` call;
- context_templates: the backend's `get_context_templates` (cached by EasyEdit after the first
  edit, so ~0 after the warm-up);
- rep_keys / rep_train / rep_total: REP's own stage, from `request["rep"]["seconds"]`;
- backend: the backend's value optimisation + weight update (REP: `request["rep"]["seconds"]
  ["backend"]`; plain methods: the wall of the edit);
- ROME family only: compute_u, compute_v (the installed EasyEdit ROME module's functions, wrapped
  with timers for the run) and rome_update_rest = backend − compute_u − compute_v − templates
  inside the backend (the rank-one update, its in-place add, the weight copies and restore).

Peak resident memory: `ru_maxrss` of the worker at its end, and its RSS after loading the model
(before any edit), so that the edits' own increment shows.

Reference (worker `reference`): a training loop of the authors' kind (ElliottYan/RobustKeyEdit):
`--reference-steps` steps (10), each a full forward and backward of the whole model on a batch of
16 variant prompts (the subject variants in the edit prompt, right padded) with the adapter
hooked at the edited layer through `pathway.pathway_installed` (soft gate, training mode) and our
aggregation loss (`training.aggregation_loss`) on the adapted keys at the subject's last token,
captured by a forward hook on the pathway. The model's weights are frozen (gradient reaches the
adapter only), but the forward runs to the logits with autograd on and `loss.backward()` walks
the recorded graph, as in the authors' code. Compared with our REP stage (keys + train).

Floor (REP workers, after each edit, on the restored model): the texts REP needs for that edit
(training texts, k* texts, the corpus spans of the gate negatives) tokenized once and run in one
length-bucketed, gradient-free forward that captures the input of every edited module and stops at
the highest (`FloorPass`): `floor_s`, with tokens, padded tokens and forwards, against REP's own
collection (`rep_collection`), its training steps and seconds per step.

Reference on equal work (worker `reference`, the first `--reference-equal-cases` cases): the same
loop over our REP stage's texts (every variant in every template and long context, and the k*
texts) in length-bucketed batches of 16, each step one forward+backward over all of them;
`--reference-equal-steps` steps are timed and the stage is their mean times `--reference-steps`.

Covariance (worker `covariance`): `covariance.build_stats` on the cached corpus for layer 3 and for
layers [2, 3, 4], into a temporary stats_dir: tokens/s and seconds per layer.

    OMP_NUM_THREADS=2 python benchmarks/bench_edit.py                     # the full benchmark
    OMP_NUM_THREADS=1 python benchmarks/bench_edit.py --cases 1 --modes ROME REP-ROME \
        --reference-steps 2 --no-warmup --out /tmp/bench_check.json     # a functional check
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rep_easyedit.eval.runner import edit_request

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "counterfact_smollm2_dev.json"
MODES = ("ROME", "REP-ROME", "MEMIT", "REP-MEMIT")
EXTRA_WORKERS = ("reference", "covariance")
REFERENCE_BATCH = 16
GOALS = {  # ratio -> (comparison, bound)
    "REP-ROME edit time / ROME edit time": ("<=", 1.05),
    "REP-MEMIT / MEMIT": ("<=", 1.15),
    "reference REP stage / our REP stage": (">=", 5.0),
    "REP-ROME peak RSS / ROME peak RSS": ("<=", 1.1),
    "our REP stage / floor": ("<=", 1.5),
    "reference REP stage / our REP stage (equal work)": (">=", 5.0),
}


# -- helpers --------------------------------------------------------------------------------

def _default_threads() -> int:
    try:
        return int(os.environ.get("OMP_NUM_THREADS", "")) or 2
    except ValueError:
        return 2


def hparams_path(args, mode: str) -> Path:
    return Path(args.hparams_root) / mode / f"{args.hparams_name}.yaml"


def current_rss_kb() -> int:
    """Resident set size now (kB), from /proc where there is one, else the peak so far."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        return maxrss_kb()


def maxrss_kb() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, kB on Linux


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def setup_worker(args):
    import torch

    torch.set_num_threads(args.threads)
    from rep_easyedit.model_loading import load_model_and_tokenizer

    t0 = time.perf_counter()
    model, tok = load_model_and_tokenizer(args.model, device=args.device)
    load_s = time.perf_counter() - t0
    memory = {"after_load_rss_kb": current_rss_kb(), "after_load_maxrss_kb": maxrss_kb()}
    return model, tok, load_s, memory


def select_cases(args) -> tuple[list[dict], dict | None]:
    cases = json.loads(DATA.read_text())
    measured = cases[args.case_offset:args.case_offset + args.cases]
    if len(measured) < args.cases:
        raise SystemExit(f"{DATA} has only {len(cases)} cases; --case-offset/--cases ask for more")
    warm = None if args.no_warmup else cases[(args.case_offset + args.cases) % len(cases)]
    return measured, warm


# -- timers around the installed EasyEdit's functions ------------------------------------------

class FunctionTimers:
    """Wrap module functions with timers for the duration of a block, shims included.

    The device shims (`compat.legacy_shims.DeviceLiteralShims`) swap some module attributes (e.g.
    ROME's `compute_v`) for recompiled versions while an edit runs; a plain `setattr` would be
    overwritten by them. So both the module attribute and the shim's replacement for that
    attribute are wrapped, and both are put back on exit.
    """

    def __init__(self, module, names):
        self.module, self.names = module, [n for n in names if callable(getattr(module, n, None))]
        self.seconds = {n: 0.0 for n in self.names}
        self.calls = {n: 0 for n in self.names}

    def reset(self):
        for n in self.names:
            self.seconds[n], self.calls[n] = 0.0, 0

    def _wrap(self, name, fn):
        import functools

        @functools.wraps(fn)
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds[name] += time.perf_counter() - t0
                self.calls[name] += 1
        timed.__bench_wrapped__ = fn
        return timed

    @contextlib.contextmanager
    def installed(self):
        from rep_easyedit.compat.easyedit import device_shims

        shims = device_shims()
        saved_attrs = {n: getattr(self.module, n) for n in self.names}
        saved_repl = list(shims.replacements)
        try:
            wrapped = {n: self._wrap(n, saved_attrs[n]) for n in self.names}
            for n in self.names:
                setattr(self.module, n, wrapped[n])
            # the shims swap an attribute only where it still holds the original (they leave a
            # spy alone), so the timed original stands in for it in their table
            shims.replacements = [
                (o, a, wrapped[a] if orig is saved_attrs[a] else orig, self._wrap(a, p))
                if (o is self.module and a in self.names) else (o, a, orig, p)
                for o, a, orig, p in saved_repl]
            yield self
        finally:
            shims.replacements = saved_repl
            for n, fn in saved_attrs.items():
                setattr(self.module, n, fn)


# -- the floor: one gradient-free, length-bucketed forward over the texts REP needs -----------

def rep_texts(request: dict, pert, template_groups, rep, corpus) -> tuple[list[tuple[str, int]], list[str]]:
    """(the distinct texts REP collects keys of for one edit, the corpus spans of its negatives):
    every trained variant in every context template and long context, the subject in each template
    (k*), as `rep_main.gather_training_keys` builds them."""
    from rep_easyedit.rep_main import _variant_texts, training_variants

    templates = [t for group in template_groups for t in group]
    variants = training_variants(request, pert, rep.train_on)
    contexts = pert.long_in if "long" in rep.train_on else []
    pairs = _variant_texts(request, variants, templates, contexts)
    pairs += _variant_texts(request, [request["subject"]], templates, [])
    spans = list(corpus[: rep.corpus_negative_texts]) if rep.corpus_negative_texts and corpus else []
    return list(dict.fromkeys(pairs)), spans


class FloorPass:
    """The cost floor of REP's key stage: the same texts (training texts, k* texts and the corpus
    spans), tokenized once, in one length-bucketed, gradient-free forward that captures the input of
    every edited module and stops at the highest one (one pass for all layers)."""

    def __init__(self, model, tok, hp):
        from rep_easyedit.backends import get_backend
        from rep_easyedit.corpus import load_corpus
        from rep_easyedit.rep_main import edited_module_paths

        self.model, self.tok, self.rep = model, tok, hp.rep
        backend = get_backend(hp.backend_name)
        self.base_hp = hp.backend_hparams(backend)
        self.backend = backend
        self.paths = [p for _, p in sorted(edited_module_paths(model, self.base_hp).items())]
        self.corpus = load_corpus(self.rep.corpus, model, tok, seed=self.rep.seed, progress=False) \
            if (self.rep.n_long_contexts or self.rep.corpus_negative_texts) else []

    def measure(self, request: dict) -> dict:
        import torch

        from rep_easyedit.backends import templates_keyed_by_model
        from rep_easyedit.compat.easyedit import shims_applied
        from rep_easyedit.core.devices import model_device
        from rep_easyedit.core.keys import _StopForward, capture_input, encode, length_buckets
        from rep_easyedit.core.pathway import get_module
        from rep_easyedit.core.perturbations import Perturbations

        with shims_applied(), templates_keyed_by_model(self.model, self.backend):
            groups = self.backend.context_templates(self.model, self.tok, self.base_hp)  # cached
        pert = Perturbations(**request["rep"]["perturbations"])
        pairs, spans = rep_texts(request, pert, groups, self.rep, self.corpus)
        texts = [t for t, _ in pairs]
        device = model_device(self.model)
        modules = [get_module(self.model, p) for p in self.paths]
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        enc = encode(self.tok, texts + spans)
        t1 = time.perf_counter()
        ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device).long()
        padded = forwards = 0
        with torch.no_grad(), contextlib.ExitStack() as hooks:
            for m in modules[:-1]:
                hooks.enter_context(capture_input(m, stop=False))
            hooks.enter_context(capture_input(modules[-1], stop=True))
            for batch in length_buckets(enc.lengths.tolist()):
                width = int(enc.lengths[batch].max())
                rows = torch.as_tensor(batch, device=device)
                try:
                    self.model(input_ids=ids[rows, :width], attention_mask=mask[rows, :width], use_cache=False)
                except _StopForward:
                    pass
                padded += len(batch) * width
                forwards += 1
        sync()
        t2 = time.perf_counter()
        return {"seconds": t2 - t1, "tokenize_s": t1 - t0, "texts": len(texts) + len(spans),
                "corpus_spans": len(spans), "tokens": enc.tokens, "padded_tokens": padded,
                "forwards": forwards, "layers": len(modules)}


# -- workers --------------------------------------------------------------------------------

def worker_mode(args, mode: str) -> dict:
    import torch

    from rep_easyedit.compat.easyedit import installed_algorithm
    from rep_easyedit.editing import apply_edit, load_hparams, restore

    model, tok, load_s, memory = setup_worker(args)
    hp = load_hparams(hparams_path(args, mode))
    base_name = getattr(hp, "backend_name", hp.alg_name)
    notes = []
    if getattr(hp, "mom2_adjustment", False):
        notes += ensure_stats(args, model, tok, hp)
    backend_fn = installed_algorithm(base_name)
    module = importlib.import_module(getattr(backend_fn, "__rep_easyedit_original__", backend_fn).__module__)
    rome_family = hasattr(module, "compute_u") and hasattr(module, "compute_v")
    timers = FunctionTimers(module, ["get_context_templates"] + (["compute_u", "compute_v"] if rome_family else []))
    measured, warm = select_cases(args)

    floor = FloorPass(model, tok, hp) if hasattr(hp, "rep") else None

    def one_edit(case):
        request = edit_request(case)
        timers.reset()
        torch.manual_seed(0)
        t0 = time.perf_counter()
        weights_copy = apply_edit(model, tok, [request], hp)
        wall = time.perf_counter() - t0
        restore(model, weights_copy)
        floor_row = floor.measure(request) if floor is not None else None
        row = {"case_id": case["case_id"], "wall": wall,
               "context_templates": timers.seconds["get_context_templates"]}
        templates_in_backend = timers.seconds["get_context_templates"]
        rep = request.get("rep")
        if rep is not None:
            s = rep["seconds"]
            row.update(rep_keys=s["keys"], rep_train=s["train"], rep_total=s["rep_total"],
                       rep_stage=s["keys"] + s["train"], backend=s["backend"])
            templates_in_backend = max(0.0, templates_in_backend - s["context_templates"])
            tr = next(iter(rep["training"].values()), {}) if rep.get("training") else {}
            row["training"] = {k: tr.get(k) for k in ("steps", "loss", "gate_pos_fire", "gate_neg_fire",
                                                      "activation", "seconds_per_step", "negatives_kept")}
            layers = list(rep.get("training", {}).values())
            row["rep_train_steps"] = sum(t.get("steps", 0) for t in layers)
            row["rep_train_s_per_step"] = (s["train"] / row["rep_train_steps"]) if row["rep_train_steps"] else None
            coll = [t.get("collection") or {} for t in layers]
            row["rep_collection"] = {
                "texts": sum(c.get("texts", 0) for c in coll), "forwards": sum(c.get("forwards", 0) for c in coll),
                "tokens": sum(c.get("tokens", 0) for c in coll),
                "padded_tokens": sum(c.get("padded_tokens", 0) for c in coll),
                "corpus_negatives": [c.get("corpus_negatives") for c in coll]}
            if floor_row is not None:
                row["floor"] = floor_row
                row["floor_s"] = floor_row["seconds"]
        else:
            row["backend"] = wall
        if rome_family:
            row["compute_u"] = timers.seconds["compute_u"]
            row["compute_v"] = timers.seconds["compute_v"]
            row["rome_update_rest"] = row["backend"] - row["compute_u"] - row["compute_v"] - templates_in_backend
        return row

    memory["before_edits_maxrss_kb"] = maxrss_kb()
    with timers.installed(), _quiet(args.verbose):
        warm_row = one_edit(warm) if warm is not None else None
        rows = [one_edit(case) for case in measured]
    memory["peak_maxrss_kb"] = maxrss_kb()
    memory["end_rss_kb"] = current_rss_kb()
    memory["edit_increment_kb"] = memory["peak_maxrss_kb"] - memory["after_load_rss_kb"]
    memory["peak_set_by_load"] = memory["peak_maxrss_kb"] <= memory["after_load_maxrss_kb"]
    stages = sorted({k for r in rows for k, v in r.items() if isinstance(v, float)})
    return {"mode": mode, "hparams": str(hparams_path(args, mode)), "backend": base_name,
            "model_load_s": load_s, "memory": memory, "warmup": warm_row, "cases": rows,
            "median": {k: median(r.get(k) for r in rows) for k in stages}, "notes": notes}


def ensure_stats(args, model, tok, hp) -> list[str]:
    """MEMIT needs covariance files; if any is missing, build them into a temp stats_dir (not timed
    as part of the edit) rather than writing into the shared cache."""
    from rep_easyedit.corpus import load_corpus
    from rep_easyedit.covariance import build_stats, has_stats

    missing = [layer for layer in hp.layers if not has_stats(model, hp, layer)]
    if not missing:
        return []
    tmp = tempfile.mkdtemp(prefix="bench_edit_stats_")
    texts = load_corpus(None, model, tok, progress=False)
    hp.stats_dir = tmp
    figures = build_stats(model, tok, hp, list(hp.layers), texts, progress=False)
    note = (f"covariance statistics missing in the configured stats_dir for layers {missing}: built "
            f"for layers {list(hp.layers)} into {tmp} in {figures['seconds']:.1f} s (not part of the edit)")
    print(f"[bench_edit] {note}", file=sys.stderr, flush=True)
    return [note]


def reference_batch(request: dict, pert, rep, tok):
    """Up to 16 variant prompts (cycled when fewer variants exist) and each one's subject-last index."""
    from rep_easyedit.core.keys import subject_last_index
    from rep_easyedit.core.perturbations import with_subject
    from rep_easyedit.rep_main import _prompt_filled, training_variants

    variants = training_variants(request, pert, [t for t in rep.train_on if t != "long"])
    prompt, subject = _prompt_filled(request), request["subject"]
    start = prompt.index(subject)
    texts, positions = [], []
    for i in range(REFERENCE_BATCH):
        v = variants[i % len(variants)]
        text = with_subject(prompt, subject, v)
        texts.append(text)
        positions.append(subject_last_index(tok, text, start + len(v)))
    return texts, positions, len(variants)


def worker_reference(args) -> dict:
    import torch

    from rep_easyedit.core.adapter import GatedLowRankAdapter
    from rep_easyedit.corpus import load_corpus
    from rep_easyedit.editing import load_hparams
    from rep_easyedit.core.devices import model_device
    from rep_easyedit.core.keys import collect_keys, subject_last_index
    from rep_easyedit.core.pathway import pathway_installed
    from rep_easyedit.core.perturbations import build_perturbations
    from rep_easyedit.rep_main import _prompt_filled, edited_module_paths
    from rep_easyedit.core.training import TrainingKeys, aggregation_loss

    model, tok, load_s, memory = setup_worker(args)
    hp = load_hparams(hparams_path(args, "REP-ROME"))
    rep = hp.rep
    layer, path = next(iter(edited_module_paths(model, hp.backend_hparams()).items()))
    corpus = load_corpus(None, model, tok, seed=rep.seed, progress=False) if rep.n_long_contexts else []
    device = model_device(model)
    measured, warm = select_cases(args)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)

    def one_loop(case):
        request = edit_request(case)
        pert = build_perturbations(request, tok, corpus, n_shuffles=rep.n_shuffles, n_long=0,
                                   base_seed=rep.seed)
        texts, positions, n_variants = reference_batch(request, pert, rep, tok)
        # k*: the edit key (the subject's own prompt), collected once, outside the timed loop
        prompt = _prompt_filled(request)
        end = prompt.index(request["subject"]) + len(request["subject"])
        k_star, _ = collect_keys(model, tok, [prompt], path, [subject_last_index(tok, prompt, end)])
        torch.manual_seed(0)
        dim = k_star.shape[-1]
        adapter = GatedLowRankAdapter(dim, rep.rank, rep.gate_ratio, rep.tau)
        keys = TrainingKeys(positives=k_star[:0], negatives=k_star[:0], target=k_star[0].to(device))
        old_side = tok.padding_side
        tok.padding_side = "right"
        enc = tok(texts, return_tensors="pt", padding=True).to(device)
        tok.padding_side = old_side
        idx = torch.tensor(positions, device=device)
        step_s = []
        with pathway_installed(model, path, adapter) as pathway:
            adapter.train()  # soft gate while training, as the authors do
            opt = torch.optim.Adam([p for p in adapter.parameters() if p.requires_grad], lr=rep.lr)
            box = {}
            handle = pathway.register_forward_hook(lambda _m, _a, out: box.__setitem__("keys", out))
            try:
                t0 = time.perf_counter()
                for _ in range(args.reference_steps):
                    ts = time.perf_counter()
                    opt.zero_grad(set_to_none=True)
                    out = model(**enc, use_cache=False)  # the whole model, autograd on
                    adapted = box.pop("keys")[torch.arange(len(texts), device=device), idx].float()
                    loss = aggregation_loss(adapted, keys, rep.aggregation, rep.aggregation_abs)
                    loss.backward()
                    opt.step()
                    del out
                    step_s.append(time.perf_counter() - ts)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                total = time.perf_counter() - t0
            finally:
                handle.remove()
        return {"case_id": case["case_id"], "reference_stage": total, "steps": args.reference_steps,
                "median_step": median(step_s), "batch": len(texts), "distinct_variants": n_variants,
                "padded_length": int(enc["input_ids"].shape[1]), "final_loss": float(loss.detach())}

    from rep_easyedit.backends import get_backend, templates_keyed_by_model
    from rep_easyedit.compat.easyedit import shims_applied
    from rep_easyedit.core.keys import length_buckets, subject_last_indices

    backend = get_backend(hp.backend_name)
    with shims_applied(), templates_keyed_by_model(model, backend):
        groups = backend.context_templates(model, tok, hp.backend_hparams(backend))  # not timed
    full_corpus = load_corpus(None, model, tok, seed=rep.seed, progress=False) \
        if (rep.n_long_contexts or rep.corpus_negative_texts) else []

    def equal_work(case):
        """The same loop on the texts our REP stage trains on (every variant in every template and
        long context, and the k* texts), in length-bucketed batches of up to 16; each step one
        forward+backward over all of them. `--reference-equal-steps` steps are timed; the stage is
        their mean times `--reference-steps`."""
        request = edit_request(case)
        pert = build_perturbations(request, tok, full_corpus, n_shuffles=rep.n_shuffles,
                                   n_long=rep.n_long_contexts, long_tokens=rep.long_context_tokens,
                                   base_seed=rep.seed)
        pairs, _ = rep_texts(request, pert, groups, rep, full_corpus)
        texts = [t for t, _ in pairs]
        positions, enc = subject_last_indices(tok, texts, [e for _, e in pairs])
        prompt = _prompt_filled(request)
        end = prompt.index(request["subject"]) + len(request["subject"])
        k_star, _ = collect_keys(model, tok, [prompt], path, [subject_last_index(tok, prompt, end)])
        torch.manual_seed(0)
        adapter = GatedLowRankAdapter(k_star.shape[-1], rep.rank, rep.gate_ratio, rep.tau)
        keys = TrainingKeys(positives=k_star[:0], negatives=k_star[:0], target=k_star[0].to(device))
        batches = length_buckets(enc.lengths.tolist(), max_texts=REFERENCE_BATCH)
        pos = torch.as_tensor(positions, device=device)
        ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device).long()
        padded = sum(len(b) * int(enc.lengths[b].max()) for b in batches)
        step_s = []
        with pathway_installed(model, path, adapter) as pathway:
            adapter.train()
            opt = torch.optim.Adam([p for p in adapter.parameters() if p.requires_grad], lr=rep.lr)
            box = {}
            handle = pathway.register_forward_hook(lambda _m, _a, out: box.__setitem__("keys", out))
            try:
                for _ in range(args.reference_equal_steps):
                    ts = time.perf_counter()
                    opt.zero_grad(set_to_none=True)
                    for batch in batches:
                        width = int(enc.lengths[batch].max())
                        rows = torch.as_tensor(batch, device=device)
                        out = model(input_ids=ids[rows, :width], attention_mask=mask[rows, :width], use_cache=False)
                        adapted = box.pop("keys")[torch.arange(len(batch), device=device), pos[rows]].float()
                        loss = aggregation_loss(adapted, keys, rep.aggregation, rep.aggregation_abs) * (len(batch) / len(texts))
                        loss.backward()
                        del out
                    opt.step()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    step_s.append(time.perf_counter() - ts)
            finally:
                handle.remove()
        per_step = statistics.mean(step_s)
        return {"case_id": case["case_id"], "texts": len(texts), "tokens": enc.tokens, "padded_tokens": padded,
                "forwards_per_step": len(batches), "measured_steps": len(step_s), "step_s": per_step,
                "reference_equal_stage": per_step * args.reference_steps}

    memory["before_edits_maxrss_kb"] = maxrss_kb()
    try:
        warm_row = one_loop(warm) if warm is not None else None
        rows = [one_loop(case) for case in measured]
        equal_rows = [equal_work(case) for case in measured[: args.reference_equal_cases]]
    finally:
        for p in frozen:
            p.requires_grad_(True)
    memory["peak_maxrss_kb"] = maxrss_kb()
    memory["end_rss_kb"] = current_rss_kb()
    memory["edit_increment_kb"] = memory["peak_maxrss_kb"] - memory["after_load_rss_kb"]
    memory["peak_set_by_load"] = memory["peak_maxrss_kb"] <= memory["after_load_maxrss_kb"]
    return {"mode": "reference", "layer": layer, "module": path, "model_load_s": load_s,
            "memory": memory, "warmup": warm_row, "cases": rows,
            "median": {"reference_stage": median(r["reference_stage"] for r in rows),
                       "median_step": median(r["median_step"] for r in rows),
                       "reference_equal_stage": median(r["reference_equal_stage"] for r in equal_rows),
                       "reference_equal_step": median(r["step_s"] for r in equal_rows)},
            "equal_work": equal_rows}


def worker_covariance(args) -> dict:
    from rep_easyedit.corpus import load_corpus
    from rep_easyedit.covariance import build_stats
    from rep_easyedit.editing import load_hparams

    model, tok, load_s, memory = setup_worker(args)
    hp = load_hparams(hparams_path(args, "ROME"))
    texts = load_corpus(None, model, tok, progress=False)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench_edit_cov_") as tmp:
        hp.stats_dir = tmp
        for layers in ([3], [2, 3, 4]):
            fig = build_stats(model, tok, hp, layers, texts, progress=False)
            fig.pop("paths", None)
            runs[",".join(map(str, layers))] = fig
    memory["peak_maxrss_kb"] = maxrss_kb()
    return {"mode": "covariance", "model_load_s": load_s, "memory": memory, "runs": runs}


@contextlib.contextmanager
def _quiet(verbose: bool):
    """EasyEdit prints per step; keep the benchmark's output readable unless --verbose."""
    if verbose:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


# -- driver ---------------------------------------------------------------------------------

def run_worker(args, name: str) -> dict:
    with tempfile.NamedTemporaryFile(prefix=f"bench_edit_{name}_", suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--worker-out", out,
           "--model", args.model, "--hparams-root", args.hparams_root, "--hparams-name", args.hparams_name,
           "--cases", str(args.cases), "--case-offset", str(args.case_offset), "--threads", str(args.threads),
           "--reference-steps", str(args.reference_steps), "--device", str(args.device),
           "--reference-equal-steps", str(args.reference_equal_steps),
           "--reference-equal-cases", str(args.reference_equal_cases)]
    if args.no_warmup:
        cmd.append("--no-warmup")
    if args.verbose:
        cmd.append("--verbose")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    print(f"[bench_edit] worker {name} ...", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=str(ROOT))
    elapsed = time.perf_counter() - t0
    try:
        if proc.returncode != 0:
            return {"mode": name, "error": f"worker exited with {proc.returncode}", "worker_s": elapsed}
        result = json.loads(Path(out).read_text())
        result["worker_s"] = elapsed
        print(f"[bench_edit] worker {name} done in {elapsed:.1f} s", flush=True)
        return result
    finally:
        Path(out).unlink(missing_ok=True)


def ratio(a, b):
    return a / b if (a is not None and b) else None


def summarize(results: dict) -> tuple[dict, list[str]]:
    modes = results["modes"]
    med = {m: r.get("median", {}) for m, r in modes.items() if "error" not in r}
    peak = {m: r["memory"]["peak_maxrss_kb"] for m, r in modes.items() if "error" not in r}
    ours = med.get("REP-ROME", {}).get("rep_stage")
    ours_from = "REP-ROME"
    if ours is None and med.get("REP-MEMIT", {}).get("rep_stage") is not None:
        ours, ours_from = med["REP-MEMIT"]["rep_stage"], "REP-MEMIT (all its layers)"
    ref = results.get("reference", {}).get("median", {}).get("reference_stage")

    def base_plus_stage(base: str):
        """(base edit + the REP method's own stage) / base edit: the backend's swings left out."""
        wall, stage = med.get(base, {}).get("wall"), med.get(f"REP-{base}", {}).get("rep_stage")
        return ratio(wall + stage, wall) if wall and stage else None

    ratios = {
        "REP-ROME edit time / ROME edit time": ratio(med.get("REP-ROME", {}).get("wall"), med.get("ROME", {}).get("wall")),
        "REP-MEMIT / MEMIT": ratio(med.get("REP-MEMIT", {}).get("wall"), med.get("MEMIT", {}).get("wall")),
        "reference REP stage / our REP stage": ratio(ref, ours),
        "REP-ROME peak RSS / ROME peak RSS": ratio(peak.get("REP-ROME"), peak.get("ROME")),
        "our REP stage / floor": ratio(ours, med.get(ours_from.split(" ")[0], {}).get("floor_s")),
        "reference REP stage / our REP stage (equal work)": ratio(
            results.get("reference", {}).get("median", {}).get("reference_equal_stage"), ours),
        # without a goal, for the record
        "REP-MEMIT REP stage / its floor (all layers in one pass)": ratio(
            med.get("REP-MEMIT", {}).get("rep_stage"), med.get("REP-MEMIT", {}).get("floor_s")),
        "REP-ROME (ROME + REP stage) / ROME": base_plus_stage("ROME"),
        # the same for MEMIT: the edit-time ratio swings with the backend's own time (the same
        # computation in both workers), which this one leaves out
        "REP-MEMIT (MEMIT + REP stage) / MEMIT": base_plus_stage("MEMIT"),
        "REP-MEMIT REP stage / MEMIT edit time": ratio(med.get("REP-MEMIT", {}).get("rep_stage"),
                                                      med.get("MEMIT", {}).get("wall")),
    }
    lines = []
    verdicts = {}
    for name, value in ratios.items():
        if name not in GOALS:
            if value is not None:
                lines.append(f"{name}: {value:.3f}")
            continue
        op, bound = GOALS[name]
        if value is None:
            verdicts[name] = "n/a"
            lines.append(f"{name}: n/a (goal {op} {bound})")
            continue
        ok = value <= bound if op == "<=" else value >= bound
        verdicts[name] = "PASS" if ok else "MISS"
        extra = f" (ours from {ours_from})" if name.startswith("reference") else ""
        lines.append(f"{name}: {value:.3f} (goal {op} {bound}) {verdicts[name]}{extra}")
    return {"values": ratios, "goals": {k: f"{op} {b}" for k, (op, b) in GOALS.items()},
            "verdicts": verdicts, "our_rep_stage_from": ours_from}, lines


def markdown(results: dict) -> str:
    cols = ["wall", "context_templates", "rep_keys", "rep_train", "rep_total", "backend",
            "compute_u", "compute_v", "rome_update_rest", "floor_s", "rep_train_s_per_step"]
    out = ["| mode | n | " + " | ".join(f"{c} s" for c in cols) + " | RSS after load MB | peak RSS MB | edit increment MB |",
           "|---|---|" + "---|" * (len(cols) + 3)]

    def f(x, fmt="{:.3f}"):
        return "–" if x is None else fmt.format(x)

    for mode, r in results["modes"].items():
        if "error" in r:
            out.append(f"| {mode} | – | {r['error']} |")
            continue
        m, mem = r["median"], r["memory"]
        out.append(f"| {mode} | {len(r['cases'])} | " + " | ".join(f(m.get(c)) for c in cols)
                   + f" | {mem['after_load_rss_kb'] / 1024:.0f} | {mem['peak_maxrss_kb'] / 1024:.0f}"
                   + f" | {mem['edit_increment_kb'] / 1024:.0f} |")
    stage_rows = []
    for mode, r in results["modes"].items():
        if "error" in r or not r.get("cases") or "rep_collection" not in r["cases"][0]:
            continue
        cases = r["cases"]
        med_of = lambda get: median(get(c) for c in cases)  # noqa: E731
        stage_rows.append(
            f"| {mode} | {f(med_of(lambda c: c['rep_collection']['texts']), '{:.0f}')} | "
            f"{f(med_of(lambda c: c['rep_collection']['tokens']), '{:.0f}')} | "
            f"{f(med_of(lambda c: c['rep_collection']['padded_tokens']), '{:.0f}')} | "
            f"{f(med_of(lambda c: c['rep_collection']['forwards']), '{:.0f}')} | "
            f"{f(med_of(lambda c: c['floor']['texts']), '{:.0f}')} | {f(med_of(lambda c: c['floor']['tokens']), '{:.0f}')} | "
            f"{f(med_of(lambda c: c['floor']['padded_tokens']), '{:.0f}')} | "
            f"{f(med_of(lambda c: c.get('rep_train_steps')), '{:.0f}')} | "
            f"{f(med_of(lambda c: c.get('rep_train_s_per_step')), '{:.4f}')} |")
    if stage_rows:
        out += ["", "| mode | REP texts | REP tokens | REP padded | REP forwards | floor texts | floor tokens | "
                "floor padded | train steps | s/step |", "|---|---|---|---|---|---|---|---|---|---|"] + stage_rows
    ref = results.get("reference")
    if ref and "error" not in ref:
        mem = ref["memory"]
        out += ["", "| reference (authors' kind) | n | steps | batch | stage s | step s | peak RSS MB | increment MB |",
                "|---|---|---|---|---|---|---|---|",
                f"| layer {ref['layer']} | {len(ref['cases'])} | {ref['cases'][0]['steps']} | "
                f"{ref['cases'][0]['batch']} | {f(ref['median']['reference_stage'])} | "
                f"{f(ref['median']['median_step'])} | {mem['peak_maxrss_kb'] / 1024:.0f} | "
                f"{mem['edit_increment_kb'] / 1024:.0f} |"]
        eq = ref.get("equal_work") or []
        if eq:
            out += ["", "| reference on our texts (equal work) | n | texts | tokens | padded | forwards/step | "
                    "step s | stage s (x steps) |", "|---|---|---|---|---|---|---|---|",
                    f"| layer {ref['layer']} | {len(eq)} | {f(median(r['texts'] for r in eq), '{:.0f}')} | "
                    f"{f(median(r['tokens'] for r in eq), '{:.0f}')} | {f(median(r['padded_tokens'] for r in eq), '{:.0f}')} | "
                    f"{f(median(r['forwards_per_step'] for r in eq), '{:.0f}')} | "
                    f"{f(ref['median'].get('reference_equal_step'))} | {f(ref['median'].get('reference_equal_stage'))} |"]
    cov = results.get("covariance")
    if cov and "error" not in cov:
        out += ["", "| covariance layers | texts | tokens | s | tokens/s | s per layer |", "|---|---|---|---|---|---|"]
        for layers, fig in cov["runs"].items():
            out.append(f"| {layers} | {fig['texts']} | {fig['tokens']} | {fig['seconds']:.2f} | "
                       f"{fig['tokens_per_s']:.0f} | {fig['seconds_per_layer']:.2f} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="bundled alias or a local model directory")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--cases", type=int, default=5, help="dev cases measured per mode")
    ap.add_argument("--case-offset", type=int, default=0)
    ap.add_argument("--reference-steps", type=int, default=10)
    ap.add_argument("--reference-equal-steps", type=int, default=1,
                    help="steps timed of the reference loop on our REP stage's texts (the stage is "
                         "their mean x --reference-steps)")
    ap.add_argument("--reference-equal-cases", type=int, default=2,
                    help="cases (the first measured ones) the equal-work reference runs on")
    ap.add_argument("--no-warmup", action="store_true", help="skip the uncounted warm-up edit")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--no-covariance", action="store_true")
    ap.add_argument("--threads", type=int, default=_default_threads())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hparams-root", default=str(ROOT / "hparams"))
    ap.add_argument("--hparams-name", default="smollm2-135m", help="hparams/<MODE>/<name>.yaml")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_edit.json"))
    ap.add_argument("--verbose", action="store_true", help="keep EasyEdit's own prints")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        fn = {"reference": worker_reference, "covariance": worker_covariance}.get(args.worker)
        result = fn(args) if fn else worker_mode(args, args.worker)
        Path(args.worker_out).write_text(json.dumps(result, indent=1, default=float))
        return

    modes, skipped = [], {}
    for mode in args.modes:
        needs = {"ROME", "REP-ROME"} if mode.endswith("ROME") else {"MEMIT", mode}
        absent = [m for m in sorted(needs) if not hparams_path(args, m).is_file()]
        if absent:
            note = f"skipped: {', '.join(str(hparams_path(args, m)) for m in absent)} absent"
            print(f"[bench_edit] {mode} {note}", flush=True)
            skipped[mode] = note
        else:
            modes.append(mode)

    import torch

    results = {
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S")},
        "skipped": skipped, "modes": {},
    }
    for mode in modes:
        results["modes"][mode] = run_worker(args, mode)
    if not args.no_reference:
        results["reference"] = run_worker(args, "reference")
    if not args.no_covariance:
        results["covariance"] = run_worker(args, "covariance")
    results["ratios"], lines = summarize(results)
    table = markdown(results)
    results["markdown"] = table
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=float))
    print()
    print(f"threads {args.threads}, {args.cases} case(s) per mode, medians"
          + (", no warm-up" if args.no_warmup else ", after one warm-up edit"))
    print(table)
    print()
    for line in lines:
        print(line)
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
