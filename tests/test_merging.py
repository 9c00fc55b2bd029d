"""Merging stacked adapters: one adapter trained on the union of their keys takes their place."""

import pytest
import torch
from torch import nn

from rep_easyedit.core.config import REPConfig
from rep_easyedit.core.merging import merge_adapters, union_of_keys
from rep_easyedit.core.pathway import install, pathway_of
from rep_easyedit.core.training import TrainingKeys, train_adapter
from rep_easyedit.core.adapter import GatedLowRankAdapter

DIM = 48


def _edit_keys(seed: int) -> TrainingKeys:
    """Variants scattered around a subject direction, pulled onto that edit's key k*."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(DIM, generator=g) * 3
    positives = target * 0.5 + 0.5 * torch.randn(40, DIM, generator=g)
    negatives = torch.randn(300, DIM, generator=g)
    return TrainingKeys(positives=positives, negatives=negatives, target=target)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.down_proj = nn.Linear(DIM, 8)


def test_union_gives_each_positive_its_own_target():
    a, b = _edit_keys(1), _edit_keys(2)
    keys = union_of_keys([a, b], max_negatives=100)
    assert keys.positives.shape == (80, DIM) and keys.target.shape == (80, DIM)
    assert torch.equal(keys.target[:40], a.target.expand(40, -1))
    assert torch.equal(keys.target[40:], b.target.expand(40, -1))
    assert keys.negatives.shape == (100, DIM)
    assert torch.equal(keys.edit_keys(), torch.unique(torch.stack([a.target, b.target]), dim=0))


def test_merged_adapter_replaces_the_stack_and_serves_every_edit():
    torch.manual_seed(0)
    rep = REPConfig(rank=8, steps=300, lr=1e-2, num_negatives=256)
    groups = [_edit_keys(s) for s in (1, 2, 3)]
    model = Layer()
    stacked = []
    for g in groups:
        adapter = GatedLowRankAdapter(DIM, rep.rank, rep.gate_ratio, rep.tau)
        train_adapter(adapter, g, rep)
        install(model, "down_proj", adapter)
        stacked.append(adapter)
    assert len(pathway_of(model.down_proj).adapters) == 3

    merged, report = merge_adapters(model, "down_proj", groups, rep, rank=24)
    adapters = list(pathway_of(model.down_proj).adapters)
    assert len(adapters) == 1 and adapters[0] is merged
    assert not any(p.requires_grad for p in merged.parameters())
    with torch.no_grad():
        for g in groups:  # each edit's variants land near their own k*, not another edit's
            moved = merged(g.positives, hard=True)
            own = (moved - g.target).norm(dim=-1) / g.target.norm()
            unmoved = (g.positives - g.target).norm(dim=-1) / g.target.norm()
            others = [(moved - o.target).norm(dim=-1) / o.target.norm() for o in groups if o is not g]
            assert own.median() < 0.75 * unmoved.median()
            assert all(own.median() < x.median() for x in others)
            # unrelated keys pass through: the hard gate stays shut on them
            fresh = torch.randn(200, DIM, generator=torch.Generator().manual_seed(9))
            assert (merged.gate_prob(fresh).squeeze(-1) > rep.tau).float().mean() < 0.05
            assert torch.equal(merged(fresh[:5], hard=True)[merged.gate_prob(fresh[:5]).squeeze(-1) <= rep.tau],
                               fresh[:5][merged.gate_prob(fresh[:5]).squeeze(-1) <= rep.tau])
    assert report.gate_pos_fire > 0.9


def test_merging_trains_with_the_whole_rep_config(monkeypatch):
    """Regression: merge_adapters dropped `rep.aggregation_abs`, so a merged adapter ignored it."""
    import rep_easyedit.core.training as training

    seen = []
    real = training.aggregation_loss

    def spy(adapted, keys, kind, use_abs):
        seen.append((kind, use_abs))
        return real(adapted, keys, kind, use_abs)

    monkeypatch.setattr(training, "aggregation_loss", spy)
    rep = REPConfig(rank=4, steps=3, aggregation="cosine", aggregation_abs=True, adaptive_stop=False)
    groups = [_edit_keys(1), _edit_keys(2)]
    merge_adapters(Layer(), "down_proj", groups, rep, rank=8)
    assert seen and all(s == ("cosine", True) for s in seen)


def test_recording_keeps_each_edits_keys_per_layer_and_puts_the_collector_back():
    from rep_easyedit import rep_main
    from rep_easyedit.rep_main import recording_training_keys

    real = rep_main.gather_training_keys
    calls = iter([_edit_keys(1), _edit_keys(2), _edit_keys(3)])
    rep_main.gather_training_keys = lambda *a, **k: next(calls)
    fake = rep_main.gather_training_keys
    try:
        with recording_training_keys() as captured:
            got = [rep_main.gather_training_keys(None, None, None, None, None, p) for p in ("a", "b", "a")]
        assert rep_main.gather_training_keys is fake
        assert [len(captured["a"]), len(captured["b"])] == [2, 1]
        assert captured["a"][0] is got[0] and captured["a"][1] is got[2] and captured["b"][0] is got[1]
        try:
            with recording_training_keys():
                raise RuntimeError("an edit failed")
        except RuntimeError:
            pass
        assert rep_main.gather_training_keys is fake
    finally:
        rep_main.gather_training_keys = real


def test_slimmed_keeps_positives_and_targets_and_caps_negatives():
    from rep_easyedit.core.merging import slimmed

    keys = _edit_keys(4)
    keys.target_whitened = keys.target * 2
    slim = slimmed(keys, 50, seed=1)
    assert torch.equal(slim.positives, keys.positives) and torch.equal(slim.target, keys.target)
    assert torch.equal(slim.target_whitened, keys.target_whitened)
    assert slim.negatives.shape == (50, DIM)
    # the kept negatives are the edit's own rows, none repeated
    rows = {tuple(r.tolist()) for r in keys.negatives}
    assert all(tuple(r.tolist()) in rows for r in slim.negatives)
    assert len({tuple(r.tolist()) for r in slim.negatives}) == 50
    assert torch.equal(slimmed(keys, 500).negatives, keys.negatives)


# -- rep.merge_rank: merging inside the edit, before the backend's update ---------------------------

def _live(model, path="model.layers.1.mlp.down_proj"):
    from rep_easyedit.core.pathway import get_module

    pathway = pathway_of(get_module(model, path))
    return [a for a in pathway.adapters if float(a.active) != 0.0] if pathway is not None else []


def _merging_hparams(tmp_path, **changes):
    from conftest import tiny_hparams_dict
    from rep_easyedit import REPHyperParams

    return REPHyperParams.from_dict(tiny_hparams_dict("REP-ROME", tmp_path,
                                                      **{"rep_merge_rank": 16, "rep_n_shuffles": 2, **changes}))


EDITS = [("Ferrari F355 is produced by", "Ferrari F355", "BMW"),
         ("Danielle Darrieux speaks", "Danielle Darrieux", "English"),
         ("The Eiffel Tower is in", "The Eiffel Tower", "Rome")]


def _request(i):
    prompt, subject, target = EDITS[i]
    return {"prompt": prompt, "subject": subject, "target_new": target, "case_id": i}


def _restore(model, weights_copy):
    """EasyEdit's restore: every name in weights_copy written back through the parameters."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights_copy.items():
            params[name][...] = value


