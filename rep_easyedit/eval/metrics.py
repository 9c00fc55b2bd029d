"""Evaluation of one edit: efficacy, generalisation, locality, fluency and REP's robustness.

Every rate is greedy and teacher-forced: the target is tokenised as ``" " + target`` and appended
to the prompt's tokens, and at each target position the argmax of the model's logits (given the
prompt and the previous *true* target tokens) is compared with the target token. With
``scoring="exact"`` (CounterFact) a prompt scores 1 only if every position matches; with
``scoring="token"`` (zsRE, as EasyEdit and the paper score it) it scores the share of positions
that match. All prompts of a case go through the model in right-padded batches, without
gradients, one forward per batch (sorted by length, capped in tokens).

Metrics of a case (each a mean over that case's prompts/variants; None when the case has none):

- ``success``: prompt → target_new.
- ``paraphrase``: non-empty `rephrase_prompt` entries → target_new.
- ``reversion``: prompt → target_true, after the edit (how often the old fact is still there).
- ``locality``: neighbourhood prompts with `locality_ground_truth` teacher-forced: the share of
  target positions whose argmax is the same after the edit as before it (EasyEdit's definition),
  per prompt, then averaged. Needs `locality_reference(...)` computed before the edit.
- ``fluency``: ROME's generation entropy (Meng et al. 2022, "Locating and Editing Factual
  Associations in GPT", App. / `compute_n_gram_entropy`): the prompt is continued greedily for
  `fluency_tokens` (50) new tokens; on the word tokens of prompt + continuation, with ``H_n`` the
  entropy in bits of the n-gram frequency distribution, ``fluency = mean(2/3·H_2, 4/3·H_3)
  = (2/3·H_2 + 4/3·H_3) / 2``. ROME tokenises words with `nltk.word_tokenize`; here a regex
  (``\\w+`` runs and single punctuation marks) stands in for it, which agrees on plain prose.
  Unlike ROME (which reports ×100) the value is in bits; lower means more repetitive text.
- ``rephrase_in/out``: the prompt with the subject replaced by each rephrased subject of that
  half → target_new; ``shuffle_in/out`` the same with token shuffles of the subject;
  ``long_in/out``: each long context, a blank line, then the prompt → target_new. The "in" halves
  are the ones REP trains on, the "out" halves are never seen in training.
- ``distract_in/out`` (metric ``distract``, opt-in): a distracting context (`eval/contexts.py`:
  the old fact and the subject tied to the old object, built from the request; or the case's
  neighbourhood facts), a space, then the prompt → target_new.
- ``long_old`` (opt-in): a long context that hurts: ~1,024 tokens of corpus text restating the old
  fact every 128 tokens (`contexts.hurting_long_contexts`, two per case), a blank line, then the
  prompt → target_new. REP never trains on this kind.
- ``generation_new/old`` (metric ``generation``, opt-in): greedy free answers to the prompt, a
  question form and the chat template (`eval/generation.py`); the share of forms whose answer
  names target_new / target_true. Not teacher-forced: what the model says on its own.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from typing import Iterable, Sequence

import numpy as np
import torch

from ..core.devices import model_device
from ..core.perturbations import Perturbations, with_context, with_subject
from .contexts import with_distractor
from .generation import generation_check, greedy_answer

METRIC_KEYS = ("success", "paraphrase", "locality", "reversion", "fluency", "rephrase_in",
               "rephrase_out", "shuffle_in", "shuffle_out", "long_in", "long_out", "distract_in",
               "distract_out", "long_old", "generation_new", "generation_old")
RATE_KEYS = tuple(k for k in METRIC_KEYS if k != "fluency")  # shares in [0, 1], summarised in %
SUMMARY_KEYS = ("n_cases", *METRIC_KEYS, "edit_seconds_median", "rep_seconds_median")
ROBUSTNESS_KEYS = ("rephrase_in", "rephrase_out", "shuffle_in", "shuffle_out", "long_in", "long_out")
DEFAULT_METRICS = ("success", "paraphrase", "reversion", "locality", "fluency", "rephrase",
                   "shuffle", "long")


# -- teacher forcing ---------------------------------------------------------------------------

def _encode_pair(tok, prompt: str, target: str) -> tuple[list[int], list[int]]:
    p_ids = tok(prompt)["input_ids"]
    t_ids = tok(" " + target.strip(), add_special_tokens=False)["input_ids"]
    if not t_ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return list(p_ids), list(t_ids)


def _batches(lengths: Sequence[int], batch_size: int, max_tokens: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out, cur, cur_max = [], [], 0
    for i in order:
        new_max = max(cur_max, lengths[i])
        if cur and (len(cur) >= batch_size or new_max * (len(cur) + 1) > max_tokens):
            out.append(cur)
            cur, new_max = [], lengths[i]
        cur.append(i)
        cur_max = new_max
    if cur:
        out.append(cur)
    return out


@torch.no_grad()
def teacher_forced_predictions(model, tok, pairs: Sequence[tuple[str, str]], batch_size: int = 16,
                               max_tokens: int = 4096) -> list[tuple[list[int], list[int]]]:
    """For each (prompt, target): (target token ids, argmax token ids at those positions)."""
    if not pairs:
        return []
    encoded = [_encode_pair(tok, p, t) for p, t in pairs]
    lengths = [len(p) + len(t) for p, t in encoded]
    device = model_device(model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    was_training = model.training
    model.eval()
    results: list = [None] * len(pairs)
    try:
        for batch in _batches(lengths, batch_size, max_tokens):
            width = max(lengths[i] for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                seq = encoded[i][0] + encoded[i][1]
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            # positions whose logits predict a target token (right padding: they differ per row)
            wanted = sorted({pos for i in batch for pos in range(len(encoded[i][0]) - 1, lengths[i] - 1)})
            keep = torch.tensor(wanted, dtype=torch.long, device=device)
            column = {pos: c for c, pos in enumerate(wanted)}
            ids, mask = ids.to(device), mask.to(device)
            try:
                logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
                if logits.shape[1] != len(wanted):
                    raise TypeError("logits_to_keep not honoured")
            except TypeError:
                logits = model(input_ids=ids, attention_mask=mask).logits
                column = {pos: pos for pos in wanted}
            argmax = logits.argmax(-1).cpu()
            for row, i in enumerate(batch):
                p_ids, t_ids = encoded[i]
                start = len(p_ids) - 1
                pred = [int(argmax[row, column[start + j]]) for j in range(len(t_ids))]
                results[i] = (t_ids, pred)
    finally:
        model.train(was_training)
    return results


def exact_match(model, tok, prompts: Sequence[str], target: str, batch_size: int = 16) -> list[int]:
    """1 per prompt whose every target token is the teacher-forced argmax, else 0."""
    preds = teacher_forced_predictions(model, tok, [(p, target) for p in prompts], batch_size)
    return [int(t == p) for t, p in preds]


def token_accuracy(target_ids: Sequence[int], predicted: Sequence[int]) -> float:
    """The share of target positions whose teacher-forced argmax is the target token."""
    return sum(int(t == p) for t, p in zip(target_ids, predicted)) / max(len(target_ids), 1)


# scoring name -> (target ids, predicted ids) -> score of one prompt
_SCORING = {"exact": lambda t, p: int(list(t) == list(p)), "token": token_accuracy}


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


# -- locality --------------------------------------------------------------------------------

def _locality_pairs(record: dict) -> list[tuple[str, str]]:
    prompts = [p for p in (record.get("locality_prompt") or [])]
    gt = record.get("locality_ground_truth")
    answers = gt if isinstance(gt, list) else [gt] * len(prompts)
    return [(p, a) for p, a in zip(prompts, answers) if p and p.strip() and a]


def locality_reference(model, tok, record: dict, batch_size: int = 16) -> dict:
    """Pre-edit argmaxes over the locality prompts' ground-truth tokens (run before the edit)."""
    pairs = _locality_pairs(record)
    preds = teacher_forced_predictions(model, tok, pairs, batch_size)
    return {"pairs": [list(p) for p in pairs], "target_ids": [t for t, _ in preds],
            "argmax": [p for _, p in preds]}


