"""Building blocks the R-ROME and EMMET backends share: hparams files, access to the installed
EasyEdit, requests, ROME's keys and values, the key second moment, and weight updates.

Looked up at call time from the installed EasyEdit (so the device shims of `rep_easyedit.compat`
apply): ROME's `repr_tools` for keys, ROME's `compute_v` for the value, ROME's `layer_stats` for
the covariance and ROME's `get_context_templates` for the random prefixes.
"""

from __future__ import annotations

import contextlib
import copy as _copy
import dataclasses
import importlib
import logging
import re
import typing
import weakref
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence

import torch

LOG = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# hparams


_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce_numbers(cls, config: dict) -> dict:
    """Quoted numbers (`"5e-1"`, `"1e5"`) and ints given for float fields become the field's
    declared type (the YAML reader already reads an unquoted `5e-1` as a float)."""
    hints = typing.get_type_hints(cls)
    out = dict(config)
    for key, value in config.items():
        tp = hints.get(key)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            if tp is float:
                out[key] = float(value)
            elif tp is int and float(value).is_integer():
                out[key] = int(float(value))
        elif tp is float and isinstance(value, int) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def load_hparams_yaml(cls, path, alg_name: str):
    """Read an EasyEdit hparams YAML into dataclass `cls`, with errors that name the problem."""
    from ..hparams import read_hparams_file

    path, config = read_hparams_file(path)
    if config.get("alg_name") != alg_name:
        raise ValueError(f"{cls.__name__} cannot load {path}: alg_name is "
                         f"{config.get('alg_name')!r}, expected {alg_name!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - names)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown} for {cls.__name__}; "
                         f"valid keys: {sorted(names)}")
    required = sorted(f.name for f in dataclasses.fields(cls)
                      if f.default is dataclasses.MISSING
                      and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
                      and f.name not in config)
    if required:
        raise ValueError(f"{path}: required key(s) {required} missing for {cls.__name__}")
    return cls(**_coerce_numbers(cls, config))


@dataclass(kw_only=True)
class LocateEditHyperParams:
    """The fields upstream EasyEdit's R-ROME, EMMET and AlphaEdit hparams share (ROME's)."""

    # Method
    layers: List[int]
    fact_token: str
    v_num_grad_steps: int
    v_lr: float
    v_loss_layer: int
    v_weight_decay: float
    clamp_norm_factor: float
    kl_factor: float
    mom2_adjustment: bool

    # Module templates
    rewrite_module_tmp: str
    layer_module_tmp: str
    mlp_module_tmp: str
    attn_module_tmp: str
    ln_f_module: str
    lm_head_module: str

    # Statistics
    mom2_dataset: str
    mom2_n_samples: int
    mom2_dtype: str
    alg_name: str
    device: Any
    model_name: Any
    stats_dir: str

    max_length: int = 40
    model_parallel: bool = False
    fp16: bool = False


# ---------------------------------------------------------------------------------------------
# access to the installed EasyEdit (looked up at call time: the device shims replace functions
# inside their modules only while `shims_applied()` is active)


def easyedit_module(name: str):
    from ..compat.easyedit import easyeditor

    easyeditor()
    return importlib.import_module(f"easyeditor.{name}")


@contextlib.contextmanager
def legacy_context(tok) -> Iterator[None]:
    """Device shims for old EasyEdit + right padding (ROME's value/key code assumes it)."""
    from ..compat.easyedit import shims_applied

    from ..core.devices import padding_side

    if getattr(tok, "pad_token", None) is None and getattr(tok, "eos_token", None) is not None:
        LOG.warning("tokenizer has no pad token; using eos as pad for the edit")
        tok.pad_token = tok.eos_token
    with padding_side(tok, "right"), shims_applied():
        yield


def get_context_templates(model, tok, length_params) -> List[str]:
    """ROME's random-prefix templates (first is "{}"), from the installed ROME (and its cache)."""
    from ..compat.easyedit import shims_applied

    rome_main = easyedit_module("models.rome.rome_main")
    with shims_applied():
        return list(rome_main.get_context_templates(model, tok, length_params))


# ---------------------------------------------------------------------------------------------
# requests, keys, values


def normalise_request(request: dict) -> dict:
    """EasyEdit's request conventions: `prompt` with a "{}" subject slot, `target_new` with a space."""
    if not isinstance(request, dict):
        raise TypeError(f"a request must be a dict, got {type(request).__name__}")
    missing = [k for k in ("prompt", "subject", "target_new") if k not in request]
    if missing:
        raise ValueError(f"request is missing {missing}: {request!r}")
    req = _copy.deepcopy(request)
    target = req["target_new"]
    if isinstance(target, dict):  # CounterFact style {"str": ...}
        target = target["str"]
    if not target.startswith(" "):
        target = " " + target
    req["target_new"] = target
    if "{}" not in req["prompt"]:
        if req["subject"] not in req["prompt"]:
            raise ValueError(f"subject {req['subject']!r} does not occur in prompt {req['prompt']!r}")
        req["prompt"] = req["prompt"].replace(req["subject"], "{}", 1)
    if req["prompt"].count("{}") != 1:
        raise ValueError(f"prompt must have exactly one subject slot: {req['prompt']!r}")
    return req


