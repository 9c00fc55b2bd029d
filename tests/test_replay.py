"""Replaying the blocks below the lowest edited layer (core/replay.py) gives the keys a full run gives.

A multi-layer REP edit collects keys at each layer over the same texts, bottom-up, while what sits
at or above the lowest edited layer changes (adapters, the backend's update). The replayed
collections must see those changes, must not run the blocks below, and must leave them as they were.
"""

from __future__ import annotations

import pytest
import torch

from rep_easyedit.core.keys import collect_keys_flat
from rep_easyedit.core.pathway import get_module
from rep_easyedit.core.replay import BlockReplay
from rep_easyedit.rep_main import blocks_to_replay

TEXTS = ["Ferrari F355 is produced by", "The Eiffel Tower is located in the city of",
         "a", "Some longer text about cars, towers, cities and the people who make them all day."]


def _calls(module) -> tuple[list, object]:
    seen: list = []
    return seen, module.register_forward_pre_hook(lambda *_: seen.append(1))


def test_replayed_keys_equal_a_full_run_after_a_change_above(tiny_model, tokenizer):
    replay = BlockReplay(tiny_model.model.layers)
    first = collect_keys_flat(tiny_model, tokenizer, TEXTS, "model.layers.1.mlp.down_proj", all_tokens=True,
                              replay=replay)
    plain = collect_keys_flat(tiny_model, tokenizer, TEXTS, "model.layers.1.mlp.down_proj", all_tokens=True)
    assert torch.equal(first.tokens, plain.tokens)
    upper = "model.layers.3.mlp.down_proj"
    before = collect_keys_flat(tiny_model, tokenizer, TEXTS, upper, all_tokens=True)
    with torch.no_grad():  # what the backend's update does to the lowest edited layer
        get_module(tiny_model, "model.layers.1.mlp.down_proj").weight.mul_(1.5)
    calls, handle = _calls(tiny_model.model.layers[0].self_attn)
    try:
        replayed = collect_keys_flat(tiny_model, tokenizer, TEXTS, upper, all_tokens=True, replay=replay)
    finally:
        handle.remove()
    rerun = collect_keys_flat(tiny_model, tokenizer, TEXTS, upper, all_tokens=True)
    assert calls == []  # the block below never ran (its attention was never called)
    assert not torch.allclose(rerun.tokens, before.tokens)  # the change above reaches the upper keys
    assert torch.allclose(replayed.tokens, rerun.tokens, rtol=1e-5, atol=1e-6)
    assert "forward" not in vars(tiny_model.model.layers[0])
    assert replay.replayed == 0  # block 2's output, recorded by the collection at block 3, waits for the next
    with torch.no_grad():
        get_module(tiny_model, "model.layers.3.mlp.down_proj").weight.mul_(0.5)  # above block 2: replayable
    blocks_run, handles = [], []
    for i in range(3):
        seen, handle = _calls(tiny_model.model.layers[i].self_attn)
        blocks_run.append(seen)
        handles.append(handle)
    try:
        third = collect_keys_flat(tiny_model, tokenizer, TEXTS, "model.layers.3.mlp.down_proj", all_tokens=True,
                                  replay=replay)
    finally:
        for handle in handles:
            handle.remove()
    assert [len(seen) > 0 for seen in blocks_run] == [False, False, False]  # blocks 0-2 all replayed
    assert replay.replayed == 2
    rerun = collect_keys_flat(tiny_model, tokenizer, TEXTS, "model.layers.3.mlp.down_proj", all_tokens=True)
    assert torch.allclose(third.tokens, rerun.tokens, rtol=1e-5, atol=1e-6)


def test_replay_collects_bottom_up_only(tiny_model, tokenizer):
    replay = BlockReplay(tiny_model.model.layers)
    collect_keys_flat(tiny_model, tokenizer, TEXTS, "model.layers.2.mlp.down_proj", all_tokens=True, replay=replay)
    collect_keys_flat(tiny_model, tokenizer, TEXTS, "model.layers.3.mlp.down_proj", all_tokens=True, replay=replay)
    with pytest.raises(ValueError, match="bottom-up"):
        collect_keys_flat(tiny_model, tokenizer, TEXTS, "model.layers.1.mlp.down_proj", all_tokens=True,
                          replay=replay)


def test_replay_refuses_other_texts(tiny_model, tokenizer):
    replay = BlockReplay(tiny_model.model.layers)
    collect_keys_flat(tiny_model, tokenizer, TEXTS, "model.layers.1.mlp.down_proj", all_tokens=True, replay=replay)
    with pytest.raises(ValueError, match="texts of its first collection"):
        collect_keys_flat(tiny_model, tokenizer, TEXTS[:2], "model.layers.2.mlp.down_proj", replay=replay,
                          positions=[0, 0])


def test_blocks_come_back_after_a_failed_replay(tiny_model, tokenizer):
    blocks = list(tiny_model.model.layers)
    replay = BlockReplay(blocks)
    collect_keys_flat(tiny_model, tokenizer, TEXTS, "model.layers.2.mlp.down_proj", all_tokens=True, replay=replay)
    failing = get_module(tiny_model, "model.layers.2.self_attn").register_forward_pre_hook(
        lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    try:
        with pytest.raises(RuntimeError, match="boom"):
            collect_keys_flat(tiny_model, tokenizer, TEXTS, "model.layers.3.mlp.down_proj", all_tokens=True,
                              replay=replay)
    finally:
        failing.remove()
    assert all("forward" not in vars(b) for b in blocks)
    plain = collect_keys_flat(tiny_model, tokenizer, TEXTS, "model.layers.3.mlp.down_proj", all_tokens=True)
    assert torch.isfinite(plain.tokens).all()


class _HP:
    layer_module_tmp = "model.layers.{}"
    rewrite_module_tmp = "model.layers.{}.mlp.down_proj"


def test_blocks_to_replay_only_where_there_is_something_to_replay(tiny_model):
    paths = lambda layers: {l: _HP.rewrite_module_tmp.format(l) for l in layers}  # noqa: E731
    assert blocks_to_replay(tiny_model, _HP, paths([1, 2])) == list(tiny_model.model.layers[:3])
    assert blocks_to_replay(tiny_model, _HP, paths([2])) is None        # one layer: one collection
    other = type("HP", (), {"layer_module_tmp": "model.blocks.{}"})
    assert blocks_to_replay(tiny_model, other, paths([1, 2])) is None   # the edited module is not in it
