"""Surface forms of a subject: rephrases, token shuffles and long contexts, fixed per case.

Every list is split in halves: the first half trains the adapter (in-domain), the second half is
only ever used to evaluate (out-of-domain). Randomness comes from a generator seeded by the case,
so the same case always gets the same perturbations, and they are stored with the results.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np

REPHRASE_FIELDS = ("subject_rephrase", "rephrase_subjects")
LONG_CONTEXT_SEPARATOR = "\n\n"


@dataclass
class Perturbations:
    seed: int
    rephrase_in: list[str] = field(default_factory=list)
    rephrase_out: list[str] = field(default_factory=list)
    shuffle_in: list[str] = field(default_factory=list)
    shuffle_out: list[str] = field(default_factory=list)
    long_in: list[str] = field(default_factory=list)
    long_out: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def case_seed(request: dict, base_seed: int = 0) -> int:
    if request.get("case_id") is not None:
        key = f"case:{request['case_id']}"
    else:
        key = f"{request['prompt']}\x00{request['subject']}"
    return (zlib.crc32(key.encode("utf-8")) + 1_000_003 * int(base_seed)) % (2**31 - 1)


def halves(items: list) -> tuple[list, list]:
    mid = (len(items) + 1) // 2
    return list(items[:mid]), list(items[mid:])


def subject_rephrases(request: dict) -> list[str]:
    for name in REPHRASE_FIELDS:
        value = request.get(name)
        if value:
            if isinstance(value, str):
                value = [value]
            subject = request["subject"]
            return [v for v in dict.fromkeys(x.strip() for x in value) if v and v != subject]
    return []


def token_shuffles(tok, subject: str, n: int, rng: np.random.Generator) -> list[str]:
    """Distinct permutations of the subject's tokens, decoded to text by the tokenizer."""
    ids = tok(subject, add_special_tokens=False)["input_ids"]
    if len(ids) < 2 or n <= 0:
        return []
    seen, out = {tuple(ids)}, []
    for _ in range(50 * n):
        cand = tuple(ids[i] for i in rng.permutation(len(ids)))
        if cand in seen:
            continue
        seen.add(cand)
        text = " ".join(tok.decode(list(cand), skip_special_tokens=True).split())
        if text and text != subject and text not in out:
            out.append(text)
        if len(out) == n:
            break
    return out


def long_contexts(tok, corpus: list[str], n: int, n_tokens: int, rng: np.random.Generator) -> list[str]:
    """`n` spans of `n_tokens` tokens of unrelated text, cut from the corpus at random offsets."""
    if n <= 0 or n_tokens <= 0:
        return []
    if not corpus:
        raise ValueError("long contexts need a text corpus; none was given or sampled")
    stream: list[int] = []
    sep = tok(LONG_CONTEXT_SEPARATOR, add_special_tokens=False)["input_ids"]
    for text in corpus:
        stream.extend(tok(text, add_special_tokens=False)["input_ids"] + sep)
        if len(stream) > 4 * n * n_tokens + n_tokens:
            break
    if len(stream) <= n_tokens:
        raise ValueError(f"the corpus holds {len(stream)} tokens; long contexts need more than {n_tokens}")
    out = []
    for start in rng.integers(0, len(stream) - n_tokens, size=n):
        text = tok.decode(stream[int(start):int(start) + n_tokens], skip_special_tokens=True)
        out.append(text.strip())
    return out


def build_perturbations(request: dict, tok, corpus: list[str] | None, *, n_shuffles: int = 10,
                        n_long: int = 4, long_tokens: int = 512, base_seed: int = 0) -> Perturbations:
    seed = case_seed(request, base_seed)
    rng = np.random.default_rng(seed)
    reph_in, reph_out = halves(subject_rephrases(request))
    shuf_in, shuf_out = halves(token_shuffles(tok, request["subject"], n_shuffles, rng))
    longs = long_contexts(tok, corpus or [], n_long, long_tokens, rng) if n_long else []
    long_in, long_out = halves(longs)
    return Perturbations(seed, reph_in, reph_out, shuf_in, shuf_out, long_in, long_out)


