"""The docs a user reads are true to the tree: every link, anchor, section reference and path."""

import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "data" / "README.md",
        ROOT / "benchmarks" / "README.md"]
TREE_DIRS = ("rep_easyedit/", "benchmarks/", "examples/", "hparams/", "tests/", "docs/", "data/")


def _in_venv(path: Path) -> bool:
    """Under `.venv` or `.venv-upstream` (`make test-upstream`): third-party files."""
    return any(part.startswith(".venv") for part in path.relative_to(ROOT).parts)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@functools.lru_cache(maxsize=None)
def headings(path: Path) -> tuple[str, ...]:
    return tuple(m.group(1).strip() for m in re.finditer(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.M))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_anchors_resolve(doc):
    text = doc.read_text(encoding="utf-8")
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file_part, _, frag = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists():
            bad.append(f"{target}: no such file")
        elif frag and path.suffix == ".md" and frag not in {anchor(h) for h in headings(path)}:
            bad.append(f"{target}: no heading with anchor #{frag}")
    assert not bad, f"{doc.relative_to(ROOT)}: " + "; ".join(bad)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_tree_paths_named_in_docs_exist(doc):
    text = doc.read_text(encoding="utf-8")
    missing = []
    for m in re.finditer(r"`((?:%s)[\w./\-]*)`" % "|".join(map(re.escape, TREE_DIRS)), text):
        path = m.group(1).rstrip(".")
        if "<" in path or "{" in path or "*" in path:
            continue
        if not (ROOT / path).exists():
            missing.append(path)
    assert not missing, f"{doc.relative_to(ROOT)} names paths that do not exist: {sorted(set(missing))}"


def test_section_references_in_code_and_yaml_exist():
    """A section cited by name after README or docs/<name>.md, in code, YAML and docs, is a real heading."""
    files = [p for p in ROOT.rglob("*") if p.suffix in (".py", ".yaml", ".md", ".sh")
             and not _in_venv(p) and "results" not in p.parts and p.is_file()]
    bad = []
    for f in files:
        for doc, section in re.findall(r"(README(?:\.md)?|docs/\w+\.md)[ ,]+[\"']([^\"'\n]+)[\"']", f.read_text(encoding="utf-8")):
            target = ROOT / ("README.md" if doc.startswith("README") else doc)
            if not any(h.startswith(section) for h in headings(target)):
                bad.append(f"{f.relative_to(ROOT)}: {doc} \"{section}\"")
    assert not bad, "section references to headings that do not exist: " + "; ".join(bad)


def test_files_named_in_code_yaml_and_docs_exist():
    """A script, module or YAML of this tree named in a comment, docstring or doc (moved files leave
    stale names behind, as the probes did when they went to benchmarks/lab/)."""
    pattern = re.compile(r"(?<![\w/.])((?:%s)[\w/.\-]*\.(?:py|sh|yaml|md|json))\b" % "|".join(map(re.escape, TREE_DIRS)))
    files = [p for p in ROOT.rglob("*") if p.suffix in (".py", ".yaml", ".md", ".sh") and p.is_file()
             and not {"results", ".git"} & set(p.parts) and not _in_venv(p)]
    missing = sorted({f"{f.relative_to(ROOT)}: {m}" for f in files
                      for m in pattern.findall(f.read_text(encoding="utf-8"))
                      if not (ROOT / m).exists() and not (f.parent / m).exists()})
    assert not missing, f"names of files that do not exist: {missing}"