def _locality_scores(reference: dict, after: list[list[int]]) -> list[float]:
    return [float(np.mean([int(a == b) for a, b in zip(before, now)]))
            for before, now in zip(reference["argmax"], after)]


def locality(model, tok, record: dict, reference: dict, batch_size: int = 16) -> float | None:
    """Share of locality target positions whose argmax is unchanged since `reference`."""
    pairs = [tuple(p) for p in reference["pairs"]]
    if pairs != _locality_pairs(record):
        raise ValueError("the locality reference was computed for other prompts")
    after = [p for _, p in teacher_forced_predictions(model, tok, pairs, batch_size)]
    return _mean(_locality_scores(reference, after))


# -- fluency ---------------------------------------------------------------------------------

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's `compute_n_gram_entropy` (arithmetic aggregation) on word tokens, in bits."""
    words = _WORD.findall(text)
    values = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum((c / total) * math.log2(c / total) for c in grams.values()) if total else 0.0
        values.append(w * h)
    return float(np.mean(values))


def generate_greedy(model, tok, prompt: str, max_new_tokens: int = 50) -> str:
    """Deterministic greedy continuation of `prompt` (prompt included in the returned text)."""
    return greedy_answer(model, tok, prompt, max_new_tokens, include_prompt=True)


def fluency_of(model, tok, record: dict, max_new_tokens: int = 50) -> tuple[float, str]:
    """(ROME generation entropy in bits, generated text) for the record's prompt."""
    text = generate_greedy(model, tok, record["prompt"], max_new_tokens)
    return ngram_entropy(text), text


