"""The architecture holds: the method in `rep_easyedit/core/` imports nothing outside it (so it can
move upstream as `easyeditor/models/rep/`), and no script reaches into the tree with sys.path."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "rep_easyedit" / "core"
THIRD_PARTY_OK = {"torch", "numpy", "safetensors", "transformers"}


def _imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield node.level, node.module or ""
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield 0, alias.name


def test_core_imports_only_itself_the_standard_library_and_torch():
    import sys

    bad = []
    for path in sorted(CORE.glob("*.py")):
        for level, module in _imports(path):
            top = module.split(".")[0]
            if level > 1 or (level == 0 and top not in sys.stdlib_module_names and top not in THIRD_PARTY_OK):
                bad.append(f"{path.name}: {'.' * level}{module}")
    assert not bad, f"rep_easyedit/core must not import EasyEdit or the binding: {bad}"


def test_no_sys_path_inserts_outside_conftest():
    offenders = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                 if not any(part.startswith(".venv") for part in p.relative_to(ROOT).parts)  # .venv-upstream too
                 and p.name != "conftest.py" and p != Path(__file__)
                 and "sys.path.insert" in p.read_text(encoding="utf-8")]
    assert not offenders, f"import the package instead of inserting paths: {offenders}"
