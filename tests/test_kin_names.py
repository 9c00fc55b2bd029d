"""`rep.kin_negatives`: names of the subject's kind, sampled from the model, become gate hard negatives."""

import dataclasses

import numpy as np
import pytest
import torch

from rep_easyedit.core import key_cache
from rep_easyedit.core.config import REPConfig
from rep_easyedit.core.keys import collect_keys_per_text, subject_last_index
from rep_easyedit.core.kin_names import is_kin, kin_names, kin_prompt, list_items
from rep_easyedit.core.perturbations import build_perturbations
from rep_easyedit.rep_main import _variant_texts, gather_training_keys, request_kin_names, training_variants

PATH = "model.layers.2.mlp.down_proj"
REQ = {"prompt": "BMW E23, developed by", "subject": "BMW E23", "target_new": "Suzuki", "ground_truth": "BMW",
       "case_id": 7, "subject_rephrase": ["BMW E23 model", "First-gen BMW 7 Series", "BMW E23 sedan", "E23"]}


def test_the_prompt_states_the_old_fact_and_opens_a_list_with_the_subject():
    assert kin_prompt("BMW E23, developed by", "BMW E23", "BMW") == \
        "BMW E23, developed by BMW. Other examples of the same kind:\n1. BMW E23\n2."
    assert kin_prompt("BMW E23, developed by", "BMW E23", None).startswith("BMW E23, developed by. Other")


def test_list_items_are_the_closed_items_in_order():
    assert list_items(" BMW E38\n3. BMW E46.\n4) BMW M4\n5. BMW X") == ["BMW E38", "BMW E46", "BMW M4"]
    assert list_items(" Stuttgart\n\nThe city of") == ["Stuttgart"]   # prose after the list ends it
    assert list_items(" cut off mid-na") == []


def test_surface_forms_of_the_subject_are_not_kin():
    exclude = ["BMW E23 model", "First-gen BMW 7 Series"]
    for item in ["BMW E23", "bmw  e23", "E23", "BMW", "BMW E23 sedan", "The BMW E23", "first-gen bmw 7 series",
                 "1995", "x", "A" * 61, "Alpina E23"]:
        assert not is_kin(item, "BMW E23", exclude), item
    assert not is_kin("Jean de Croisset", "Francis de Croisset", [])  # shares its last word
    for item in ["BMW E38", "Stuttgart", "Mercedes-Benz W126"]:
        assert is_kin(item, "BMW E23", exclude), item


class _Scripted:
    """Stands in for a model whose sampled continuations are known (generate returns them)."""

    def __init__(self, model, tok, continuations):
        self.model, self.tok, self.continuations, self.calls = model, tok, continuations, []

    def parameters(self):
        return self.model.parameters()

    def generate(self, input_ids, num_return_sequences, **kwargs):
        self.calls.append(dict(kwargs, num_return_sequences=num_return_sequences))
        rows = [self.tok(c, add_special_tokens=False)["input_ids"] for c in self.continuations]
        width = max(map(len, rows))
        pad = self.tok.pad_token_id
        tail = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        return torch.cat([input_ids.repeat(len(rows), 1), tail], dim=1)


