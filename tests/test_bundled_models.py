"""The two bundled real models: they load offline, save like any model, and take a REP edit."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import rep_easyedit
from rep_easyedit.model_loading import load_model_and_tokenizer

from conftest import ROOT, request_from_case

pytestmark = pytest.mark.real_model
PROBE = ["The capital of France is", "Toyota Celica is created by"]


def _logits(model, tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_a_loaded_bundled_model_saves_and_reloads(name, tmp_path):
    """Regression: the converted copy kept the GGUF quantization_config, so save_pretrained (and
    save_edited_model) raised "The model is quantized with gguf and is not serializable"."""
    model, tok = load_model_and_tokenizer(name)
    assert getattr(model.config, "quantization_config", None) is None
    out = rep_easyedit.save_edited_model(model, tok, tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert torch.equal(_logits(reloaded, tok, PROBE), _logits(model, tok, PROBE))


def test_smollm2_saves_after_rep_edits(real_model, dev_cases, tmp_path):
    from easyeditor import BaseEditor

    from rep_easyedit.editing import keep_edit_kwargs

    hp = rep_easyedit.REPHyperParams.from_hparams(ROOT / "hparams/REP-ROME/smollm2-135m.yaml")
    editor = BaseEditor.from_hparams(hp)
    model, tok = editor.model, editor.tok
    case = dev_cases[3]
    torch.manual_seed(0)
    editor.edit(prompts=[case["prompt"]], ground_truth=[case["target_true"]],
                target_new=[case["target_new"]], subject=[case["subject"]],
                subject_rephrase=[case["subject_rephrase"]], case_id=[case["case_id"]],
                **keep_edit_kwargs())
    assert rep_easyedit.installed_paths(model) == ["model.layers.3.mlp.down_proj"]
    out = rep_easyedit.save_edited_model(model, tok, tmp_path / "edited", hparams=hp)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    rep_easyedit.load_pathway(reloaded, out)
    texts = [case["prompt"], case["prompt"].replace(case["subject"], case["subject_rephrase"][0])]
    assert torch.equal(_logits(reloaded, tok, texts), _logits(model, tok, texts))


def test_rep_rome_edits_gemma3_through_base_editor():
    """Gemma-3-270M (gemma3_text: tied embeddings, sliding-window attention) edited by name."""
    import json

    from easyeditor import BaseEditor

    from rep_easyedit.stats import main as build_stats

    case = json.loads((ROOT / "data/counterfact_gemma3_dev.json").read_text())[0]
    yaml = ROOT / "hparams/REP-ROME/gemma3-270m.yaml"
    assert build_stats(["--hparams", str(yaml)]) == 0   # mom2_adjustment: true, as a user builds them
    hp = rep_easyedit.REPHyperParams.from_hparams(yaml)
    editor = BaseEditor.from_hparams(hp)
    model, tok = editor.model, editor.tok
    assert model.config.model_type == "gemma3_text"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = _logits(model, tok, PROBE + [case["prompt"]])
    torch.manual_seed(0)
    request = request_from_case(case)
    metrics, _, _ = editor.edit(prompts=[request["prompt"]], ground_truth=[request["ground_truth"]],
                                target_new=[request["target_new"]], subject=[request["subject"]],
                                subject_rephrase=[request["subject_rephrase"]], case_id=[request["case_id"]],
                                keep_original_weight=True)
    assert metrics[0]["post"]["rewrite_acc"][0] == 1.0
    health = metrics[0]["requested_rewrite"]["rep"]["health"]
    assert health["effective"] is True
    (layer,) = health["layers"].values()
    assert layer["gate_pos_fire"] > 0.9 and layer["distance_after"] < layer["distance_before"]
    after = model.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state)
    # the restored adapter is an exact identity and takes itself off at the next forward
    assert torch.equal(_logits(model, tok, PROBE + [case["prompt"]]), before)
    assert rep_easyedit.installed_paths(model) == []