# -- one case ----------------------------------------------------------------------------------

def _variant_prompts(record: dict, pert: Perturbations | dict) -> dict[str, list[str]]:
    p = pert if isinstance(pert, dict) else pert.to_dict()
    prompt, subject = record["prompt"], record["subject"]
    out = {}
    for kind in ("rephrase", "shuffle"):
        for half in ("in", "out"):
            out[f"{kind}_{half}"] = [with_subject(prompt, subject, v) for v in p.get(f"{kind}_{half}", [])]
    for half in ("in", "out"):
        out[f"long_{half}"] = [with_context(c, prompt) for c in p.get(f"long_{half}", [])]
    return out


def evaluate_case(model, tok, record: dict, perturbations: Perturbations | dict | None,
                  locality_ref: dict | None, fluency: bool = True, *,
                  metrics: Iterable[str] = DEFAULT_METRICS, batch_size: int = 16,
                  fluency_tokens: int = 50, scoring: str = "exact",
                  contexts: dict | None = None) -> dict:
    """Every metric of one case on the (edited) model; rates in [0, 1], None where undefined.

    Returns the metrics under their names (`METRIC_KEYS`) plus `details`: per-prompt scores and
    the generated text.
    """
    metrics = set(metrics)
    score = _SCORING.get(scoring)
    if score is None:
        raise ValueError(f"unknown scoring {scoring!r}; choose from {sorted(_SCORING)}")
    target_new, target_true = record["target_new"], record.get("target_true")
    groups: dict[str, list[tuple[str, str]]] = {"success": [(record["prompt"], target_new)]}
    if "paraphrase" in metrics:
        groups["paraphrase"] = [(p, target_new) for p in record.get("rephrase_prompt") or []
                                if p and p.strip()]
    if "reversion" in metrics and target_true:
        groups["reversion"] = [(record["prompt"], target_true)]
    if perturbations is not None:
        for name, prompts in _variant_prompts(record, perturbations).items():
            if name.split("_")[0] in metrics:
                groups[name] = [(p, target_new) for p in prompts]
    if "distract" in metrics and contexts is not None:
        for half in ("in", "out"):
            groups[f"distract_{half}"] = [(with_distractor(c, record["prompt"]), target_new)
                                          for c in contexts.get(f"distract_{half}", [])]
    if "long_old" in metrics and contexts is not None:
        groups["long_old"] = [(with_context(c, record["prompt"]), target_new)
                              for c in contexts.get("long_old", [])]
    if "locality" in metrics and locality_ref is not None:
        groups["locality"] = [tuple(p) for p in locality_ref["pairs"]]
        if groups["locality"] != _locality_pairs(record):
            raise ValueError("the locality reference was computed for other prompts")

    flat = [(name, pair) for name, pairs in groups.items() for pair in pairs]
    preds = teacher_forced_predictions(model, tok, [pair for _, pair in flat], batch_size)
    scores: dict[str, list] = {name: [] for name in groups}
    loc_after = []
    for (name, _), (t_ids, pred) in zip(flat, preds):
        if name == "locality":
            loc_after.append(pred)
        else:
            scores[name].append(score(t_ids, pred))
    if "locality" in groups:
        scores["locality"] = _locality_scores(locality_ref, loc_after)

    result: dict = {key: None for key in METRIC_KEYS}
    for name, values in scores.items():
        result[name] = _mean(values)
    details: dict = {"scores": scores}
    if "generation" in metrics:
        gen = generation_check(model, tok, record)
        result["generation_new"], result["generation_old"] = gen["generation_new"], gen["generation_old"]
        details["answers"] = gen["answers"]
    if fluency and "fluency" in metrics:
        result["fluency"], details["generation"] = fluency_of(model, tok, record, fluency_tokens)
    result["details"] = details
    return result


# -- key similarity (paper Fig. 3) -------------------------------------------------------------

def _subject_end(prompt: str, subject: str, variant: str) -> int:
    return prompt.index(subject) + len(variant)


