"""Where REP keeps what it computes once (converted models, sampled corpora).

Its own module so that the method's code (`corpus.py`) does not depend on the bundled-model
loader, and can be exported to an upstream EasyEdit without it (`python -m rep_easyedit.contrib`).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$REP_EASYEDIT_CACHE`, else `$XDG_CACHE_HOME/rep_easyedit` (default `~/.cache/rep_easyedit`)."""
    root = os.environ.get("REP_EASYEDIT_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rep_easyedit"
