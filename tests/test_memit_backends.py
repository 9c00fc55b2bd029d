"""MEMIT / REP-MEMIT on the installed EasyEdit, on a tiny random llama (CPU, fast).

Plain legacy MEMIT needs two shims under transformers 5 (its `compute_z` indexes the tuple a
decoder layer no longer returns; `apply_memit_to_model` builds `cuda:{device}`); REP-MEMIT trains
one adapter per edited layer; `batch_edit` accepts REP-MEMIT; bad input changes nothing.
"""

from pathlib import Path

import pytest
import torch
import yaml

import rep_easyedit
from conftest import tiny_hparams_dict
from rep_easyedit import EditRequestError, LayoutError, REPHyperParams, apply_rep_to_model
from rep_easyedit.core.pathway import installed_paths

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [1, 2]
REQ = {"prompt": "Ferrari F355 is produced by", "subject": "Ferrari F355", "target_new": "BMW",
       "case_id": 1, "subject_rephrase": ["The F355", "F355 by Ferrari", "Ferrari's F355", "F355"]}
REQ2 = {"prompt": "The Eiffel Tower is located in", "subject": "Eiffel Tower", "target_new": "Rome",
        "case_id": 2, "subject_rephrase": ["the Tower", "Tour Eiffel", "Paris's tower", "Eiffel's tower"]}
TEXTS = [f"Some text number {i} about cars, towers, cities and the people who make them." for i in range(24)]


def _raw(name: str, tmp_path, **changes) -> dict:
    changes = {"model_name": "tiny", "layers": LAYERS,
               "lm_head_module": "lm_head",  # the tiny model does not tie its embeddings
               "mom2_n_samples": 1000, **changes}
    return tiny_hparams_dict(name, tmp_path, **changes)


def memit_hparams(tmp_path, **changes):
    """Through `load_hparams`, as a user loads the non-REP yaml (EasyEdit's own from_hparams)."""
    from rep_easyedit.editing import load_hparams

    path = tmp_path / "memit.yaml"
    path.write_text(yaml.safe_dump(_raw("MEMIT", tmp_path, **changes)))
    return load_hparams(path)


def rep_memit_hparams(tmp_path, **changes):
    return REPHyperParams.from_dict(_raw("REP-MEMIT", tmp_path, **changes))


@pytest.fixture()
def model(tiny_model, tokenizer, tmp_path):
    """The tiny llama, named (EasyEdit's stats path holds the model name), with covariance built."""
    from rep_easyedit.covariance import build_stats

    tiny_model.config._name_or_path = "tiny-llama"
    build_stats(tiny_model, tokenizer, memit_hparams(tmp_path), LAYERS, TEXTS, progress=False)
    memit_main = _memit_main()
    saved = dict(memit_main.COV_CACHE)
    memit_main.COV_CACHE.clear()  # keyed by model name only: do not reuse another test's statistics
    yield tiny_model
    memit_main.COV_CACHE.clear()
    memit_main.COV_CACHE.update(saved)


def _memit_main():
    import importlib

    return importlib.import_module("easyeditor.models.memit.memit_main")


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, before) -> bool:
    after = _state(model)
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)


def _hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _weights(model, layers=LAYERS):
    params = dict(model.named_parameters())
    return {l: params[f"model.layers.{l}.mlp.down_proj.weight"].detach().clone() for l in layers}


# -- the shims ----------------------------------------------------------------------------------

def test_tuple_shim_is_detected_and_narrow():
    from rep_easyedit.compat.easyedit import shimmed_functions
    from rep_easyedit.compat.legacy_shims import decoder_layer_returns_tensor

    shimmed = shimmed_functions()
    name = "easyeditor.models.memit.compute_z.compute_z"
    import inspect

    source = inspect.getsource(getattr(_memit_main().compute_z, "__rep_easyedit_original__",
                                       _memit_main().compute_z))
    if decoder_layer_returns_tensor() and "cur_out[0]" in source:
        assert "layer_output_tuple" in shimmed[name]
    # only compute_z gets the tuple rewrite; nothing else in EasyEdit is touched by it
    assert [k for k, v in shimmed.items() if "layer_output_tuple" in v] in ([], [name])
    # outside shims_applied the module holds the original function
    assert not hasattr(_memit_main().compute_z, "__rep_easyedit_rewrites__")


