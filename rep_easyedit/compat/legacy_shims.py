"""Every workaround for old EasyEdit builds (the PyPI release `easyeditor==0.0.1.dev0`), in one place.

Each shim is detected, not assumed: it is applied only where the installed EasyEdit shows the
problem (a missing optional package at import, a hard-coded ``f"cuda:{...}"`` in a function's
source, a decoder layer returning a tensor where the code indexes a tuple), and only for the
duration of the calls that need it. Nothing here touches torch globally.

- ``import_with_optional_stubs``: `import easyeditor` imports every sub-package (multimodal,
  trainers ...) and with them ~15 optional packages the editing path never uses. While that import
  runs, missing ones resolve to placeholder modules that raise a clear ImportError when used.
- ``device_literal_shims``: functions whose source builds ``f"cuda:{hparams.device}"`` are
  recompiled with that expression replaced by a resolver that gives ``cuda:N`` for an integer
  (the legacy behaviour, unchanged) and the device itself for ``"cpu"``, ``"cuda:1"``, ``"mps"``.
  The recompiled functions replace the originals only inside the context manager.
- ``layer_output_tuple_rewrite``: legacy MEMIT's ``compute_z`` reads and edits the hidden state of
  a decoder layer as ``cur_out[0]`` / ``tr[...].output[0]``; transformers 5 decoder layers return a
  tensor, so ``[0]`` picks the first sequence and the edit fails ("too many indices"). Where the
  installed transformers' decoder layer returns a tensor and a function's source has the pattern,
  the function is recompiled (together with its cuda-literal fix, by ``DeviceLiteralShims``) with
  ``x[0]`` replaced by ``_rep_easyedit_hidden(x)``: the tensor itself, or element 0 of a tuple, so
  the rewritten code is right for either kind of layer.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import re
import sys
import textwrap
import threading
import types
from typing import Iterator

# Optional third-party packages imported at module level by parts of EasyEdit the editing path
# does not use (multimodal editors, trainers, API editors, metrics we compute ourselves).
OPTIONAL_IMPORTS = (
    "higher", "timm", "torchvision", "iopath", "fairscale", "cv2", "openai", "peft",
    "sentence_transformers", "datasets", "nltk", "scipy", "sklearn", "seaborn", "pandas", "einops",
    "PIL", "knowledge_neurons", "zhipuai", "qwen_vl_utils", "decord", "av",
    "rouge",  # upstream EasyEdit's evaluate_uns / evaluate_cknowedit
)


class _Placeholder(type):
    """A class that stands for anything from a missing package: subclassable, never usable."""

    def __getattr__(cls, item):
        if item.startswith("__") and item.endswith("__"):
            raise AttributeError(item)
        return _placeholder(f"{cls.__qualname__}.{item}", cls._missing_package)

    def __getitem__(cls, item):  # type annotations such as `Optional[x]`
        return cls

    def __call__(cls, *args, **kwargs):
        # decorators applied at import time (`@x.register`) get their argument back
        if len(args) == 1 and callable(args[0]) and not kwargs and cls.__qualname__.count(".") >= 1:
            return args[0]
        raise ImportError(
            f"`{cls.__qualname__}` comes from the optional package `{cls._missing_package}`, "
            f"which is not installed; EasyEdit's editing path does not need it. Install it "
            f"(`pip install {cls._missing_package}`) to use the EasyEdit feature that does."
        )


def _placeholder(name: str, package: str) -> type:
    return _Placeholder(name, (), {"_missing_package": package, "__module__": package})


class _StubModule(types.ModuleType):
    def __init__(self, name: str):
        super().__init__(name)
        self.__path__ = []  # a package, so `import x.y` works
        self.__file__ = None
        self._missing_package = name.split(".")[0]

    def __getattr__(self, item):
        if item.startswith("__") and item.endswith("__"):
            raise AttributeError(item)
        return _placeholder(f"{self.__name__}.{item}", self._missing_package)


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots: set[str]):
        self.roots = roots
        self.created: list[str] = []

    def find_spec(self, fullname, path=None, target=None):
        # only EasyEdit's own imports get placeholders: availability checks by other libraries
        # (transformers asks `importlib.util.find_spec("torchvision")`) must see the truth
        if fullname.split(".")[0] in self.roots and _imported_by_easyeditor():
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        self.created.append(spec.name)
        return _StubModule(spec.name)

    def exec_module(self, module):
        return None


def _imported_by_easyeditor() -> bool:
    """Whether the innermost non-import-machinery frame belongs to an `easyeditor` module."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name.startswith(("importlib", "_frozen_importlib")) or name == __name__:
            frame = frame.f_back
            continue
        return name.split(".")[0] == "easyeditor"
    return False


