"""EMMET for EasyEdit builds that lack it, written from the paper.

Gupta, Sajnani, Anumanchipalli (2024), "A Unified Framework for Model Editing". The
preservation-memorisation objective with *equality* constraints for a batch of B edits:

    min_Ŵ ‖Ŵ K0 − W K0‖²   subject to   Ŵ K_E = V_E

(K0: keys to preserve, C0 = K0 K0ᵀ; K_E: d×B, one averaged key k* per edit; V_E: the values the
value optimisation finds). Its closed form is

    Δ = (V_E − W K_E) (K_Eᵀ C0⁻¹ K_E)⁻¹ K_Eᵀ C0⁻¹ .

As implemented here (with `R = V_E − W K_E − b`):

    Δ = R (λ I_B + K_Eᵀ C0⁻¹ K_E)⁻¹ (C0⁻¹ K_E)ᵀ ,       λ = emmet_lambda

i.e. λ is added to the diagonal of the B×B matrix `K_Eᵀ C0⁻¹ K_E` (as upstream EasyEdit does, to
counter an ill-conditioned batch); λ → 0 gives the exact constrained solution `W' K_E = V_E`
when the keys are linearly independent. If the B×B system is singular (λ = 0 and dependent
keys) the pseudo-inverse is used. Linear solves, no explicit inverse of C0.

    C0 = mom2_update_weight · E[k kᵀ] + update_norm_lambda · I     (mom2_adjustment: true)
    C0 = mom2_update_weight · I       + update_norm_lambda · I     (mom2_adjustment: false)

`update_norm_lambda` is the weight of a ‖Δ‖² penalty (min ‖ΔK0‖² + μ‖Δ‖² gives C0 + μI);
`mom2_update_weight` scales the preservation term (it only matters relative to λ and μ).

Keys, values and the residual of each layer (one layer: the value shift; several: MEMIT's spread
over layers) come from the batch edit EMMET shares with AlphaEdit, `layered.py`.
"""

from __future__ import annotations

import copy as _copy
import logging
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from . import common as _c
from .layered import (LayeredHyperParams, LayerUpdate, apply_updates, execute_layered,  # noqa: F401
                      get_context_templates)  # the backend module's templates, looked up by name

LOG = logging.getLogger(__name__)

ALG_NAME = "EMMET"


@dataclass(kw_only=True)
class EMMETHyperParams(LayeredHyperParams):
    """Field names as in upstream EasyEdit's `EMMETHyperParams`: MEMIT's (`LayeredHyperParams`) and these."""

    calculate_objective_value: bool = False
    update_norm_lambda: float = 0.0
    emmet_lambda: float = 0.1

    @classmethod
    def from_hparams(cls, hparams_name_or_path) -> "EMMETHyperParams":
        return _c.load_hparams_yaml(cls, hparams_name_or_path, ALG_NAME)


def emmet_update(residual: torch.Tensor, keys: torch.Tensor, c0: Optional[torch.Tensor],
                 emmet_lambda: float) -> torch.Tensor:
    """Δ = R (λI + Kᵀ C0⁻¹ K)⁻¹ (C0⁻¹ K)ᵀ.  residual (out, B), keys (in, B), c0 (in, in) or None (= I)."""
    dt = residual.dtype
    keys = keys.to(dt)
    cinv_k = keys if c0 is None else torch.linalg.solve(c0.to(device=keys.device, dtype=dt), keys)
    gram = keys.T @ cinv_k
    gram = (gram + gram.T) / 2
    m = gram + emmet_lambda * torch.eye(gram.shape[0], dtype=dt, device=gram.device)
    try:
        x = torch.linalg.solve(m, cinv_k.T)                       # (B, in)
    except RuntimeError:  # torch.linalg.LinAlgError: singular batch system
        LOG.warning("EMMET: K_E^T C0^-1 K_E + lambda I is singular; using the pseudo-inverse")
        x = torch.linalg.pinv(m) @ cinv_k.T
    return residual @ x


def preservation_matrix(model, tok, hparams, layer: int, dim: int, device, dtype) -> Optional[torch.Tensor]:
    """C0 of the module docstring; None when it is exactly the identity."""
    w_mom2 = float(hparams.mom2_update_weight)
    mu = float(getattr(hparams, "update_norm_lambda", 0.0) or 0.0)
    eye = torch.eye(dim, dtype=dtype, device=device)
    if hparams.mom2_adjustment:
        c0 = _c.second_moment(model, tok, hparams, layer).to(device=device, dtype=dtype) * w_mom2
        return c0 + mu * eye if mu else c0
    if w_mom2 + mu <= 0:
        raise ValueError("EMMET: with mom2_adjustment false, mom2_update_weight + update_norm_lambda "
                         "must be > 0")
    return None if w_mom2 + mu == 1.0 else (w_mom2 + mu) * eye


def execute_emmet(model, tok, requests, hparams, context_templates=None) -> Dict[str, LayerUpdate]:
    """Compute the EMMET update(s) for a batch of requests; the model is left unchanged."""
    lam = float(hparams.emmet_lambda)
    if lam < 0:
        raise ValueError(f"emmet_lambda must be >= 0, got {lam}")

    def rule(layer, w, keys, residual):
        dev, dt = keys.device, keys.dtype
        c0 = preservation_matrix(model, tok, hparams, layer, keys.shape[0], dev, dt)
        delta = emmet_update(residual, keys, c0, lam)
        objective = None
        if getattr(hparams, "calculate_objective_value", False):
            c = c0 if c0 is not None else torch.eye(keys.shape[0], dtype=dt, device=dev)
            objective = {
                "preservation": torch.sum((delta @ c) * delta).item(),   # tr(Δ C0 Δᵀ)
                "memorization": (residual - delta @ keys).norm().item(),  # ‖W'K_E − V_E‖
            }
            LOG.info("EMMET layer %d objective: %s", layer, objective)
        return delta, objective

    def value_direction(layer, key):  # a lone request's row direction in Δ: C0⁻¹k
        dt = _c.linalg_dtype(key.device)
        c0 = preservation_matrix(model, tok, hparams, layer, key.shape[0], key.device, dt)
        return key.to(dt) if c0 is None else torch.linalg.solve(c0, key.to(dt))

    return execute_layered(model, tok, requests, hparams, rule, ALG_NAME, context_templates,
                           value_direction)


def apply_emmet_to_model(model, tok, requests, hparams, copy=False, return_orig_weights=False,
                         keep_original_weight=False, **kwargs):
    """EasyEdit's contract: returns (model, weights_copy); a batch of requests per call.

    `weights_copy` holds the original value of every edited parameter whenever
    `return_orig_weights` is true (upstream's EMMET returns it only with `keep_original_weight`,
    so its edits are never undone by the editor). Extra keyword: `context_templates`.
    """
    if copy:
        model = _copy.deepcopy(model)
    updates = execute_emmet(model, tok, requests, hparams,
                            context_templates=kwargs.get("context_templates"))
    return model, apply_updates(model, hparams, updates, return_orig_weights)