def test_hidden_state_helper():
    from rep_easyedit.compat.legacy_shims import hidden_state

    t = torch.zeros(2, 3, 4)
    assert hidden_state(t) is t and hidden_state((t, None)) is t


# -- plain MEMIT ----------------------------------------------------------------------------------

def test_legacy_memit_edits_every_layer(model, tokenizer, tmp_path):
    from rep_easyedit.compat.easyedit import installed_algorithm
    from rep_easyedit.editing import apply_edit, restore

    assert installed_algorithm("MEMIT") is not None
    hp = memit_hparams(tmp_path)
    before, state = _weights(model), _state(model)
    weights_copy = apply_edit(model, tokenizer, [dict(REQ)], hp)
    after = _weights(model)
    assert sorted(weights_copy) == [f"model.layers.{l}.mlp.down_proj.weight" for l in LAYERS]
    for layer in LAYERS:
        assert not torch.equal(after[layer], before[layer]), f"layer {layer} unchanged"
        assert torch.isfinite(after[layer]).all()
    restore(model, weights_copy)
    assert _unchanged(model, state)


@pytest.mark.parametrize("alg", ["MEMIT", "ROME"])
def test_easyedits_own_methods_name_missing_statistics_before_editing(tiny_model, tokenizer, tmp_path,
                                                                       monkeypatch, alg):
    """EasyEdit's MEMIT (always) and ROME (`mom2_adjustment: true`) with no statistics on disk and no
    way to build them (`datasets` absent, or offline): the error names the files and the offline
    command, through `ALG_DICT` as `BaseEditor` calls it, and the model is as it was. Without the
    check, the edit failed inside `layer_stats` with an ImportError about `datasets`."""
    from rep_easyedit.compat.easyedit import installed_algorithm
    from rep_easyedit.covariance import MissingCovarianceError
    from rep_easyedit.editing import load_hparams

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # whether or not `datasets` is installed here
    tiny_model.config._name_or_path = "tiny-llama-no-stats"
    path = tmp_path / f"{alg}.yaml"
    path.write_text(yaml.safe_dump(_raw(alg, tmp_path, layers=[1], mom2_adjustment=True)))
    hp = load_hparams(path)
    apply = installed_algorithm(alg)
    state, hooks = _state(tiny_model), _hooks(tiny_model)
    with pytest.raises(MissingCovarianceError, match=r"(?s)layer 1: .*rep_easyedit\.stats --hparams"):
        apply(tiny_model, tokenizer, [dict(REQ)], hp, copy=False, return_orig_weights=True)
    assert _unchanged(tiny_model, state) and _hooks(tiny_model) == hooks


# -- REP-MEMIT ------------------------------------------------------------------------------------

def _restore_as_easyedit(edited, weights_copy, state):
    """Restore the way EasyEdit does (write weights_copy back; adapters' `active` switches too) and
    check that the model is exactly as before: parameters, buffers, no pathway, no hook."""
    params = dict(edited.named_parameters())
    with torch.no_grad():
        for k, v in weights_copy.items():
            params[k][...] = v
    rep_easyedit.prune_inactive(edited)
    assert installed_paths(edited) == [] and _hooks(edited) == 0
    assert _unchanged(edited, state)


