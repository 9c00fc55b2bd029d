"""Fitting ROME's value over the subject's variants too (an option beyond the paper).

With the pathway installed, a trained variant's key at its last subject token is mapped onto k*,
so a rank-one edit gives it the same MLP output as the original prompt. That is often not enough:
the other tokens of a rephrased or shuffled subject still carry the old fact. Here the value
vector v* of ROME's update (Meng et al. 2022, eq. 4: minimise the target's NLL, with a KL term on
"{} is a" and a norm clamp, over a shift δ added to the MLP output at the subject's last token) is
optimised over the backend's prompts *and* the in-domain variant prompts, each with δ added at
its own subject's last token. The result has ROME's form, so ROME's update equation is unchanged:
right_vector = (v* − W k) / (kᵀu) with k, W k taken at the unprefixed prompt.

`value_fitted_on_variants(...)` swaps the backend module's `compute_v` for the block.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .core.devices import model_device, padding_side
from .core.keys import subject_last_index
from .core.pathway import get_module


def _fill(template: str, text: str) -> str:
    return template.replace("{}", text)


def optimise_value(model, tok, request: dict, hparams, layer: int, left_vector: torch.Tensor,
                   context_templates: Sequence[str], variants: Sequence[str],
                   variant_templates: int = 3) -> torch.Tensor:
    """ROME's right vector, with v* fitted over the edit prompt and the variant prompts."""
    device = model_device(model)
    prompt_tpl = request["prompt"] if "{}" in request["prompt"] else \
        request["prompt"].replace(request["subject"], "{}", 1)
    subject = request["subject"]
    target = request["target_new"]
    target_ids = tok(target, add_special_tokens=False)["input_ids"]
    if not target.startswith(" "):
        target_ids = tok(" " + target, add_special_tokens=False)["input_ids"]
    target_text = tok.decode(target_ids[:-1])

    # (text, character end of the subject or variant): rewriting prompts then the KL prompt
    rewriting = []
    for ctx in context_templates:
        filled = _fill(ctx, prompt_tpl)
        start = filled.index("{}")
        rewriting.append((filled.replace("{}", subject, 1) + target_text, start + len(subject)))
    for variant in variants:
        for ctx in list(context_templates)[:variant_templates]:
            filled = _fill(ctx, prompt_tpl)
            start = filled.index("{}")
            rewriting.append((filled.replace("{}", variant, 1) + target_text, start + len(variant)))
    kl_text = f"{subject} is a"
    texts = [t for t, _ in rewriting] + [kl_text]
    lookup = [subject_last_index(tok, t, end) for t, end in rewriting] + \
             [subject_last_index(tok, kl_text, len(subject))]

    with padding_side(tok, "right"):
        enc = tok(texts, return_tensors="pt", padding=True).to(device)
    n_rw = len(rewriting)
    labels = torch.full(enc["input_ids"].shape, -100, device=device)
    lengths = enc["attention_mask"].sum(1)
    tgt = torch.tensor(target_ids, device=device)
    for i in range(n_rw):
        end = int(lengths[i])
        labels[i, end - len(target_ids):end] = tgt  # logits at p predict token p+1

    mlp = get_module(model, hparams.mlp_module_tmp.format(layer))
    hidden = model.config.hidden_size
    delta = torch.zeros(hidden, device=device, dtype=torch.float32, requires_grad=True)
    rows = torch.arange(len(texts), device=device)
    idx = torch.tensor(lookup, device=device)
    state = {"init": None}

    def add_delta(_module, _args, output):
        out = output[0] if isinstance(output, tuple) else output
        if state["init"] is None:
            state["init"] = out[0, lookup[0]].detach().float().clone()
        shifted = out.clone()
        shifted[rows, idx] = (out[rows, idx].float() + delta).to(out.dtype)
        return (shifted, *output[1:]) if isinstance(output, tuple) else shifted

    opt = torch.optim.Adam([delta], lr=hparams.v_lr)
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    kl_init = None
    handle = mlp.register_forward_hook(add_delta)
    try:
        for step in range(hparams.v_num_grad_steps):
            opt.zero_grad()
            logits = model(**enc).logits.float()
            # labels sit where the logits that predict them are (ROME's convention)
            log_probs = torch.log_softmax(logits[:n_rw], dim=-1)
            gold = labels[:n_rw]
            mask = gold != -100
            picked = torch.gather(log_probs, 2, gold.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            nll = -(picked * mask).sum(1) / len(target_ids)
            nll = nll.mean()
            kl_logp = torch.log_softmax(logits[n_rw:, :][torch.arange(1, device=device), idx[n_rw:]], dim=-1)
            if kl_init is None:
                kl_init = kl_logp.detach().clone()
            kl = hparams.kl_factor * F.kl_div(kl_init, kl_logp, log_target=True, reduction="batchmean")
            decay = hparams.v_weight_decay * (delta.norm() / state["init"].norm() ** 2)
            loss = nll + kl + decay
            if loss.item() < 5e-2 or step == hparams.v_num_grad_steps - 1:
                break
            loss.backward()
            opt.step()
            max_norm = hparams.clamp_norm_factor * state["init"].norm()
            if delta.norm() > max_norm:
                with torch.no_grad():
                    delta.mul_(max_norm / delta.norm())
    finally:
        handle.remove()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    target_vec = state["init"] + delta.detach()

    # the key and MLP output at the unprefixed prompt, as ROME takes them
    plain = _fill(prompt_tpl, subject)
    pos = subject_last_index(tok, plain, prompt_tpl.index("{}") + len(subject))
    down = get_module(model, hparams.rewrite_module_tmp.format(layer))
    box = {}
    h1 = down.register_forward_hook(lambda m, a, o: box.update(k=a[0][0, pos].detach().float(),
                                                               v=o[0, pos].detach().float()))
    try:
        with torch.no_grad():
            model(**tok([plain], return_tensors="pt").to(device))
    finally:
        h1.remove()
    return (target_vec - box["v"]) / torch.dot(box["k"], left_vector.float())


@contextlib.contextmanager
def value_fitted_on_variants(backend_apply, variants_of_request: dict, variant_templates: int = 3
                             ) -> Iterator[bool]:
    """Swap the backend module's `compute_v` for `optimise_value` over the variants; yields
    whether the backend has a swappable `compute_v` (ROME-style backends do)."""
    fn = getattr(backend_apply, "__rep_easyedit_original__", backend_apply)
    module = importlib.import_module(fn.__module__)
    original = getattr(module, "compute_v", None)
    if original is None:
        yield False
        return

    def compute_v(model, tok, request, hparams, layer, left_vector, context_templates, *a, **kw):
        key = (request["prompt"].replace("{}", request["subject"]), request["subject"])
        variants = variants_of_request.get(key, [])
        return optimise_value(model, tok, request, hparams, layer, left_vector, context_templates,
                              variants, variant_templates)

    module.compute_v = compute_v
    try:
        yield True
    finally:
        module.compute_v = original
