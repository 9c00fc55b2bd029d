"""What only an upstream EasyEdit checkout has (`make test-upstream EASYEDIT=...`; skipped on PyPI's).

Upstream restores through `editors.utils.restore_after_edit` (the editor passes
`keep_original_weight=False` and writes `weights_copy` back unless `sequential_edit=True`),
evaluates each request right after its edit, has its own R-ROME, EMMET and AlphaEdit, gives right
padding only to the names it lists, and decides batching with the `BatchEditor` enum.
"""

import pytest
import torch

import rep_easyedit
from rep_easyedit.core.pathway import get_module, installed_paths, pathway_of

from conftest import ROOT, tiny_hparams_dict

pytestmark = pytest.mark.upstream_easyedit
REP_NAMES = ("REP-ROME", "REP-MEMIT", "REP-R-ROME", "REP-EMMET")


def _original(fn):
    return getattr(fn, "__rep_easyedit_original__", fn)


def test_rep_names_in_upstream_alg_dict_and_backends_are_upstreams():
    from easyeditor.editors.batch_editor import BatchEditor
    from easyeditor.util.alg_dict import ALG_DICT

    assert rep_easyedit.REGISTERED == list(REP_NAMES)
    for name in REP_NAMES:
        assert _original(ALG_DICT[name]) is rep_easyedit.apply_rep_to_model
    # upstream has R-ROME and EMMET: ours (backends_extra) must not replace them
    for name in ("R-ROME", "EMMET", "AlphaEdit"):
        assert _original(ALG_DICT[name]).__module__.startswith("easyeditor.models."), name
    assert BatchEditor.is_batchable_method("REP-MEMIT") and BatchEditor.is_batchable_method("REP-EMMET")
    assert not BatchEditor.is_batchable_method("REP-ROME")
    assert not BatchEditor.is_batchable_method("REP-R-ROME")
    assert BatchEditor.is_batchable_method("AlphaEdit")  # its own answers unchanged


def test_upstream_binding_agrees_with_the_plugins():
    """`compat/upstream.py` (what the export uses) finds what `compat/easyedit.py` finds."""
    from rep_easyedit.compat import easyedit, upstream

    for name in ("ROME", "MEMIT", "R-ROME", "EMMET") + REP_NAMES:
        assert _original(upstream.installed_algorithm(name)) is _original(easyedit.installed_algorithm(name))
    assert upstream.installed_algorithm("NO-SUCH-METHOD") is None
    assert upstream.editor_uses_sequential_flag() and easyedit.editor_uses_sequential_flag()


def test_rep_names_get_right_padding_where_easyedit_loads_the_model(tmp_path, monkeypatch):
    """Upstream loads a `...llama...` path itself and pads left for names not on its list."""
    from easyeditor import BaseEditor
    import rep_easyedit.compat.easyedit as compat
    from rep_easyedit.model_loading import bundled_model_dir

    link = tmp_path / "smollm2-llama"
    link.symlink_to(bundled_model_dir())
    monkeypatch.setattr(compat, "_loads_itself", lambda name: False)
    raw = tiny_hparams_dict("REP-ROME", tmp_path, model_name=str(link))
    editor = BaseEditor.from_hparams(rep_easyedit.REPHyperParams.from_dict(raw))
    assert editor.tok.padding_side == "right"
    editor.hparams.alg_name = "MEMIT-FE"  # same model, a name off the list: upstream's left stays
    editor.__init__(editor.hparams)
    assert editor.tok.padding_side == "left"


def _two_requests():
    return [{"prompt": "Ferrari F355 is produced by", "subject": "Ferrari F355", "target_new": "BMW",
             "ground_truth": "Ferrari", "case_id": 1, "subject_rephrase": ["F355 by Ferrari", "The F355"]},
            {"prompt": "The Eiffel Tower is located in", "subject": "Eiffel Tower", "target_new": "Rome",
             "ground_truth": "Paris", "case_id": 2, "subject_rephrase": ["Tour Eiffel", "the Tower"]}]


