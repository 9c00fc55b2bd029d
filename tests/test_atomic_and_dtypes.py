"""Atomic edits (a failing edit changes nothing), low-precision dtypes, CUDA, determinism."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import rep_easyedit.rep_main as rep_main
from conftest import tiny_hparams_dict
from rep_easyedit import REPHyperParams, apply_rep_to_model
from rep_easyedit.core.adapter import GatedLowRankAdapter
from rep_easyedit.backends import get_backend
from rep_easyedit.core.pathway import installed_paths, pathway_of

ROOT = Path(__file__).resolve().parents[1]
REQ = {"prompt": "Ferrari F355 is produced by", "subject": "Ferrari F355", "target_new": "BMW",
       "case_id": 1, "subject_rephrase": ["The F355", "F355 by Ferrari", "Ferrari's F355", "F355"]}
TWO_LAYERS = dict(layers=[1, 2])


def cheap_hparams(tmp_path, **changes):
    return REPHyperParams.from_dict(tiny_hparams_dict("REP-ROME", tmp_path, **{"rep_steps": 2, **changes}))


def full_state(model):
    """Every parameter and buffer (persistent or not), by name."""
    state = {f"param:{k}": v.detach().clone() for k, v in model.named_parameters()}
    state.update({f"buffer:{k}": v.detach().clone() for k, v in model.named_buffers()})
    return state


def hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def assert_unchanged(model, before, hooks_before=0):
    after = full_state(model)
    assert after.keys() == before.keys()
    changed = [k for k in after if not (after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]))]
    assert not changed, f"changed by a failed edit: {changed}"
    assert hook_count(model) == hooks_before


def run(model, tok, hp, req=None):
    return apply_rep_to_model(model, tok, [dict(req or REQ)], hp, return_orig_weights=True,
                              keep_original_weight=True)


# ----------------------------------------------------------------------------------------------
# atomicity


def test_nan_keys_make_training_fail_and_change_nothing(tiny_model, tokenizer, tmp_path, monkeypatch):
    real = rep_main.collect_keys_flat

    def nan_keys(*args, **kwargs):
        flat = real(*args, **kwargs)
        if flat.picked is not None:
            flat.picked = flat.picked * float("nan")
        return flat

    monkeypatch.setattr(rep_main, "collect_keys_flat", nan_keys)
    before = full_state(tiny_model)
    with pytest.raises(FloatingPointError, match="diverged"):
        run(tiny_model, tokenizer, cheap_hparams(tmp_path, **TWO_LAYERS))
    assert_unchanged(tiny_model, before)


def test_nan_loss_in_second_layer_training(tiny_model, tokenizer, tmp_path, monkeypatch):
    real, calls = rep_main.train_adapter, []

    def poisoned(adapter, keys, *args, **kwargs):
        calls.append(adapter)
        if len(calls) == 2:  # the first layer's adapter trained fine
            with torch.no_grad():
                adapter.down.weight.fill_(float("nan"))
        return real(adapter, keys, *args, **kwargs)

    monkeypatch.setattr(rep_main, "train_adapter", poisoned)
    before = full_state(tiny_model)
    with pytest.raises(FloatingPointError):
        run(tiny_model, tokenizer, cheap_hparams(tmp_path, **TWO_LAYERS))
    assert len(calls) == 2
    assert_unchanged(tiny_model, before)


def _failing_backend(monkeypatch, exc):
    real = get_backend("ROME")

    def exploding(model, tok, requests, hparams, **kw):
        real.apply(model, tok, requests, hparams, **kw)  # really edits both layers, then fails
        raise exc

    monkeypatch.setattr(rep_main, "get_backend", lambda name: real.__class__(
        real.name, exploding, real.hparams_cls, real.context_templates, real.max_batch))


@pytest.mark.parametrize("exc", [RuntimeError("backend failure"), KeyboardInterrupt()])
def test_backend_exception_after_editing(tiny_model, tokenizer, tmp_path, monkeypatch, exc):
    _failing_backend(monkeypatch, exc)
    before = full_state(tiny_model)
    with pytest.raises(type(exc)):
        run(tiny_model, tokenizer, cheap_hparams(tmp_path, **TWO_LAYERS))
    assert_unchanged(tiny_model, before)
    assert installed_paths(tiny_model) == []


def test_memory_error_inside_key_collection(tiny_model, tokenizer, tmp_path, monkeypatch):
    """MemoryError raised from inside the model's forward while keys for the 2nd layer are collected."""
    real_collect, state = rep_main.collect_keys_flat, {"calls": 0, "armed": False}

    def collect(*args, **kwargs):
        state["calls"] += 1
        state["armed"] = state["calls"] == 2
        try:
            return real_collect(*args, **kwargs)
        finally:
            state["armed"] = False

    # block 1's attention runs in the 2nd collection (block 0 is replayed from the 1st, rep.replay_blocks)
    mlp = tiny_model.model.layers[1].self_attn
    real_forward = mlp.forward

    def forward(*args, **kwargs):
        if state["armed"]:
            raise MemoryError("simulated out of memory")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(rep_main, "collect_keys_flat", collect)
    before = full_state(tiny_model)
    mlp.forward = forward
    try:
        with pytest.raises(MemoryError, match="simulated"):
            run(tiny_model, tokenizer, cheap_hparams(tmp_path, **TWO_LAYERS))
    finally:
        del mlp.forward
    assert state["calls"] == 2
    assert_unchanged(tiny_model, before)


