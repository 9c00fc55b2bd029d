"""The binding to EasyEdit as REP sees it from inside an upstream checkout: no shims, no stubs.

`compat/easyedit.py` is what the plugin uses (it must also run the PyPI release, so it imports
EasyEdit with optional packages stubbed and shims what old builds get wrong). Once REP lives in
`easyeditor/models/rep/` (`python -m rep_easyedit.contrib export`), none of that applies: this
module takes the place of `compat/easyedit.py` there, with the same names for what the method
uses. In the plugin it is only imported by the exporter and its tests.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from typing import Callable, Iterator


def easyeditor():
    """The `easyeditor` package (imported lazily: `models/rep` is imported while it loads)."""
    return importlib.import_module("easyeditor")


def alg_dicts() -> list[dict]:
    """Upstream's algorithm registry, `easyeditor.util.alg_dict.ALG_DICT`."""
    return [importlib.import_module("easyeditor.util.alg_dict").ALG_DICT]


def installed_algorithm(name: str) -> Callable | None:
    for d in alg_dicts():
        if name in d:
            return d[name]
    return None


@contextlib.contextmanager
def shims_applied() -> Iterator[None]:
    """Nothing to apply upstream; kept so the method's code reads the same in both places."""
    yield


def editor_uses_sequential_flag() -> bool:
    """Upstream's `edit(..., sequential_edit=)` restores from `weights_copy` unless sequential."""
    editor = importlib.import_module("easyeditor.editors.editor").BaseEditor
    return "sequential_edit" in inspect.signature(editor.edit).parameters