def test_rep_memit_one_adapter_per_layer(model, tokenizer, tmp_path):
    hp = rep_memit_hparams(tmp_path)
    before, state = _weights(model), _state(model)
    req = dict(REQ)
    edited, weights_copy = apply_rep_to_model(model, tokenizer, [req], hp, return_orig_weights=True,
                                              keep_original_weight=True)
    assert installed_paths(edited) == [f"model.layers.{l}.mlp.down_proj" for l in LAYERS]
    assert sorted(req["rep"]["training"]) == [f"model.layers.{l}.mlp.down_proj" for l in LAYERS]
    after = _weights(edited)
    assert all(not torch.equal(after[l], before[l]) for l in LAYERS)
    _restore_as_easyedit(edited, weights_copy, state)


def test_rep_alphaedit_batch_of_two_adapters_per_request_and_restore(model, tokenizer, tmp_path):
    """REP-AlphaEdit (AlphaEdit where the installed EasyEdit lacks it) edits a batch: one adapter per
    request and layer, both layers' weights move, and EasyEdit's restore of weights_copy puts the
    model back exactly (AlphaEdit's cumulative term then forgets the edit)."""
    from rep_easyedit.backends_extra.alphaedit import edited_keys, reset_history
    from rep_easyedit.backends_extra.common import edited_weight

    hp = REPHyperParams.from_dict(_raw("REP-AlphaEdit", tmp_path, nullspace_threshold=1e-1, L2=1e-4))
    before, state = _weights(model), _state(model)
    reqs = [dict(REQ), dict(REQ2)]
    try:
        edited, weights_copy = apply_rep_to_model(model, tokenizer, reqs, hp, return_orig_weights=True,
                                                  keep_original_weight=True)
        paths = [f"model.layers.{l}.mlp.down_proj" for l in LAYERS]
        assert installed_paths(edited) == paths
        assert all(sorted(r["rep"]["training"]) == paths for r in reqs)
        after = _weights(edited)
        assert all(not torch.equal(after[l], before[l]) for l in LAYERS)
        w = edited_weight(edited, hp.backend_hparams(), LAYERS[0])
        assert len(edited_keys(edited, w)) == 1 and edited_keys(edited, w)[0].shape[1] == 2
        _restore_as_easyedit(edited, weights_copy, state)
        assert edited_keys(edited, w) == []
    finally:
        reset_history(model)


def test_rep_memit_batch_edit_through_editor(model, tokenizer, tmp_path):
    """Legacy `BaseEditor.batch_edit` with two requests: REP-MEMIT must count as batchable."""
    from rep_easyedit.compat.easyedit import _batch_editor_class, editor_class

    assert _batch_editor_class().is_batchable_method("REP-MEMIT")
    assert _batch_editor_class().is_batchable_method("REP-EMMET")
    assert _batch_editor_class().is_batchable_method("REP-AlphaEdit")
    assert _batch_editor_class().is_batchable_method("AlphaEdit")
    assert _batch_editor_class().is_batchable_method("MEMIT")       # unchanged answers
    assert not _batch_editor_class().is_batchable_method("REP-ROME")
    hp = rep_memit_hparams(tmp_path, batch_size=2)
    hp.model_name = (model, tokenizer)
    editor = editor_class()(hp)
    editor.model_name = "tiny-llama"  # EasyEdit's evaluation calls .lower() on it
    before = _weights(model)
    metrics, edited, weights_copy = editor.batch_edit(
        prompts=[REQ["prompt"], REQ2["prompt"]], target_new=[REQ["target_new"], REQ2["target_new"]],
        ground_truth=["Ferrari", "Paris"], subject=[REQ["subject"], REQ2["subject"]],
        subject_rephrase=[REQ["subject_rephrase"], REQ2["subject_rephrase"]],
        keep_original_weight=True, verbose=False)
    assert len(metrics) == 2
    # two requests, two layers: two adapters per edited layer, trained with their own keys
    for path in (f"model.layers.{l}.mlp.down_proj" for l in LAYERS):
        active = [k for k in weights_copy if k.startswith(path) and k.endswith(".active")]
        assert len(active) == 2, (path, sorted(weights_copy))
    # keep_original_weight=True: the editor wrote the original weights back
    assert all(torch.equal(_weights(edited)[l], before[l]) for l in LAYERS)
    rep_easyedit.prune_inactive(edited)
    assert installed_paths(edited) == []


