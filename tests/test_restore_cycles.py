"""Many edit/restore cycles leave the model bit-identical; bad requests never change it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from rep_easyedit import REPHyperParams, apply_rep_to_model
from rep_easyedit.editing import apply_edit
from rep_easyedit.core.pathway import installed_paths
from rep_easyedit.core.requests import EditRequestError, validate_requests

ROOT = Path(__file__).resolve().parents[1]
CYCLES = 100
REQ = {"prompt": "Ferrari F355 is produced by", "subject": "Ferrari F355", "target_new": "BMW",
       "case_id": 1, "subject_rephrase": ["The F355", "F355 by Ferrari", "Ferrari's F355", "F355"]}
TARGETS = ["BMW", "Audi", "Toyota", "Fiat", "Honda"]


def cheapest_hparams(tmp_path):
    raw = yaml.safe_load((ROOT / "hparams/REP-ROME/smollm2-135m.yaml").read_text())
    # v_num_grad_steps 2, not 1: with 1, ROME's compute_v breaks out before its only optimiser step,
    # `delta` stays 0 and the "edit" changes no weight, which would make the cycles test vacuous
    raw.update(layers=[1], v_loss_layer=3, v_num_grad_steps=2, context_template_length_params=[[3, 5]],
               stats_dir=str(tmp_path / "stats"))
    raw["rep"].update(steps=2, n_long_contexts=0, corpus_negative_texts=0, n_shuffles=2)
    return REPHyperParams.from_dict(raw)


def hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def full_state(model):
    state = {f"param:{k}": v.detach().clone() for k, v in model.named_parameters()}
    state.update({f"buffer:{k}": v.detach().clone() for k, v in model.named_buffers()})
    return state


def assert_same(model, before):
    after = full_state(model)
    assert after.keys() == before.keys()
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert not changed, changed
    assert hook_count(model) == 0 and installed_paths(model) == []


def test_edit_restore_cycles_are_exact(tiny_model, tokenizer, tmp_path):
    hp = cheapest_hparams(tmp_path)
    start = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    weight = "model.layers.1.mlp.down_proj.weight"
    enc = tokenizer(["Ferrari F355 is produced by"], return_tensors="pt")
    t0 = time.perf_counter()
    for i in range(CYCLES):
        weights_copy = apply_edit(tiny_model, tokenizer, [dict(REQ, target_new=TARGETS[i % len(TARGETS)])], hp)
        assert installed_paths(tiny_model) == ["model.layers.1.mlp.down_proj"]
        if i % 10 == 0:
            assert not torch.equal(tiny_model.state_dict()[weight], start[weight])  # a real edit
        # EasyEdit's restore: write weights_copy back through the parameters, then one forward
        params = dict(tiny_model.named_parameters())
        with torch.no_grad():
            for name, value in weights_copy.items():
                params[name][...] = value
            tiny_model(**enc)
    elapsed = time.perf_counter() - t0
    print(f"{CYCLES} edit/restore cycles in {elapsed:.1f} s")
    end = tiny_model.state_dict()
    assert end.keys() == start.keys()
    assert all(torch.equal(end[k], start[k]) for k in start)
    assert hook_count(tiny_model) == 0 and installed_paths(tiny_model) == []


# ----------------------------------------------------------------------------------------------
# bad requests (property test)

WORDS = st.sampled_from(["Ferrari", "F355", "Paris", "Émile Zola", "東京", "🚗", "naïve", "Ω", "x", "the"])
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)
LONG = st.integers(min_value=5001, max_value=7000).map(lambda n: ("lorem ipsum dolor " * (n // 18 + 1))[:n])


@st.composite
def bad_request(draw):
    """(request, expected message fragment) for a request that must be refused."""
    subject = draw(st.one_of(WORDS, TEXT.filter(lambda s: s.strip() and "{}" not in s)))
    filler = draw(st.one_of(TEXT, WORDS, LONG))
    target = draw(st.one_of(WORDS, TEXT.filter(str.strip)))
    kind = draw(st.sampled_from(["empty", "blank", "absent", "repeated", "two_slots", "stray_brace",
                                 "not_str"]))
    # a brace anywhere is its own refusal (checked first), so only the brace kinds may carry one
    assume(not any(b in subject + filler for b in "{}"))
    prompt = f"{filler} {subject} is produced by"
    req = {"prompt": prompt, "subject": subject, "target_new": target}
    if kind in ("empty", "blank"):
        field = draw(st.sampled_from(["prompt", "subject", "target_new"]))
        req[field] = "" if kind == "empty" else draw(st.sampled_from([" ", "\t\n", "  \u3000 "]))
        return req, "empty"
    if kind == "absent":
        req["prompt"] = filler.replace(subject, "") + " is produced by"
        assume(subject not in req["prompt"] and "{}" not in req["prompt"])
        return req, "does not occur"
    if kind == "repeated":
        n = draw(st.integers(2, 4))
        req["prompt"] = " and ".join([subject] * n) + " " + filler
        assume("{}" not in req["prompt"])
        return req, "times"
    if kind == "two_slots":
        req["prompt"] = "{} " + filler + " {} is produced by"
        return req, "slots"
    if kind == "stray_brace":
        req["prompt"] = filler + " " + draw(st.sampled_from(["{", "}", "{0}"])) + " " + prompt
        return req, "braces"
    if kind == "not_str":
        field = draw(st.sampled_from(["prompt", "subject", "target_new"]))
        req[field] = draw(st.sampled_from([None, 3, ["a"], b"bytes"]))
        return req, "must be a string"
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def module_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def module_hparams(tmp_path_factory):
    return cheapest_hparams(tmp_path_factory.mktemp("hp"))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(case=bad_request())
def test_bad_requests_are_refused_clearly(module_model, tokenizer, module_hparams, case):
    req, message = case
    before = full_state(module_model)
    with pytest.raises(ValueError) as info:
        apply_rep_to_model(module_model, tokenizer, [dict(req)], module_hparams, return_orig_weights=True,
                           keep_original_weight=True)
    assert isinstance(info.value, EditRequestError), repr(info.value)
    assert message in str(info.value), (str(info.value), req)
    assert "request 0" in str(info.value)
    assert_same(module_model, before)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 5), good=st.booleans())
def test_request_list_lengths(n, good):
    requests = [dict(REQ) for _ in range(n)]
    if n == 0:
        with pytest.raises(EditRequestError, match="no requests"):
            validate_requests(requests, max_batch=1, alg_name="REP-ROME")
    elif n > 1:
        with pytest.raises(EditRequestError, match=f"1 fact\\(s\\) per call but got {n}"):
            validate_requests(requests, max_batch=1, alg_name="REP-ROME")
        validate_requests(requests, max_batch=None)  # batch backends take any number
    else:
        validate_requests(requests, max_batch=1)
    if not good and n:
        bad = list(requests)
        bad[-1] = dict(REQ, subject="Porsche")
        with pytest.raises(EditRequestError, match=f"request {n - 1}: subject 'Porsche' does not occur"):
            validate_requests(bad, max_batch=None)
    with pytest.raises(EditRequestError, match="non-empty list"):
        validate_requests(dict(REQ) if good else "Ferrari", max_batch=None)


def test_batch_to_rep_rome_changes_nothing(module_model, tokenizer, module_hparams):
    before = full_state(module_model)
    with pytest.raises(EditRequestError, match="1 fact"):
        apply_rep_to_model(module_model, tokenizer, [dict(REQ), dict(REQ, target_new="Audi")], module_hparams)
    with pytest.raises(EditRequestError, match="no requests"):
        apply_rep_to_model(module_model, tokenizer, [], module_hparams)
    assert_same(module_model, before)


# ----------------------------------------------------------------------------------------------
# requests that used to slip past validation and fail deep inside EasyEdit with an unclear error

BRACES = st.sampled_from(["{", "}", "{0}", "{name}", "{1}", "}{", "{ }"])


@settings(max_examples=30, deadline=None, report_multiple_bugs=False,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(brace=BRACES, where=st.integers(0, 2))
def test_prompt_with_stray_braces_is_refused_clearly(module_model, tokenizer, module_hparams, brace, where):
    words = ["Ferrari F355", "is produced", "by"]
    words.insert(where + 1, brace)
    req = dict(REQ, prompt=" ".join(words))
    before = full_state(module_model)
    try:
        with pytest.raises(EditRequestError, match="brace|\\{"):
            apply_rep_to_model(module_model, tokenizer, [req], module_hparams, return_orig_weights=True,
                               keep_original_weight=True)
    finally:
        assert_same(module_model, before)


def test_non_string_rephrase_is_refused_clearly(module_model, tokenizer, module_hparams):
    before = full_state(module_model)
    try:
        with pytest.raises(EditRequestError, match="subject_rephrase"):
            apply_rep_to_model(module_model, tokenizer, [dict(REQ, subject_rephrase=[None, "F355"])],
                               module_hparams)
    finally:
        assert_same(module_model, before)