def test_names_come_first_items_first_deduplicated_and_filtered(tiny_model, tokenizer):
    scripted = _Scripted(tiny_model, tokenizer, [" BMW E38\n3. BMW E46\n4. BMW E23 sedan\n5.",
                                                 " BMW E23\n3. BMW M5\n4. bmw e38\n5.",
                                                 " Mercedes-Benz W126\n3. BMW E4"])
    names = kin_names(scripted, tokenizer, REQ["prompt"], REQ["subject"], "BMW", 8, seed=0,
                      exclude=REQ["subject_rephrase"])
    assert names == ["BMW E38", "Mercedes-Benz W126", "BMW E46", "BMW M5"]
    assert kin_names(scripted, tokenizer, REQ["prompt"], REQ["subject"], "BMW", 2, seed=0) == ["BMW E38",
                                                                                           "Mercedes-Benz W126"]
    assert scripted.calls[0]["do_sample"] and scripted.calls[0]["num_return_sequences"] > 1
    assert kin_names(scripted, tokenizer, REQ["prompt"], REQ["subject"], "BMW", 0, seed=0) == []


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(tiny_model, tokenizer):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = kin_names(tiny_model, tokenizer, REQ["prompt"], REQ["subject"], "BMW", 8, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = kin_names(tiny_model, tokenizer, REQ["prompt"], REQ["subject"], "BMW", 8, seed=5)
    assert a == b and len(a) <= 8 and all(is_kin(n, REQ["subject"], []) for n in a)


def test_kin_names_are_hard_negatives_keyed_at_their_last_token(tiny_model, tokenizer):
    """Each name stands in the edit prompt in the subject's place and its last token's key is a hard
    negative; every other key stays as without them; off (0) samples nothing."""
    key_cache.clear_memory()
    base = REPConfig(n_shuffles=3, n_long_contexts=0, corpus_negative_texts=0, num_negatives=40,
                     kin_negatives=0, answer_negatives=False)  # no hard group but the one under test
    pert = build_perturbations(dict(REQ), tokenizer, [], n_shuffles=3, n_long=0, long_tokens=24)
    groups = [["{}", "Once upon a time. {}"]]
    args = (tiny_model, tokenizer, dict(REQ), pert, groups, PATH)
    plain = gather_training_keys(*args, base, [], np.random.default_rng(3))
    assert plain.hard_negatives is None
    assert request_kin_names(tiny_model, tokenizer, dict(REQ), pert, base) == []
    kin = ["BMW E38", "Stuttgart"]
    hard = gather_training_keys(*args, dataclasses.replace(base, kin_negatives=2), [], np.random.default_rng(3),
                                kin=kin)
    texts = _variant_texts(dict(REQ), kin, ["{}"], [])
    assert [t for t, _ in texts] == ["BMW E38, developed by", "Stuttgart, developed by"]
    want, _ = collect_keys_per_text(tiny_model, tokenizer, [t for t, _ in texts], PATH,
                                    [subject_last_index(tokenizer, t, e) for t, e in texts], all_tokens=False)
    assert torch.allclose(hard.hard_negatives.cpu(), want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(hard.positives, plain.positives) and torch.allclose(hard.negatives, plain.negatives)
    # sampled from the model when not given: the same names as the request's own draw
    rep = dataclasses.replace(base, kin_negatives=4)
    drawn = request_kin_names(tiny_model, tokenizer, dict(REQ), pert, rep)
    assert drawn == kin_names(tiny_model, tokenizer, REQ["prompt"], REQ["subject"], "BMW", 4, seed=pert.seed + 3,
                              exclude=training_variants(dict(REQ), pert, rep.train_on))


@pytest.mark.real_model
def test_kin_names_keep_the_gate_off_the_demo_cases_neighbours(real_model, dev_cases):
    """The demo's case (808, "Mercator Ice Piedmont" on SmolLM2): without kin names the gate fires on
    neighbours that are other Antarctic places ("Queen Maud Land"), which is where REP-ROME lost
    locality; with `kin_negatives: 8` the model's own names of Antarctic places teach it off them,
    while it still fires on the subject's trained variants. The report names what was sampled."""
    from rep_easyedit.backends import get_backend, templates_keyed_by_model
    from rep_easyedit.compat.easyedit import shims_applied
    from rep_easyedit.core.devices import padding_side
    from rep_easyedit.core.keys import collect_keys_flat
    from rep_easyedit.corpus import load_corpus
    from rep_easyedit.editing import load_hparams
    from rep_easyedit.rep_main import edited_module_paths, fit_adapters

    from conftest import ROOT, request_from_case

    model, tok = real_model
    case = next(c for c in dev_cases if c["case_id"] == 808)
    hp = load_hparams(ROOT / "hparams/REP-ROME/smollm2-135m.yaml")
    backend = get_backend(hp.backend_name)
    base_hp = hp.backend_hparams(backend)
    paths = edited_module_paths(model, base_hp)
    corpus = load_corpus(hp.rep.corpus, model, tok, seed=hp.rep.seed)
    request = request_from_case(case)
    fired = {}
    with padding_side(tok, "right"), shims_applied(), templates_keyed_by_model(model, backend):
        torch.manual_seed(0)
        templates = backend.context_templates(model, tok, base_hp)
        for n in (0, 8):
            rep = dataclasses.replace(hp.rep, kin_negatives=n, kin_mine=False, answer_negatives=False)  # every name
            pert = build_perturbations(request, tok, corpus, n_shuffles=rep.n_shuffles, n_long=rep.n_long_contexts,
                                       long_tokens=rep.long_context_tokens, base_seed=rep.seed)
            (path, adapter, report), = fit_adapters(model, tok, dict(request), pert, templates, paths, rep, corpus)
            flat = collect_keys_flat(model, tok, list(case["locality_prompt"]), path, None, all_tokens=True)
            with torch.no_grad():
                fired[n] = [bool((adapter.gate_prob(k) > adapter.tau).any()) for k in flat.per_text()]
            assert report.gate_pos_fire >= 0.95
            if n:
                names = report.collection["kin_names"]
                assert 0 < len(names) <= 8 and all(is_kin(x, request["subject"], []) for x in names)
            else:
                assert "kin_names" not in report.collection
    assert sum(fired[0]) >= 2 and sum(fired[8]) < sum(fired[0])