@pytest.mark.parametrize("sequential", [False, True])
def test_sequential_edit_keeps_adapters_and_restore_removes_them(tiny_model, tokenizer, tmp_path,
                                                                  monkeypatch, sequential):
    """`sequential_edit=True`: both edits stay (two adapters, weights changed), each request is
    evaluated right after its own edit. Without it upstream's `restore_after_edit` runs after each
    edit and leaves weights, hooks and outputs as before."""
    import easyeditor.editors.editor as editor_module
    from easyeditor import BaseEditor

    raw = tiny_hparams_dict("REP-ROME", tmp_path, model_name="tiny")
    hp = rep_easyedit.REPHyperParams.from_dict(raw)
    editor = BaseEditor.from_hparams(_with_model(hp, tiny_model, tokenizer))
    editor.model_name = "tiny-llama"  # upstream's evaluation reads a name (it keeps the pair)
    path = hp.rewrite_module_tmp.format(hp.layers[0])
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    calls = []
    restore = editor_module.restore_after_edit
    monkeypatch.setattr(editor_module, "restore_after_edit",
                        lambda *a: calls.append(len(installed_paths(tiny_model))) or restore(*a))
    requests = _two_requests()
    metrics, model, _ = editor.edit(prompts=[r["prompt"] for r in requests],
                                    target_new=[r["target_new"] for r in requests],
                                    ground_truth=[r["ground_truth"] for r in requests],
                                    subject=[r["subject"] for r in requests],
                                    subject_rephrase=[r["subject_rephrase"] for r in requests],
                                    case_id=[r["case_id"] for r in requests], sequential_edit=sequential)
    assert [m["requested_rewrite"]["case_id"] for m in metrics] == [1, 2]  # REP's fields arrived
    assert all("post" in m and "rep" in m["requested_rewrite"] for m in metrics)
    weight = tiny_model.state_dict()[f"{path}.weight"]
    if sequential:
        assert calls == []
        pathway = pathway_of(get_module(tiny_model, path))
        assert len(pathway.adapters) == 2 and all(float(a.active) == 1.0 for a in pathway.adapters)
        assert not torch.equal(weight, before[f"{path}.weight"])
    else:
        assert calls == [1, 1]  # called once per edit, with that edit's pathway installed
        rep_easyedit.prune_inactive(tiny_model)
        assert installed_paths(tiny_model) == []
        after = tiny_model.state_dict()
        assert all(torch.equal(after[k], before[k]) for k in before)


def _with_model(hp, model, tok):
    """Hparams whose `model_name` is the `(model, tokenizer)` pair upstream's editor accepts."""
    import copy

    proxy = copy.copy(hp)
    proxy.model_name = (model, tok)
    return proxy


BACKENDS = ("ROME", "MEMIT", "R-ROME", "EMMET")


@pytest.fixture(scope="module")
def smollm2_covariance():
    """MEMIT's/EMMET's key statistics for SmolLM2 (built once when missing, as a user builds them)."""
    from rep_easyedit.stats import main

    assert main(["--hparams", str(ROOT / "hparams/MEMIT/smollm2-135m.yaml")]) == 0


@pytest.mark.real_model
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_with_and_without_rep_on_smollm2(backend, dev_cases, smollm2_covariance, monkeypatch):
    """One dev case per method, through `BaseEditor.from_hparams(...).edit(...)`: the edit
    succeeds, REP's pathway is effective, and upstream's `restore_after_edit` leaves the model
    exactly as before (parameters, hooks)."""
    import easyeditor.editors.editor as editor_module
    from easyeditor import BaseEditor
    from rep_easyedit.editing import load_hparams

    case = dev_cases[0]
    restored = []
    restore = editor_module.restore_after_edit
    monkeypatch.setattr(editor_module, "restore_after_edit", lambda *a: restored.append(1) or restore(*a))
    for name in (backend, f"REP-{backend}"):
        hp = load_hparams(ROOT / f"hparams/{name}/smollm2-135m.yaml")
        editor = BaseEditor.from_hparams(hp)
        model = editor.model
        state = {k: v.clone() for k, v in model.state_dict().items()}
        torch.manual_seed(0)
        metrics, _, _ = editor.edit(
            prompts=[case["prompt"]], ground_truth=[case["target_true"]], target_new=[case["target_new"]],
            subject=[case["subject"]], subject_rephrase=[case["subject_rephrase"]], case_id=[case["case_id"]])
        assert metrics[0]["post"]["rewrite_acc"][0] == 1.0, (name, metrics[0]["post"])
        if name.startswith("REP-"):
            assert metrics[0]["requested_rewrite"]["rep"]["health"]["effective"], name
        rep_easyedit.prune_inactive(model)
        after = model.state_dict()
        assert installed_paths(model) == [] and after.keys() == state.keys()
        restored_exactly = all(torch.equal(after[k], state[k]) for k in state)
        # upstream's own EMMET (14cea82, emmet_main.py) empties weights_copy when
        # keep_original_weight=False, which the editor always passes: its edit is never undone.
        # REP-EMMET returns its own snapshot, so REP's edit is.
        assert restored_exactly == (name != "EMMET"), name
    assert len(restored) == 2