def _missing(names) -> set[str]:
    missing = set()
    for name in names:
        if name in sys.modules:
            continue
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.add(name)
    return missing


# names old EasyEdit imports from `transformers.modeling_utils` that moved or were removed
_MOVED_FROM_MODELING_UTILS = ("apply_chunking_to_forward", "find_pruneable_heads_and_indices",
                              "prune_linear_layer")


@contextlib.contextmanager
def _transformers_moved_names() -> Iterator[None]:
    """Give `transformers.modeling_utils` the names old EasyEdit imports from it, for one import."""
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    added = []
    for name in _MOVED_FROM_MODELING_UTILS:
        if not hasattr(mu, name):
            setattr(mu, name, getattr(pu, name, None) or _placeholder(name, "transformers<5"))
            added.append(name)
    try:
        yield
    finally:
        for name in added:
            delattr(mu, name)


def import_with_optional_stubs(module: str = "easyeditor"):
    """Import EasyEdit; optional packages that are missing become placeholders for this import only."""
    if module in sys.modules:
        return sys.modules[module]
    finder = _StubFinder(_missing(OPTIONAL_IMPORTS))
    sys.meta_path.insert(0, finder)
    try:
        with _transformers_moved_names():
            return importlib.import_module(module)
    finally:
        sys.meta_path.remove(finder)
        # the stubs stay referenced by EasyEdit's modules, but later imports of those names by
        # anyone else find the real package (or fail normally)
        for name in finder.created:
            sys.modules.pop(name, None)


# ---------------------------------------------------------------------------------------------
# f"cuda:{...}" literals

_CUDA_LITERAL = re.compile(r"""f(["'])cuda:\{([^{}]+)\}\1""")
# a function that already tells an index from a device name before building the literal (upstream's
# `normalize_device`: `isinstance(device, int)`, `device_str.isdigit()`) needs no resolver
_RESOLVES_ITSELF = re.compile(r"\.isdigit\(\)|\bisinstance\([^()]*,\s*int\)")
_RESOLVER = "_rep_easyedit_device"


def resolve_device(value) -> str:
    """What EasyEdit's `device` field means: int N -> cuda:N (as before), strings as given."""
    from ..core.devices import torch_device

    return str(torch_device(value))


def _patched_function(func: types.FunctionType,
                      extra_rewrites: tuple["SourceRewrite", ...] = ()) -> types.FunctionType | None:
    try:
        source = textwrap.dedent(inspect.getsource(func))
    except (OSError, TypeError):
        return None
    extras = [r for r in extra_rewrites if r.applies_to(func, source)]
    cuda_literal = bool(_CUDA_LITERAL.search(source)) and not _RESOLVES_ITSELF.search(source)
    if not cuda_literal and not extras:
        return None
    if func.__code__.co_freevars:  # closures (e.g. methods using super()) are left alone
        return None
    new_source = source
    if cuda_literal:
        new_source = _CUDA_LITERAL.sub(lambda m: f"{_RESOLVER}({m.group(2)})", source)
    for rewrite in extras:
        new_source = rewrite.rewrite(new_source)
        for name, helper in rewrite.helpers.items():
            func.__globals__.setdefault(name, helper)
    # drop decorators: the patched function replaces the undecorated one
    new_source = re.sub(r"^(\s*@.*\n)+", "", new_source)
    namespace: dict = {}
    globals_ = func.__globals__
    globals_.setdefault(_RESOLVER, resolve_device)
    code = compile(new_source, inspect.getsourcefile(func) or "<easyeditor>", "exec")
    exec(code, globals_, namespace)
    patched = namespace[func.__name__]
    patched.__defaults__ = func.__defaults__
    patched.__kwdefaults__ = func.__kwdefaults__
    patched.__qualname__ = func.__qualname__
    patched.__rep_easyedit_original__ = func
    patched.__rep_easyedit_rewrites__ = ("cuda_literal",) * cuda_literal + \
        tuple(r.name for r in extras)
    return patched


