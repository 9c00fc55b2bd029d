"""Names of other subjects of the same kind, written by the edited model itself (gate hard negatives).

A gate trained on the subject's surface forms also fires on other names of its kind, the
neighbours whose facts locality measures ("Windows NT" for "Microsoft Office Mobile"): the random
corpus tokens it learns to reject are rarely names at all. The model knows which names sit beside
the subject: asked to continue a numbered list that starts with the subject under its old fact
("BMW E23, developed by BMW. Other examples of the same kind: 1. BMW E23 2."), it writes siblings
("BMW E31", "Wiesbaden" for "Darmstadt"). Only the request is read: prompt, subject, ground truth.

Items that are surface forms of the subject rather than neighbours are dropped (`is_kin`).
"""

from __future__ import annotations

import re

import torch

SAMPLES = 6            # sampled continuations per request
MAX_NEW_TOKENS = 24    # about three list items each
TOP_K = 40             # sampling among the 40 likeliest tokens (a top-p sort of a 262k vocabulary costs more)
_ITEM = re.compile(r"\n\s*\d+\s*[.)]\s*")


def kin_prompt(prompt_filled: str, subject: str, ground_truth: str | None) -> str:
    """The list the model continues: the old fact, then a numbered list whose first item is the subject."""
    fact = f"{prompt_filled} {ground_truth}" if ground_truth else prompt_filled
    return f"{fact.rstrip()}. Other examples of the same kind:\n1. {subject}\n2."


def list_items(continuation: str) -> list[str]:
    """The items of a generated continuation of a numbered list, in order (the first one is item 2).

    An item the continuation does not close with a line break may be cut off, and is left out.
    """
    items = []
    parts = _ITEM.split("\n2." + continuation)[1:]
    for i, part in enumerate(parts):
        line, closed, _ = part.partition("\n")
        if i == len(parts) - 1 and not closed:
            continue
        item = line.strip().strip(".,;:").strip()
        if item:
            items.append(item)
    return items


def _norm(text: str) -> str:
    """Case and runs of whitespace do not make two names differ."""
    return " ".join(text.casefold().split())


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+", text.casefold())


def is_kin(item: str, subject: str, exclude: list[str]) -> bool:
    """A usable sibling name: a short name with a letter in it, not a surface form of the subject.

    Surface forms left out: part of the subject or containing it, a trained variant, a name that
    shares the subject's last word ("Alfa Romeo F355" for "Ferrari F355": the key
    at its last token is close to the subject's own; "Jean de Croisset" for "Francis de Croisset").
    Near-spellings ("Eduardo Duhhala") stay: no spelling measure tells them from siblings ("BMW E31"
    for "BMW E23").
    """
    low, subj = _norm(item), _norm(subject)
    if not 1 < len(low) <= 60 or not re.search(r"[^\W\d_]", low):
        return False
    if low in subj or subj in low:
        return False
    words = _words(subject)
    if words and words[-1] in _words(item):
        return False
    return all(low != _norm(e) for e in exclude)


def kin_names(model, tok, prompt_filled: str, subject: str, ground_truth: str | None, n: int, seed: int,
              exclude: list[str] = ()) -> list[str]:
    """Up to `n` sibling names, sampled from the model (seeded; the global RNG is left as it was)."""
    if n <= 0:
        return []
    device = next(model.parameters()).device
    enc = tok(kin_prompt(prompt_filled, subject, ground_truth), return_tensors="pt").to(device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(**enc, do_sample=True, temperature=0.8, top_k=TOP_K, top_p=1.0,
                             max_new_tokens=MAX_NEW_TOKENS, num_return_sequences=SAMPLES, pad_token_id=pad)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    per_sample = [list_items(text) for text in texts]
    names: list[str] = []
    seen: set[str] = set()
    for rank in range(max(map(len, per_sample), default=0)):  # round-robin: every sample's item 2 first
        for items in per_sample:
            if rank < len(items) and is_kin(items[rank], subject, exclude) and _norm(items[rank]) not in seen:
                seen.add(_norm(items[rank]))
                names.append(items[rank])
    return names[:n]
