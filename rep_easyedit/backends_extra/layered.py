"""The batch edit EMMET and AlphaEdit share: one value shift per request, spread over layers.

Both methods differ from MEMIT only in how a layer turns its keys `K` (in, B) and residual `R`
(out, B) into a weight change; everything else is this loop:

- the value optimisation of the installed ROME (`compute_v`) once per request at the last edited
  layer gives a shift `d` of the MLP output at the fact token;
- one layer: the residual is that shift, `R = D` (every context's output moves by `d`, hence so
  does their mean `W k*`);
- several layers: `z = h_L + d` at the last layer's output, and layer i (in order, earlier layers'
  updates in place) gets `R_i = (z − h_L^current) / (L − i)`, mapped through the layer's post-MLP
  norm where it has one (Gemma-2/3; `rep_easyedit.post_mlp_norm`).

Keys: MEMIT's `compute_ks` (the subject's last-token key averaged within each group of context
templates, then over groups), or ROME's `repr_tools` for `fact_token: last`. The model is left
unchanged: the caller applies the returned deltas.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from ..post_mlp_norm import mlp_residual
from . import common as _c

LOG = logging.getLogger(__name__)


@dataclass(kw_only=True)
class LayeredHyperParams(_c.LocateEditHyperParams):
    """The fields upstream EasyEdit's `EMMETHyperParams` and `AlphaEditHyperParams` share (MEMIT's)."""

    layer_selection: str          # "all" | "random" (upstream's field; every layer here is edited)
    mom2_update_weight: float
    batch_size: int = 1


@dataclass
class LayerUpdate:
    layer: int
    weight_name: str
    keys: torch.Tensor       # K_E (in, B)
    values: torch.Tensor     # V_E (out, B) = W K_E + b + R, with W before this layer's update
    residual: torch.Tensor   # R (out, B)
    delta: torch.Tensor      # (out, in)
    objective: Optional[dict] = None


# (layer, edited weight, keys (in, B), residual (out, B)) -> (delta (out, in), objective or None)
UpdateRule = Callable[[int, _c.EditedWeight, torch.Tensor, torch.Tensor], tuple]


def get_context_templates(model, tok) -> List[List[str]]:
    """MEMIT's grouped random-prefix templates ([["{}"], [five prefixes]]), from the installed MEMIT."""
    from ..compat.easyedit import shims_applied

    memit_main = _c.easyedit_module("models.memit.memit_main")
    with shims_applied():
        return [list(g) if not isinstance(g, str) else [g]
                for g in memit_main.get_context_templates(model, tok)]


def batch_keys(model, tok, requests: List[dict], hparams, layer: int, groups) -> torch.Tensor:
    """K_E as (in, B): MEMIT's compute_ks for subject_* fact tokens, ROME's repr_tools for 'last'."""
    if hparams.fact_token.startswith("subject_"):
        compute_ks = _c.easyedit_module("models.memit.compute_ks")
        ks = compute_ks.compute_ks(model, tok, requests, hparams, layer, groups)
        return ks.float().T
    return torch.stack([_c.average_key(model, tok, r, hparams, layer, groups) for r in requests], 1)


def _layer_outputs(model, tok, requests, hparams, layer: int) -> torch.Tensor:
    """Residual stream (decoder layer output) at each request's fact token, unprefixed: (hidden, B)."""
    out = _c.reprs_at_fact_token(model, tok, [r["prompt"] for r in requests],
                                 [r["subject"] for r in requests], layer,
                                 hparams.layer_module_tmp, hparams.fact_token, track="out")
    return out.float().T


def execute_layered(model, tok, requests, hparams, update_rule: UpdateRule, alg_name: str,
                    context_templates=None, value_direction=None) -> Dict[str, LayerUpdate]:
    """Compute each edited layer's update for a batch of requests; the model is left unchanged.

    `value_direction(layer, key)`: the row direction the update gives one request's key at the
    value's layer (EMMET: C0⁻¹k), for a value fit that reads it (`common.rome_value`)."""
    requests = [_c.normalise_request(r) for r in _c.as_request_list(requests)]
    if not requests:
        raise ValueError(f"{alg_name}: no requests")
    layers = list(hparams.layers)
    if not layers:
        raise ValueError(f"{alg_name}: hparams.layers is empty")
    if context_templates is None:
        context_templates = get_context_templates(model, tok)
    groups = _c.template_groups(context_templates)
    flat = _c.flat_templates(groups)

    updates: Dict[str, LayerUpdate] = {}
    with _c.weights_put_back() as originals, _c.legacy_context(tok):
        z_layer = layers[-1]
        # the value optimisation, once per request, at the last edited layer
        shifts = []
        for r in requests:
            direction = None
            if value_direction is not None:
                def direction(_k_p, r=r):
                    return value_direction(z_layer, batch_keys(model, tok, [r], hparams, z_layer, groups)[:, 0])
            v_star, _k_p, out_p = _c.rome_value(model, tok, r, hparams, z_layer, flat, direction)
            shifts.append(v_star - out_p)
        shifts = torch.stack(shifts, 1)                       # D: (out, B)
        z = _layer_outputs(model, tok, requests, hparams, z_layer) + shifts if len(layers) > 1 else None

        for i, layer in enumerate(layers):
            w = _c.edited_weight(model, hparams, layer)
            originals.remember(w)
            dev = w.param.device
            dt = _c.linalg_dtype(dev)
            keys = batch_keys(model, tok, requests, hparams, layer, groups).to(device=dev, dtype=dt)
            if len(layers) == 1:
                residual = shifts.to(device=dev, dtype=dt)
            else:
                cur = _layer_outputs(model, tok, requests, hparams, z_layer)
                share = ((z - cur) / (len(layers) - i)).to(device=dev, dtype=dt)
                residual = mlp_residual(model, hparams, layer, keys, share)
            values = w.output(keys) + residual
            delta, objective = update_rule(layer, w, keys, residual)
            LOG.info("%s layer %d: %d edits, |R|=%.4g |delta|=%.4g", alg_name, layer,
                     keys.shape[1], residual.norm().item(), delta.norm().item())
            _c.add_update(w, delta)
            updates[w.name] = LayerUpdate(layer, w.name, keys, values, residual, delta, objective)
    return updates


def apply_updates(model, hparams, updates: Dict[str, LayerUpdate], return_orig_weights: bool) -> dict:
    """Add each update to its weight; the originals of the edited weights when asked."""
    weights_copy = {}
    for name, upd in updates.items():
        w = _c.edited_weight(model, hparams, upd.layer)
        if return_orig_weights and name not in weights_copy:
            weights_copy[name] = w.param.detach().clone()
        _c.add_update(w, upd.delta)
    return weights_copy
