"""The binding to whichever EasyEdit is installed: import, detection, registration, editor hooks.

Works with the PyPI release (`easyeditor==0.0.1.dev0`, which needs the shims of
`legacy_shims.py`) and with upstream checkouts (where detection finds nothing to shim).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import os
from typing import Callable, Iterator

from .legacy_shims import DeviceLiteralShims, import_with_optional_stubs

_SHIM_PREFIXES = ("easyeditor.editors", "easyeditor.evaluate", "easyeditor.models.rome",
                  "easyeditor.models.memit", "easyeditor.util")
_state: dict = {}


def easyeditor():
    """The installed `easyeditor` package (imported once, with optional packages stubbed)."""
    if "module" not in _state:
        _state["module"] = import_with_optional_stubs("easyeditor")
        _state["shims"] = DeviceLiteralShims(_SHIM_PREFIXES)
    return _state["module"]


def device_shims() -> DeviceLiteralShims:
    easyeditor()
    return _state["shims"]


@contextlib.contextmanager
def shims_applied() -> Iterator[None]:
    """Old EasyEdit's hard-coded `cuda:{device}` functions, fixed for the block (no-op upstream)."""
    shims = device_shims()
    if not shims:
        yield
        return
    with shims.applied():
        yield


def alg_dicts() -> list[dict]:
    import importlib

    dicts = []
    for name in ("easyeditor.util.alg_dict", "easyeditor.editors.editor"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        d = getattr(mod, "ALG_DICT", None)
        if isinstance(d, dict) and all(d is not x for x in dicts):
            dicts.append(d)
    return dicts


def installed_algorithm(name: str) -> Callable | None:
    easyeditor()
    for d in alg_dicts():
        if name in d:
            return d[name]
    return None


def register_algorithm(name: str, apply_fn: Callable, overwrite: bool = True) -> None:
    easyeditor()
    for d in alg_dicts():
        if overwrite or name not in d:
            d[name] = apply_fn


def editor_class():
    return easyeditor().BaseEditor


def editor_uses_sequential_flag() -> bool:
    """Upstream `edit(..., sequential_edit=)` restores unless sequential; legacy uses keep_original_weight."""
    return "sequential_edit" in inspect.signature(editor_class().edit).parameters


# -- editor hooks ---------------------------------------------------------------------------

_ENTRY_POINTS = ("edit", "batch_edit", "edit_dataset", "edit_requests")


def _loads_itself(model_name) -> bool:
    from ..models import is_bundled

    return isinstance(model_name, str) and (is_bundled(model_name) or os.path.isdir(os.path.expanduser(model_name)))


def patch_editor() -> None:
    """Wrap `BaseEditor` once: load local/bundled models with Auto classes, apply device shims.

    EasyEdit picks a loader by substring of the model name (a local path must contain `llama` ...)
    and, in old releases, a LlamaTokenizer that mis-tokenises GPT-2-style BPE. For the bundled model
    and any local directory we load `AutoModelForCausalLM` + `AutoTokenizer` (right padding) and
    hand EasyEdit the `(model, tokenizer)` pair it accepts, keeping `model_name` a string for its
    evaluation code. Hub names are left to EasyEdit.
    """
    cls = editor_class()
    if getattr(cls, "__rep_easyedit_patched__", False):
        return
    shims = device_shims()
    patched_by_name = {(o, a): p for o, a, _f, p in shims.replacements if o is cls}
    # entry points are wrapped permanently (the shim must be active before the method runs)
    shims.replacements = [r for r in shims.replacements if r[0] is not cls]

    original_init = patched_by_name.get((cls, "__init__"), cls.__init__)

    @functools.wraps(cls.__init__)
    def __init__(self, hparams, *args, **kwargs):
        with shims_applied():
            name = getattr(hparams, "model_name", None)
            if _loads_itself(name):
                from ..models import load_model_and_tokenizer

                model, tok = load_model_and_tokenizer(
                    name, device=getattr(hparams, "device", "cpu"))
                proxy = copy.copy(hparams)
                proxy.model_name = (model, tok)
                original_init(self, proxy, *args, **kwargs)
                self.model_name = name
                self.hparams = hparams
            else:
                original_init(self, hparams, *args, **kwargs)

    cls.__init__ = __init__
    for method_name in _ENTRY_POINTS:
        if method_name not in vars(cls):
            continue
        target = patched_by_name.get((cls, method_name), vars(cls)[method_name])

        def make(target):
            @functools.wraps(target)
            def entry(self, *args, **kwargs):
                with shims_applied():
                    return target(self, *args, **kwargs)
            return entry

        setattr(cls, method_name, make(target))
    if "_prepare_requests" in vars(cls):
        cls._prepare_requests = _with_rep_fields(vars(cls)["_prepare_requests"])
    cls.__rep_easyedit_patched__ = True


# per-request inputs REP reads that old editors drop from `edit(**kwargs)`
REQUEST_FIELDS = ("subject_rephrase", "rephrase_subjects", "case_id")


def _with_rep_fields(prepare):
    @functools.wraps(prepare)
    def _prepare_requests(self, prompts, *args, **kwargs):
        requests = prepare(self, prompts, *args, **kwargs)
        for key in REQUEST_FIELDS:
            values = kwargs.get(key)
            if values is None:
                continue
            if len(requests) == 1 and (isinstance(values, (str, int)) or
                                       (key != "case_id" and values and isinstance(values[0], str))):
                values = [values]
            if len(values) != len(requests):
                raise ValueError(f"`{key}` has {len(values)} entries for {len(requests)} prompts; "
                                 f"give one per prompt")
            for request, value in zip(requests, values):
                request.setdefault(key, value)
        return requests
    return _prepare_requests
