"""The variant-aware value fit reduces to ROME's own value when there are no variants."""

import importlib

import pytest
import torch

from rep_easyedit.compat.easyedit import installed_algorithm, shims_applied
from rep_easyedit.core.keys import subject_last_index
from rep_easyedit.robust_value import VariantFit, optimise_target, optimise_value

from test_rep_edit_tiny import REQ, tiny_hparams


def test_matches_rome_compute_v_without_variants(tiny_model, tokenizer, tmp_path):
    hp = tiny_hparams(tmp_path, v_num_grad_steps=5).backend_hparams()
    rome = importlib.import_module(installed_algorithm("ROME").__module__)
    request = {"prompt": "{} is produced by", "subject": REQ["subject"], "target_new": " BMW"}
    templates = ["{}", "Hello there. {}", "In a word. {}"]
    left = torch.randn(tiny_model.config.intermediate_size)
    left = left / left.norm()
    with shims_applied():
        theirs = rome.compute_v(tiny_model, tokenizer, dict(request), hp, 1, left, templates)
    ours = optimise_value(tiny_model, tokenizer, dict(request), hp, 1, left, templates)
    assert torch.allclose(ours, theirs, rtol=1e-3, atol=1e-4)


def test_matches_memit_compute_z_without_variants(tiny_model, tokenizer, tmp_path):
    from conftest import tiny_hparams_dict
    from rep_easyedit.editing import load_hparams
    import yaml

    path = tmp_path / "memit.yaml"
    path.write_text(yaml.safe_dump(tiny_hparams_dict("MEMIT", tmp_path, model_name="tiny", layers=[1, 2],
                                                     lm_head_module="lm_head", v_num_grad_steps=5)))
    hp = load_hparams(path)
    memit = importlib.import_module(installed_algorithm("MEMIT").__module__)
    request = {"prompt": "{} is produced by", "subject": REQ["subject"], "target_new": " BMW"}
    templates = [["{}"], ["Hello there. {}", "In a word. {}"]]
    with shims_applied():
        theirs = memit.compute_z(tiny_model, tokenizer, dict(request), hp, 2, templates)
    ours = optimise_target(tiny_model, tokenizer, dict(request), hp, 2, templates)
    assert torch.allclose(ours, theirs, rtol=1e-3, atol=1e-4)


def test_variants_change_the_value(tiny_model, tokenizer, tmp_path):
    hp = tiny_hparams(tmp_path, v_num_grad_steps=5).backend_hparams()
    request = {"prompt": "{} is produced by", "subject": REQ["subject"], "target_new": " BMW"}
    left = torch.ones(tiny_model.config.intermediate_size) / tiny_model.config.intermediate_size ** 0.5
    plain = optimise_value(tiny_model, tokenizer, dict(request), hp, 1, left, ["{}"])
    robust = optimise_value(tiny_model, tokenizer, dict(request), hp, 1, left, ["{}"],
                            VariantFit(variants=("The F355", "F355 by Ferrari")))
    assert torch.isfinite(robust).all() and not torch.allclose(plain, robust)


@pytest.mark.parametrize("alg", ["REP-ROME", "REP-R-ROME", "REP-EMMET", "REP-MEMIT"])
def test_option_reaches_every_backend(alg, tiny_model, tokenizer, tmp_path, monkeypatch):
    """`rep.value_on_variants` fits the value over the variants in every backend (R-ROME and EMMET
    read ROME's `compute_v` at call time, MEMIT its `compute_z`) and gives each back afterwards."""
    import rep_easyedit.robust_value as robust_value
    from conftest import tiny_hparams_dict
    from rep_easyedit import REPHyperParams, apply_rep_to_model
    from rep_easyedit.backends_extra.common import easyedit_module
    from rep_easyedit.covariance import build_stats

    tiny_model.config._name_or_path = f"tiny-llama-value-{alg}"
    raw = tiny_hparams_dict(alg, tmp_path, model_name="tiny", layers=[1], lm_head_module="lm_head",
                            mom2_n_samples=1000, v_num_grad_steps=3, rep_value_on_variants=True,
                            rep_value_variant_templates=1, rep_fit_after_update=False)
    hp = REPHyperParams.from_dict(raw)
    build_stats(tiny_model, tokenizer, hp, [1], [f"Some text {i} about cars and towns." for i in range(24)],
                progress=False)
    seen = []
    original = robust_value.fit_shift

    def spy(*args, **kwargs):
        seen.append(list(args[6].variants))
        return original(*args, **kwargs)

    monkeypatch.setattr(robust_value, "fit_shift", spy)
    rome_v = easyedit_module("models.rome.compute_v")
    memit_main = importlib.import_module(installed_algorithm("MEMIT").__module__)
    before = rome_v.compute_v, memit_main.compute_z
    req = dict(REQ, ground_truth="Ferrari")
    apply_rep_to_model(tiny_model, tokenizer, [req], hp, keep_original_weight=True)
    assert seen and all(seen) and "The F355" in seen[0]
    assert (rome_v.compute_v, memit_main.compute_z) == before