def sibling_subjects(subject: str, corpus: list[str], n: int, rng: np.random.Generator,
                     exclude: list[str] = ()) -> list[str]:
    """The gate's hard negatives: the subject's leading words alone ("Norwegian", "Norwegian News"),
    then `n` names that share them but end otherwise ("Norwegian Review", "Norwegian News Station").
    A neighbour sharing the subject's first word ("Toyota Corolla" for "Toyota FCHV") is where an
    untaught gate fires: token shuffles teach it that "Toyota" can end the subject, and a causal
    model gives the neighbour's "Toyota" the very key of the prompt's. Replacement words are
    capitalised words of the corpus; none for a one-word subject.
    """
    words = subject.split()
    if n <= 0 or len(words) < 2:
        return []
    pool = sorted({w for text in corpus for w in re.findall(r"\b[A-Z][a-z]{2,}\b", text)} - set(words))
    if not pool:
        return []
    taken = {subject, *exclude}
    out: list[str] = []
    for keep in range(1, len(words)):
        prefix = " ".join(words[:keep])
        if prefix not in taken:
            taken.add(prefix)
            out.append(prefix)
    wanted = len(out) + n
    for _ in range(4 * wanted):
        keep = int(rng.integers(1, len(words)))            # 1 .. len-1 leading words stay
        tail = [pool[int(i)] for i in rng.integers(0, len(pool), size=int(rng.integers(1, 3)))]
        name = " ".join(words[:keep] + tail)
        if name not in taken:
            taken.add(name)
            out.append(name)
        if len(out) == wanted:
            break
    return out


def partial_subjects(tok, subject: str, n: int, rng: np.random.Generator, exclude: list[str] = ()) -> list[str]:
    """Gate hard negatives made of the subject's own tokens, but not all of them: every proper prefix
    of its tokens in order ("Nor", "Norwegian", "Norwegian News" for "Norwegian News Agency"), then
    `n` shuffles of the tokens before its last word ("wegian Nor", "News Norwegian").

    Token shuffles teach the gate that any of the subject's tokens may close it, and a neighbour that
    shares one ("Norwegian Computing Center") has, in a causal model, the very key of the prompt's
    own "Norwegian". A shuffle closes on its token with every other subject token before it; these
    negatives lack some, so the gate may learn to tell them apart. The last word's tokens are left
    out of the shuffles: a short form such as "Duhalde" for "Eduardo Duhalde" is a surface form of
    the subject, not a neighbour. None for a one-token subject.
    """
    ids = tok(subject, add_special_tokens=False)["input_ids"]
    if n < 0 or len(ids) < 2:
        return []
    taken = {subject, *exclude}
    out: list[str] = []

    def add(cand) -> None:
        text = " ".join(tok.decode(list(cand), skip_special_tokens=True).split())
        if text and text not in taken:
            taken.add(text)
            out.append(text)

    for keep in range(1, len(ids)):
        add(ids[:keep])
    words = subject.split()
    head_chars = subject.rstrip().rfind(words[-1]) if len(words) > 1 else 0  # where the last word starts
    spans = tok(subject, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    head_ids = [i for i, (_, end) in zip(ids, spans) if end <= head_chars]  # tokens wholly before it
    wanted = len(out) + n
    for _ in range(20 * n if head_ids else 0):
        size = int(rng.integers(1, len(head_ids) + 1))
        add([head_ids[int(i)] for i in rng.permutation(len(head_ids))[:size]])
        if len(out) >= wanted:
            break
    return out


def with_subject(prompt: str, subject: str, variant: str) -> str:
    """The prompt with its subject replaced by a variant."""
    return prompt.replace(subject, variant, 1)


def with_context(context: str, text: str) -> str:
    return f"{context}{LONG_CONTEXT_SEPARATOR}{text}"
