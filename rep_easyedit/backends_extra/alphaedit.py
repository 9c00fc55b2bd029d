"""AlphaEdit for EasyEdit builds that lack it, written from the paper.

Fang et al. (ICLR 2025), "AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models".
A MEMIT-style batch edit whose update is projected onto the null space of the preserved
knowledge's keys, so it leaves their outputs alone however many edits pile up:

    P  = Û Ûᵀ,   Û: eigenvectors of the keys' second moment E[k kᵀ] with eigenvalue < threshold
    Δ  = R K1ᵀ P (K_p K_pᵀ P + K1 K1ᵀ P + α I)⁻¹

K1 (in, B): this batch's keys; R (out, B): their residuals (MEMIT's spread over layers,
`layered.py`); K_p: the keys of the earlier AlphaEdit edits still in the weights (the cumulative
term that keeps them in place); α = `L2`. For a preserved key k with P k = 0 the matrix in
brackets maps k to α k, so Δ k = R K1ᵀ P k / α = 0: the update cannot move it.

Differences from upstream EasyEdit's `AlphaEdit` (its snapshot 14cea82), all so it works on any model:
- upstream sizes P and its cumulative cache by model-name substrings ("llama", "qwen", "gpt-j-6b",
  "gpt2-xl"; any other name leaves P undefined) and writes `null_space_project.pt` to the working
  directory. Here P is sized from the edited weight (nn.Linear or GPT-2's Conv1D) and cached in
  memory per model and beside the covariance statistics on disk (`P_loc`, when given and present,
  is read instead, as upstream does).
- upstream keeps the cumulative term in a module global shared by every model, and never drops an
  edit the editor restored. Here it is kept per model and layer, and an edit whose weights were put
  back (EasyEdit's `sequential_edit=False`/`keep_original_weight=True`) leaves it.
- `mom2_adjustment` and `mom2_update_weight` are read (upstream's fields) but do not enter the
  update, as upstream's.
"""

from __future__ import annotations

import copy as _copy
import dataclasses
import logging
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import common as _c
from .layered import (LayeredHyperParams, LayerUpdate, apply_updates, execute_layered,  # noqa: F401
                      get_context_templates)  # the backend module's templates, looked up by name

LOG = logging.getLogger(__name__)

ALG_NAME = "AlphaEdit"


@dataclass(kw_only=True)
class AlphaEditHyperParams(LayeredHyperParams):
    """Field names as in upstream EasyEdit's `AlphaEditHyperParams`: MEMIT's (`LayeredHyperParams`;
    `mom2_adjustment` and `mom2_update_weight` are read but, as upstream, unused) and these."""

    nullspace_threshold: float    # eigenvalues of E[k kᵀ] below it span the null space
    L2: float                     # α, the ridge term of the update
    P_loc: Optional[str] = None   # a saved projector (layers × in × in) to read instead of computing

    @classmethod
    def from_hparams(cls, hparams_name_or_path) -> "AlphaEditHyperParams":
        return _c.load_hparams_yaml(cls, hparams_name_or_path, ALG_NAME)


# ---------------------------------------------------------------------------------------------
# the null-space projector


