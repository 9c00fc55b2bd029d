"""REP-ROME plumbing on a tiny random llama: contract, restore, atomicity, bad input."""

import pytest
import torch

import rep_easyedit
from rep_easyedit import EditRequestError, LayoutError, REPHyperParams, apply_rep_to_model
from rep_easyedit.core.pathway import installed_paths

from conftest import tiny_hparams_dict



def tiny_hparams(tmp_path, **changes):
    return REPHyperParams.from_dict(tiny_hparams_dict("REP-ROME", tmp_path, **changes))


REQ = {"prompt": "Ferrari F355 is produced by", "subject": "Ferrari F355", "target_new": "BMW",
       "case_id": 1, "subject_rephrase": ["The F355", "F355 by Ferrari", "Ferrari's F355", "F355"]}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _logits(model, tok):
    enc = tok(["Ferrari F355 is produced by", "The capital of France is"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


def test_edit_installs_pathway_and_restore_is_exact(tiny_model, tokenizer, tmp_path):
    hp = tiny_hparams(tmp_path)
    before_state, before_logits = _state(tiny_model), _logits(tiny_model, tokenizer)
    req = dict(REQ)
    model, weights_copy = apply_rep_to_model(tiny_model, tokenizer, [req], hp, return_orig_weights=True,
                                             keep_original_weight=True)
    assert installed_paths(model) == ["model.layers.1.mlp.down_proj"]
    assert "model.layers.1.mlp.down_proj.weight" in weights_copy
    assert any(k.endswith(".active") for k in weights_copy)
    assert not torch.equal(_logits(model, tokenizer), before_logits)
    assert req["rep"]["perturbations"]["rephrase_in"] == ["The F355", "F355 by Ferrari"]
    # EasyEdit's restore: write weights_copy back through get_parameter
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in weights_copy.items():
            params[k][...] = v
    assert torch.equal(_logits(model, tokenizer), before_logits)
    assert _hooks(model) == 0 and installed_paths(model) == []
    after = _state(model)
    assert after.keys() == before_state.keys()
    assert all(torch.equal(after[k], before_state[k]) for k in after)


def test_sequential_style_returns_no_copy_on_legacy(tiny_model, tokenizer, tmp_path):
    from rep_easyedit.compat.easyedit import editor_uses_sequential_flag

    hp = tiny_hparams(tmp_path)
    _, weights_copy = apply_rep_to_model(tiny_model, tokenizer, [dict(REQ)], hp, return_orig_weights=True,
                                         keep_original_weight=False)
    assert (weights_copy == {}) == (not editor_uses_sequential_flag())


def test_failure_in_backend_leaves_model_untouched(tiny_model, tokenizer, tmp_path, monkeypatch):
    import rep_easyedit.rep_main as rep_main
    from rep_easyedit.backends import get_backend

    hp = tiny_hparams(tmp_path)
    real = get_backend("ROME")

    def exploding(model, tok, requests, hparams, **kw):
        real.apply(model, tok, requests, hparams, **kw)  # really edits, then fails
        raise RuntimeError("backend failure")

    monkeypatch.setattr(rep_main, "get_backend", lambda name: real.__class__(
        real.name, exploding, real.hparams_cls, real.context_templates, real.max_batch))
    before = _state(tiny_model)
    with pytest.raises(RuntimeError, match="backend failure"):
        apply_rep_to_model(tiny_model, tokenizer, [dict(REQ)], hp, return_orig_weights=True,
                           keep_original_weight=True)
    after = _state(tiny_model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    assert _hooks(tiny_model) == 0


@pytest.mark.parametrize("change, error, message", [
    ({"subject": "Porsche"}, EditRequestError, "does not occur"),
    ({"prompt": "Ferrari F355 or Ferrari F355 is produced by"}, EditRequestError, "2 times"),
    ({"target_new": ""}, EditRequestError, "empty"),
])
def test_bad_requests_change_nothing(tiny_model, tokenizer, tmp_path, change, error, message):
    hp = tiny_hparams(tmp_path)
    before = _state(tiny_model)
    with pytest.raises(error, match=message):
        apply_rep_to_model(tiny_model, tokenizer, [dict(REQ, **change)], hp)
    assert all(torch.equal(v, before[k]) for k, v in _state(tiny_model).items())
    assert _hooks(tiny_model) == 0


def test_layout_errors(tiny_model, tokenizer, tmp_path):
    with pytest.raises(LayoutError, match="outside"):
        apply_rep_to_model(tiny_model, tokenizer, [dict(REQ)], tiny_hparams(tmp_path, layers=[7]))
    with pytest.raises(LayoutError, match="does not exist"):
        apply_rep_to_model(tiny_model, tokenizer, [dict(REQ)],
                           tiny_hparams(tmp_path, rewrite_module_tmp="transformer.h.{}.mlp.c_proj"))
    assert _hooks(tiny_model) == 0


def test_missing_covariance_is_a_clear_error(tiny_model, tokenizer, tmp_path):
    from rep_easyedit.covariance import MissingCovarianceError

    hp = tiny_hparams(tmp_path, mom2_adjustment=True)
    with pytest.raises(MissingCovarianceError, match="rep_easyedit.stats"):
        apply_rep_to_model(tiny_model, tokenizer, [dict(REQ)], hp)
    assert _hooks(tiny_model) == 0


def test_batch_to_single_fact_backend(tiny_model, tokenizer, tmp_path):
    with pytest.raises(EditRequestError, match="1 fact"):
        apply_rep_to_model(tiny_model, tokenizer, [dict(REQ), dict(REQ)], tiny_hparams(tmp_path))


def test_context_templates_are_generated_once_per_model(tiny_model, tokenizer, tmp_path, monkeypatch):
    """EasyEdit's template cache is a module global; REP keeps it per model, nested calls included."""
    import importlib

    from rep_easyedit.compat.easyedit import device_shims, installed_algorithm
    from rep_easyedit.editing import apply_edit, restore

    fn = installed_algorithm("ROME")
    rome_main = importlib.import_module(getattr(fn, "__rep_easyedit_original__", fn).__module__)
    calls = []
    # the spy calls the shimmed generator (the shims leave a replaced attribute alone)
    real = next((p for _o, _a, orig, p in device_shims().replacements if orig is rome_main.generate_fast),
                rome_main.generate_fast)
    monkeypatch.setattr(rome_main, "generate_fast", lambda *a, **k: calls.append(1) or real(*a, **k))
    hp = tiny_hparams(tmp_path)
    counts = []
    for _ in range(2):
        restore(tiny_model, apply_edit(tiny_model, tokenizer, [dict(REQ)], hp))
        counts.append(len(calls))
    assert counts[0] > 0 and counts[1] == counts[0]