def test_failed_edit_keeps_an_earlier_kept_edit(tiny_model, tokenizer, tmp_path, monkeypatch):
    hp = cheap_hparams(tmp_path)
    run(tiny_model, tokenizer, hp)  # kept: weights edited, pathway installed
    assert installed_paths(tiny_model) == ["model.layers.1.mlp.down_proj"]
    before, hooks_before = full_state(tiny_model), hook_count(tiny_model)
    _failing_backend(monkeypatch, RuntimeError("second edit fails"))
    with pytest.raises(RuntimeError, match="second edit fails"):
        run(tiny_model, tokenizer, hp, dict(REQ, target_new="Audi"))
    assert_unchanged(tiny_model, before, hooks_before)
    assert len(pathway_of(tiny_model.get_submodule("model.layers.1.mlp.down_proj")).adapters) == 1


# ----------------------------------------------------------------------------------------------
# dtypes

# easyeditor 0.0.1.dev0's ROME mixes dtypes (a float32 right vector times a low-precision left
# vector); the `rank_one_dtype` rewrite in rep_easyedit/compat/legacy_shims.py casts it.


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_rep_rome_in_low_precision(tiny_model, tokenizer, tmp_path, dtype):
    model = tiny_model.to(dtype)
    before = full_state(model)
    model, weights_copy = run(model, tokenizer, cheap_hparams(tmp_path))
    _check_low_precision_model(model, tokenizer, dtype)
    weight = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(model.get_parameter(weight), weights_copy[weight].to(dtype))


