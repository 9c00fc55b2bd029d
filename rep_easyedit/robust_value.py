"""Fitting ROME's value over the subject's variants too (an option beyond the paper).

With the pathway installed, a trained variant's key at its last subject token is mapped onto k*,
so a rank-one edit gives it the same MLP output as the original prompt. That is often not enough:
the other tokens of a rephrased or shuffled subject still carry the old fact. Here the value
vector v* of ROME's update (Meng et al. 2022, eq. 4: minimise the target's NLL, with a KL term on
"{} is a" and a norm clamp, over a shift δ added to the MLP output at the subject's last token) is
optimised over the backend's prompts *and* the in-domain variant prompts, each with δ added at
its own subject's last token. The result has ROME's form, so ROME's update equation is unchanged:
right_vector = (v* − W k) / (kᵀu) with k, W k taken at the unprefixed prompt.

MEMIT's z (its `compute_z`: the same optimisation with δ added to the residual stream after the
last edited block) is fitted the same way (`optimise_target`); MEMIT then spreads it over its
layers as usual. `value_fitted_on_variants(...)` swaps them in for the block.

The LM head runs only at the positions the loss reads (each prompt's target tokens and the KL
prompt's subject token), not at every position as ROME's and MEMIT's own code does.
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


def fit_shift(model, tok, request: dict, hparams, module_path: str, context_templates: Sequence[str],
              variants: Sequence[str], variant_templates: int = 3, variant_weight: float = 1.0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(output at the subject's last token of the unprefixed prompt, the shift δ): ROME's `compute_v`
    and MEMIT's `compute_z` optimisation (δ added to `module_path`'s output at each prompt's subject
    token), over the edit prompt in every context template and each variant in the first
    `variant_templates` of them, a variant prompt's NLL weighted `variant_weight` against an edit
    prompt's 1 (1: the plain mean over prompts, as ROME). The loss reads the model's own logits (the
    YAMLs' `v_loss_layer` is the last layer, where ROME and MEMIT read theirs)."""
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
    n_t = len(target_ids)
    lengths = enc["attention_mask"].sum(1).tolist()
    # the only logits the loss reads: at p, predicting token p+1, over each prompt's target tokens
    # (ROME's convention), and at the KL prompt's subject token. The LM head runs on these rows alone:
    # on Gemma-3 the 262k-token head is most of a step's arithmetic, on SmolLM2 about a fifth.
    scored_rows = [i for i in range(n_rw) for _ in range(n_t)] + [n_rw]
    scored_pos = [int(lengths[i]) - n_t + j for i in range(n_rw) for j in range(n_t)] + [lookup[n_rw]]
    scored_rows = torch.tensor(scored_rows, device=device)
    scored_pos = torch.tensor(scored_pos, device=device)
    gold = torch.tensor(target_ids, device=device).repeat(n_rw)
    n_edit = len(context_templates)
    weight = torch.tensor([1.0] * n_edit + [float(variant_weight)] * (n_rw - n_edit), device=device)
    weight = (weight / weight.sum()).repeat_interleave(n_t) / n_t

    shifted_module = get_module(model, module_path)
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

    def scored_only(_module, args):
        return (args[0][scored_rows, scored_pos].unsqueeze(0), *args[1:])

    opt = torch.optim.Adam([delta], lr=hparams.v_lr)
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    kl_init = None
    head = model.get_output_embeddings()
    handles = [shifted_module.register_forward_hook(add_delta)]
    if head is not None:
        handles.append(head.register_forward_pre_hook(scored_only))
    try:
        for step in range(hparams.v_num_grad_steps):
            opt.zero_grad()
            logits = model(**enc).logits
            logits = logits[0] if logits.shape[0] == 1 and head is not None else logits[scored_rows, scored_pos]
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            picked = log_probs[torch.arange(n_rw * n_t, device=device), gold]
            nll = -(picked * weight).sum()
            kl_logp = log_probs[-1:]
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
        for handle in handles:
            handle.remove()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    return state["init"], delta.detach()


def optimise_value(model, tok, request: dict, hparams, layer: int, left_vector: torch.Tensor,
                   context_templates: Sequence[str], variants: Sequence[str],
                   variant_templates: int = 3, variant_weight: float = 1.0) -> torch.Tensor:
    """ROME's right vector (`compute_v`'s result), with v* fitted over the variant prompts too."""
    device = model_device(model)
    init, delta = fit_shift(model, tok, request, hparams, hparams.mlp_module_tmp.format(layer),
                            context_templates, variants, variant_templates, variant_weight)
    target_vec = init + delta
    prompt_tpl = request["prompt"] if "{}" in request["prompt"] else \
        request["prompt"].replace(request["subject"], "{}", 1)
    subject = request["subject"]

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


def optimise_target(model, tok, request: dict, hparams, layer: int, context_templates,
                    variants: Sequence[str], variant_templates: int = 3, variant_weight: float = 1.0
                    ) -> torch.Tensor:
    """MEMIT's z (`compute_z`'s result: the residual stream after block `layer` at the subject's last
    token, shifted), with the shift fitted over the variant prompts too."""
    flat = [t for group in context_templates for t in ([group] if isinstance(group, str) else group)]
    init, delta = fit_shift(model, tok, request, hparams, hparams.layer_module_tmp.format(layer), flat,
                            variants, variant_templates, variant_weight)
    return init + delta


@contextlib.contextmanager
def value_fitted_on_variants(backend_apply, variants_of_request: dict, variant_templates: int = 3,
                             variant_weight: float = 1.0) -> Iterator[bool]:
    """Swap ROME's `compute_v` and MEMIT's `compute_z` for their variant-aware fits, wherever the
    backend reads them: the backend's own module (EasyEdit's ROME and MEMIT bind them at import)
    and the installed ROME's `compute_v` module (R-ROME and EMMET here look it up there at call
    time). Yields whether any was swapped; every one is given back on exit."""
    from .backends_extra.common import easyedit_module

    fn = getattr(backend_apply, "__rep_easyedit_original__", backend_apply)
    modules = [importlib.import_module(fn.__module__)]
    if fn.__module__.startswith("rep_easyedit.backends_extra"):
        modules.append(easyedit_module("models.rome.compute_v"))

    def variants_of(request):
        prompt = request["prompt"]
        filled = prompt.replace("{}", request["subject"]) if "{}" in prompt else prompt
        return variants_of_request.get((filled, request["subject"]), [])

    def compute_v(model, tok, request, hparams, layer, left_vector, context_templates, *a, **kw):
        return optimise_value(model, tok, request, hparams, layer, left_vector, context_templates,
                              variants_of(request), variant_templates, variant_weight)

    def compute_z(model, tok, request, hparams, layer, context_templates, *a, **kw):
        return optimise_target(model, tok, request, hparams, layer, context_templates,
                               variants_of(request), variant_templates, variant_weight)

    swaps = [(m, name, getattr(m, name)) for m in dict.fromkeys(modules)
             for name in ("compute_v", "compute_z") if getattr(m, name, None) is not None]
    for m, name, _ in swaps:
        setattr(m, name, compute_v if name == "compute_v" else compute_z)
    try:
        yield bool(swaps)
    finally:
        for m, name, original in swaps:
            setattr(m, name, original)
