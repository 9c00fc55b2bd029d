"""Backends missing from the installed EasyEdit, written from their papers.

- `R-ROME` (Gupta et al. 2024, "Rebuilding ROME"): `r_rome.py`
- `EMMET` (Gupta et al. 2024, "A Unified Framework for Model Editing"): `emmet.py`
- `AlphaEdit` (Fang et al. 2025, "AlphaEdit: Null-Space Constrained Knowledge Editing"): `alphaedit.py`

The PyPI release `easyeditor==0.0.1.dev0` has none of them; upstream EasyEdit has all three, and there its
own implementations are used. `register_missing_backends()` adds ours to EasyEdit's `ALG_DICT`
only where the installed EasyEdit lacks the name. The hparams classes are exported here because
`rep_easyedit.backends` looks a backend's hparams class up in the package of its apply function.
"""

from __future__ import annotations

from .alphaedit import AlphaEditHyperParams, apply_AlphaEdit_to_model, execute_alphaedit
from .emmet import EMMETHyperParams, apply_emmet_to_model, execute_emmet
from .common import clear_second_moment_cache, seed_second_moment
from .r_rome import R_ROMEHyperParams, apply_r_rome_to_model, execute_r_rome

BACKENDS = {
    "R-ROME": (apply_r_rome_to_model, R_ROMEHyperParams),
    "EMMET": (apply_emmet_to_model, EMMETHyperParams),
    "AlphaEdit": (apply_AlphaEdit_to_model, AlphaEditHyperParams),
}


def register_missing_backends() -> list[str]:
    """Register R-ROME / EMMET / AlphaEdit in EasyEdit's ALG_DICT where the installed EasyEdit lacks them.

    Returns the names registered by this call (empty when EasyEdit already has all).
    """
    from ..compat.easyedit import installed_algorithm, register_algorithm

    from ..backends import prefer_implementation

    registered = []
    for name, (apply_fn, _cls) in BACKENDS.items():
        if installed_algorithm(name) is None:
            register_algorithm(name, apply_fn, overwrite=False)
            registered.append(name)
    # REP-AlphaEdit runs on ours everywhere: upstream's sizes its projector by model-name substrings
    # (any other name leaves it undefined) and writes it to the working directory (docs/design.md)
    prefer_implementation("AlphaEdit", apply_AlphaEdit_to_model, AlphaEditHyperParams)
    return registered


__all__ = [
    "R_ROMEHyperParams", "EMMETHyperParams", "AlphaEditHyperParams", "apply_AlphaEdit_to_model",
    "execute_alphaedit", "apply_r_rome_to_model", "apply_emmet_to_model",
    "execute_r_rome", "execute_emmet", "register_missing_backends", "seed_second_moment",
    "clear_second_moment_cache", "BACKENDS",
]