# -- bad input, before anything changes -------------------------------------------------------------

def test_mismatched_list_lengths_change_nothing(model, tokenizer, tmp_path):
    from rep_easyedit.compat.easyedit import editor_class

    hp = rep_memit_hparams(tmp_path, batch_size=2)
    hp.model_name = (model, tokenizer)
    editor = editor_class()(hp)
    editor.model_name = "tiny-llama"
    state = _state(model)
    with pytest.raises((ValueError, AssertionError)):
        editor.batch_edit(prompts=[REQ["prompt"], REQ2["prompt"]], target_new=[REQ["target_new"]],
                          subject=[REQ["subject"], REQ2["subject"]], verbose=False)
    with pytest.raises(ValueError, match="subject_rephrase"):
        editor.batch_edit(prompts=[REQ["prompt"], REQ2["prompt"]],
                          target_new=[REQ["target_new"], REQ2["target_new"]],
                          subject=[REQ["subject"], REQ2["subject"]],
                          subject_rephrase=[REQ["subject_rephrase"]], verbose=False)
    assert _unchanged(model, state) and _hooks(model) == 0


def test_memit_layers_outside_model(model, tokenizer, tmp_path):
    state = _state(model)
    with pytest.raises(LayoutError, match="outside"):
        apply_rep_to_model(model, tokenizer, [dict(REQ)], rep_memit_hparams(tmp_path, layers=[2, 3, 4]))
    with pytest.raises(LayoutError, match="outside"):
        apply_rep_to_model(model, tokenizer, [dict(REQ)], rep_memit_hparams(tmp_path, layers=[-1, 1]))
    assert _unchanged(model, state) and _hooks(model) == 0


def test_batch_to_rep_r_rome_is_refused(model, tokenizer, tmp_path):
    raw = _raw("REP-R-ROME", tmp_path, layers=[1], context_template_length_params=[[3, 5]])
    hp = REPHyperParams.from_dict(raw)
    state = _state(model)
    with pytest.raises(EditRequestError, match="1 fact"):
        apply_rep_to_model(model, tokenizer, [dict(REQ), dict(REQ2)], hp)
    assert _unchanged(model, state) and _hooks(model) == 0


@pytest.mark.parametrize("after", [False, True], ids=["keys-before-update", "keys-after-update"])
def test_rep_memit_reads_keys_before_or_after_the_update(model, tokenizer, tmp_path, monkeypatch, after):
    """`rep.fit_after_update`: the adapters' keys come from the model MEMIT has already edited."""
    from rep_easyedit import rep_main

    hp = rep_memit_hparams(tmp_path, rep_fit_after_update=after)
    original = _weights(model)
    seen = []
    real = rep_main.gather_training_keys

    def spy(*args, **kwargs):
        now = _weights(model)
        seen.append(all(torch.equal(now[l], original[l]) for l in LAYERS))
        return real(*args, **kwargs)

    monkeypatch.setattr(rep_main, "gather_training_keys", spy)
    state = _state(model)
    edited, weights_copy = apply_rep_to_model(model, tokenizer, [dict(REQ)], hp, return_orig_weights=True,
                                              keep_original_weight=True)
    assert seen == [not after] * len(LAYERS)  # one key collection per layer, each before/after
    assert installed_paths(edited) == [f"model.layers.{l}.mlp.down_proj" for l in LAYERS]
    params = dict(edited.named_parameters())
    with torch.no_grad():
        for k, v in weights_copy.items():
            params[k][...] = v
    rep_easyedit.prune_inactive(edited)
    assert _unchanged(edited, state) and _hooks(edited) == 0


