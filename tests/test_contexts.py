"""Distracting contexts: fixed per case, built from what each half may use, scored by the runner."""

from __future__ import annotations

import json

from rep_easyedit.eval.contexts import distracting_contexts, with_distractor

from conftest import ROOT

CASES = json.loads((ROOT / "data/counterfact_smollm2_dev.json").read_text())[:5]


def test_contexts_are_fixed_per_case_and_differ_between_cases():
    first = [distracting_contexts(c) for c in CASES]
    assert first == [distracting_contexts(json.loads(json.dumps(c))) for c in CASES]
    assert len({json.dumps(d) for d in first}) == len(CASES)
    assert distracting_contexts(CASES[0], base_seed=1) != first[0]
    for d in first:
        assert len(d["distract_in"]) == 3 and len(d["distract_out"]) == 3
        assert len(set(d["distract_in"])) == 3


def test_in_half_uses_the_request_only_and_out_half_the_neighbours():
    for case in CASES:
        d = distracting_contexts(case)
        for text in d["distract_in"]:
            assert case["target_true"] in text
            assert not any(p in text for p in case["locality_prompt"])   # never the locality prompts
        for text in d["distract_out"]:
            assert any(p.strip() in text for p in case["locality_prompt"])


def test_a_context_without_the_subject_is_scored_on_the_prompt_after_it():
    """The neighbour facts name other subjects only: the prompt after them still carries the subject."""
    case = next(c for c in CASES if all(c["subject"] not in p for p in c["locality_prompt"]))
    (context, *_) = distracting_contexts(case)["distract_out"]
    assert case["subject"] not in context
    text = with_distractor(context, case["prompt"])
    assert text.endswith(case["prompt"]) and text.count(case["subject"]) == 1


def test_no_old_object_or_neighbours_gives_empty_halves():
    bare = {"case_id": 1, "prompt": "X is made by", "subject": "X", "target_new": "Y"}
    assert distracting_contexts(bare) == {"distract_in": [], "distract_out": []}


def test_long_contexts_of_each_kind(tokenizer):
    import numpy as np
    import pytest

    from rep_easyedit.eval.contexts import long_context_of_kind

    corpus = ["The river runs past the old mill and into the valley below the town. " * 60]
    case = CASES[0]

    def make(kind, seed=0):
        return long_context_of_kind(case, tokenizer, corpus, 512, kind, np.random.default_rng(seed))

    for kind in ("unrelated", "subject", "old_object"):
        text = make(kind)
        assert text == make(kind)                                     # fixed by the generator
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        assert 0.9 * 512 <= n <= 1.1 * 512
    assert case["subject"] not in make("unrelated") and case["target_true"] not in make("unrelated")
    about_subject, about_old = make("subject"), make("old_object")
    assert about_subject.count(case["subject"]) >= 2
    # (the subject itself may contain the old object's name: "Ferrari F355" / "Ferrari")
    assert case["target_true"] not in about_subject.replace(case["subject"], "")
    assert about_old.replace(case["subject"], "").count(case["target_true"]) >= 2
    with pytest.raises(ValueError, match="unknown long-context kind"):
        make("noise")
