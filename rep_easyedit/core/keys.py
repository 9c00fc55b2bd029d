"""Keys: the input of the edited down-projection, collected without gradients.

The forward stops at the hooked module (an exception raised by the hook), so collecting keys at
layer L costs L/N of a forward pass. Hooks are always removed.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from .devices import model_device, padding_side
from .pathway import get_module


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


@torch.no_grad()
def collect_keys(model: nn.Module, tok, texts: Sequence[str], module_path: str,
                 positions: Sequence[int] | None = None, batch_size: int = 32,
                 all_tokens: bool = False):
    """Keys (float32, on CPU) at `positions` (one per text), and optionally every token's key.

    Returns (keys_at_positions [n, D] or None, list of per-text [len_i, D] tensors or None).
    """
    module = get_module(model, module_path)
    device = model_device(model)
    picked, every = [], []
    with padding_side(tok, "right"):
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start:start + batch_size])
            enc = tok(chunk, return_tensors="pt", padding=True).to(device)
            with capture_input(module, stop=True) as box:
                try:
                    model(**enc)
                except _StopForward:
                    pass
            if "input" not in box:
                raise RuntimeError(f"the forward never reached {module_path}")
            keys = box["input"].float().cpu()
            mask = enc["attention_mask"].cpu().bool()
            if positions is not None:
                idx = torch.tensor(positions[start:start + batch_size])
                picked.append(keys[torch.arange(len(chunk)), idx])
            if all_tokens:
                every.extend(keys[i][mask[i]] for i in range(len(chunk)))
    return (torch.cat(picked) if positions is not None else None), (every if all_tokens else None)
