"""`python -m rep_easyedit.contrib export`: REP written into an EasyEdit checkout, in its layout.

The layout and registry edits are checked everywhere (on a mock of upstream's files); the real
export runs where `$EASYEDIT` names a checkout (`make test-upstream`): into a fresh copy of it,
then REP-ROME edits SmolLM2 through `BaseEditor` with only that copy importable.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from rep_easyedit.contrib.export import check_checkout, planned_files
from rep_easyedit.contrib.layout import MODULES, ExportError, check_imports, method_files
from rep_easyedit.contrib.registry import register_all

from conftest import ROOT

EXAMPLES = "examples"  # upstream's folder (ours has no REP.md: the names below are the checkout's)

# the shapes of upstream's files at 14cea82 that the registry edits rely on, cut down
MOCK = {
    "easyeditor/models/__init__.py": "from .rome import *\nfrom .simie import *\n",
    "easyeditor/util/alg_dict.py": textwrap.dedent("""\
        from ..models.rome import ROMEHyperParams, apply_rome_to_model
        from ..models.memit import MEMITHyperParams, apply_memit_to_model


        ALG_DICT = {
            'ROME': apply_rome_to_model,
            'MEMIT': apply_memit_to_model,
            "R-ROME": apply_r_rome_to_model,
            "EMMET": apply_emmet_to_model
        }
        """),
    "easyeditor/editors/editor.py": textwrap.dedent("""\
        class BaseEditor:
            def __init__(self, hparams):
                if tok and (hparams.alg_name not in ['ROME', 'MEMIT', 'EMMET','R-ROME']):
                    tok.padding_side = 'left'
                if tok and (hparams.alg_name in ['ROME', 'MEMIT', 'EMMET', 'R-ROME']):
                    tok.padding_side = 'right'
        """),
    "easyeditor/editors/batch_editor.py": textwrap.dedent("""\
        from enum import Enum


        class BatchEditor(Enum):
            MEMIT = 'MEMIT'
            EMMET = "EMMET"


            @staticmethod
            def is_batchable_method(alg_name: str):
                return alg_name == BatchEditor.MEMIT.value \\
                    or alg_name == BatchEditor.EMMET.value

        """),
}


def _mock_checkout(root: Path) -> Path:
    for rel, text in MOCK.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_method_files_import_nothing_of_the_plugin():
    files = method_files()
    assert set(files) == {f"easyeditor/models/rep/{n}" for n in [*MODULES.values(), "__init__.py"]}
    for path, text in files.items():
        compile(text, path, "exec")
        text = text.split("\n", 1)[1]  # past the "Generated from rep_easyedit/..." line
        for gone in ("legacy_shims", "compat.easyedit", "model_loading", "backends_extra",
                     "import rep_easyedit", "from rep_easyedit", "from .core."):
            assert gone not in text, (path, gone)
    # one source of truth: the exported text is ours, with imports rewritten
    ours = (ROOT / "rep_easyedit/core/adapter.py").read_text()
    assert files["easyeditor/models/rep/adapter.py"].endswith(ours)
    assert "from .rep_hparams import REPHyperParams" in files["easyeditor/models/rep/rep_main.py"]
    assert "from .compat import " in files["easyeditor/models/rep/backends.py"]


@pytest.mark.parametrize("line", ["from .model_loading import cache_dir", "from ..util import nethook",
                                  "import rep_easyedit", "from rep_easyedit.core import adapter"])
def test_an_import_the_export_lacks_is_refused(line):
    with pytest.raises(ExportError, match=r"x\.py imports"):
        check_imports("x.py", line + "\n")


def test_registry_edits_on_upstreams_shapes_are_idempotent(tmp_path):
    root = _mock_checkout(tmp_path)
    changed = register_all(root)
    assert changed == list(MOCK)
    texts = {rel: (root / rel).read_text() for rel in MOCK}
    for text in texts.values():
        compile(text, "mock", "exec")
    alg = texts["easyeditor/util/alg_dict.py"]
    assert "from ..models.rep import REPHyperParams, apply_rep_to_model" in alg
    for name in ("REP-ROME", "REP-MEMIT", "REP-R-ROME", "REP-EMMET"):
        assert f'"{name}": apply_rep_to_model' in alg
    editor = texts["easyeditor/editors/editor.py"]
    assert editor.count("'REP-ROME', 'REP-MEMIT', 'REP-R-ROME', 'REP-EMMET'") == 2
    ns = {}
    exec(texts["easyeditor/editors/batch_editor.py"], ns)
    check = ns["BatchEditor"].is_batchable_method
    assert check("REP-MEMIT") and check("REP-EMMET") and check("MEMIT") and not check("REP-ROME")
    assert register_all(root) == []  # a second export changes nothing
    assert {rel: (root / rel).read_text() for rel in MOCK} == texts


def test_unexpected_upstream_shape_and_non_checkout_are_named(tmp_path):
    with pytest.raises(ExportError, match="not an EasyEdit checkout"):
        check_checkout(tmp_path)
    root = _mock_checkout(tmp_path)
    (root / "easyeditor/util/alg_dict.py").write_text("ALG = dict(ROME=1)\n")
    with pytest.raises(ExportError, match="alg_dict.py: no `ALG_DICT"):
        register_all(root)


def test_export_writes_hparams_example_and_docs_page():
    files = planned_files()
    for name in ("REP-ROME", "REP-MEMIT", "REP-R-ROME", "REP-EMMET"):
        assert f"hparams/{name}/llama-7b.yaml" in files and f"hparams/{name}/llama-7b-paper.yaml" in files
        assert not any(p.startswith(f"hparams/{name}/smollm2") for p in files)  # the plugin's own models
    assert files[f"{EXAMPLES}/REP.md"].startswith("# REP\n")
    compile(files[f"{EXAMPLES}/run_REP_editing.py"], "run_REP_editing.py", "exec")


# -- the real export ------------------------------------------------------------------------------

RUN_IN_CHECKOUT = r"""
import json, sys
# the plugin is installed (editable) in this venv: take its finder away, then prove it is gone
sys.meta_path[:] = [f for f in sys.meta_path  # (setuptools installs the finder class itself)
                    if not (f if isinstance(f, type) else type(f)).__module__.startswith("__editable__")]
