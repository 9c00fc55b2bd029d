from rep_easyedit.core.perturbations import build_perturbations, halves, token_shuffles, with_subject

import numpy as np

REQ = {"prompt": "Ferrari F355 is produced by", "subject": "Ferrari F355", "target_new": "BMW",
       "case_id": 300, "subject_rephrase": [f"variant {i}" for i in range(10)]}
CORPUS = ["Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 40]


def test_deterministic_per_case(tokenizer):
    a = build_perturbations(REQ, tokenizer, CORPUS, n_long=4, long_tokens=32)
    b = build_perturbations(dict(REQ), tokenizer, CORPUS, n_long=4, long_tokens=32)
    assert a.to_dict() == b.to_dict()
    c = build_perturbations(dict(REQ, case_id=301), tokenizer, CORPUS, n_long=4, long_tokens=32)
    assert c.seed != a.seed


def test_rephrase_halves(tokenizer):
    p = build_perturbations(REQ, tokenizer, CORPUS, n_long=0)
    assert p.rephrase_in == [f"variant {i}" for i in range(5)]
    assert p.rephrase_out == [f"variant {i}" for i in range(5, 10)]
    assert halves([1, 2, 3]) == ([1, 2], [3])


def test_shuffles_are_decoded_text(tokenizer):
    out = token_shuffles(tokenizer, "Ferrari F355", 10, np.random.default_rng(0))
    assert 1 <= len(out) <= 10 and len(set(out)) == len(out)
    for s in out:
        assert "Ġ" not in s and "▁" not in s and s != "Ferrari F355"
        assert sorted(s.replace(" ", "")) == sorted("FerrariF355")


def test_no_shuffles_for_one_token_subject(tokenizer):
    word = "Paris"
    assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1
    assert token_shuffles(tokenizer, word, 10, np.random.default_rng(0)) == []


def test_long_contexts_have_the_requested_length(tokenizer):
    p = build_perturbations(REQ, tokenizer, CORPUS, n_long=4, long_tokens=64)
    assert len(p.long_in) == 2 and len(p.long_out) == 2
    for ctx in p.long_in + p.long_out:
        n = len(tokenizer(ctx, add_special_tokens=False)["input_ids"])
        assert 56 <= n <= 72


def test_with_subject():
    assert with_subject(REQ["prompt"], REQ["subject"], "The F355") == "The F355 is produced by"
