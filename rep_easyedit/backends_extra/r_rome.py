"""R-ROME for EasyEdit builds that lack it, written from the paper.

Gupta, Baskaran, Anumanchipalli (2024), "Rebuilding ROME: Resolving Model Collapse during
Sequential Model Editing". ROME inserts a key-value pair into the down-projection `W` of one MLP
with the rank-one update

    W' = W + (v* - W k) (C^-1 k*)^T / ((C^-1 k*)^T k)

where `k*` is the subject's last-token key averaged over random-prefix context templates and `C`
the key second moment. ROME's released code mixes two keys: `k*` in the numerator but the key of
the unprefixed prompt `k_p` in the denominator and in the residual (`v* - W k_p`). The paper shows
that this asymmetry is what makes sequential ROME collapse and fixes it by using the same key
everywhere:

    W' = W + (v* - W k*) (C^-1 k*)^T / (k*^T C^-1 k*)            (R-ROME)

so that `W' k* = v*` exactly. With `mom2_adjustment: false`, `C = I`.

Building blocks reused from the installed EasyEdit (looked up at call time, so the device shims
of `rep_easyedit.compat` apply): ROME's `repr_tools` for keys, ROME's `compute_v` for the value
optimisation and `get_module_input_output_at_word` for the prompt key, ROME's `layer_stats` for the
covariance and ROME's `get_context_templates` for the random prefixes. Nothing here is copied from
upstream EasyEdit; the update is computed from the equation above.

The value `v*` is ROME's: the output of the down-projection at the subject's last token of the
unprefixed prompt plus the shift `delta` that ROME's optimisation finds. `compute_v` returns
`(v* - W k_p) / (k_p . left)`; we pass `left = k_p / |k_p|^2` and recover `v*` from it.

The helpers it shares with EMMET are in `common.py`.
"""

from __future__ import annotations

import copy as _copy
import logging
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from .common import (LocateEditHyperParams, add_update, as_request_list, average_key, edited_weight, flat_templates,
                     get_context_templates, legacy_context, linalg_dtype, load_hparams_yaml,
                     normalise_request, rome_value, second_moment, weights_put_back)

LOG = logging.getLogger(__name__)

ALG_NAME = "R-ROME"


@dataclass(kw_only=True)
class R_ROMEHyperParams(LocateEditHyperParams):
    """Field names as in upstream EasyEdit's `R_ROMEHyperParams` (ROME's fields + R-ROME's flags)."""

    context_template_length_params: List[List[int]]

    # which key enters the update (upstream's flags):
    # the prompt's own key only, in the numerator, the denominator and the residual
    enable_prompt_keys: bool = False
    # the key averaged over the random-prefix templates (with the plain prompt), everywhere (R-ROME)
    enable_random_prefix_keys: bool = True
    # ROME's released mix (averaged key in C^-1 k*, prompt key in the denominator and residual);
    # overrides the two flags above
    original_implementation: bool = False

    @classmethod
    def from_hparams(cls, hparams_name_or_path) -> "R_ROMEHyperParams":
        return load_hparams_yaml(cls, hparams_name_or_path, ALG_NAME)



# ---------------------------------------------------------------------------------------------
# R-ROME


