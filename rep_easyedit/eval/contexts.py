"""Distracting contexts: text before the question that names what the edit should override.

CoRE (2025) shows that a prefix naming entities related to an edit (the old object, neighbours of
the subject) drops a locate-and-edit method's success far more than unrelated text does. Two
halves, fixed per case (seeded like the other perturbations, stored with each case's results):

- ``distract_in``: built from the edit request alone (its prompt, subject and old object), so a
  method may legitimately train on this kind: the old fact stated outright, and sentences tying
  the subject to the old object.
- ``distract_out``: the case's neighbourhood facts (its locality prompts completed with their
  answers: other subjects with, in CounterFact, the same old object), which training never sees.

Each context is followed by a space and the edit prompt, as one running text.
"""

from __future__ import annotations

import numpy as np

from ..core.perturbations import case_seed

# sentences from the request alone: {s} subject, {o} old object, {p} prompt
_IN_TEMPLATES = (
    "{p} {o}.",
    "Many people still associate {s} with {o}.",
    "{o} is the name that comes up first when {s} is mentioned.",
    "Everyone who has read about {s} has also read about {o}.",
    "It is well known that {p} {o}.",
    "Reports on {s} rarely fail to mention {o}.",
)


def _neighbour_facts(record: dict) -> list[str]:
    prompts = record.get("locality_prompt") or []
    if isinstance(prompts, str):
        prompts = [prompts]
    truths = record.get("locality_ground_truth")
    if isinstance(truths, (list, tuple)):
        pairs = list(zip(prompts, truths))
    else:
        pairs = [(p, truths) for p in prompts]
    return [f"{p.strip()} {t.strip()}." for p, t in pairs if p and t]


def distracting_contexts(record: dict, *, n: int = 3, sentences: int = 2, base_seed: int = 0) -> dict:
    """`{"distract_in": [...], "distract_out": [...]}`, up to `n` contexts each of `sentences`
    sentences; deterministic per case. A half is empty where its source is (no old object, no
    neighbourhood prompts)."""
    rng = np.random.default_rng(case_seed(record, base_seed) + 17)
    subject = record["subject"]
    prompt = record["prompt"].replace("{}", subject)
    old = record.get("target_true") or record.get("ground_truth")
    pool_in = [t.format(s=subject, o=old.strip(), p=prompt) for t in _IN_TEMPLATES] if old else []
    pool_out = _neighbour_facts(record)
    return {"distract_in": _draw(pool_in, n, sentences, rng), "distract_out": _draw(pool_out, n, sentences, rng)}


def _draw(pool: list[str], n: int, sentences: int, rng: np.random.Generator) -> list[str]:
    if not pool or n <= 0:
        return []
    k = min(sentences, len(pool))
    out: list[str] = []
    for _ in range(20 * n):
        text = " ".join(pool[int(i)] for i in rng.choice(len(pool), size=k, replace=False))
        if text not in out:
            out.append(text)
        if len(out) == n:
            break
    return out


def with_distractor(context: str, prompt: str) -> str:
    return f"{context} {prompt}"


# -- long contexts of a kind ------------------------------------------------------------------

LONG_KINDS = ("unrelated", "subject", "old_object")
_SUBJECT_TEMPLATES = (
    "{s} was discussed at length.",
    "There is more to say about {s}.",
    "Much has been written about {s}.",
    "{s} comes up again here.",
)


def long_context_of_kind(record: dict, tok, corpus: list[str], n_tokens: int, kind: str,
                         rng: np.random.Generator, every: int = 128) -> str:
    """About `n_tokens` tokens of corpus text with, every `every` tokens, a sentence of `kind`:
    ``unrelated`` (none), ``subject`` (a sentence naming the subject only) or ``old_object``
    (the `distract_in` sentences: the old fact, the subject tied to the old object)."""
    from ..core.perturbations import long_contexts

    if kind not in LONG_KINDS:
        raise ValueError(f"unknown long-context kind {kind!r}; choose from {LONG_KINDS}")
    subject = record["subject"]
    old = record.get("target_true") or record.get("ground_truth")
    if kind == "subject":
        pool = [t.format(s=subject) for t in _SUBJECT_TEMPLATES]
    elif kind == "old_object":
        if not old:
            raise ValueError(f"case {record.get('case_id')}: kind 'old_object' needs target_true")
        prompt = record["prompt"].replace("{}", subject)
        pool = [t.format(s=subject, o=old.strip(), p=prompt) for t in _IN_TEMPLATES]
    else:
        pool = []
    n_inserts = max(n_tokens // every - 1, 0) if pool else 0
    inserts = [pool[int(i)] for i in rng.integers(0, len(pool), size=n_inserts)] if pool else []
    budget = n_tokens - sum(len(tok(s, add_special_tokens=False)["input_ids"]) for s in inserts)
    (text,) = long_contexts(tok, corpus, 1, max(budget, 1), rng)
    if not inserts:
        return text
    ids = tok(text, add_special_tokens=False)["input_ids"]
    step = max(len(ids) // (len(inserts) + 1), 1)
    parts = [tok.decode(ids[i * step:(i + 1) * step], skip_special_tokens=True) for i in range(len(inserts))]
    parts.append(tok.decode(ids[len(inserts) * step:], skip_special_tokens=True))
    out = parts[0]
    for sentence, part in zip(inserts, parts[1:]):
        out = f"{out.rstrip()} {sentence} {part.lstrip()}"
    return out.strip()


# the setting where a long context hurts the base method (benchmarks/lab/probe_long_context.py,
# SmolLM2 dev 0-9: ROME's success 100 -> 25 with an old-object prefix of 1024 tokens)
HURTING_KIND = "old_object"
HURTING_TOKENS = 1024
HURTING_CONTEXTS = 2


def hurting_long_contexts(record: dict, tok, corpus: list[str], *, base_seed: int = 0,
                          n_tokens: int = HURTING_TOKENS, n: int = HURTING_CONTEXTS) -> dict:
    """`{"long_old": [...]}`: `n` prefixes of about `n_tokens` tokens of corpus text that restate the
    old fact every 128 tokens (`long_context_of_kind(..., "old_object")`), fixed per case. Empty
    where the case has no old object; an error without a corpus."""
    if not (record.get("target_true") or record.get("ground_truth")):
        return {"long_old": []}
    if not corpus:
        raise ValueError("metric long_old needs a corpus for its prefixes (rep.corpus text files, or "
                         "text sampled from the model: the runner loads it when n_long_contexts > 0)")
    rng = np.random.default_rng(case_seed(record, base_seed) + 29)
    return {"long_old": [long_context_of_kind(record, tok, corpus, n_tokens, HURTING_KIND, rng)
                         for _ in range(n)]}
