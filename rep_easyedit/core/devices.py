"""Where tensors live and how texts are padded: the one resolver of EasyEdit's `device` field."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def torch_device(device) -> torch.device | None:
    """EasyEdit's `device` field: an int N (or "N") means cuda:N; a string is a torch device."""
    if device is None:
        return None
    if isinstance(device, torch.device):
        return device
    if isinstance(device, int) or (isinstance(device, str) and device.isdigit()):
        return torch.device(f"cuda:{int(device)}")
    return torch.device(device)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's input embeddings (where token ids must go)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None:
        return emb.weight.device
    return next(model.parameters()).device


@contextlib.contextmanager
def padding_side(tok, side: str = "right") -> Iterator[None]:
    """Pad on `side` for the block, then put the tokenizer's own setting back.

    ROME-style code (EasyEdit's and ours) indexes the last real token assuming right padding;
    generation needs left padding.
    """
    old = tok.padding_side
    tok.padding_side = side
    try:
        yield
    finally:
        tok.padding_side = old