class DeviceLiteralShims:
    """Finds every function of the given EasyEdit modules with a cuda literal; swaps on demand."""

    def __init__(self, module_prefixes: tuple[str, ...],
                 extra_rewrites: tuple["SourceRewrite", ...] = ()):
        self.replacements: list[tuple[object, str, object, object]] = []
        self.extra_rewrites = tuple(extra_rewrites)
        self._lock = threading.RLock()
        self._depth = 0
        seen: dict[int, object] = {}
        for mod_name, mod in list(sys.modules.items()):
            if mod is None or not mod_name.startswith(module_prefixes):
                continue
            for attr, value in list(vars(mod).items()):
                if inspect.isclass(value) and value.__module__ == mod_name:
                    for m_name, m_value in list(vars(value).items()):
                        if isinstance(m_value, types.FunctionType):
                            self._add(value, m_name, m_value, seen)
                elif isinstance(value, types.FunctionType):
                    self._add(mod, attr, value, seen)

    def _add(self, owner, attr, func, seen):
        key = id(func)
        if key not in seen:
            seen[key] = _patched_function(func, self.extra_rewrites)
        patched = seen[key]
        if patched is not None:
            self.replacements.append((owner, attr, func, patched))

    def __bool__(self) -> bool:
        return bool(self.replacements)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:  # an attribute someone else replaced (a test's spy) is left alone
                for owner, attr, orig, patched in self.replacements:
                    if getattr(owner, attr, None) is orig:
                        setattr(owner, attr, patched)
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    for owner, attr, orig, patched in self.replacements:
                        if getattr(owner, attr, None) is patched:
                            setattr(owner, attr, orig)


# ---------------------------------------------------------------------------------------------
# decoder layers that return a tensor where legacy code indexes a tuple

_HIDDEN = "_rep_easyedit_hidden"


def hidden_state(output):
    """The hidden state in a layer's output: element 0 of a tuple (transformers < 5), else itself."""
    return output[0] if isinstance(output, (tuple, list)) else output


class SourceRewrite:
    """A textual rewrite of a legacy function's source, for functions of the given modules only.

    ``pattern`` detects the code to fix; ``replacements`` are (regex, replacement) pairs applied in
    order; ``helpers`` are names the rewritten code calls, added to the function's module globals
    (``setdefault``: an existing name is never overwritten).
    """

    def __init__(self, name: str, modules: tuple[str, ...], pattern: str,
                 replacements: tuple[tuple[str, str], ...], helpers: dict):
        self.name = name
        self.modules = tuple(modules)
        self.pattern = re.compile(pattern)
        self.replacements = tuple((re.compile(a), b) for a, b in replacements)
        self.helpers = dict(helpers)

    def applies_to(self, func: types.FunctionType, source: str) -> bool:
        return func.__module__ in self.modules and bool(self.pattern.search(source))

    def rewrite(self, source: str) -> str:
        for regex, replacement in self.replacements:
            source = regex.sub(replacement, source)
        return source

    def __repr__(self) -> str:
        return f"SourceRewrite({self.name!r}, modules={self.modules})"


# `cur_out[0]` (the edit_output hook's argument) and `tr[...].output[0]` (a traced layer output)
_TUPLE_INDEX = (
    (r"\bcur_out\[0\]", f"{_HIDDEN}(cur_out)"),
    (r"(\btr\[[^\[\]]+\]\.output)\[0\]", rf"{_HIDDEN}(\1)"),
)
_TUPLE_INDEX_MODULES = ("easyeditor.models.memit.compute_z",)

_LAYER_RETURNS: dict = {}


def decoder_layer_returns_tensor() -> bool:
    """Whether the installed transformers' decoder layers return a bare tensor (transformers >= 5).

    Measured, not assumed from the version: a one-layer LlamaModel of width 8 is run once (its
    random initialisation under `torch.random.fork_rng`, so the caller's RNG stream is untouched)
    and the type its decoder layer returns is recorded. Cached for the process.
    """
    if "tensor" not in _LAYER_RETURNS:
        import torch
        from transformers import LlamaConfig, LlamaModel

        seen = []
        cfg = LlamaConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                          num_attention_heads=1, num_key_value_heads=1, vocab_size=4,
                          max_position_embeddings=8)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model = LlamaModel(cfg).eval()
            handle = model.layers[0].register_forward_hook(lambda m, a, out: seen.append(out))
            try:
                model(input_ids=torch.tensor([[0, 1]]), use_cache=False)
            finally:
                handle.remove()
        _LAYER_RETURNS["tensor"] = bool(seen) and isinstance(seen[0], torch.Tensor)
    return _LAYER_RETURNS["tensor"]