def test_sequential_edits_keep_one_adapter_per_layer_carrying_every_edits_keys(tiny_model, tokenizer, tmp_path):
    from rep_easyedit.editing import apply_edit

    hp = _merging_hparams(tmp_path)
    requests = [_request(i) for i in range(3)]
    for i, request in enumerate(requests):
        apply_edit(tiny_model, tokenizer, [request], hp)
        live = _live(tiny_model)
        assert len(live) == 1  # the first edit's own adapter, then one merged adapter
        assert len(getattr(live[0], "kept_keys")) == i + 1
    merge = requests[-1]["rep"]["merge"]["model.layers.1.mlp.down_proj"]
    assert merge["merged"] and merge["edits"] == 3 and merge["adapters"] == 2 and live[0].rank == 16
    assert requests[0]["rep"]["merge"] == {}  # one adapter per layer: nothing to merge


def test_restoring_a_merging_edit_gives_back_the_pathway_before_it(tiny_model, tokenizer, tmp_path):
    from rep_easyedit.editing import apply_edit

    hp = _merging_hparams(tmp_path)
    apply_edit(tiny_model, tokenizer, [_request(0)], hp)
    apply_edit(tiny_model, tokenizer, [_request(1)], hp)
    enc = tokenizer(["Ferrari F355 is produced by", "Danielle Darrieux speaks English"], return_tensors="pt",
                    padding=True)
    before_live = _live(tiny_model)
    with torch.no_grad():
        before = tiny_model(**enc).logits
    weights_copy = apply_edit(tiny_model, tokenizer, [_request(2)], hp)
    assert _live(tiny_model) != before_live  # the third edit replaced the merged adapter
    _restore(tiny_model, weights_copy)
    assert _live(tiny_model) == before_live
    with torch.no_grad():
        assert torch.equal(tiny_model(**enc).logits, before)


