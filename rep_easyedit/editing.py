"""Editing outside `BaseEditor`: load any hparams file, edit, and always restore.

The benchmark and examples use this to edit each case from the unedited model: the same
`apply_X_to_model` EasyEdit's editor calls, then EasyEdit's own restore (`weights_copy` written
back; for REP that also switches its adapters off), then the pathway is pruned.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch
from .compat.easyedit import installed_algorithm, shims_applied
from .hparams import REP_PREFIX, REPHyperParams, read_hparams_file
from .core.pathway import prune_inactive


def load_hparams(path: str | Path):
    """Hparams for any alg_name the plugin knows: REP-*, or a backend of the installed EasyEdit."""
    import rep_easyedit  # noqa: F401 - registration
    from .backends import get_backend

    path, raw = read_hparams_file(path)
    alg = raw.get("alg_name")
    if isinstance(alg, str) and alg.startswith(REP_PREFIX):
        return REPHyperParams.from_dict(raw, source=str(path))
    if alg is None or installed_algorithm(alg) is None:
        raise ValueError(f"{path}: unknown alg_name {alg!r}")
    hparams = get_backend(alg).hparams_cls.from_hparams(str(path))
    if isinstance(getattr(hparams, "stats_dir", None), str):
        hparams.stats_dir = os.path.expanduser(hparams.stats_dir)
    return hparams


def apply_edit(model, tok, requests: list[dict], hparams):
    """Run the algorithm named by `hparams.alg_name`; returns `weights_copy` (always captured)."""
    import rep_easyedit  # noqa: F401

    apply = installed_algorithm(hparams.alg_name)
    if apply is None:
        raise ValueError(f"alg_name {hparams.alg_name!r} is not registered with EasyEdit")
    from .backends import get_backend, templates_keyed_by_model

    from .core.devices import padding_side

    base = getattr(hparams, "backend_name", hparams.alg_name)
    with padding_side(tok, "right"), shims_applied(), \
            templates_keyed_by_model(model, get_backend(base)):
        _, weights_copy = apply(model, tok, requests, hparams, copy=False,
                                return_orig_weights=True, keep_original_weight=True)
    return weights_copy


def restore(model, weights_copy: dict) -> None:
    """EasyEdit's restore (write `weights_copy` back), then drop switched-off adapters."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights_copy.items():
            params[name].copy_(value.to(params[name].device))
    prune_inactive(model)


@contextlib.contextmanager
def edited(model, tok, requests: list[dict], hparams) -> Iterator[dict]:
    """Edit for the duration of the block; the model is restored on exit, errors included."""
    weights_copy = apply_edit(model, tok, requests, hparams)
    try:
        yield weights_copy
    finally:
        restore(model, weights_copy)


def keep_edit_kwargs() -> dict:
    """`BaseEditor.edit` keyword that keeps the edit in the model, for the installed EasyEdit."""
    from .compat.easyedit import editor_uses_sequential_flag

    return {"sequential_edit": True} if editor_uses_sequential_flag() else {"keep_original_weight": False}


def snapshot(model) -> dict:
    """A copy of every parameter and buffer, to put a model back after edits made in place."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def restore_snapshot(model, state: dict) -> None:
    """Take off every REP pathway and write the snapshot back."""
    from .core.pathway import remove_pathways

    remove_pathways(model)
    model.load_state_dict(state)