def _check_low_precision_model(model, tok, dtype):
    pathway = pathway_of(model.get_submodule("model.layers.1.mlp.down_proj"))
    assert pathway is not None
    assert all(p.dtype == torch.float32 for p in pathway.parameters())
    assert model.get_submodule("model.layers.1.mlp.down_proj").weight.dtype == dtype
    seen = {}
    def record(_module, args):
        seen["dtype"] = args[0].dtype

    handle = model.get_submodule("model.layers.1.mlp.down_proj").register_forward_pre_hook(record)
    try:
        enc = tok(["Ferrari F355 is produced by", "The F355 by Ferrari is made by"],
                  return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            out = model(**enc).logits
    finally:
        handle.remove()
    assert seen["dtype"] == dtype  # what the down-projection receives, after the pathway
    keys = torch.randn(3, 128, device=model.device).to(dtype)
    assert pathway(keys).dtype == dtype
    assert out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_rep_side_runs_in_low_precision(tiny_model, tokenizer, tmp_path, dtype):
    """Key collection, training and the installed pathway on a half-precision model."""
    from rep_easyedit.core.perturbations import build_perturbations
    from rep_easyedit.core.pathway import install

    model = tiny_model.to(dtype)
    hp = cheap_hparams(tmp_path, rep_steps=20)
    req = dict(REQ)
    pert = build_perturbations(req, tokenizer, [], n_shuffles=4, n_long=0, long_tokens=16, base_seed=0)
    from rep_easyedit.core.devices import padding_side

    with padding_side(tokenizer, "right"):
        fitted = rep_main.fit_adapters(model, tokenizer, req, pert, [["{}", "Some text. {}"]],
                                       {1: "model.layers.1.mlp.down_proj"}, hp.rep, [])
    (path, adapter, report), = fitted
    assert all(p.dtype == torch.float32 for p in adapter.parameters())
    assert all(torch.isfinite(p).all() for p in adapter.parameters())
    assert report.loss == report.loss  # not NaN
    install(model, path, adapter)
    _check_low_precision_model(model, tokenizer, dtype)


@pytest.mark.parametrize("cast", ["to", "half", "bfloat16"])
def test_casting_an_edited_model_keeps_adapters_float32(tiny_model, tokenizer, tmp_path, cast):
    model, _ = run(tiny_model, tokenizer, cheap_hparams(tmp_path))
    adapter = pathway_of(model.get_submodule("model.layers.1.mlp.down_proj")).adapters[0]
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    dtype = torch.float16 if cast == "half" else torch.bfloat16
    model = model.to(dtype) if cast == "to" else getattr(model, cast)()
    after = adapter.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], before[k]) for k in before)
    _check_low_precision_model(model, tokenizer, dtype)
    model.float()
    assert all(torch.equal(adapter.state_dict()[k], before[k]) for k in before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rep_edit_on_cuda(tiny_model, tokenizer, tmp_path):
    model = tiny_model.to("cuda")
    hp = cheap_hparams(tmp_path, device="cuda:0")
    before = full_state(model)
    model, weights_copy = run(model, tokenizer, hp)
    adapter = pathway_of(model.get_submodule("model.layers.1.mlp.down_proj")).adapters[0]
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in adapter.parameters())
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in weights_copy.items():
            params[k][...] = v.to(params[k].device)
    enc = tokenizer(["Ferrari F355 is produced by"], return_tensors="pt").to("cuda")
    with torch.no_grad():
        model(**enc)
    assert_unchanged(model, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_rep_rome_low_precision_on_cuda(tiny_model, tokenizer, tmp_path, dtype):
    model = tiny_model.to("cuda", dtype)
    model, _ = run(model, tokenizer, cheap_hparams(tmp_path, device="cuda:0"))
    _check_low_precision_model(model, tokenizer, dtype)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_rep_edit_with_device_map(tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "m")
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0,
                  "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "model.rotary_emb": 0,
                  "lm_head": 1}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map=device_map).eval()
    model, _ = run(model, tokenizer, cheap_hparams(tmp_path, device="cuda:0", **TWO_LAYERS))
    for layer, device in ((1, 0), (2, 1)):
        module = model.get_submodule(f"model.layers.{layer}.mlp.down_proj")
        adapter = pathway_of(module).adapters[0]
        assert module.weight.device == torch.device("cuda", device)
        assert all(p.device == module.weight.device for p in adapter.parameters())
    enc = tokenizer(["Ferrari F355 is produced by"], return_tensors="pt").to("cuda:0")
    with torch.no_grad():
        assert torch.isfinite(model(**enc).logits).all()


# ----------------------------------------------------------------------------------------------
# determinism


def test_same_seed_gives_bit_identical_edits(tiny_model, tokenizer, tmp_path):
    hp = cheap_hparams(tmp_path, **TWO_LAYERS)
    results = []
    for _ in range(2):
        model = copy.deepcopy(tiny_model)
        torch.manual_seed(0)  # EasyEdit samples its context templates
        model, _ = run(model, tokenizer, hp)
        results.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    first, second = results
    assert first.keys() == second.keys()
    adapter_keys = [k for k in first if ".rep_pathway." in k]
    assert len(adapter_keys) >= 2 * 7  # two layers' adapters (down, up, gate x4, active)
    assert not torch.equal(first["model.layers.1.mlp.down_proj.weight"],
                           tiny_model.state_dict()["model.layers.1.mlp.down_proj.weight"])
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, different
