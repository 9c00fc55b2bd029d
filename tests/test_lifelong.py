"""benchmarks/lifelong.py resumes a run exactly: edited weights, REP pathway and AlphaEdit's
cumulative term come back as they were saved."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from test_alphaedit import alphaedit_hp, low_rank_moment
from test_backends_extra import GROUPED, LAYER, REQUESTS

ROOT = Path(__file__).resolve().parents[1]


def _lifelong():
    spec = importlib.util.spec_from_file_location("lifelong", ROOT / "benchmarks" / "lifelong.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_state_round_trip(tiny_model, tokenizer, tmp_path):
    from rep_easyedit.backends_extra import apply_AlphaEdit_to_model, clear_second_moment_cache, seed_second_moment
    from rep_easyedit.backends_extra.alphaedit import edited_keys, reset_history
    from rep_easyedit.backends_extra.common import edited_weight
    from rep_easyedit.core.adapter import GatedLowRankAdapter
    from rep_easyedit.core.pathway import install, installed_paths, remove_pathways

    lifelong = _lifelong()
    model, hp = tiny_model, alphaedit_hp()
    seed_second_moment(model, hp, LAYER, low_rank_moment(40)[0])
    try:
        _, copy = apply_AlphaEdit_to_model(model, tokenizer, REQUESTS[:2], hp, return_orig_weights=True,
                                           context_templates=GROUPED)
        path = hp.rewrite_module_tmp.format(LAYER)
        torch.manual_seed(0)
        adapter = GatedLowRankAdapter(128, rank=4)
        torch.nn.init.normal_(adapter.up.weight)
        install(model, path, adapter)
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        w = edited_weight(model, hp, LAYER)
        keys = edited_keys(model, w)
        # the names a REP edit's weights_copy carries include its adapters' switches: they go to the pathway
        active = f"{path}.rep_pathway.adapters.0.active"
        assert active in dict(model.named_parameters())
        lifelong._save_state(model, tmp_path / "state", sorted(copy) + [active])
        # a state saved before that fix holds the switch among the weights too: it still loads
        from safetensors.torch import load_file, save_file
        weights = tmp_path / "state" / "weights.safetensors"
        save_file({**load_file(str(weights)), active: torch.ones(())}, str(weights))

        # a fresh start: unedited weights, no pathway, no cumulative term
        remove_pathways(model)
        reset_history(model)
        with torch.no_grad():
            for name, value in copy.items():
                model.get_parameter(name).copy_(value)
        lifelong._load_state(model, tmp_path / "state")

        assert installed_paths(model) == [path]
        for k, v in model.state_dict().items():
            assert torch.equal(v, saved[k]), k
        (k_back,) = edited_keys(model, w)
        assert torch.equal(k_back, keys[0])
    finally:
        clear_second_moment_cache(model)
        reset_history(model)


def test_merging_after_each_batch_keeps_one_adapter_per_layer_and_resumes(tmp_path):
    """--merge-rank: the pathway stays one adapter per layer however many edits; the keys every
    later merge retrains on survive a restart."""
    from test_merging import DIM, Layer, _edit_keys

    from rep_easyedit.core.adapter import GatedLowRankAdapter
    from rep_easyedit.core.config import REPConfig
    from rep_easyedit.core.pathway import install, pathway_of

    lifelong = _lifelong()
    rep = REPConfig(rank=4, steps=20, num_negatives=64)
    model, groups = Layer(), {}
    for batch in ((1, 2), (3, 4, 5)):
        captured = {"down_proj": [_edit_keys(s) for s in batch]}
        for _ in batch:  # what the batch's REP edits leave: one adapter each
            install(model, "down_proj", GatedLowRankAdapter(DIM, rep.rank, rep.gate_ratio, rep.tau))
        merge = lifelong._merge(model, rep, groups, captured, rank=8)
        assert len(pathway_of(model.down_proj).adapters) == 1
        assert pathway_of(model.down_proj).adapters[0].up.weight.shape[-1] == 8
        assert merge["edits"] == len(groups["down_proj"])
    assert merge["edits"] == 5
    assert all(len(k.negatives) == lifelong.MERGE_NEGATIVES_PER_EDIT for k in groups["down_proj"])

    lifelong._save_keys(groups, tmp_path / "state")  # before the first batch's state is written
    back = lifelong._load_keys(tmp_path / "state")
    assert len(back["down_proj"]) == 5
    for a, b in zip(groups["down_proj"], back["down_proj"]):
        assert torch.equal(a.positives, b.positives) and torch.equal(a.negatives, b.negatives)
        assert torch.equal(a.target, b.target)


def test_resume_refuses_a_recipe_whose_default_changed_under_the_run(monkeypatch):
    """Progress records REP's resolved recipe; a run recorded before that resumes only with the defaults it ran with."""
    import dataclasses

    from rep_easyedit.core import config as rep_config
    from rep_easyedit.core.config import REPConfig

    lifelong = _lifelong()
    current = {"alg": "REP-AlphaEdit", "n": 20, "set": {}, "rep": dataclasses.asdict(REPConfig())}
    old = {"alg": "REP-AlphaEdit", "n": 10, "set": {}}  # recorded before progress kept `rep`
    monkeypatch.setattr(rep_config, "CHANGED_DEFAULTS", {})
    assert lifelong._settings(old, current) == lifelong._settings(current)
    monkeypatch.setattr(rep_config, "CHANGED_DEFAULTS", {"steps": 200})
    current["rep"]["steps"] = 120  # a default lowered since the old run
    assert lifelong._settings(old, current) != lifelong._settings(current)
    named = ({**old, "set": {"rep.steps": "120"}}, {**current, "set": {"rep.steps": "120"}})
    assert lifelong._settings(*named) == lifelong._settings(named[1])  # the old run named it itself
    recorded = {**current, "n": 10, "rep": {**current["rep"], "steps": 200}}
    assert lifelong._settings(recorded, current) != lifelong._settings(current)


def test_resume_reads_a_field_added_after_the_recorded_recipe(monkeypatch):
    """A recorded recipe that predates a field ran with that field's behaviour of its day: the
    default, or what `CHANGED_DEFAULTS` says it was."""
    import dataclasses

    from rep_easyedit.core import config as rep_config
    from rep_easyedit.core.config import REPConfig

    lifelong = _lifelong()
    current = {"alg": "REP-AlphaEdit", "n": 20, "set": {}, "rep": dataclasses.asdict(REPConfig())}
    recorded = {**current, "n": 10, "rep": {k: v for k, v in current["rep"].items() if k != "merge_steps"}}
    monkeypatch.setattr(rep_config, "CHANGED_DEFAULTS", {})
    assert lifelong._settings(recorded, current) == lifelong._settings(current)  # merge_steps: its default
    monkeypatch.setattr(rep_config, "CHANGED_DEFAULTS", {"merge_steps": 50})
    assert lifelong._settings(recorded, current) != lifelong._settings(current)  # it ran with 50
