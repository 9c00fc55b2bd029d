"""Write REP into an EasyEdit checkout: the method, its registration, hparams, example, docs page.

Everything is generated from this package (`layout.py`, `registry.py`) or copied from its files
(`hparams/REP-*/` for the 7B models, `upstream_files/`): nothing here is a second copy of the
method. `git diff --stat` in the checkout afterwards is the pull request.
"""

from __future__ import annotations

from pathlib import Path

from .layout import ExportError, method_files
from .registry import REP_NAMES, register_all

FILES = Path(__file__).resolve().parent / "upstream_files"
HPARAMS = Path(__file__).resolve().parents[2] / "hparams"
# model files of ours whose name is upstream's too (`hparams/ROME/<model>.yaml`); the bundled
# small models are this plugin's own and stay out
HPARAMS_MODELS = ("llama-7b", "mistral-7b", "qwen2-7b")
UPSTREAM_EXAMPLES = "examples"  # upstream's folder for each method's docs page and script
EXTRA = {f"{UPSTREAM_EXAMPLES}/{name}": name for name in ("REP.md", "run_REP_editing.py")}


def check_checkout(root: Path) -> Path:
    root = Path(root).expanduser().resolve()
    if not (root / "easyeditor" / "util" / "alg_dict.py").is_file():
        raise ExportError(f"{root} is not an EasyEdit checkout (no easyeditor/util/alg_dict.py); "
                          f"pass the root of a clone of https://github.com/zjunlp/EasyEdit")
    return root


def hparams_files() -> dict[str, str]:
    if not HPARAMS.is_dir():
        raise ExportError(f"{HPARAMS} not found: export from a source checkout of rep-easyedit "
                          f"(pip install -e .), which has the hparams/ folder")
    files = {}
    for name in REP_NAMES:
        for model in HPARAMS_MODELS:
            for suffix in ("", "-paper"):
                src = HPARAMS / name / f"{model}{suffix}.yaml"
                if src.is_file():
                    files[f"hparams/{name}/{src.name}"] = src.read_text(encoding="utf-8")
    return files


def planned_files() -> dict[str, str]:
    """Path in the checkout -> text, for every file the export writes whole."""
    files = {**method_files(), **hparams_files()}
    for theirs, ours in EXTRA.items():
        files[theirs] = (FILES / ours).read_text(encoding="utf-8")
    return files


def export(root: Path) -> list[str]:
    """Write everything into the checkout at `root`; returns the paths written or edited."""
    root = check_checkout(root)
    files = planned_files()  # all of it built before anything is written
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return sorted(files) + register_all(root)