def template_groups(templates) -> List[List[str]]:
    """A flat list of templates is one group; MEMIT-style nested lists are kept as groups."""
    templates = list(templates)
    if templates and all(isinstance(t, str) for t in templates):
        groups = [templates]
    else:
        groups = [[t] if isinstance(t, str) else list(t) for t in templates]
    for group in groups:
        for t in group:
            if t.count("{}") != 1:
                raise ValueError(f"context template must contain exactly one '{{}}': {t!r}")
    if not groups or not groups[0]:
        raise ValueError("no context templates")
    return groups


def flat_templates(templates) -> List[str]:
    flat = [t for group in template_groups(templates) for t in group]
    if flat[0] != "{}":  # compute_v records the unprefixed value from the first template
        flat = ["{}"] + [t for t in flat if t != "{}"]
    return flat


def reprs_at_fact_token(model, tok, templates: Sequence[str], subjects: Sequence[str], layer: int,
                        module_template: str, fact_token: str, track: str = "in") -> torch.Tensor:
    """Input (or output) of `module_template.format(layer)` at the fact token of each text.

    `templates[i]` has one "{}" for `subjects[i]`. Uses ROME's `repr_tools`. Returns (n, dim).
    """
    repr_tools = easyedit_module("models.rome.repr_tools")
    if fact_token.startswith("subject_"):
        return repr_tools.get_reprs_at_word_tokens(
            model=model, tok=tok, context_templates=list(templates), words=list(subjects),
            layer=layer, module_template=module_template, subtoken=fact_token[len("subject_"):],
            track=track)
    if fact_token == "last":
        texts = [t.format(s) for t, s in zip(templates, subjects)]
        # the last real token (ROME's idx -1 would be a pad token under right padding)
        idxs = [[len(tok.encode(text)) - 1] for text in texts]
        return repr_tools.get_reprs_at_idxs(
            model=model, tok=tok, contexts=texts, idxs=idxs, layer=layer,
            module_template=module_template, track=track)
    raise ValueError(f"fact_token={fact_token!r} not recognised (use 'last' or 'subject_<first|last|"
                     f"first_after_last>')")


def average_key(model, tok, request: dict, hparams, layer: int, templates) -> torch.Tensor:
    """k*: the down-projection input at the fact token, averaged over the context templates.

    Flat templates: the plain mean (ROME). Grouped templates (MEMIT/EMMET): mean within each
    group, then over groups. Returned in float32.
    """
    groups = template_groups(templates)
    flat = [t.format(request["prompt"]) for g in groups for t in g]
    keys = reprs_at_fact_token(model, tok, flat, [request["subject"]] * len(flat), layer,
                               hparams.rewrite_module_tmp, hparams.fact_token, "in").float()
    means, start = [], 0
    for g in groups:
        means.append(keys[start:start + len(g)].mean(0))
        start += len(g)
    return torch.stack(means).mean(0)


def prompt_key_and_output(model, tok, request: dict, hparams, layer: int):
    """(k_p, W k_p + b): the down-projection's input and output at the unprefixed prompt."""
    compute_v_mod = easyedit_module("models.rome.compute_v")
    k_p, out_p = compute_v_mod.get_module_input_output_at_word(
        model, tok, layer, context_template=request["prompt"], word=request["subject"],
        module_template=hparams.rewrite_module_tmp, fact_token_strategy=hparams.fact_token)
    return k_p, out_p


def rome_value(model, tok, request: dict, hparams, layer: int, templates,
               direction: Optional[typing.Callable[[torch.Tensor], torch.Tensor]] = None):
    """ROME's value optimisation (installed `compute_v`); returns (v*, k_p, W k_p + b), float32.

    `v* = W k_p + b + delta`, the down-projection output at the unprefixed prompt plus the shift
    the optimisation found (added at the MLP output at the fact token of every template).

    `direction(k_p)`: the row direction of the backend's update (C⁻¹k for R-ROME and EMMET with
    covariance), asked for only when the installed `compute_v` reads its left vector beyond the
    division (`uses_update_direction`: the variant-aware fit, whose anchors take the update's
    share uᵀk / uᵀk_p). Without it the left vector is along k_p, exact when C = I.
    """
    compute_v_mod = easyedit_module("models.rome.compute_v")
    k_p, out_p = prompt_key_and_output(model, tok, request, hparams, layer)
    d = k_p.float()
    if direction is not None and getattr(compute_v_mod.compute_v, "uses_update_direction", False):
        d = direction(k_p).float().to(d.device)
    # normalised so that compute_v's division factor k_pᵀ left is (numerically) 1
    left = (d / d.dot(k_p.float())).to(k_p.dtype)
    right = compute_v_mod.compute_v(model, tok, request, hparams, layer, left,
                                    flat_templates(templates))
    factor = torch.dot(k_p, left).float()
    v_star = right.float() * factor + out_p.float()
    return v_star.detach(), k_p.float().detach(), out_p.float().detach()