def layer_output_tuple_rewrite() -> SourceRewrite | None:
    """The rewrite for legacy MEMIT's tuple indexing, or None where decoder layers return tuples."""
    if not decoder_layer_returns_tensor():
        return None
    return SourceRewrite("layer_output_tuple", _TUPLE_INDEX_MODULES,
                         pattern=r"\bcur_out\[0\]|\.output\[0\]",
                         replacements=_TUPLE_INDEX, helpers={_HIDDEN: hidden_state})


# ROME's rank-one update `u.unsqueeze(1) @ v.unsqueeze(0)`: in the PyPI release `compute_v` returns
# a float32 right vector while `compute_u` returns the key in the model's dtype, so a bfloat16 or
# float16 model fails with "expected m1 and m2 to have the same dtype". The right vector is cast to
# the left one's dtype (a no-op where they already agree).
_RANK_ONE = r"\b(\w+)\.unsqueeze\(1\) @ (\w+)\.unsqueeze\(0\)"


def rank_one_dtype_rewrite() -> SourceRewrite:
    return SourceRewrite("rank_one_dtype", ("easyeditor.models.rome.rome_main",), pattern=_RANK_ONE,
                         replacements=((_RANK_ONE, r"\1.unsqueeze(1) @ \2.to(\1.dtype).unsqueeze(0)"),),
                         helpers={})


# MEMIT's per-layer share `resid = targets / (len(hparams.layers) - i)` is a residual-stream change
# written as a change of the MLP output; on models that normalise the MLP output before the residual
# add (Gemma-2/3) it is first mapped through that norm (`rep_easyedit.post_mlp_norm`; unchanged on
# every other model). Not a legacy fix: upstream's MEMIT has the same line and gets the same mapping.
_MEMIT_SHARE = r"\bresid = (targets / \(len\(hparams\.layers\) - i\))"
_MLP_RESIDUAL = "_rep_easyedit_mlp_residual"


def memit_post_norm_rewrite() -> SourceRewrite:
    from ..post_mlp_norm import mlp_residual

    return SourceRewrite(
        "memit_post_mlp_norm", ("easyeditor.models.memit.memit_main",), pattern=_MEMIT_SHARE,
        replacements=((_MEMIT_SHARE,
                       rf"resid = {_MLP_RESIDUAL}(model, hparams, layer, layer_ks, \1)"),),
        helpers={_MLP_RESIDUAL: mlp_residual})


# Legacy `generate_fast` (ROME's context templates) passes `past_key_values=` and reads
# `model_out.past_key_values`; transformers renamed both to `cache` (5.25 warns that the old name goes
# in 5.40). The call and the read use whichever name the model's forward takes.
_CACHE_KWARG = r"\bpast_key_values=past_key_values,"
_CACHE_READ = r"\bmodel_out\.past_key_values\b"
_CACHE_KW_HELPER = "_rep_easyedit_cache_kwargs"
_CACHE_OUT_HELPER = "_rep_easyedit_cache_of"


@functools.lru_cache(maxsize=None)
def _cache_kwarg_name(model_cls: type) -> str:
    """Read once per model class: the generation loop asks at every token."""
    return "cache" if "cache" in inspect.signature(model_cls.forward).parameters else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """`{"cache": cache}` where the model's forward takes `cache` (transformers >= 5.25), else the old name."""
    return {_cache_kwarg_name(type(model)): cache}


def cache_of(output):
    """The key/value cache of a model output, under its new name (`cache`) or its old one."""
    return output.cache if "cache" in output else getattr(output, "past_key_values", None)


def cache_kwarg_rewrite() -> SourceRewrite:
    return SourceRewrite(
        "cache_kwarg", ("easyeditor.util.generate",), pattern=_CACHE_KWARG,
        replacements=((_CACHE_KWARG, rf"**{_CACHE_KW_HELPER}(model, past_key_values),"),
                      (_CACHE_READ, f"{_CACHE_OUT_HELPER}(model_out)")),
        helpers={_CACHE_KW_HELPER: cache_kwargs, _CACHE_OUT_HELPER: cache_of})
