"""Keys: the input of the edited down-projection, collected without gradients.

The forward stops at the hooked module (an exception raised by the hook), so collecting keys at
layer L costs L/N of a forward pass. Hooks are always removed.

`collect_keys_flat` is the fast path every REP edit takes: the texts are tokenized once (one batched
tokenizer call, which also gives the subject's last-token positions, `subject_last_indices`), sorted
by length into buckets under a token budget (so a 500-token long context is never padded together
with 20-token prompts), run bucket by bucket, and scattered back into text order with tensor
indexing (no Python loop per text). Keys are gathered on the hooked module's device, in the model's
dtype, and cast to float32 once. Right padding with the attention mask leaves every real token's
key as it is without padding (causal attention), so the result equals the per-text collection up to
float tolerance (`tests/test_keys_fast.py`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from .devices import model_device, padding_side
from .pathway import get_module

# padded tokens per forward; also the cap on one text's share (a longer text runs alone)
TOKEN_BUDGET = 8192
MAX_TEXTS_PER_BATCH = 512


class _StopForward(Exception):
    pass


@contextlib.contextmanager
def capture_input(module: nn.Module, stop: bool = True) -> Iterator[dict]:
    """Record the first positional input of `module`; optionally stop the forward there."""
    box: dict = {}

    def hook(_module, args):
        box["input"] = args[0].detach()
        if stop:
            raise _StopForward

    handle = module.register_forward_pre_hook(hook, prepend=True)
    try:
        yield box
    finally:
        handle.remove()


def subject_last_index(tok, text: str, char_end: int) -> int:
    """Index of the token that holds character `char_end - 1` of `text`."""
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=True)
    offsets = enc["offset_mapping"]
    target = char_end - 1
    for i, (start, end) in enumerate(offsets):
        if start <= target < end:
            return i
    # tokenizers that merge a trailing space differently: the last token starting before char_end
    best = None
    for i, (start, end) in enumerate(offsets):
        if end > start and start < char_end:
            best = i
    if best is None:
        raise ValueError(f"cannot locate the subject's last token in {text!r}")
    return best


@dataclass
class Encoded:
    """Texts tokenized once, right padded: ids and mask [n, L] (CPU), each text's length."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: torch.Tensor
    offsets: torch.Tensor | None = None  # [n, L, 2] character offsets, when asked for

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())


def encode(tok, texts: Sequence[str], offsets: bool = False) -> Encoded:
    """One batched tokenizer call for all texts (right padding, special tokens as `tok(text)`)."""
    texts = list(texts)
    if not texts:
        empty = torch.zeros(0, 0, dtype=torch.long)
        return Encoded(empty, empty, torch.zeros(0, dtype=torch.long),
                       torch.zeros(0, 0, 2, dtype=torch.long) if offsets else None)
    with padding_side(tok, "right"):
        enc = tok(texts, return_tensors="pt", padding=True, return_offsets_mapping=offsets)
    mask = enc["attention_mask"].bool()
    return Encoded(enc["input_ids"], mask, mask.sum(1), enc["offset_mapping"] if offsets else None)


def subject_last_indices(tok, texts: Sequence[str], char_ends: Sequence[int],
                         encoded: Encoded | None = None) -> tuple[list[int], Encoded]:
    """`subject_last_index` for many texts from one batched tokenization; returns (positions, encoding).

    A `char_end` of None asks for no position (0 comes back): such a text is only tokenized."""
    enc = encoded if encoded is not None and encoded.offsets is not None else encode(tok, texts, offsets=True)
    if len(texts) == 0:
        return [], enc
    start, end = enc.offsets[..., 0], enc.offsets[..., 1]
    wanted = torch.tensor([e is not None for e in char_ends])  # None: no position (0 is returned)
    target = torch.as_tensor([1 if e is None else e for e in char_ends], dtype=torch.long).unsqueeze(1) - 1
    mask = enc.attention_mask
    holds = (start <= target) & (target < end) & mask
    # fallback: the last token starting before char_end (tokenizers that merge a trailing space)
    before = (end > start) & (start < target + 1) & mask
    idx = torch.arange(holds.shape[1])
    first_hold = torch.where(holds, idx, holds.shape[1]).min(1).values
    last_before = torch.where(before, idx, -1).max(1).values
    pos = torch.where(first_hold < holds.shape[1], first_hold, last_before)
    pos = torch.where(wanted, pos, 0)
    if bool((pos < 0).any()):
        bad = int((pos < 0).nonzero()[0, 0])
        raise ValueError(f"cannot locate the subject's last token in {texts[bad]!r}")
    return pos.tolist(), enc


