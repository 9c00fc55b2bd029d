"""Behaviour on the real bundled model (SmolLM2-135M-Instruct): the edit, robustness, restore."""

import pytest
import torch

import rep_easyedit
from rep_easyedit.editing import edited, load_hparams
from rep_easyedit.core.pathway import installed_paths

from conftest import ROOT, request_from_case

pytestmark = pytest.mark.real_model
REP_YAML = ROOT / "hparams/REP-ROME/smollm2-135m.yaml"
ROME_YAML = ROOT / "hparams/ROME/smollm2-135m.yaml"


def _logits(model, tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


def test_rep_rome_through_base_editor_succeeds_and_restores(dev_cases):
    from easyeditor import BaseEditor

    case = dev_cases[0]
    hp = rep_easyedit.REPHyperParams.from_hparams(REP_YAML)
    editor = BaseEditor.from_hparams(hp)
    model, tok = editor.model, editor.tok
    probe = [case["prompt"], case["locality_prompt"][0], "The capital of France is"]
    before = _logits(model, tok, probe)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    metrics, edited_model, _ = editor.edit(
        prompts=[case["prompt"]], ground_truth=[case["target_true"]], target_new=[case["target_new"]],
        subject=[case["subject"]], rephrase_prompts=[case["rephrase_prompt"][:3]],
        locality_inputs={"neighborhood": {"prompt": [case["locality_prompt"][:3]],
                                          "ground_truth": [[case["target_true"]] * 3]}},
        subject_rephrase=[case["subject_rephrase"]], case_id=[case["case_id"]],
        keep_original_weight=True)
    post = metrics[0]["post"]
    assert post["rewrite_acc"][0] == 1.0
    rep_info = metrics[0]["requested_rewrite"]["rep"]
    assert rep_info["perturbations"]["rephrase_in"] == case["subject_rephrase"][:5]
    assert rep_info["training"]["model.layers.3.mlp.down_proj"]["gate_pos_fire"] > 0.9
    # the editor restored weights_copy: outputs, parameters and hooks as before the edit
    assert torch.equal(_logits(model, tok, probe), before)
    assert installed_paths(model) == []
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def _robustness(model, tok, case, hparams, rep_cfg, corpus):
    from rep_easyedit.eval.metrics import evaluate_case, locality_reference
    from rep_easyedit.core.perturbations import build_perturbations

    request = request_from_case(case)
    pert = build_perturbations(request, tok, corpus, n_shuffles=rep_cfg.n_shuffles,
                               n_long=rep_cfg.n_long_contexts, long_tokens=rep_cfg.long_context_tokens,
                               base_seed=rep_cfg.seed)
    ref = locality_reference(model, tok, case)
    torch.manual_seed(0)
    with edited(model, tok, [request], hparams):
        scores = evaluate_case(model, tok, case, pert, ref, fluency=False)
    return scores


ROBUST_CASES = (0, 1, 2)
BACKENDS = ("ROME", "MEMIT", "R-ROME", "EMMET")


@pytest.fixture(scope="session")
def covariance_stats():
    """MEMIT's, EMMET's and AlphaEdit's key statistics (layers 2-4) from the offline corpus, built when missing,
    as a user builds them: `python -m rep_easyedit.stats --hparams hparams/MEMIT/smollm2-135m.yaml`."""
    from rep_easyedit.stats import main

    assert main(["--hparams", str(ROOT / "hparams/MEMIT/smollm2-135m.yaml")]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_rep_raises_rephrase_and_shuffle_success(backend, real_model, dev_cases, covariance_stats):
    """On a few dev cases, each backend's edit succeeds with and without REP; with REP the trained
    (in-domain) subject variants succeed more often, shuffled ones in particular, locality does
    not collapse, and the model is exactly as before once the edits are undone.

    Rephrases are pooled with shuffles: three cases hold 15 rephrases, and one of them flipping
    (it does, with the thread count and with which test drew ROME's context templates first: a
    clean-clone CI run scored REP-EMMET 10/15 against EMMET's 11/15, a one-thread run 11 against
    10) says nothing; the per-column claim rests on the 100-case table (docs/results.md)."""
    from rep_easyedit.corpus import load_corpus

    model, tok = real_model
    base_hp = load_hparams(ROOT / f"hparams/{backend}/smollm2-135m.yaml")
    rep_hp = load_hparams(ROOT / f"hparams/REP-{backend}/smollm2-135m.yaml")
    corpus = load_corpus(None, model, tok, seed=rep_hp.rep.seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    totals = {"base": {}, "REP": {}}
    for i in ROBUST_CASES:
        for name, hp in (("base", base_hp), ("REP", rep_hp)):
            scores = _robustness(model, tok, dev_cases[i], hp, rep_hp.rep, corpus)
            for key in ("success", "locality", "rephrase_in", "shuffle_in"):
                if scores[key] is not None:
                    totals[name].setdefault(key, []).append(scores[key])
    mean = {n: {k: sum(v) / len(v) for k, v in t.items()} for n, t in totals.items()}
    print(backend, mean)
    assert mean["base"]["success"] == 1.0 and mean["REP"]["success"] == 1.0
    in_domain = {n: (m["rephrase_in"] + m["shuffle_in"]) / 2 for n, m in mean.items()}
    assert in_domain["REP"] > in_domain["base"]
    assert mean["REP"]["shuffle_in"] > mean["base"]["shuffle_in"]
    assert mean["REP"]["locality"] >= mean["base"]["locality"] - 0.2
    after = model.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state) and installed_paths(model) == []


def test_alphaedit_batch_succeeds_and_restores(real_model, dev_cases, covariance_stats):
    """AlphaEdit (ours on the PyPI release) writes a batch of two real edits and is undone exactly.

    REP-AlphaEdit is not in the robustness test above: on its three cases it scored locality 77
    against AlphaEdit's 92 (a single run), too close to that test's bound to be a stable check;
    the lifelong table (docs/results.md) measures it on more edits."""
    from rep_easyedit.backends_extra.alphaedit import reset_history
    from rep_easyedit.eval.metrics import exact_match

    model, tok = real_model
    hp = load_hparams(ROOT / "hparams/AlphaEdit/smollm2-135m.yaml")
    cases = dev_cases[:2]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    try:
        with edited(model, tok, [request_from_case(c) for c in cases], hp):
            for c in cases:
                assert exact_match(model, tok, [c["prompt"]], c["target_new"]) == [1]
        after = model.state_dict()
        assert all(torch.equal(after[k], state[k]) for k in state)
    finally:
        reset_history(model)
