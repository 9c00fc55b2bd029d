"""Free generation: the forms asked, the object check, and the scores against what the model said."""

from __future__ import annotations

import pytest
import torch

from rep_easyedit.eval.generation import answer_prompts, generation_check, greedy_answer, question_form, states


def test_states_needs_whole_words():
    assert states("It was made by BMW in Munich.", "BMW")
    assert states("made by bmw", "BMW")
    assert not states("made by BMWs", "BMW") and not states("made by XBMW", "BMW")
    assert states("the War  of 1812 began", "War of 1812")
    assert not states("anything", "") and not states("anything", None)


def test_question_form_keeps_questions():
    assert question_form("In what city was X born?") == "Question: In what city was X born?\nAnswer:"
    assert question_form("X is made by") == "Fill in the blank: X is made by ___\nAnswer:"


def test_chat_form_only_where_the_tokenizer_has_a_template(tokenizer):
    record = {"prompt": "Ferrari F355 is produced by", "subject": "Ferrari F355", "target_new": "BMW"}
    forms = answer_prompts(tokenizer, record)
    assert forms["prompt"] == record["prompt"]
    assert ("chat" in forms) == bool(tokenizer.chat_template)
    if "chat" in forms:
        assert question_form(record["prompt"]) in forms["chat"]
    plain = type("Plain", (), {"chat_template": None})()
    assert set(answer_prompts(plain, record)) == {"prompt", "question"}


def test_scores_count_the_forms_whose_answer_names_the_object(tiny_model, tokenizer):
    """Make the tiny model's own greedy answer to the bare prompt the 'new object': that form
    scores, and the score is the share of forms whose answer contains it."""
    record = {"prompt": "Ferrari F355 is produced by", "subject": "Ferrari F355", "target_new": "x",
              "target_true": "Ferrari"}
    torch.manual_seed(0)
    said = greedy_answer(tiny_model, tokenizer, record["prompt"], 24, chat=False)
    word = next((w for w in said.split() if w.isalpha() and len(w) > 2), None)
    if word is None:
        pytest.skip("the random model said no word")
    result = generation_check(tiny_model, tokenizer, dict(record, target_new=word))
    assert set(result["answers"]) == set(answer_prompts(tokenizer, record))
    expect = sum(states(a, word) for a in result["answers"].values()) / len(result["answers"])
    assert result["generation_new"] == expect and expect >= 1 / len(result["answers"])
    again = generation_check(tiny_model, tokenizer, dict(record, target_new=word))
    assert again == result   # greedy: deterministic
