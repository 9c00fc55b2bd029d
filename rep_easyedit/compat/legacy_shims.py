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
"""

from __future__ import annotations

import contextlib
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
    "sentence_transformers", "datasets", "nltk", "sklearn", "seaborn", "pandas", "einops",
    "PIL", "knowledge_neurons", "zhipuai", "qwen_vl_utils", "decord", "av",
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
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        self.created.append(spec.name)
        return _StubModule(spec.name)

    def exec_module(self, module):
        return None


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
_RESOLVER = "_rep_easyedit_device"


def resolve_device(value) -> str:
    """What EasyEdit's `device` field means: int N -> cuda:N (as before), strings as given."""
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        return f"cuda:{int(value)}"
    return str(value)


def _patched_function(func: types.FunctionType) -> types.FunctionType | None:
    try:
        source = textwrap.dedent(inspect.getsource(func))
    except (OSError, TypeError):
        return None
    if not _CUDA_LITERAL.search(source):
        return None
    if func.__code__.co_freevars:  # closures (e.g. methods using super()) are left alone
        return None
    new_source = _CUDA_LITERAL.sub(lambda m: f"{_RESOLVER}({m.group(2)})", source)
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
    return patched


class DeviceLiteralShims:
    """Finds every function of the given EasyEdit modules with a cuda literal; swaps on demand."""

    def __init__(self, module_prefixes: tuple[str, ...]):
        self.replacements: list[tuple[object, str, object, object]] = []
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
            seen[key] = _patched_function(func)
        patched = seen[key]
        if patched is not None:
            self.replacements.append((owner, attr, func, patched))

    def __bool__(self) -> bool:
        return bool(self.replacements)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                for owner, attr, _orig, patched in self.replacements:
                    setattr(owner, attr, patched)
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    for owner, attr, orig, _patched in self.replacements:
                        setattr(owner, attr, orig)
