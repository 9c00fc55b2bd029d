"""The binding to whichever EasyEdit is installed: import, detection, registration, editor hooks.

Works with the PyPI release (`easyeditor==0.0.1.dev0`, which needs the shims of
`legacy_shims.py`) and with upstream checkouts (where detection finds nothing to shim).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import inspect
import os
import sys
import types
from typing import Callable, Iterator

from .legacy_shims import (DeviceLiteralShims, cache_kwarg_rewrite, import_with_optional_stubs,
                           layer_output_tuple_rewrite, memit_post_norm_rewrite, rank_one_dtype_rewrite)

_SHIM_PREFIXES = ("easyeditor.editors", "easyeditor.evaluate", "easyeditor.models.rome",
                  "easyeditor.models.memit", "easyeditor.util")
_state: dict = {}


def easyeditor():
    """The installed `easyeditor` package (imported once, with optional packages stubbed)."""
    if "module" not in _state:
        _state["module"] = import_with_optional_stubs("easyeditor")
        rewrites = [layer_output_tuple_rewrite(),  # None where decoder layers return tuples
                    rank_one_dtype_rewrite(),
                    memit_post_norm_rewrite(),
                    cache_kwarg_rewrite()]
        _state["shims"] = DeviceLiteralShims(_SHIM_PREFIXES,
                                             extra_rewrites=tuple(r for r in rewrites if r))
        _shim_alg_dict_entries(_state["shims"])
        _guard_statistics_entries()
    return _state["module"]


def _shim_alg_dict_entries(shims: DeviceLiteralShims) -> list[str]:
    """`ALG_DICT` holds the apply functions themselves, which the shims cannot swap (a dict value,
    not a module attribute): the editor's `self.apply_algo` and `installed_algorithm()` would run
    the unshimmed code (legacy MEMIT's `apply_memit_to_model` builds `f"cuda:{device}"` itself).
    Each entry that has a shimmed version becomes a thin wrapper running that version with the
    shims applied (`__rep_easyedit_original__` keeps the original, e.g. to find its module).
    Returns the names wrapped.
    """
    patched = {id(orig): p for _o, _a, orig, p in shims.replacements}
    patched_modules = {orig.__module__ for _o, _a, orig, _p in shims.replacements}
    wrapped = []
    for d in alg_dicts():
        for name, fn in list(d.items()):
            # an apply function that is itself unchanged still calls shimmed helpers of its module
            # (upstream's `apply_memit_to_model` -> the rewritten `execute_memit`)
            if id(fn) not in patched and getattr(fn, "__module__", None) not in patched_modules:
                continue

            def make(fn, shimmed):
                @functools.wraps(fn)
                def apply_with_shims(*args, **kwargs):
                    with shims_applied():
                        return shimmed(*args, **kwargs)
                apply_with_shims.__rep_easyedit_original__ = fn
                return apply_with_shims

            d[name] = make(fn, patched.get(id(fn), fn))
            wrapped.append(name)
    return wrapped


# EasyEdit's own methods that read covariance statistics whatever `mom2_adjustment` says
_ALWAYS_READ_STATISTICS = ("MEMIT", "PMET", "AlphaEdit")


def _easyedit_can_build_statistics() -> bool:
    """EasyEdit builds missing statistics itself by downloading Wikipedia through `datasets`: only
    where that package is installed and the Hugging Face hub is not switched off."""
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_DATASETS_OFFLINE",
                                                                           "HF_HUB_OFFLINE")):
        return False
    try:
        return importlib.util.find_spec("datasets") is not None
    except (ImportError, ValueError):
        return False


def _guard_statistics_entries() -> list[str]:
    """EasyEdit's own ROME (with `mom2_adjustment`) and MEMIT-family methods load covariance
    statistics mid-edit, and where the file is missing try to build it from Wikipedia. Without
    `datasets` (or offline) that fails deep inside `layer_stats` with an error about an optional
    package. Each such entry of `ALG_DICT` checks first and raises `MissingCovarianceError`, which
    names the files and the offline command, before anything is computed or written. Our own
    backends check for themselves. Returns the names guarded."""
    guarded = []
    for d in alg_dicts():
        for name, fn in list(d.items()):
            original = getattr(fn, "__rep_easyedit_original__", fn)
            if getattr(fn, "__rep_easyedit_statistics_guard__", False) or not inspect.isfunction(original) \
                    or not str(getattr(original, "__module__", "")).startswith("easyeditor"):
                continue

            def make(name, fn, original):
                @functools.wraps(fn)
                def apply_with_statistics_check(model, tok, requests, hparams, *args, **kwargs):
                    reads = name in _ALWAYS_READ_STATISTICS or bool(getattr(hparams, "mom2_adjustment", False))
                    if reads and not _easyedit_can_build_statistics():
                        from ..covariance import require_stats

                        require_stats(model, hparams, getattr(hparams, "layers", None) or [])
                    return fn(model, tok, requests, hparams, *args, **kwargs)
                apply_with_statistics_check.__rep_easyedit_original__ = original
                apply_with_statistics_check.__rep_easyedit_statistics_guard__ = True
                return apply_with_statistics_check

            d[name] = make(name, fn, original)
            guarded.append(name)
    return guarded


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


def shimmed_functions() -> dict[str, tuple[str, ...]]:
    """`module.qualname` -> the rewrites its shim applies ("cuda_literal", "layer_output_tuple")."""
    out = {}
    for _owner, _attr, orig, patched in device_shims().replacements:
        out[f"{orig.__module__}.{orig.__qualname__}"] = getattr(patched, "__rep_easyedit_rewrites__", ())
    return out


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
    from ..model_loading import is_bundled

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
                from ..model_loading import load_model_and_tokenizer

                model, tok = load_model_and_tokenizer(
                    name, device=getattr(hparams, "device", "cpu"))
                proxy = copy.copy(hparams)
                proxy.model_name = (model, tok)
                original_init(self, proxy, *args, **kwargs)
                self.model_name = name
                self.hparams = hparams
            else:
                original_init(self, hparams, *args, **kwargs)
                _right_padding_for_rep(self, hparams)

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
    else:
        # upstream: a module-level function the editor's module imports from `editors.utils`
        module = sys.modules.get(cls.__module__)
        prepare = getattr(module, "_prepare_requests", None)
        if isinstance(prepare, types.FunctionType):
            module._prepare_requests = _with_rep_fields(prepare, method=False)
    patch_batchable()
    cls.__rep_easyedit_patched__ = True


def _right_padding_for_rep(editor, hparams) -> None:
    """EasyEdit keeps right padding only for the names it lists (ROME, MEMIT, R-ROME, EMMET ...);
    a model it loaded for a `REP-*` name gets left padding. REP's backends are on that list, and
    REP evaluates as they do: right padding. A `(model, tokenizer)` pair is left as given."""
    tok = getattr(editor, "tok", None)
    if str(getattr(hparams, "alg_name", "")).startswith("REP-") and hasattr(tok, "padding_side") \
            and isinstance(getattr(hparams, "model_name", None), str):
        tok.padding_side = "right"


# per-request inputs REP reads that old editors drop from `edit(**kwargs)`
REQUEST_FIELDS = ("subject_rephrase", "rephrase_subjects", "case_id")


def _with_rep_fields(prepare, method: bool = True):
    """Wrap a `_prepare_requests`: the editor's method (legacy) or a plain function (upstream)."""
    if method:
        @functools.wraps(prepare)
        def _prepare_requests(self, prompts, *args, **kwargs):
            return _add_rep_fields(prepare(self, prompts, *args, **kwargs), kwargs)
    else:
        @functools.wraps(prepare)
        def _prepare_requests(prompts, *args, **kwargs):
            return _add_rep_fields(prepare(prompts, *args, **kwargs), kwargs)
    return _prepare_requests


def _add_rep_fields(requests, kwargs):
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


# -- batch editing ------------------------------------------------------------------------------

# methods that take several requests per `apply_X_to_model` call; the editor's own list decides
# for everything else
BATCHABLE_NAMES = ("REP-MEMIT", "REP-EMMET", "EMMET", "REP-AlphaEdit", "AlphaEdit")


def _batch_editor_class():
    import importlib

    easyeditor()
    for name in ("easyeditor.editors.batch_editor", "easyeditor.editors.editor"):
        try:
            cls = getattr(importlib.import_module(name), "BatchEditor", None)
        except ImportError:
            continue
        if cls is not None and callable(getattr(cls, "is_batchable_method", None)):
            return cls
    return None


def patch_batchable() -> list[str]:
    """Let `BaseEditor.batch_edit` accept REP-MEMIT, REP-EMMET (and EMMET where it is ours).

    EasyEdit decides batchability by name (`BatchEditor.is_batchable_method`, a staticmethod of
    an Enum in both the PyPI release and upstream). Detected: only the names the installed check
    rejects are added (an upstream EMMET that is already batchable is left to it); the check is
    wrapped once (still a staticmethod) and answers as before for every other name. Names that
    are not registered still fail where the editor looks the algorithm up. Returns the names added.
    """
    cls = _batch_editor_class()
    if cls is None:
        return []
    raw = inspect.getattr_static(cls, "is_batchable_method")
    original = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
    if getattr(original, "__rep_easyedit_batchable__", None) is not None:
        return []
    check = getattr(cls, "is_batchable_method")
    added = tuple(n for n in BATCHABLE_NAMES if not check(n))
    if not added:
        return []

    @functools.wraps(original)
    def is_batchable_method(alg_name, *args, **kwargs):
        return alg_name in added or check(alg_name, *args, **kwargs)

    is_batchable_method.__rep_easyedit_batchable__ = added
    # Enum classes refuse new members but accept plain attributes; a staticmethod keeps the
    # `BatchEditor.is_batchable_method(name)` call shape (`check` is already bound if need be)
    setattr(cls, "is_batchable_method", staticmethod(is_batchable_method))
    return list(added)
