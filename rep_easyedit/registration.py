"""One call that makes the REP methods known to the installed EasyEdit."""

from __future__ import annotations

from .compat.easyedit import easyeditor, installed_algorithm, patch_editor, register_algorithm
from .hparams import REP_PREFIX, SUPPORTED_BACKENDS


def register() -> list[str]:
    """Register `REP-<backend>` for every backend the installed EasyEdit has; returns the names."""
    from .rep_main import apply_rep_to_model

    easyeditor()
    try:
        from .backends_extra import register_missing_backends
    except ImportError:
        register_missing_backends = None
    if register_missing_backends is not None:
        register_missing_backends()
    patch_editor()
    names = []
    for backend in SUPPORTED_BACKENDS:
        if installed_algorithm(backend) is not None:
            register_algorithm(REP_PREFIX + backend, apply_rep_to_model)
            names.append(REP_PREFIX + backend)
    return names