def null_space_projector(second_moment: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = Û Ûᵀ over the eigenvectors of `second_moment` whose eigenvalue is below `threshold`."""
    m = second_moment.double()
    m = (m + m.T) / 2
    evals, evecs = torch.linalg.eigh(m)
    small = evecs[:, evals < threshold]
    return small @ small.T


_PROJECTORS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _projector_file(model, hparams, layer: int) -> tuple[Path, str]:
    """Where the projector is kept: beside the statistics it is computed from, stamped by them."""
    from ..covariance import _existing_path

    stats = _existing_path(model, hparams, layer)   # MissingCovarianceError names the fix
    st = stats.stat()
    stamp = f"{st.st_size}-{st.st_mtime_ns}"
    name = stats.name[:-len(".npz")] + f"_nullspace_{float(hparams.nullspace_threshold):g}.pt"
    return stats.with_name(name), stamp


def projector(model, hparams, layer: int, index: int) -> torch.Tensor:
    """P for `layer` (float64, CPU): from `P_loc` when given, from a seeded second moment
    (`seed_second_moment`), else from the statistics file, computed once and cached beside it."""
    key = (hparams.rewrite_module_tmp.format(layer), float(hparams.nullspace_threshold),
           str(hparams.mom2_dataset), int(hparams.mom2_n_samples), str(hparams.stats_dir),
           str(hparams.P_loc))
    per_model = _PROJECTORS.setdefault(model, {})
    if key in per_model:
        return per_model[key]
    dim = _c.edited_weight(model, hparams, layer).out_in().shape[1]
    if hparams.P_loc and os.path.exists(os.path.expanduser(hparams.P_loc)):
        stacked = torch.load(os.path.expanduser(hparams.P_loc), map_location="cpu")
        if stacked.dim() != 3 or stacked.shape[0] != len(hparams.layers) \
                or tuple(stacked.shape[1:]) != (dim, dim):
            raise ValueError(f"P_loc {hparams.P_loc} holds a projector of shape {tuple(stacked.shape)}; "
                             f"this model and hparams need ({len(hparams.layers)}, {dim}, {dim}) "
                             f"(layers {list(hparams.layers)}). Remove P_loc to compute it here.")
        p = stacked[index].double()
    elif (seeded := _c.seeded_second_moment(model, hparams, layer)) is not None:
        p = null_space_projector(seeded, float(hparams.nullspace_threshold))
    else:
        from ..covariance import load_second_moment

        path, stamp = _projector_file(model, hparams, layer)
        p = None
        if path.is_file():
            saved = torch.load(path, map_location="cpu")
            if saved.get("stats") == stamp and tuple(saved["P"].shape) == (dim, dim):
                p = saved["P"].double()
        if p is None:
            moment, _count = load_second_moment(model, hparams, layer)
            p = null_space_projector(moment, float(hparams.nullspace_threshold))
            tmp = path.with_suffix(".tmp")
            torch.save({"P": p.float(), "stats": stamp}, tmp)
            os.replace(tmp, path)
    rank = int(round(p.trace().item()))
    if rank == 0:
        raise ValueError(f"AlphaEdit: no eigenvalue of layer {layer}'s key second moment is below "
                         f"nullspace_threshold={hparams.nullspace_threshold}, so the null space is "
                         f"empty and no edit can be written; raise nullspace_threshold")
    LOG.info("AlphaEdit layer %d: null space of rank %d of %d", layer, rank, dim)
    per_model[key] = p
    return p


# ---------------------------------------------------------------------------------------------
# the cumulative term: keys of earlier edits still in the weights


@dataclass
class _Record:
    before: torch.Tensor     # weight signature before the edit
    after: torch.Tensor      # and after it
    keys: torch.Tensor       # (in, B) float64, CPU


# model -> edited weight's name -> its records, oldest first
_HISTORY: "weakref.WeakKeyDictionary[torch.nn.Module, Dict[str, List[_Record]]]" = weakref.WeakKeyDictionary()


def _signature(w: _c.EditedWeight) -> torch.Tensor:
    """W r for a fixed random r: changes whenever the weight does (one matrix-vector product)."""
    m = w.out_in()
    g = torch.Generator(device="cpu").manual_seed(12345)
    r = torch.randn(m.shape[1], generator=g, dtype=torch.float64).to(device=m.device, dtype=m.dtype)
    return (m @ r).cpu()


def edited_keys(model, w: _c.EditedWeight) -> List[torch.Tensor]:
    """The keys of the AlphaEdit edits still in `w` (earlier ones whose weights were restored dropped)."""
    records = _HISTORY.setdefault(model, {}).setdefault(w.name, [])
    now = _signature(w)
    for i in range(len(records) - 1, -1, -1):
        if torch.equal(now, records[i].after):
            del records[i + 1:]     # later edits were put back
            break
        if torch.equal(now, records[i].before):
            del records[i:]         # this edit and later ones were put back
            break
    # no match: changed by something else (another method's edit); earlier edits stay counted
    return [r.keys for r in records]


def history_state(model) -> dict:
    """The cumulative term of `model` as plain tensors (to save beside its edited weights)."""
    return {name: [dataclasses.asdict(r) for r in records] for name, records in _HISTORY.get(model, {}).items()}


def load_history_state(model, state: dict) -> None:
    """Put back a `history_state` (after the weights it describes are loaded)."""
    _HISTORY[model] = {name: [_Record(**r) for r in records] for name, records in state.items()}


def reset_history(model=None) -> None:
    """Forget the edited keys (all models, or one): the next edit has no cumulative term."""
    if model is None:
        _HISTORY.clear()
    else:
        _HISTORY.pop(model, None)


def alphaedit_update(residual: torch.Tensor, keys: torch.Tensor, p: torch.Tensor,
                     earlier: Optional[torch.Tensor], l2: float) -> torch.Tensor:
    """Δ = R K1ᵀ P (C P + α I)⁻¹ with C = K_p K_pᵀ + K1 K1ᵀ; residual (out, B), keys (in, B)."""
    dt, dev = residual.dtype, residual.device
    keys = keys.to(dtype=dt, device=dev)
    p = p.to(dtype=dt, device=dev)
    c = keys @ keys.T
    if earlier is not None and earlier.numel():
        earlier = earlier.to(dtype=dt, device=dev)
        c = c + earlier @ earlier.T
    m = c @ p + l2 * torch.eye(c.shape[0], dtype=dt, device=dev)
    # Δ m = R K1ᵀ P  ⇔  mᵀ Δᵀ = P K1 Rᵀ
    return torch.linalg.solve(m.T, p @ keys @ residual.T).T


def execute_alphaedit(model, tok, requests, hparams, context_templates=None) -> Dict[str, LayerUpdate]:
    """Compute the AlphaEdit update(s) for a batch of requests; the model is left unchanged."""
    l2 = float(hparams.L2)
    if l2 <= 0:
        raise ValueError(f"AlphaEdit: L2 must be > 0 (the solve needs it), got {l2}")
    index = {layer: i for i, layer in enumerate(hparams.layers)}
    projectors = {layer: projector(model, hparams, layer, index[layer]) for layer in hparams.layers}

    def rule(layer, w, keys, residual):
        earlier = edited_keys(model, w)
        k_p = torch.cat(earlier, 1) if earlier else None
        return alphaedit_update(residual, keys, projectors[layer], k_p, l2), None

    return execute_layered(model, tok, requests, hparams, rule, ALG_NAME, context_templates)


def apply_AlphaEdit_to_model(model, tok, requests, hparams, copy=False, return_orig_weights=False,
                             keep_original_weight=False, reset_cache=False, **kwargs):
    """EasyEdit's contract: returns (model, weights_copy); a batch of requests per call.

    `reset_cache=True` (upstream's keyword) forgets the earlier edits' keys first. Extra keyword:
    `context_templates`.
    """
    if copy:
        model = _copy.deepcopy(model)
    if reset_cache:
        reset_history(model)
    updates = execute_alphaedit(model, tok, requests, hparams,
                                context_templates=kwargs.get("context_templates"))
    weights_copy = {}
    for name, upd in updates.items():
        w = _c.edited_weight(model, hparams, upd.layer)
        before = _signature(w)
        weights_copy.update(apply_updates(model, hparams, {name: upd}, return_orig_weights))
        _HISTORY.setdefault(model, {}).setdefault(name, []).append(
            _Record(before, _signature(w), upd.keys.detach().double().cpu()))
    return model, weights_copy