def test_variant_weight_counts_a_prompt_as_repeated(tiny_model, tokenizer, tmp_path):
    """`rep.value_variant_weight: 2` fits the value as if each variant prompt were there twice."""
    hp = tiny_hparams(tmp_path, v_num_grad_steps=4).backend_hparams()
    request = {"prompt": "{} is produced by", "subject": REQ["subject"], "target_new": " BMW"}
    left = torch.ones(tiny_model.config.intermediate_size) / tiny_model.config.intermediate_size ** 0.5
    templates = ["{}", "Hello there. {}"]
    weighted = optimise_value(tiny_model, tokenizer, dict(request), hp, 1, left, templates,
                              VariantFit(("The F355",), templates=1, weight=2.0))
    repeated = optimise_value(tiny_model, tokenizer, dict(request), hp, 1, left, templates,
                              VariantFit(("The F355", "The F355"), templates=1))
    plain = optimise_value(tiny_model, tokenizer, dict(request), hp, 1, left, templates,
                           VariantFit(("The F355",), templates=1))
    assert torch.allclose(weighted, repeated, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(weighted, plain, rtol=1e-3, atol=1e-4)


def test_anchor_keys_are_the_keys_each_name_has_alone(tiny_model, tokenizer):
    """The anchors' per-token keys, read from one right-padded batch, are each text's keys in its
    own forward, and zero past its end."""
    from rep_easyedit.robust_value import _token_keys

    down = tiny_model.model.layers[1].mlp.down_proj
    texts = [f"{n} is produced by" for n in ["Ferrari F40", "BMW", "the Lamborghini Countach LP400"]]
    batched = _token_keys(tiny_model, tokenizer, texts, down)
    for text, keys in zip(texts, batched):
        alone = _token_keys(tiny_model, tokenizer, [text], down)[0]
        n = alone.shape[0]
        assert torch.allclose(keys[:n], alone, atol=1e-5)
        assert not keys[n:].any()


def test_an_anchor_the_update_cannot_tell_from_the_subject_is_left_out(tiny_model, tokenizer, tmp_path):
    """A name whose key takes the whole update (the subject itself: share 1) would only undo the
    edit; it is left out and reported, and the value is the one fitted without it."""
    hp = tiny_hparams(tmp_path, v_num_grad_steps=5).backend_hparams()
    request = {"prompt": "{} is produced by", "subject": REQ["subject"], "target_new": " BMW"}
    left = torch.ones(tiny_model.config.intermediate_size) / tiny_model.config.intermediate_size ** 0.5
    plain = optimise_value(tiny_model, tokenizer, dict(request), hp, 1, left, ["{}"])
    fit = VariantFit(anchors=(REQ["subject"],), anchor_weight=10.0)
    guarded = optimise_value(tiny_model, tokenizer, dict(request), hp, 1, left, ["{}"], fit)
    assert fit.report["anchors_left_out"] == [REQ["subject"]]
    assert fit.report["anchor_shares"][REQ["subject"]] == pytest.approx(1.0, abs=1e-3)
    assert torch.allclose(guarded, plain, rtol=1e-4, atol=1e-5)
    kept = optimise_value(tiny_model, tokenizer, dict(request), hp, 1, left, ["{}"],
                          VariantFit(anchors=(REQ["subject"],), anchor_weight=10.0, anchor_max_share=2.0))
    assert not torch.allclose(kept, plain, rtol=1e-3, atol=1e-4)


@pytest.mark.real_model
def test_anchors_keep_a_neighbour_as_it_was(real_model, tmp_path):
    """On SmolLM2: with a neighbour's name as an anchor, ROME's update built from the fitted value
    moves that name's next-token distribution less, and still makes the edit."""
    from conftest import tiny_hparams_dict
    from rep_easyedit import REPHyperParams

    model, tok = real_model
    hp = REPHyperParams.from_dict(tiny_hparams_dict("REP-ROME", tmp_path, layers=[3], v_loss_layer=29,
                                                    v_num_grad_steps=15)).backend_hparams()
    request = {"prompt": "{} is produced by", "subject": "Ferrari F355", "target_new": " BMW"}
    down = model.model.layers[3].mlp.down_proj
    prompt, neighbour = request["prompt"].format(request["subject"]), request["prompt"].format("Ferrari F40")
    key = _subject_key(model, tok, prompt, len(request["subject"]), down)
    left = key / key.norm()  # ROME without covariance: u along the subject's key
    bmw = tok(" BMW")["input_ids"][0]

    def edited_predictions(fit):
        right = optimise_value(model, tok, dict(request), hp, 3, left, ["{}"], fit)
        original = down.weight.detach().clone()
        try:
            with torch.no_grad():
                down.weight.add_(torch.outer(right, left))
                return [_next_token_log_probs(model, tok, t) for t in (prompt, neighbour)]
        finally:
            with torch.no_grad():
                down.weight.copy_(original)

    before = _next_token_log_probs(model, tok, neighbour)
    kl = lambda after: torch.sum(before.exp() * (before - after)).item()
    (edit_free, free), (edit_anchored, anchored) = (
        edited_predictions(VariantFit()), edited_predictions(VariantFit(anchors=("Ferrari F40",), anchor_weight=10.0)))
    assert kl(anchored) < 0.8 * kl(free)
    assert edit_anchored[bmw].exp() > 0.5 and edit_free[bmw].exp() > 0.5


def _subject_key(model, tok, text, end, module):
    from rep_easyedit.robust_value import _subject_io

    return _subject_io(model, tok, [text], [end], module)[0][0]


def _next_token_log_probs(model, tok, text):
    with torch.no_grad():
        return torch.log_softmax(model(**tok(text, return_tensors="pt")).logits[0, -1].float(), -1)


@pytest.mark.parametrize("alg", ["REP-R-ROME", "REP-EMMET"])
def test_anchor_shares_are_the_updates_own_with_covariance(alg, tiny_model, tokenizer, tmp_path):
    """With covariance, R-ROME's and EMMET's update writes along C⁻¹k, not k: an anchor's reported
    share is what the update they then compute gives its key, relative to the edit's own key."""
    from conftest import tiny_hparams_dict
    from rep_easyedit import REPHyperParams
    from rep_easyedit.backends_extra import emmet, r_rome
    from rep_easyedit.backends_extra.common import prompt_key_and_output
    from rep_easyedit.covariance import build_stats
    from rep_easyedit.robust_value import _token_keys, value_fitted_on_variants

    tiny_model.config._name_or_path = f"tiny-llama-shares-{alg}"
    raw = tiny_hparams_dict(alg, tmp_path, model_name="tiny", layers=[1], lm_head_module="lm_head",
                            mom2_n_samples=1000, v_num_grad_steps=3, mom2_adjustment=True)
    hp = REPHyperParams.from_dict(raw).backend_hparams()
    build_stats(tiny_model, tokenizer, hp, [1], [f"Some text {i} about cars, towns and {i * 7} rivers."
                                                 for i in range(40)], progress=False)
    request = {"prompt": "{} is produced by", "subject": REQ["subject"], "target_new": " BMW",
               "ground_truth": "Ferrari"}
    anchor = "Ferrari F40"
    fit = VariantFit(anchors=(anchor,), anchor_max_share=1e9)
    fits = {(request["prompt"].format(request["subject"]), request["subject"]): fit}
    backend, execute = ((r_rome.apply_r_rome_to_model, lambda: r_rome.execute_r_rome(
        tiny_model, tokenizer, dict(request), hp)) if alg == "REP-R-ROME" else
        (emmet.apply_emmet_to_model, lambda: emmet.execute_emmet(tiny_model, tokenizer, [dict(request)], hp)))
    with value_fitted_on_variants(backend, fits):
        (update,) = execute().values()

    down = tiny_model.model.layers[1].mlp.down_proj
    text = request["prompt"].format(anchor)
    k_a = _token_keys(tiny_model, tokenizer, [text], down)[0][
        subject_last_index(tokenizer, text, len(anchor))].double()
    k_p = prompt_key_and_output(tiny_model, tokenizer, request, hp, 1)[0].double()
    delta = update.delta.double().cpu()
    on_edit = delta @ k_p
    actual = float((delta @ k_a) @ on_edit / (on_edit @ on_edit))
    assert fit.report["anchor_shares"][anchor] == pytest.approx(actual, abs=2e-3)
    assert abs(float(k_a @ k_p / (k_p @ k_p)) - actual) > 0.01  # what k_p's direction would report (5 × the tolerance)
