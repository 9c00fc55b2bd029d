import pytest
import torch

from rep_easyedit.core.adapter import GatedLowRankAdapter
from rep_easyedit.core.keys import collect_keys
from rep_easyedit.core.pathway import (ATTR, get_module, install, installed_paths, pathway_installed,
                                  prune_inactive, remove_pathways)

PATH = "model.layers.1.mlp.down_proj"


def _firing_adapter(dim):
    a = GatedLowRankAdapter(dim, rank=4, tau=0.5)
    with torch.no_grad():
        a.up.weight.normal_()
        a.gate[2].bias.fill_(50.0)  # always fires
    return a


def _hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_pathway_changes_outputs_and_context_removes_it(tiny_model, tokenizer):
    ids = tokenizer(["Paris is the capital of"], return_tensors="pt")
    before = tiny_model(**ids).logits
    with pathway_installed(tiny_model, PATH, _firing_adapter(128)):
        during = tiny_model(**ids).logits
        assert installed_paths(tiny_model) == [PATH]
    after = tiny_model(**ids).logits
    assert not torch.allclose(before, during)
    assert torch.equal(before, after)
    assert _hooks(tiny_model) == 0
    assert not hasattr(get_module(tiny_model, PATH), ATTR)


def test_hooks_removed_after_an_error(tiny_model):
    with pytest.raises(RuntimeError, match="boom"):
        with pathway_installed(tiny_model, PATH, _firing_adapter(128)):
            raise RuntimeError("boom")
    assert _hooks(tiny_model) == 0
    assert installed_paths(tiny_model) == []


def test_adapters_are_registered_submodules(tiny_model):
    adapter = _firing_adapter(128)
    install(tiny_model, PATH, adapter)
    names = [n for n, _ in tiny_model.named_parameters()]
    assert f"{PATH}.{ATTR}.adapters.0.active" in names
    assert any(k.startswith(f"{PATH}.{ATTR}.adapters.0.up") for k in tiny_model.state_dict())
    remove_pathways(tiny_model)
    assert _hooks(tiny_model) == 0


def test_switch_off_prunes_on_next_forward(tiny_model, tokenizer):
    ids = tokenizer(["a b c"], return_tensors="pt")
    before = tiny_model(**ids).logits
    adapter = _firing_adapter(128)
    install(tiny_model, PATH, adapter)
    with torch.no_grad():
        adapter.active.zero_()  # what EasyEdit's restore of weights_copy does
    assert torch.equal(tiny_model(**ids).logits, before)
    assert _hooks(tiny_model) == 0 and installed_paths(tiny_model) == []
    assert prune_inactive(tiny_model) == 0


def test_unknown_module_path_is_clear(tiny_model):
    with pytest.raises(LookupError, match="does not exist"):
        install(tiny_model, "model.layers.9.mlp.down_proj", _firing_adapter(128))


def test_key_collection_stops_and_matches_full_forward(tiny_model, tokenizer):
    texts = ["The Eiffel Tower is in", "Hello"]
    seen = {}
    mod = get_module(tiny_model, PATH)
    h = mod.register_forward_pre_hook(lambda m, a: seen.setdefault("k", a[0].detach().clone()))
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    tiny_model(**enc)
    h.remove()
    picked, every = collect_keys(tiny_model, tokenizer, texts, PATH, positions=[2, 0], all_tokens=True)
    assert torch.allclose(picked[0], seen["k"][0, 2]) and torch.allclose(picked[1], seen["k"][1, 0])
    assert every[1].shape[0] == int(enc["attention_mask"][1].sum())
    assert _hooks(tiny_model) == 0
    # the forward stopped at layer 1: later layers never ran
    calls = []
    h2 = get_module(tiny_model, "model.layers.3").register_forward_pre_hook(lambda m, a: calls.append(1))
    collect_keys(tiny_model, tokenizer, texts, PATH, positions=[0, 0])
    h2.remove()
    assert calls == []
