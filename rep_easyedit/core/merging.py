"""Merging a layer's stacked adapters into one, retrained on all their keys.

Sequential editing leaves one adapter per edit on a layer; each forward runs them all. A merged
adapter is trained on the union of their training keys, each positive pulled onto its own edit's
key, the consistency loss holding every edit key in place and the gate trained on every edit's
negatives. Whether that keeps quality as edits accumulate is measured by
`benchmarks/sequential_edits.py --merge` (docs/results.md, "Sequential edits").

`merge_in_place` is the form an edit uses (`rep.merge_rank`): every live adapter at a layer carries
its edits' slimmed keys (`KEPT`), the merged adapter takes them all over, and the adapters it
replaces are switched off rather than removed, so restoring the edit's `weights_copy` (which
switches them on again and the merged one off) gives back the pathway as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .adapter import GatedLowRankAdapter
from .pathway import detach_adapter, get_module, install, pathway_of
from .training import TrainingKeys, TrainingReport, freeze, fresh_adapter, train_adapter


def _some_rows(rows: torch.Tensor, at_most: int | None, seed: int) -> torch.Tensor:
    """`rows`, or `at_most` of them drawn without repeats (seeded, in their order) where there are more."""
    if not at_most or len(rows) <= at_most:
        return rows
    idx = np.sort(np.random.default_rng(seed).choice(len(rows), at_most, replace=False))
    return rows[torch.as_tensor(idx, device=rows.device)]


def union_of_keys(groups: Sequence[TrainingKeys], max_negatives: int | None = None,
                  seed: int = 0) -> TrainingKeys:
    """One TrainingKeys whose positives carry their own edit's key as target."""
    if not groups:
        raise ValueError("nothing to merge: no training keys given")
    positives = torch.cat([g.positives for g in groups])
    targets = torch.cat([g.target.expand(len(g.positives), -1) for g in groups])
    whitened = None
    if all(g.target_whitened is not None for g in groups):
        whitened = torch.cat([g.target_whitened.expand(len(g.positives), -1) for g in groups])
    negatives = _some_rows(torch.cat([g.negatives for g in groups]), max_negatives, seed)
    return TrainingKeys(positives=positives, negatives=negatives, target=targets, target_whitened=whitened)


KEPT = "kept_keys"  # attribute of an adapter: its edits' slimmed TrainingKeys, what a merge retrains on


def _trained_on(groups: Sequence[TrainingKeys], rep, rank: int | None, steps: int | None,
                max_negatives: int | None, device) -> tuple[GatedLowRankAdapter, TrainingReport]:
    keys = union_of_keys([_on(g, device) for g in groups],
                         max_negatives=max_negatives or 4 * rep.num_negatives, seed=rep.seed)
    dim = keys.positives.shape[-1]
    merged = fresh_adapter(dim, min(dim, rank or rep.rank * len(groups)), rep, rep.seed, device)
    report = train_adapter(merged, keys, rep, steps=rep.merge_steps if steps is None else steps)
    return freeze(merged), report


def _on(keys: TrainingKeys, device) -> TrainingKeys:
    """The keys a merge needs on `device` (kept keys loaded from disk sit on the CPU)."""
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return TrainingKeys(positives=move(keys.positives), negatives=move(keys.negatives),
                        target=move(keys.target), target_whitened=move(keys.target_whitened))


def merge_adapters(model, path: str, groups: Sequence[TrainingKeys], rep, rank: int | None = None,
                   steps: int | None = None, max_negatives: int | None = None
                   ) -> tuple[GatedLowRankAdapter, TrainingReport]:
    """Replace every adapter at `path` by one trained on `groups` (their keys, in any order).

    `rank` defaults to `rep.rank` × the number of edits and `max_negatives` to 4 × `rep.num_negatives`,
    both capped; `steps` to `rep.merge_steps`. The layer's adapters are only swapped once training has succeeded.
    """
    module = get_module(model, path)
    current = list(pathway_of(module).adapters) if pathway_of(module) is not None else []
    merged, report = _trained_on(groups, rep, rank, steps, max_negatives, module.weight.device)
    for adapter in current:
        detach_adapter(model, path, adapter)
    install(model, path, merged)
    return merged, report


@dataclass
class InPlaceMerge:
    merged: GatedLowRankAdapter
    report: TrainingReport
    superseded: list[GatedLowRankAdapter]  # switched off, still installed until the next edit prunes them


class KeysNotKept(ValueError):
    """An adapter at the layer carries no training keys (e.g. loaded from a pathway saved without them)."""


def merge_in_place(model, path: str, rep, rank: int) -> InPlaceMerge | None:
    """One adapter of `rank` at `path` for every live adapter there, trained on all their kept keys.

    None where there is nothing to merge (one live adapter at most). Raises `KeysNotKept`, changing
    nothing, where a live adapter has no `KEPT` keys: merging without them would drop its edits.
    """
    module = get_module(model, path)
    pathway = pathway_of(module)
    live = [a for a in pathway.adapters if float(a.active) != 0.0] if pathway is not None else []
    if len(live) < 2:
        return None
    missing = [i for i, a in enumerate(live) if getattr(a, KEPT, None) is None]
    if missing:
        raise KeysNotKept(f"{path}: {len(missing)} of its {len(live)} adapters carry no training keys "
                          f"(loaded from a pathway saved without them, or trained with rep.merge_rank: 0), "
                          f"so a merge would lose their edits")
    groups = [k for a in live for k in getattr(a, KEPT)]
    merged, report = _trained_on(groups, rep, rank, None, None, module.weight.device)
    setattr(merged, KEPT, groups)
    with torch.no_grad():
        for adapter in live:
            adapter.active.fill_(0.0)
    install(model, path, merged)
    return InPlaceMerge(merged=merged, report=report, superseded=live)


def slimmed(keys: TrainingKeys, max_negatives: int, seed: int = 0) -> TrainingKeys:
    """What a later merge needs of one edit's keys, with at most `max_negatives` of its negatives.

    A merge caps the union's negatives anyway; keeping every edit's 1,000-odd corpus keys would make
    a long run's memory grow by megabytes per edit for keys the cap throws away.
    """
    return TrainingKeys(positives=keys.positives.detach(),
                        negatives=_some_rows(keys.negatives, max_negatives, seed).detach(),
                        target=keys.target.detach(),
                        target_whitened=None if keys.target_whitened is None else keys.target_whitened.detach())
