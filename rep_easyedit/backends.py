"""The locate-and-edit backends REP wraps, taken from the installed EasyEdit.

A backend is EasyEdit's own `apply_X_to_model`, its hparams dataclass and its context templates
(the random prefixes it averages k* over, which the adapter also trains on).
"""

from __future__ import annotations

import contextlib
import importlib
import weakref
from dataclasses import dataclass
from typing import Callable

from .compat.easyedit import easyeditor, installed_algorithm


class BackendUnavailable(LookupError):
    pass


@dataclass(frozen=True)
class Backend:
    name: str
    apply: Callable
    hparams_cls: type
    context_templates: Callable  # (model, tok, backend_hparams) -> groups of "{}" templates
    max_batch: int | None         # None: any number of requests per call


def _length_param_templates(alg: str):
    """ROME-style: `get_context_templates(model, tok, length_params)`; k* is their plain mean."""
    def templates(model, tok, hp):
        mod = importlib.import_module(_module_of(_apply_function(alg)))
        return [_flat(mod.get_context_templates(model, tok, hp.context_template_length_params))]
    return templates


def _grouped_templates(alg: str):
    """MEMIT-style: `get_context_templates(model, tok)`, grouped by length; k* is the mean of
    the group means (as MEMIT's compute_ks takes it)."""
    def templates(model, tok, hp):
        mod = importlib.import_module(_module_of(_apply_function(alg)))
        return [g if isinstance(g, list) else [g] for g in mod.get_context_templates(model, tok)]
    return templates


def _flat(templates) -> list[str]:
    return [t for group in templates for t in (group if isinstance(group, list) else [group])]


def _module_of(fn) -> str:
    return getattr(fn, "__rep_easyedit_original__", fn).__module__


# Backends REP runs on a given implementation even where the installed EasyEdit has its own
# (`prefer_implementation`; rep_easyedit's AlphaEdit, docs/design.md)
_PREFERRED: dict = {}


def prefer_implementation(alg: str, apply: Callable, hparams_cls: type) -> None:
    """REP-`alg` runs on this `apply`/hparams class, whatever the installed EasyEdit has."""
    _PREFERRED[alg] = (apply, hparams_cls)


def _apply_function(alg: str):
    preferred = _PREFERRED.get(alg)
    return preferred[0] if preferred is not None else installed_algorithm(alg)


def _hparams_class(alg: str, class_name: str):
    ee = easyeditor()
    cls = getattr(ee, class_name, None)
    if cls is None:
        mod = importlib.import_module(_module_of(installed_algorithm(alg)))
        pkg = importlib.import_module(mod.__name__.rsplit(".", 1)[0])
        cls = getattr(pkg, class_name, None)
    return cls


_SPECS = {
    "ROME": ("ROMEHyperParams", _length_param_templates("ROME"), 1),
    "R-ROME": ("R_ROMEHyperParams", _length_param_templates("R-ROME"), 1),
    "MEMIT": ("MEMITHyperParams", _grouped_templates("MEMIT"), None),
    "EMMET": ("EMMETHyperParams", _grouped_templates("EMMET"), None),
    "AlphaEdit": ("AlphaEditHyperParams", _grouped_templates("AlphaEdit"), None),
}


def get_backend(name: str) -> Backend:
    if name not in _SPECS:
        raise BackendUnavailable(f"no REP backend {name!r}; available: {sorted(_SPECS)}")
    class_name, templates, max_batch = _SPECS[name]
    preferred = _PREFERRED.get(name)
    if preferred is not None:
        return Backend(name, *preferred, templates, max_batch)
    apply = installed_algorithm(name)
    cls = _hparams_class(name, class_name) if apply is not None else None
    if apply is None or cls is None:
        raise BackendUnavailable(
            f"the installed EasyEdit has no {name} ({class_name}); install an EasyEdit that "
            f"provides it or pick another REP-<backend>")
    return Backend(name, apply, cls, templates, max_batch)


_TEMPLATE_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def templates_keyed_by_model(model, backend: Backend):
    """EasyEdit caches context templates in a module global shared by every model; key it by model.

    Inside the block the backend module sees the templates generated for this model (or none
    yet); on exit they are stored for this model and the global is put back.
    """
    mod = importlib.import_module(_module_of(backend.apply))
    if not hasattr(mod, "CONTEXT_TEMPLATES_CACHE"):
        yield
        return
    per_model = _TEMPLATE_CACHES.setdefault(model, {})
    saved = mod.CONTEXT_TEMPLATES_CACHE
    mod.CONTEXT_TEMPLATES_CACHE = per_model.get(mod.__name__)
    try:
        yield
    finally:
        if mod.CONTEXT_TEMPLATES_CACHE is not None:  # nested blocks must not clobber the outer's
            per_model[mod.__name__] = mod.CONTEXT_TEMPLATES_CACHE
        mod.CONTEXT_TEMPLATES_CACHE = saved
