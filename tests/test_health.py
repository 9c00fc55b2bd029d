"""Pathway health: every REP edit says whether REP did anything, and `rep.strict` refuses a no-op."""

from __future__ import annotations

import logging

import pytest
import torch

import rep_easyedit
from rep_easyedit.core.health import IneffectivePathwayError, layer_health, pathway_health
from rep_easyedit.core.pathway import installed_paths
from rep_easyedit.core.training import TrainingReport

from conftest import ROOT, request_from_case, tiny_hparams_dict

HEALTH_FIELDS = {"gate_pos_fire", "gate_neg_fire", "distance_before", "distance_after", "steps",
                 "effective", "cause"}
PAPER_RECIPE = dict(steps=10, lr=5e-4, alpha=5e4, gate_weight=0.0, aggregation="cosine",
                    adaptive_stop=False, corpus_negative_texts=0)


def _report(pos, before, after):
    return TrainingReport(steps=10, loss=0.0, aggregation=0.0, consistency=0.0, gate=0.0,
                          gate_pos_fire=pos, gate_neg_fire=0.0, activation=1.0,
                          distance_before=before, distance_after=after)


def test_layer_health_names_the_cause():
    assert layer_health(_report(0.9, 1.0, 0.2))["effective"] is True
    shut = layer_health(_report(0.0, 1.0, 1.0))
    assert shut["effective"] is False and "gate fires on none" in shut["cause"]
    still = layer_health(_report(0.5, 1.0, 0.95))
    assert still["effective"] is False and "did not move" in still["cause"]
    both = pathway_health({"a": _report(0.9, 1.0, 0.2), "b": _report(0.0, 1.0, 1.0)})
    assert both["effective"] is False and set(both["layers"]) == {"a", "b"}


def test_every_rep_edit_reports_health_in_range(tiny_model, tokenizer, tmp_path):
    raw = tiny_hparams_dict("REP-ROME", tmp_path, rep_steps=60)
    hp = rep_easyedit.REPHyperParams.from_dict(raw)
    request = {"prompt": "The Eiffel Tower is located in", "subject": "Eiffel Tower",
               "target_new": "Rome", "subject_rephrase": ["the Tower of Eiffel", "Eiffel's tower"]}
    _, weights = rep_easyedit.apply_rep_to_model(tiny_model, tokenizer, [request], hp,
                                                 return_orig_weights=True, keep_original_weight=True)
    health = request["rep"]["health"]
    assert isinstance(health["effective"], bool)
    (path, layer), = health["layers"].items()
    assert path == "model.layers.1.mlp.down_proj" and set(layer) == HEALTH_FIELDS
    for key in ("gate_pos_fire", "gate_neg_fire"):
        assert 0.0 <= layer[key] <= 1.0
    assert layer["distance_before"] > 0 and layer["distance_after"] >= 0
    assert 1 <= layer["steps"] <= 60
    assert health["effective"] == (layer["cause"] is None)


def _paper_hparams(**extra):
    raw = rep_easyedit.REPHyperParams.from_hparams(ROOT / "hparams/REP-ROME/smollm2-135m.yaml").to_dict()
    raw["rep"].update(PAPER_RECIPE, **extra)
    return rep_easyedit.REPHyperParams.from_dict(raw)


@pytest.mark.real_model
def test_the_papers_recipe_on_smollm2_is_flagged_as_doing_nothing(real_model, dev_cases, caplog):
    from rep_easyedit.editing import edited

    model, tok = real_model
    request = request_from_case(dev_cases[0])
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="rep_easyedit"):
        with edited(model, tok, [request], _paper_hparams()):
            pass
    health = request["rep"]["health"]
    assert health["effective"] is False
    layer = health["layers"]["model.layers.3.mlp.down_proj"]
    assert layer["gate_pos_fire"] == 0.0 and layer["distance_after"] == layer["distance_before"]
    warnings = [r.getMessage() for r in caplog.records if "not effective" in r.getMessage()]
    assert len(warnings) == 1
    assert "gate fires on none" in warnings[0] and "rep.gate_weight" in warnings[0]


@pytest.mark.real_model
def test_strict_refuses_a_no_op_and_leaves_the_model_bit_identical(real_model, dev_cases):
    model, tok = real_model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    request = request_from_case(dev_cases[1])
    with pytest.raises(IneffectivePathwayError, match="rep.strict"):
        rep_easyedit.apply_rep_to_model(model, tok, [request], _paper_hparams(strict=True),
                                        return_orig_weights=True, keep_original_weight=True)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert installed_paths(model) == []