def test_a_failed_merging_edit_leaves_pathway_and_weights_as_they_were(tiny_model, tokenizer, tmp_path,
                                                                        monkeypatch):
    import rep_easyedit.rep_main as rep_main
    from rep_easyedit.editing import apply_edit

    hp = _merging_hparams(tmp_path)
    apply_edit(tiny_model, tokenizer, [_request(0)], hp)
    apply_edit(tiny_model, tokenizer, [_request(1)], hp)
    before_live, n_before = _live(tiny_model), len(pathway_of(tiny_model.model.layers[1].mlp.down_proj).adapters)
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    real = rep_main.get_backend

    class Failing:
        def __init__(self, backend):
            self._backend = backend

        def __getattr__(self, name):
            return getattr(self._backend, name)

        def apply(self, *args, **kwargs):
            raise RuntimeError("backend failed after the merge")

    monkeypatch.setattr(rep_main, "get_backend", lambda name: Failing(real(name)))
    with pytest.raises(RuntimeError, match="after the merge"):
        apply_edit(tiny_model, tokenizer, [_request(2)], hp)
    assert _live(tiny_model) == before_live
    assert len(pathway_of(tiny_model.model.layers[1].mlp.down_proj).adapters) <= n_before
    after = tiny_model.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state if ".rep_pathway." not in k)


def test_kept_keys_survive_save_and_load_so_merging_goes_on(tiny_model, tokenizer, tmp_path):
    from rep_easyedit.core.persistence import load_pathway, save_pathway
    from rep_easyedit.core.pathway import remove_pathways
    from rep_easyedit.editing import apply_edit

    hp = _merging_hparams(tmp_path)
    apply_edit(tiny_model, tokenizer, [_request(0)], hp)
    apply_edit(tiny_model, tokenizer, [_request(1)], hp)
    kept = getattr(_live(tiny_model)[0], "kept_keys")
    save_pathway(tiny_model, tmp_path / "pw")
    remove_pathways(tiny_model)
    load_pathway(tiny_model, tmp_path / "pw")
    loaded = getattr(_live(tiny_model)[0], "kept_keys")
    assert len(loaded) == len(kept) == 2
    for a, b in zip(kept, loaded):
        assert torch.equal(a.positives, b.positives) and torch.equal(a.negatives, b.negatives)
        assert torch.equal(a.target, b.target)
    request = _request(2)
    apply_edit(tiny_model, tokenizer, [request], hp)
    assert request["rep"]["merge"]["model.layers.1.mlp.down_proj"]["edits"] == 3


def test_adapters_without_kept_keys_are_stacked_with_a_warning_not_merged(tiny_model, tokenizer, tmp_path,
                                                                           caplog):
    from rep_easyedit.editing import apply_edit

    apply_edit(tiny_model, tokenizer, [_request(0)], _merging_hparams(tmp_path, rep_merge_rank=0))
    apply_edit(tiny_model, tokenizer, [_request(1)], _merging_hparams(tmp_path, rep_merge_rank=0))
    request = _request(2)
    with caplog.at_level("WARNING"):
        apply_edit(tiny_model, tokenizer, [request], _merging_hparams(tmp_path))
    assert len(_live(tiny_model)) == 3  # nothing dropped: the old edits' adapters could not be retrained
    assert "carry no training keys" in caplog.text and "stacked instead" in caplog.text
    assert request["rep"]["merge"]["model.layers.1.mlp.down_proj"]["merged"] is False