@torch.no_grad()
def key_similarities(model, tok, record: dict, perturbations: Perturbations | dict, module_path: str,
                     inv_cov: torch.Tensor | None = None, corpus: Sequence[str] | None = None,
                     n_random: int = 32, seed: int = 0) -> dict:
    """Whitened similarities ``k_sᵀC⁻¹k* / k*ᵀC⁻¹k*`` of variant keys to the edit key.

    Keys are the inputs of `module_path` at the subject's last token (the edit key k* from the
    prompt itself). "before": raw keys; "after": keys passed through the REP pathway installed
    on that module (None when there is none), with k* passed through it too. ``inv_cov`` None
    means C = identity. Groups: rephrase_in/out, shuffle_in/out, long_in/out and "random"
    (keys of random tokens of the corpus).
    """
    from ..core.keys import collect_keys, subject_last_index
    from ..core.pathway import get_module, pathway_of

    p = perturbations if isinstance(perturbations, dict) else perturbations.to_dict()
    prompt, subject = record["prompt"], record["subject"]
    texts, positions, labels = [prompt], [subject_last_index(tok, prompt, _subject_end(prompt, subject, subject))], ["k*"]
    for kind in ("rephrase", "shuffle"):
        for half in ("in", "out"):
            for v in p.get(f"{kind}_{half}", []):
                text = with_subject(prompt, subject, v)
                texts.append(text)
                positions.append(subject_last_index(tok, text, _subject_end(prompt, subject, v)))
                labels.append(f"{kind}_{half}")
    for half in ("in", "out"):
        for c in p.get(f"long_{half}", []):
            text = with_context(c, prompt)
            end = len(text) - len(prompt) + _subject_end(prompt, subject, subject)
            texts.append(text)
            positions.append(subject_last_index(tok, text, end))
            labels.append(f"long_{half}")
    keys, _ = collect_keys(model, tok, texts, module_path, positions)
    groups_raw: dict[str, torch.Tensor] = {}
    for label in dict.fromkeys(labels[1:]):
        groups_raw[label] = keys[[i for i, x in enumerate(labels) if x == label]]
    if corpus and n_random > 0:
        spans = [t[:2000] for t in list(corpus)[:4]]
        _, every = collect_keys(model, tok, spans, module_path, None, all_tokens=True)
        pool = torch.cat([e[1:] for e in every if len(e) > 1])  # skip each text's first token
        rng = np.random.default_rng(seed)
        idx = rng.choice(len(pool), size=min(n_random, len(pool)), replace=False)
        groups_raw["random"] = pool[torch.as_tensor(np.sort(idx))]

    C = inv_cov.float().cpu() if inv_cov is not None else None

    def sims(k: torch.Tensor, k_star: torch.Tensor) -> list[float]:
        w = C @ k_star if C is not None else k_star
        return [round(float(x), 5) for x in (k @ w) / (k_star @ w)]

    k_star = keys[0]
    out = {"whitening": "C^-1" if C is not None else "identity", "module": module_path,
           "before": {g: sims(k, k_star) for g, k in groups_raw.items()}, "after": None}
    pathway = pathway_of(get_module(model, module_path))
    if pathway is not None and len(pathway.adapters):
        dev = next(pathway.parameters()).device
        dtype = get_module(model, module_path).weight.dtype

        def adapt(k):
            return pathway(k.to(device=dev, dtype=dtype)).float().cpu()

        k_star_a = adapt(k_star[None])[0]
        out["after"] = {g: sims(adapt(k), k_star_a) for g, k in groups_raw.items()}
    return out


# -- summaries ---------------------------------------------------------------------------------

def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def summarize(cases: Sequence[dict]) -> dict:
    """The run summary over case lines: rates in percent, fluency in bits, medians in seconds."""
    out: dict = {"n_cases": len(cases)}
    for key in METRIC_KEYS:
        values = [c["metrics"].get(key) for c in cases]
        values = [v for v in values if v is not None]
        mean = _mean(values)
        if mean is not None and key in RATE_KEYS:
            mean = 100.0 * mean
        out[key] = round(mean, 3) if mean is not None else None
    seconds = [c.get("seconds") or {} for c in cases]
    out["edit_seconds_median"] = _median([s.get("edit") for s in seconds])
    out["rep_seconds_median"] = _median([s.get("rep") for s in seconds])
    assert tuple(out) == SUMMARY_KEYS
    return out


def _fmt(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def summary_markdown(summary: dict, title: str = "") -> str:
    rows = [("cases", str(summary["n_cases"]))]
    for key in METRIC_KEYS:
        unit = " (bits)" if key == "fluency" else " (%)"
        rows.append((key + unit, _fmt(summary[key], 2 if key == "fluency" else 1)))
    rows.append(("edit seconds (median)", _fmt(summary["edit_seconds_median"], 2)))
    rows.append(("REP seconds (median)", _fmt(summary["rep_seconds_median"], 2)))
    lines = [f"# {title}", ""] if title else []
    lines += ["| metric | value |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"