@pytest.mark.parametrize("whiten, expect_whitened", [(None, True), (True, True), (False, False)])
def test_rep_memit_cosine_target_whitening(model, tokenizer, tmp_path, monkeypatch, whiten, expect_whitened):
    """Cosine aggregation pulls towards C⁻¹k* of each layer unless `rep.whiten_target: false`."""
    from rep_easyedit import rep_main
    from rep_easyedit.covariance import load_inverse_covariance

    hp = rep_memit_hparams(tmp_path, rep_aggregation="cosine", rep_whiten_target=whiten)
    targets = []
    real = rep_main.train_adapter

    def spy(adapter, keys, *args, **kwargs):
        targets.append((keys.target.clone(), None if keys.target_whitened is None else keys.target_whitened.clone()))
        return real(adapter, keys, *args, **kwargs)

    monkeypatch.setattr(rep_main, "train_adapter", spy)
    apply_rep_to_model(model, tokenizer, [dict(REQ)], hp, keep_original_weight=True)
    assert len(targets) == len(LAYERS)
    for layer, (target, whitened) in zip(LAYERS, targets):
        if expect_whitened:
            inv = load_inverse_covariance(model, hp.backend_hparams(), layer).float().cpu()
            torch.testing.assert_close(whitened, inv @ target)
        else:
            assert whitened is None


def test_whiten_target_needs_cosine(tmp_path):
    with pytest.raises(ValueError, match="whiten_target"):
        rep_memit_hparams(tmp_path, rep_aggregation="match", rep_whiten_target=True)


@pytest.mark.parametrize("alg", ["REP-ROME", "REP-MEMIT"])
def test_editing_path_raises_no_deprecation_warning(model, tokenizer, tmp_path, alg):
    """The whole edit (templates generated afresh by EasyEdit's own sampler, keys, training, the
    backend) under the installed transformers: a FutureWarning or DeprecationWarning is an error.
    Regression: legacy `generate_fast` passed `past_key_values=`, renamed `cache` in transformers 5.25."""
    import warnings

    from rep_easyedit.backends import _TEMPLATE_CACHES

    _TEMPLATE_CACHES.pop(model, None)  # force the template sampler to run
    hp = REPHyperParams.from_dict(_raw(alg, tmp_path)) if alg == "REP-MEMIT" else REPHyperParams.from_dict(
        tiny_hparams_dict(alg, tmp_path, model_name="tiny", lm_head_module="lm_head"))
    state = _state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        edited, weights_copy = apply_rep_to_model(model, tokenizer, [dict(REQ)], hp, return_orig_weights=True,
                                                  keep_original_weight=True)
    params = dict(edited.named_parameters())
    with torch.no_grad():
        for k, v in weights_copy.items():
            params[k][...] = v
    rep_easyedit.prune_inactive(edited)
    assert _unchanged(edited, state)


def test_rep_memit_replayed_blocks_train_the_same_adapters(model, tokenizer, tmp_path):
    """`rep.replay_blocks` only saves forward passes: the adapters and the edited model are the same."""
    outputs, collected = {}, {}
    ids = tokenizer(["Ferrari F355 is produced by", "The F355 by Ferrari is made by"], return_tensors="pt",
                    padding=True)
    for replay in (False, True):
        state = _state(model)
        req = dict(REQ)
        edited, weights_copy = apply_rep_to_model(model, tokenizer, [req], rep_memit_hparams(tmp_path, rep_replay_blocks=replay),
                                                  return_orig_weights=True, keep_original_weight=True)
        with torch.no_grad():
            outputs[replay] = edited(**ids).logits
        collected[replay] = [r["collection"]["tokens"] for r in req["rep"]["training"].values()]
        _restore_as_easyedit(edited, weights_copy, state)
    assert torch.allclose(outputs[True], outputs[False], rtol=1e-4, atol=1e-5)
    assert collected[True] == collected[False]