# ---------------------------------------------------------------------------------------------
# covariance (key second moment E[k k^T]), cached per model object


_MOM2_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _mom2_key(hparams, layer_name: str):
    return (layer_name, str(hparams.mom2_dataset), int(hparams.mom2_n_samples), str(hparams.mom2_dtype),
            str(hparams.stats_dir))


def seed_second_moment(model, hparams, layer: int, mom2: torch.Tensor) -> None:
    """Give the backends a key second moment for `layer` of `model` (skips `layer_stats`)."""
    layer_name = hparams.rewrite_module_tmp.format(layer)
    _MOM2_CACHE.setdefault(model, {})[_mom2_key(hparams, layer_name)] = mom2.detach().float().cpu()


def seeded_second_moment(model, hparams, layer: int) -> Optional[torch.Tensor]:
    """The second moment given by `seed_second_moment` (or computed before), else None."""
    layer_name = hparams.rewrite_module_tmp.format(layer)
    return _MOM2_CACHE.get(model, {}).get(_mom2_key(hparams, layer_name))


def clear_second_moment_cache(model=None) -> None:
    if model is None:
        _MOM2_CACHE.clear()
    else:
        _MOM2_CACHE.pop(model, None)


def second_moment(model, tok, hparams, layer: int) -> torch.Tensor:
    """E[k kᵀ] of the down-projection input at `layer` (float32, CPU), via EasyEdit's `layer_stats`.

    The cache is keyed by the model object (not its name, unlike EasyEdit's module-level caches).
    """
    from ..compat.easyedit import shims_applied

    layer_name = hparams.rewrite_module_tmp.format(layer)
    per_model = _MOM2_CACHE.setdefault(model, {})
    key = _mom2_key(hparams, layer_name)
    if key not in per_model:
        layer_stats = easyedit_module("models.rome.layer_stats")
        with shims_applied():
            stat = layer_stats.layer_stats(
                model, tok, layer_name, hparams.stats_dir, hparams.mom2_dataset,
                to_collect=["mom2"], sample_size=hparams.mom2_n_samples,
                precision=hparams.mom2_dtype, hparams=hparams)
        per_model[key] = stat.mom2.moment().float().cpu()
    return per_model[key]


# ---------------------------------------------------------------------------------------------
# weights


@dataclass
class EditedWeight:
    name: str              # parameter name, e.g. model.layers.3.mlp.down_proj.weight
    param: torch.nn.Parameter
    bias: Optional[torch.Tensor]
    transposed: bool       # stored as (in, out) (GPT-2's Conv1D) instead of (out, in)

    def out_in(self, dtype=torch.float32) -> torch.Tensor:
        w = self.param.detach().to(dtype)
        return w.T if self.transposed else w

    def output(self, keys: torch.Tensor) -> torch.Tensor:
        """W k + b for a key (dim,) or keys (dim, n), in the keys' dtype and device."""
        w = self.out_in(keys.dtype).to(keys.device)
        out = w @ keys
        if self.bias is not None:
            b = self.bias.detach().to(keys.dtype).to(keys.device)
            out = out + (b if keys.dim() == 1 else b[:, None])
        return out


def edited_weight(model, hparams, layer: int) -> EditedWeight:
    module_name = hparams.rewrite_module_tmp.format(layer)
    module = model.get_submodule(module_name)
    param = module.weight
    if isinstance(module, torch.nn.Linear):
        transposed = False
    elif type(module).__name__ == "Conv1D":
        transposed = True
    else:
        raise TypeError(f"{module_name} is a {type(module).__name__}; expected nn.Linear or Conv1D")
    bias = getattr(module, "bias", None)
    return EditedWeight(f"{module_name}.weight", param, bias, transposed)


class _Originals(dict):
    def remember(self, w: EditedWeight) -> None:
        self.setdefault(w.name, (w, w.param.detach().clone()))


@contextlib.contextmanager
def weights_put_back() -> Iterator[_Originals]:
    """A backend that edits as it goes (later layers see earlier updates) but must leave the
    model unchanged: every weight it `remember`s is written back on exit, error or not."""
    originals = _Originals()
    try:
        yield originals
    finally:
        with torch.no_grad():
            for w, orig in originals.values():
                w.param.copy_(orig)


def linalg_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it (CPU, CUDA), else float32 (MPS)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def add_update(w: EditedWeight, delta_out_in: torch.Tensor) -> None:
    """W += delta (given as (out, in), any float dtype), in the weight's dtype and device."""
    delta = delta_out_in.T if w.transposed else delta_out_in
    if tuple(delta.shape) != tuple(w.param.shape):
        raise ValueError(f"update of shape {tuple(delta.shape)} does not fit {w.name} "
                         f"{tuple(w.param.shape)}")
    with torch.no_grad():
        p = w.param
        p.copy_((p.float() + delta.to(device=p.device, dtype=torch.float32)).to(p.dtype))


def as_request_list(requests) -> List[dict]:
    if isinstance(requests, dict):
        return [requests]
    return list(requests)