import importlib.util
assert importlib.util.find_spec("rep_easyedit") is None, "rep_easyedit is importable"

# upstream's `import easyeditor` imports its optional packages (requirements.txt: higher, timm, peft
# ...; with them a CUDA torch): the ones this venv lacks become inert placeholders, for the import
import importlib.abc, importlib.machinery, types
OPTIONAL = ("higher", "timm", "torchvision", "iopath", "fairscale", "cv2", "openai", "peft",
            "sentence_transformers", "datasets", "nltk", "scipy", "sklearn", "seaborn", "pandas",
            "einops", "PIL", "zhipuai", "qwen_vl_utils", "decord", "av", "rouge")

class Anything(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Anything(name, (), {})
    def __getitem__(cls, item):
        return cls
    def __call__(cls, *args, **kwargs):
        return args[0] if len(args) == 1 and callable(args[0]) else cls

class Placeholders(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots):
        self.roots = roots
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda name: Anything(name, (), {})
        return module
    def exec_module(self, module):
        pass

sys.meta_path.append(Placeholders({n for n in OPTIONAL if importlib.util.find_spec(n) is None}))

import torch
from easyeditor import BaseEditor, REPHyperParams
rep = importlib.import_module("easyeditor.models.rep")  # `easyeditor.models` is shadowed by trainer.models

hparams = REPHyperParams.from_hparams(sys.argv[1])
editor = BaseEditor.from_hparams(hparams)
request = json.loads(sys.argv[2])
torch.manual_seed(0)
metrics, model, _ = editor.edit_requests([request])
print(json.dumps({
    "rewrite_acc": metrics[0]["post"]["rewrite_acc"],
    "health": metrics[0]["requested_rewrite"]["rep"]["health"],
    "padding_side": editor.tok.padding_side,
    "apply": editor.apply_algo.__module__,
    "rep_file": rep.__file__,
    "plugin_modules": sorted(m for m in sys.modules if m.split(".")[0] == "rep_easyedit"),
}))
"""


@pytest.mark.export_upstream
@pytest.mark.real_model
def test_exported_rep_rome_edits_smollm2_inside_the_checkout(tmp_path, dev_cases):
    from rep_easyedit.model_loading import bundled_model_dir

    source = Path(os.environ["EASYEDIT"]).expanduser().resolve()
    checkout = tmp_path / "EasyEdit"
    shutil.copytree(source, checkout, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "rep_easyedit.contrib", "export", str(checkout)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "easyeditor/models/rep/rep_main.py" in done.stdout

    # upstream picks its loader by name: a path with "llama" in it gets AutoModel/AutoTokenizer
    model_dir = tmp_path / "smollm2-llama"
    model_dir.symlink_to(bundled_model_dir())
    raw = yaml.safe_load((ROOT / "hparams/REP-ROME/smollm2-135m.yaml").read_text())
    raw.update(model_name=str(model_dir))
    raw["rep"].update(n_long_contexts=0, corpus_negative_texts=0)  # no corpus to sample
    hp_path = checkout / "hparams" / "REP-ROME" / "smollm2-135m-test.yaml"
    hp_path.write_text(yaml.safe_dump(raw))
    case = dev_cases[0]
    request = {"prompt": case["prompt"], "subject": case["subject"], "ground_truth": case["target_true"],
               "target_new": case["target_new"], "subject_rephrase": case["subject_rephrase"],
               "case_id": case["case_id"], "portability": {}, "locality": {}}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(checkout), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    run = subprocess.run([sys.executable, "-c", RUN_IN_CHECKOUT, str(hp_path), json.dumps(request)],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["plugin_modules"] == []
    assert out["rep_file"] == str(checkout / "easyeditor/models/rep/__init__.py")
    assert out["apply"] == "easyeditor.models.rep.rep_main"
    assert out["padding_side"] == "right"
    assert out["rewrite_acc"] == [1.0]
    assert out["health"]["effective"]

    subprocess.run(["git", "add", "-A"], cwd=checkout, check=True, capture_output=True)
    stat = subprocess.run(["git", "diff", "--cached", "--stat=200", "--", ".", f":!{hp_path.relative_to(checkout)}"],
                          cwd=checkout, capture_output=True, text=True, check=True).stdout
    print(stat)
    for rel in ("easyeditor/models/rep/rep_main.py", "easyeditor/util/alg_dict.py",
                "easyeditor/editors/editor.py", "easyeditor/editors/batch_editor.py",
                f"{EXAMPLES}/REP.md", f"{EXAMPLES}/run_REP_editing.py", "hparams/REP-ROME/llama-7b.yaml"):
        assert rel in stat, rel
    assert "legacy" not in stat and "compat/" not in stat
