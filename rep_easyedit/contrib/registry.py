"""Edits to upstream's own registration points, so that `BaseEditor` knows the REP methods.

Upstream has no registration API: an algorithm is an `ALG_DICT` entry (`easyeditor/util/
alg_dict.py`) and a star import (`easyeditor/models/__init__.py`); `editor.py` keeps right padding
for a fixed list of names (ROME's `compute_v` needs it; a `REP-*` name would get left padding)
and the `BatchEditor` enum decides what may batch. Each edit finds its place with `ast`, is
idempotent, and fails naming the file when upstream's code no longer has the shape it expects.
"""

from __future__ import annotations

import ast
from pathlib import Path

from .layout import ExportError

REP_NAMES = ("REP-ROME", "REP-MEMIT", "REP-R-ROME", "REP-EMMET")
BATCHABLE = {"REP-MEMIT": "REP_MEMIT", "REP-EMMET": "REP_EMMET"}  # REP-<X> for a batchable X


def _offset(text: str, lineno: int, col: int) -> int:
    """Character offset of an ast (line, column); columns are UTF-8 byte offsets."""
    lines = text.splitlines(keepends=True)
    line = lines[lineno - 1]
    return sum(len(l) for l in lines[:lineno - 1]) + len(line.encode("utf-8")[:col].decode("utf-8"))


def _insert_after(text: str, node: ast.AST, addition: str) -> str:
    at = _offset(text, node.end_lineno, node.end_col_offset)
    return text[:at] + addition + text[at:]


def _unexpected(path: Path, what: str) -> ExportError:
    return ExportError(f"{path}: {what}; upstream's layout changed since 14cea82. Add the REP "
                       f"entries by hand or update rep_easyedit/contrib/registry.py")


def register_in_models(root: Path) -> bool:
    """`from .rep import *` in `easyeditor/models/__init__.py`."""
    path = root / "easyeditor/models/__init__.py"
    text = path.read_text(encoding="utf-8")
    if "from .rep import *" in text:
        return False
    path.write_text(text.rstrip("\n") + "\nfrom .rep import *\n", encoding="utf-8")
    return True


def register_in_alg_dict(root: Path) -> bool:
    """The import and one `ALG_DICT` entry per REP method whose backend upstream has."""
    path = root / "easyeditor/util/alg_dict.py"
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    table = next((n.value for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Dict)
                  and any(isinstance(t, ast.Name) and t.id == "ALG_DICT" for t in n.targets)), None)
    if table is None or not table.keys:
        raise _unexpected(path, "no `ALG_DICT = {...}` literal")
    present = {k.value for k in table.keys if isinstance(k, ast.Constant)}
    new = [n for n in REP_NAMES if n not in present and n[len("REP-"):] in present]
    if not new:
        return False
    text = _insert_after(text, table.values[-1],
                         "".join(f',\n    "{n}": apply_rep_to_model' for n in new))
    if "from ..models.rep import" not in text:
        imports = [n for n in ast.parse(text).body
                   if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("models")]
        if not imports:
            raise _unexpected(path, "no `from ..models.x import ...` lines")
        text = _insert_after(text, imports[-1], "\nfrom ..models.rep import REPHyperParams, apply_rep_to_model")
    path.write_text(text, encoding="utf-8")
    return True


def _name_lists(tree: ast.AST):
    """The literal lists of algorithm names that `editor.py` compares `alg_name` against."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) \
                and node.left.attr == "alg_name":
            for comp in node.comparators:
                if isinstance(comp, ast.List) and all(isinstance(e, ast.Constant) for e in comp.elts) \
                        and {"ROME", "MEMIT"} <= {e.value for e in comp.elts}:
                    yield comp


def right_padding_for_rep(root: Path) -> bool:
    """REP-* joins the names `BaseEditor.__init__` gives right padding (as their backends get)."""
    path = root / "easyeditor/editors/editor.py"
    text = path.read_text(encoding="utf-8")
    lists = list(_name_lists(ast.parse(text)))
    if not lists:
        raise _unexpected(path, "no `alg_name in [... 'ROME', 'MEMIT' ...]` padding list")
    changed = False
    for node in sorted(lists, key=lambda n: (n.end_lineno, n.end_col_offset), reverse=True):
        names = {e.value for e in node.elts}
        new = [n for n in REP_NAMES if n not in names]
        if new:
            text = _insert_after(text, node.elts[-1], "".join(f", '{n}'" for n in new))
            changed = True
    path.write_text(text, encoding="utf-8")
    return changed


def batchable_rep(root: Path) -> bool:
    """REP-MEMIT and REP-EMMET become `BatchEditor` members and batchable, as MEMIT and EMMET are."""
    path = root / "easyeditor/editors/batch_editor.py"
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "BatchEditor"), None)
    if cls is None:
        raise _unexpected(path, "no `class BatchEditor`")
    members = [n for n in cls.body if isinstance(n, ast.Assign)]
    check = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "is_batchable_method"), None)
    ret = next((n for n in ast.walk(check) if isinstance(n, ast.Return)), None) if check else None
    if not members or ret is None or ret.value is None:
        raise _unexpected(path, "no enum members or no `is_batchable_method` returning an expression")
    values = {m.value.value for m in members if isinstance(m.value, ast.Constant)}
    new = {name: member for name, member in BATCHABLE.items() if name not in values}
    if not new:
        return False
    # the later insertion first, so the earlier node's offsets stay valid
    text = _insert_after(text, ret.value, "".join(f" \\\n            or alg_name == BatchEditor.{m}.value"
                                                  for m in new.values()))
    text = _insert_after(text, members[-1], "".join(f'\n    {m} = "{name}"' for name, m in new.items()))
    path.write_text(text, encoding="utf-8")
    return True


def register_all(root: Path) -> list[str]:
    """Apply every edit; returns the files changed (relative to the checkout)."""
    steps = {"easyeditor/models/__init__.py": register_in_models,
             "easyeditor/util/alg_dict.py": register_in_alg_dict,
             "easyeditor/editors/editor.py": right_padding_for_rep,
             "easyeditor/editors/batch_editor.py": batchable_rep}
    return [name for name, step in steps.items() if step(root)]
