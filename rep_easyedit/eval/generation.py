"""Free generation: does the edited model *say* the new fact when it answers on its own?

Teacher-forced success scores the target's tokens given the true previous ones; a model can pass it
and still answer the old object, or ramble, when it generates. Here the model answers greedily in
up to three forms of the edit's question, and each answer is checked for the new and the old object:

- ``prompt``: the edit prompt itself, continued;
- ``question``: a question built from the prompt ("Fill in the blank: <prompt> ___" / "Answer:"),
  or the prompt as it is where it already is a question (zsRE);
- ``chat``: the question form through the tokenizer's chat template, where it has one (the
  instruct SmolLM2 does; the bundled Gemma-3-270M base model has none, so the form is skipped).

An answer "states" an object when the object's words appear in it as whole words (case-insensitive).
"""

from __future__ import annotations

import re

import torch

from ..core.devices import model_device

FORMS = ("prompt", "question", "chat")


def question_form(prompt: str) -> str:
    prompt = prompt.strip()
    if prompt.endswith("?"):
        return f"Question: {prompt}\nAnswer:"
    return f"Fill in the blank: {prompt} ___\nAnswer:"


def answer_prompts(tok, record: dict) -> dict[str, str]:
    """Form name -> the text the model continues (already chat-rendered for ``chat``)."""
    prompt = record["prompt"].replace("{}", record["subject"])
    out = {"prompt": prompt, "question": question_form(prompt)}
    if getattr(tok, "chat_template", None):
        out["chat"] = tok.apply_chat_template([{"role": "user", "content": question_form(prompt)}],
                                              add_generation_prompt=True, tokenize=False)
    return out


def states(answer: str, obj: str | None) -> bool:
    """Whether `answer` names `obj` as whole words, ignoring case and spacing."""
    if not obj or not obj.strip():
        return False
    words = r"\s+".join(re.escape(w) for w in obj.split())
    return re.search(rf"(?<!\w){words}(?!\w)", answer, flags=re.IGNORECASE) is not None


@torch.no_grad()
def greedy_answer(model, tok, text: str, max_new_tokens: int, chat: bool = False,
                  include_prompt: bool = False) -> str:
    """The greedy continuation of `text` (with `text` in front if `include_prompt`; special tokens
    dropped)."""
    from transformers import GenerationConfig

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                              pad_token_id=pad_id, eos_token_id=tok.eos_token_id)
    # a chat-rendered text carries its own special tokens
    enc = tok(text, return_tensors="pt", add_special_tokens=not chat).to(model_device(model))
    was_training = model.training
    model.eval()
    try:
        out = model.generate(**enc, generation_config=config)
    finally:
        model.train(was_training)
    start = 0 if include_prompt else enc["input_ids"].shape[1]
    return tok.decode(out[0, start:], skip_special_tokens=True)


def generation_check(model, tok, record: dict, max_new_tokens: int = 24) -> dict:
    """`{"generation_new": share of forms whose answer states target_new, "generation_old": ... the
    old object, "answers": {form: answer}}`; the old share is None where the record has no old object."""
    old = record.get("target_true") or record.get("ground_truth")
    answers = {form: greedy_answer(model, tok, text, max_new_tokens, chat=form == "chat")
               for form, text in answer_prompts(tok, record).items()}
    n = len(answers)
    return {"generation_new": sum(states(a, record["target_new"]) for a in answers.values()) / n,
            "generation_old": (sum(states(a, old) for a in answers.values()) / n) if old else None,
            "answers": answers}