def r_rome_update(residual: torch.Tensor, num_key: torch.Tensor, den_key: torch.Tensor,
                  mom2: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Δ = r (C⁻¹k_n)ᵀ / ((C⁻¹k_n)ᵀ k_d) with C = mom2 (or I). Returns (Δ (out, in), C⁻¹k_n)."""
    dt = residual.dtype
    k_n = num_key.to(dt)
    if mom2 is not None:
        u = torch.linalg.solve(mom2.to(device=k_n.device, dtype=dt), k_n)
    else:
        u = k_n
    denom = torch.dot(u, den_key.to(dt))
    if not torch.isfinite(denom) or denom.abs() <= torch.finfo(dt).tiny * 1e3:
        raise FloatingPointError(f"R-ROME denominator (C^-1 k)^T k is {denom.item():.3e}; "
                                 "the key is degenerate")
    return torch.outer(residual, u) / denom, u


@dataclass
class RROMEUpdate:
    layer: int
    weight_name: str
    key: torch.Tensor          # the key in the update (k*, or k_p with enable_prompt_keys)
    value: torch.Tensor        # v*
    prompt_key: torch.Tensor   # k_p
    left: torch.Tensor         # C⁻¹ key (the row space of Δ)
    delta: torch.Tensor        # (out, in), float64/float32 on the weight's device


def _check_key_flags(hparams) -> str:
    if getattr(hparams, "original_implementation", False):
        return "original"
    prompt = bool(getattr(hparams, "enable_prompt_keys", False))
    prefix = bool(getattr(hparams, "enable_random_prefix_keys", True))
    if prompt == prefix:
        raise ValueError("R-ROME: set exactly one of enable_prompt_keys / enable_random_prefix_keys "
                         f"(got {prompt} / {prefix}), or original_implementation: true")
    return "prompt" if prompt else "random_prefix"


def execute_r_rome(model, tok, request: dict, hparams, context_templates=None) -> Dict[str, RROMEUpdate]:
    """Compute the R-ROME update(s) for one request; the model is left unchanged.

    With several layers they are edited in order (each update computed with the earlier ones in
    place, as ROME does) and all restored before returning.
    """
    mode = _check_key_flags(hparams)
    request = normalise_request(request)
    if context_templates is None:
        context_templates = get_context_templates(model, tok, hparams.context_template_length_params)
    templates = flat_templates(context_templates)

    updates: Dict[str, RROMEUpdate] = {}
    with weights_put_back() as originals, legacy_context(tok):
        for layer in sorted(hparams.layers):
            w = edited_weight(model, hparams, layer)
            originals.remember(w)
            k_avg = average_key(model, tok, request, hparams, layer, templates)
            mom2 = second_moment(model, tok, hparams, layer) if hparams.mom2_adjustment else None
            dev = w.param.device
            dt = linalg_dtype(dev)

            def direction(k_p, k_avg=k_avg, mom2=mom2):  # the row direction of Δ below: C⁻¹k_n
                num = (k_p if mode == "prompt" else k_avg).to(device=dev, dtype=dt)
                return num if mom2 is None else torch.linalg.solve(mom2.to(device=dev, dtype=dt), num)

            v_star, k_p, out_p = rome_value(model, tok, request, hparams, layer, templates, direction)
            k_avg, k_p, v_star, out_p = (x.to(device=dev, dtype=dt) for x in (k_avg, k_p, v_star, out_p))
            if mode == "random_prefix":      # R-ROME: k* everywhere
                num, den, base, key = k_avg, k_avg, w.output(k_avg), k_avg
            elif mode == "prompt":           # the prompt's key everywhere
                num, den, base, key = k_p, k_p, out_p, k_p
            else:                            # ROME's released mix
                num, den, base, key = k_avg, k_p, out_p, k_avg
            delta, left = r_rome_update(v_star - base, num, den, mom2)
            LOG.info("R-ROME layer %d (%s keys): |v*-Wk|=%.4g |delta|=%.4g", layer, mode,
                     (v_star - base).norm().item(), delta.norm().item())
            add_update(w, delta)
            updates[w.name] = RROMEUpdate(layer, w.name, key, v_star, k_p, left, delta)
    return updates


def apply_r_rome_to_model(model, tok, requests, hparams, copy=False, return_orig_weights=False,
                          keep_original_weight=False, **kwargs):
    """EasyEdit's contract: returns (model, weights_copy).

    One request per call (R-ROME is a rank-one, single-fact edit). `weights_copy` maps each edited
    parameter name to its original value whenever `return_orig_weights` is true, so the editor can
    restore it (old EasyEdit's ROME dropped it unless `keep_original_weight`; upstream's EMMET too).
    Extra keyword: `context_templates` (list of "…{}" strings) overrides the random prefixes.
    """
    requests = as_request_list(requests)
    if len(requests) != 1:
        raise ValueError(f"R-ROME edits exactly one request per call; got {len(requests)}. "
                         "Call it once per request (sequential editing) or use EMMET for a batch.")
    if copy:
        model = _copy.deepcopy(model)
    updates = execute_r_rome(model, tok, requests[0], hparams,
                             context_templates=kwargs.get("context_templates"))
    weights_copy = {}
    for name, upd in updates.items():
        w = edited_weight(model, hparams, upd.layer)
        if return_orig_weights and name not in weights_copy:
            weights_copy[name] = w.param.detach().clone()
        add_update(w, upd.delta)
    return model, weights_copy
