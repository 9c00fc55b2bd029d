"""Which of our modules make up `easyeditor/models/rep/`, and their imports rewritten for it.

Upstream keeps a method flat in one folder (`models/r_rome/r_rome_main.py`, `r_rome_hparams.py`),
so `core/` is flattened, `hparams.py` becomes `rep_hparams.py` and `compat/upstream.py` (the
binding without shims) takes the place of `compat/easyedit.py`. Left out on purpose: the legacy
shims (`compat/legacy_shims.py`, `compat/easyedit.py`), `backends_extra/` (upstream has R-ROME and
EMMET), the bundled models (`model_loading.py`), the plugin's registration and our harness.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
TARGET = "easyeditor/models/rep"

_CORE = ("adapter", "config", "delta_init", "devices", "health", "key_cache", "keys", "kin_names", "merging", "pathway", "replay",
         "persistence", "perturbations", "requests", "training")
# our module (relative to rep_easyedit/) -> its name in easyeditor/models/rep/
MODULES = {**{f"core/{m}.py": f"{m}.py" for m in _CORE},
           "rep_main.py": "rep_main.py", "hparams.py": "rep_hparams.py", "backends.py": "backends.py",
           "covariance.py": "covariance.py", "corpus.py": "corpus.py",
           "robust_value.py": "robust_value.py", "cache.py": "cache.py",
           "compat/upstream.py": "compat.py"}

# dotted relative import (as written in our tree, leading dot dropped) -> name in the export
_IMPORTS = {**{f"core.{m}": m for m in _CORE},
            "compat.easyedit": "compat", "hparams": "rep_hparams"}
# user-facing names in messages: where the same thing lives upstream
_TEXT = {"rep_easyedit.REPHyperParams": "easyeditor.REPHyperParams",
         "rep_easyedit.save_pathway": "easyeditor.save_pathway",
         "rep_easyedit.load_pathway": "easyeditor.load_pathway"}

# what `from .rep import *` gives `easyeditor` (module, names)
PUBLIC = {"rep_hparams": ("REPHyperParams", "HParamsError"),
          "rep_main": ("apply_rep_to_model", "LayoutError"),
          "config": ("REPConfig",),
          "health": ("IneffectivePathwayError",),
          "persistence": ("save_pathway", "load_pathway", "save_edited_model", "PathwayLayoutError"),
          "pathway": ("installed_paths", "prune_inactive", "remove_pathways"),
          "merging": ("merge_adapters",)}


class ExportError(RuntimeError):
    """The export cannot be written as asked (a module imports something that is not exported ...)."""


def exported_source(ours: str) -> str:
    """The text of `rep_easyedit/<ours>` as it reads inside `easyeditor/models/rep/`."""
    text = (PACKAGE / ours).read_text(encoding="utf-8")
    if ours.startswith("core/"):  # core imports its siblings as `.x`, which stays right when flat
        pass
    else:
        text = re.sub(r"(\bfrom \.)([\w.]+)( import )",
                      lambda m: m.group(1) + _IMPORTS.get(m.group(2), m.group(2)) + m.group(3), text)
    for old, new in _TEXT.items():
        text = text.replace(old, new)
    check_imports(ours, text)
    header = f"# Generated from rep_easyedit/{ours} (python -m rep_easyedit.contrib export).\n"
    return header + text


def check_imports(ours: str, text: str) -> None:
    """Every relative import names an exported module; nothing imports the plugin itself."""
    exported = {Path(name).stem for name in MODULES.values()}
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            if node.level > 1 or (node.level == 1 and (node.module or "").split(".")[0] not in exported):
                raise ExportError(f"rep_easyedit/{ours} imports {'.' * node.level}{node.module}, "
                                  f"which is not part of {TARGET}/; export that module too "
                                  f"(rep_easyedit/contrib/layout.py MODULES) or drop the import")
            if node.level == 0 and (node.module or "").split(".")[0] == "rep_easyedit":
                raise ExportError(f"rep_easyedit/{ours} imports {node.module}; the export must not "
                                  f"need the plugin: import it relatively")
        elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == "rep_easyedit" for a in node.names):
            raise ExportError(f"rep_easyedit/{ours} imports rep_easyedit; the export must not need the plugin")


def package_init() -> str:
    """`easyeditor/models/rep/__init__.py`, in the style of upstream's method packages."""
    lines = [f"from .{mod} import {', '.join(names)}" for mod, names in PUBLIC.items()]
    everything = [n for names in PUBLIC.values() for n in names]
    return "\n".join(lines) + f"\n\n__all__ = {everything!r}\n"


def method_files() -> dict[str, str]:
    """Path under the checkout -> text, for every file of `easyeditor/models/rep/`."""
    files = {f"{TARGET}/{theirs}": exported_source(ours) for ours, theirs in MODULES.items()}
    files[f"{TARGET}/__init__.py"] = package_init()
    return files