FORWARD_OVERHEAD_TOKENS = 32  # one more forward costs about as much as this many padded tokens (CPU, measured)


def length_buckets(lengths: Sequence[int], token_budget: int = TOKEN_BUDGET,
                   max_texts: int = MAX_TEXTS_PER_BATCH,
                   overhead_tokens: int = FORWARD_OVERHEAD_TOKENS) -> list[list[int]]:
    """Text indices grouped into batches of similar length, padding kept to its minimum.

    The texts are sorted by length and cut into runs of neighbouring lengths by a dynamic program
    over the distinct lengths that minimises the padded tokens plus `overhead_tokens` per forward;
    a run whose padded size exceeds `token_budget` (or `max_texts` texts) is cut into several
    forwards. A text longer than the budget runs alone."""
    order = sorted(range(len(lengths)), key=lambda i: int(lengths[i]))
    if not order:
        return []
    distinct: list[int] = []
    counts: list[int] = []
    for i in order:
        L = max(1, int(lengths[i]))
        if distinct and distinct[-1] == L:
            counts[-1] += 1
        else:
            distinct.append(L)
            counts.append(1)
    per_batch = [max(1, min(max_texts, token_budget // L)) for L in distinct]

    def cost(n: int, j: int) -> int:  # n texts, the longest of length distinct[j]
        forwards = -(-n // per_batch[j])
        return n * distinct[j] + overhead_tokens * forwards

    m = len(distinct)
    best = [0] + [None] * m   # best[j]: cheapest split of the first j distinct lengths
    cut = [0] * (m + 1)
    prefix = [0]
    for c in counts:
        prefix.append(prefix[-1] + c)
    for j in range(1, m + 1):
        for i in range(j - 1, -1, -1):
            n = prefix[j] - prefix[i]
            c = best[i] + cost(n, j - 1)
            if best[j] is None or c < best[j]:
                best[j], cut[j] = c, i
            if n * distinct[j - 1] > 4 * token_budget:  # longer runs only add forwards
                break
    runs = []
    j = m
    while j > 0:
        runs.append((cut[j], j))
        j = cut[j]
    batches: list[list[int]] = []
    for i, j in reversed(runs):
        members = order[prefix[i]:prefix[j]]
        size = per_batch[j - 1]
        batches.extend(members[k:k + size] for k in range(0, len(members), size))
    return batches


@dataclass
class CollectStats:
    """What one collection cost: texts, forwards, real tokens and the padded tokens it ran."""
    texts: int = 0
    forwards: int = 0
    tokens: int = 0
    padded_tokens: int = 0

    def add(self, other: "CollectStats") -> "CollectStats":
        return CollectStats(self.texts + other.texts, self.forwards + other.forwards,
                            self.tokens + other.tokens, self.padded_tokens + other.padded_tokens)


@dataclass
class FlatKeys:
    """Keys of a collection in text order: `picked` [n, D] at the given positions (or None),
    `tokens` [T, D] every real token of every text, concatenated (or None), `lengths` [n]."""
    picked: torch.Tensor | None
    tokens: torch.Tensor | None
    lengths: torch.Tensor
    stats: CollectStats = field(default_factory=CollectStats)

    def per_text(self) -> list[torch.Tensor]:
        return list(torch.split(self.tokens, self.lengths.tolist()))


def run_to_module(model: nn.Module, module: nn.Module, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> torch.Tensor:
    """The input of `module` for one padded batch; the forward stops there."""
    with capture_input(module, stop=True) as box:
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
    if "input" not in box:
        raise RuntimeError("the forward never reached the hooked module")
    return box["input"]


@torch.no_grad()
def collect_keys_flat(model: nn.Module, tok, texts: Sequence[str], module_path: str,
                      positions: Sequence[int] | None = None, all_tokens: bool = False, *,
                      encoded: Encoded | None = None, device: torch.device | str | None = None,
                      token_budget: int = TOKEN_BUDGET, max_texts: int = MAX_TEXTS_PER_BATCH,
                      replay=None) -> FlatKeys:
    """Keys (float32, on `device`: default the hooked module's) of `texts`, length-bucketed.

    positions: one token index per text (keys at it come back as `picked`); all_tokens: also every
    real token's key, concatenated in text order (`tokens`, split by `lengths`). replay: a
    `replay.BlockReplay` shared by the bottom-up collections of one edit's layers over the same
    texts: each records what the block below its module returns, the next one starts from there.
    """
    module = get_module(model, module_path)
    enc = encoded if encoded is not None else encode(tok, texts)
    n = len(enc.lengths)
    in_device = model_device(model)
    weight = getattr(module, "weight", None)
    out_device = torch.device(device) if device is not None else (
        weight.device if isinstance(weight, torch.Tensor) else in_device)
    stats = CollectStats(texts=n, tokens=enc.tokens)
    picked = tokens = None
    if n == 0:
        return FlatKeys(None if positions is None else torch.zeros(0, 0, device=out_device),
                        torch.zeros(0, 0, device=out_device) if all_tokens else None, enc.lengths, stats)
    pos_all = None
    if positions is not None:
        pos_all = torch.as_tensor(list(positions), dtype=torch.long)
        if len(pos_all) != n:
            raise ValueError(f"{len(pos_all)} positions for {n} texts")
        if bool(((pos_all < 0) | ((pos_all >= enc.lengths) & (enc.lengths > 0))).any()):
            raise IndexError("a position lies outside its text")
    starts = torch.cumsum(enc.lengths, 0) - enc.lengths  # each text's first row in `tokens`
    ids_dev = enc.input_ids.to(in_device, non_blocking=True)
    mask_dev = enc.attention_mask.to(in_device, non_blocking=True).long()  # as a tokenizer gives it
    batches = length_buckets(enc.lengths.tolist(), token_budget, max_texts)
    if replay is not None:
        batches = replay.plan(batches, enc.input_ids, module)
    for index, batch in enumerate(batches):
        rows = torch.as_tensor(batch, dtype=torch.long)
        width = int(enc.lengths[rows].max())
        rows_dev = rows.to(in_device)
        with replay.running(index) if replay is not None else contextlib.nullcontext():
            keys = run_to_module(model, module, ids_dev[rows_dev, :width], mask_dev[rows_dev, :width])
        stats.forwards += 1
        stats.padded_tokens += len(batch) * width
        keys = keys.to(out_device)
        if stats.forwards == 1:  # the first batch tells the key width
            dim = keys.shape[-1]
            if pos_all is not None:
                picked = torch.empty(n, dim, dtype=torch.float32, device=out_device)
            if all_tokens:
                tokens = torch.empty(enc.tokens, dim, dtype=torch.float32, device=out_device)
        rows_out = rows.to(out_device)
        if pos_all is not None:
            picked[rows_out] = keys[torch.arange(len(batch), device=out_device),
                                    pos_all[rows].to(out_device)].float()
        if all_tokens:
            mask_b = enc.attention_mask[rows, :width].to(out_device)
            dest = (starts[rows].to(out_device).unsqueeze(1)
                    + torch.arange(width, device=out_device).unsqueeze(0))[mask_b]
            tokens[dest] = keys[mask_b].float()
    return FlatKeys(picked, tokens, enc.lengths, stats)


@torch.no_grad()
def collect_keys(model: nn.Module, tok, texts: Sequence[str], module_path: str,
                 positions: Sequence[int] | None = None, batch_size: int = 32,
                 all_tokens: bool = False, device: torch.device | str | None = "cpu"):
    """Keys (float32, on `device`, CPU by default) at `positions` (one per text), and optionally
    every token's key.

    Returns (keys_at_positions [n, D] or None, list of per-text [len_i, D] tensors or None).
    Length-bucketed (`collect_keys_flat`); `batch_size` caps the texts per forward.
    """
    flat = collect_keys_flat(model, tok, texts, module_path, positions, all_tokens, device=device,
                             max_texts=max(1, int(batch_size)) if batch_size else MAX_TEXTS_PER_BATCH)
    return flat.picked, (flat.per_text() if all_tokens else None)


@torch.no_grad()
def collect_keys_per_text(model: nn.Module, tok, texts: Sequence[str], module_path: str,
                          positions: Sequence[int] | None = None, all_tokens: bool = False):
    """The straightforward collection, one text per forward (no padding): the reference the fast
    path is tested against. Returns what `collect_keys` returns, on CPU."""
    module = get_module(model, module_path)
    device = model_device(model)
    picked, every = [], []
    for i, text in enumerate(texts):
        enc = tok([text], return_tensors="pt").to(device)
        keys = run_to_module(model, module, enc["input_ids"], enc["attention_mask"])[0].float().cpu()
        if positions is not None:
            picked.append(keys[positions[i]])
        every.append(keys)
    return (torch.stack(picked) if positions is not None else None), (every if all_tokens else None)
