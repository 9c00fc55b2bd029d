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
from dataclasses import dataclass, field
from typing import Iterator, Sequence, Tuple

import torch
import torch.nn.functional as F

from .core.devices import model_device, padding_side
from .core.keys import subject_last_index
from .core.pathway import get_module


def _fill(template: str, text: str) -> str:
    return template.replace("{}", text)


def _template(request: dict) -> str:
    """The request's prompt with "{}" where the subject is."""
    prompt = request["prompt"]
    return prompt if "{}" in prompt else prompt.replace(request["subject"], "{}", 1)


@dataclass(frozen=True)
class VariantFit:
    """What one request's value fit reads beyond the backend's own prompts.

    `variants`: the trained surface forms, each in the first `templates` context templates, a
    variant prompt's NLL weighted `weight` against an edit prompt's 1. `anchors`: names of other
    subjects (ROME only): each fills the edit prompt, every one of its tokens receives the shift the
    rank-one update will give that token's key, `δ · uᵀk_t / uᵀk*`, and the KL of its next-token
    distribution from the unedited one enters the loss with `anchor_weight`, so the fit sees what
    the edit does to neighbours. An anchor whose share at its own last token exceeds
    `anchor_max_share` is left out: the update cannot tell it from the subject, so keeping it as it
    was works against the edit itself. `report` receives each anchor's share there and the names
    left out."""
    variants: Tuple[str, ...] = ()
    templates: int = 3
    weight: float = 1.0
    anchors: Tuple[str, ...] = ()
    anchor_weight: float = 1.0
    anchor_max_share: float = 0.5
    report: dict = field(default_factory=dict, compare=False)


def _forward_io(model, tok, texts: list[str], module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`module`'s input and output at every token of each text ((len(texts), longest, dim), float32,
    no grad) and the attention mask, from one right-padded forward."""
    device = model_device(model)
    box = {}
    handle = module.register_forward_hook(lambda m, a, o: box.update(k=a[0].detach().float(),
                                                                     v=o.detach().float()))
    try:
        with torch.no_grad(), padding_side(tok, "right"):
            enc = tok(texts, return_tensors="pt", padding=True).to(device)
            model(**enc)
    finally:
        handle.remove()
    return box["k"], box["v"], enc["attention_mask"]


def _subject_io(model, tok, texts: list[str], ends: list[int], module) -> tuple[torch.Tensor, torch.Tensor]:
    """`module`'s input and output (each (len(texts), dim)) at each text's last subject token."""
    keys, outs, _ = _forward_io(model, tok, texts, module)
    rows = torch.arange(len(texts), device=keys.device)
    pos = torch.tensor([subject_last_index(tok, t, e) for t, e in zip(texts, ends)], device=keys.device)
    return keys[rows, pos], outs[rows, pos]


def _token_keys(model, tok, texts: list[str], module) -> torch.Tensor:
    """`module`'s input at every token of each text, zeros past each text's end."""
    keys, _, mask = _forward_io(model, tok, texts, module)
    return keys * mask.unsqueeze(-1).to(keys.dtype)


def fit_shift(model, tok, request: dict, hparams, module_path: str, context_templates: Sequence[str],
              fit: VariantFit = VariantFit(), anchors: Sequence[tuple[str, torch.Tensor]] = ()
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(output at the subject's last token of the unprefixed prompt, the shift δ): ROME's `compute_v`
    and MEMIT's `compute_z` optimisation (δ added to `module_path`'s output at each prompt's subject
    token), over the edit prompt in every context template and the variant prompts of `fit`
    (1 template and no variants: ROME's own). Each anchor `(name, shares)` fills the edit prompt and
    gets `δ · shares[t]` at its token t (`fit.anchors` is read by the caller, which knows the
    update's form). The loss reads the model's own logits (the YAMLs' `v_loss_layer` is the last
    layer, where ROME and MEMIT read theirs)."""
    device = model_device(model)
    prompt_tpl = _template(request)
    subject = request["subject"]
    target = request["target_new"]
    target_ids = tok(target, add_special_tokens=False)["input_ids"]
    if not target.startswith(" "):
        target_ids = tok(" " + target, add_special_tokens=False)["input_ids"]
    target_text = tok.decode(target_ids[:-1])

    # (text, character end of the subject or variant): rewriting prompts, the KL prompt, the anchors
    rewriting = []
    for ctx in context_templates:
        filled = _fill(ctx, prompt_tpl)
        start = filled.index("{}")
        rewriting.append((filled.replace("{}", subject, 1) + target_text, start + len(subject)))
    for variant in fit.variants:
        for ctx in list(context_templates)[:fit.templates]:
            filled = _fill(ctx, prompt_tpl)
            start = filled.index("{}")
            rewriting.append((filled.replace("{}", variant, 1) + target_text, start + len(variant)))
    kl_text = f"{subject} is a"
    texts = [t for t, _ in rewriting] + [kl_text] + [_fill(prompt_tpl, name) for name, _ in anchors]
    lookup = [subject_last_index(tok, t, end) for t, end in rewriting] + \
             [subject_last_index(tok, kl_text, len(subject))]

    with padding_side(tok, "right"):
        enc = tok(texts, return_tensors="pt", padding=True).to(device)
    n_rw, n_anchor = len(rewriting), len(anchors)
    n_t = len(target_ids)
    lengths = enc["attention_mask"].sum(1).tolist()
    # the only logits the loss reads: at p, predicting token p+1, over each prompt's target tokens
    # (ROME's convention), at the KL prompt's subject token and at each anchor's last token. The LM
    # head runs on these rows alone: on Gemma-3 its 262k tokens are most of a step, on SmolLM2 a fifth.
    scored_rows = [i for i in range(n_rw) for _ in range(n_t)] + [n_rw] + \
                  [n_rw + 1 + j for j in range(n_anchor)]
    scored_pos = [int(lengths[i]) - n_t + j for i in range(n_rw) for j in range(n_t)] + [lookup[n_rw]] + \
                 [int(lengths[n_rw + 1 + j]) - 1 for j in range(n_anchor)]
    scored_rows = torch.tensor(scored_rows, device=device)
    scored_pos = torch.tensor(scored_pos, device=device)
    gold = torch.tensor(target_ids, device=device).repeat(n_rw)
    n_edit = len(context_templates)
    weight = torch.tensor([1.0] * n_edit + [float(fit.weight)] * (n_rw - n_edit), device=device)
    weight = (weight / weight.sum()).repeat_interleave(n_t) / n_t

    shifted_module = get_module(model, module_path)
    hidden = model.config.hidden_size
    delta = torch.zeros(hidden, device=device, dtype=torch.float32, requires_grad=True)
    rows = torch.arange(n_rw + 1, device=device)
    idx = torch.tensor(lookup, device=device)
    # the anchors' per-token shares, zero past each anchor's end
    shares = torch.zeros(n_anchor, enc["input_ids"].shape[1], device=device)
    for j, (_, share) in enumerate(anchors):
        shares[j, :len(share)] = torch.as_tensor(share, dtype=torch.float32, device=device)
    state = {"init": None}

    def add_delta(_module, _args, output):
        out = output[0] if isinstance(output, tuple) else output
        if state["init"] is None:
            state["init"] = out[0, lookup[0]].detach().float().clone()
        shifted = out.clone()
        shifted[rows, idx] = (out[rows, idx].float() + delta).to(out.dtype)
        if n_anchor:
            shifted[n_rw + 1:] = (out[n_rw + 1:].float() + shares.unsqueeze(-1) * delta).to(out.dtype)
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
            kl_logp = log_probs[n_rw * n_t:]  # the KL prompt's row, then the anchors'
            if kl_init is None:
                kl_init = kl_logp.detach().clone()
            kl = hparams.kl_factor * F.kl_div(kl_init[:1], kl_logp[:1], log_target=True, reduction="batchmean")
            if n_anchor:
                kl = kl + fit.anchor_weight * F.kl_div(kl_init[1:], kl_logp[1:], log_target=True,
                                                       reduction="batchmean")
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
                   context_templates: Sequence[str], fit: VariantFit = VariantFit()) -> torch.Tensor:
    """ROME's right vector (`compute_v`'s result), with v* fitted over `fit`'s variant prompts too."""
    prompt_tpl = _template(request)
    subject = request["subject"]
    down = get_module(model, hparams.rewrite_module_tmp.format(layer))
    u = left_vector.float().to(model_device(model))

    # one forward: the key and MLP output at the unprefixed prompt, as ROME takes them (the fit does
    # not move them), and every token's key of each anchor's prompt, read through the installed
    # pathway. The update writes along u at every token, not only at a subject's last one (editing
    # "Ferrari 375 F1" on SmolLM2, the neighbour "Ferrari F2003-GA" gets 0.75 of it at its token "2"),
    # so each anchor token's share is uᵀk_t / uᵀk*.
    names = list(fit.anchors)
    texts = [_fill(prompt_tpl, n) for n in [subject] + names]
    ends = [subject_last_index(tok, t, prompt_tpl.index("{}") + len(n)) for t, n in zip(texts, [subject] + names)]
    keys, outs, mask = _forward_io(model, tok, texts, down)
    k, v = keys[0, ends[0]], outs[0, ends[0]]
    shares = keys[1:] @ u / torch.dot(k, u)
    own = [shares[j, ends[j + 1]].item() for j in range(len(names))]
    lengths = mask[1:].sum(1).tolist()
    anchors = [(n, shares[j, :lengths[j]]) for j, n in enumerate(names) if own[j] <= fit.anchor_max_share]
    if names:
        fit.report["anchor_shares"] = {n: round(x, 3) for n, x in zip(names, own)}
        fit.report["anchors_left_out"] = [n for n, x in zip(names, own) if x > fit.anchor_max_share]
    init, delta = fit_shift(model, tok, request, hparams, hparams.mlp_module_tmp.format(layer),
                            context_templates, fit, anchors)
    return (init + delta - v) / torch.dot(k, u)


def optimise_target(model, tok, request: dict, hparams, layer: int, context_templates,
                    fit: VariantFit = VariantFit()) -> torch.Tensor:
    """MEMIT's z (`compute_z`'s result: the residual stream after block `layer` at the subject's last
    token, shifted), with the shift fitted over `fit`'s variant prompts too (anchors: ROME only)."""
    flat = [t for group in context_templates for t in ([group] if isinstance(group, str) else group)]
    init, delta = fit_shift(model, tok, request, hparams, hparams.layer_module_tmp.format(layer), flat, fit)
    return init + delta


@contextlib.contextmanager
def value_fitted_on_variants(backend_apply, fits: dict) -> Iterator[bool]:
    """Swap ROME's `compute_v` and MEMIT's `compute_z` for their variant-aware fits, wherever the
    backend reads them: the backend's own module (EasyEdit's ROME and MEMIT bind them at import)
    and the installed ROME's `compute_v` module (the plugin's R-ROME and EMMET look it up there at
    call time). `fits`: (filled prompt, subject) → `VariantFit`. Yields whether any was swapped; every
    one is given back on exit."""
    fn = getattr(backend_apply, "__rep_easyedit_original__", backend_apply)
    modules = [importlib.import_module(fn.__module__)]
    try:  # where backends that reuse ROME's value look it up at call time
        modules.append(importlib.import_module("easyeditor.models.rome.compute_v"))
    except ImportError:
        pass

    def fit_of(request) -> VariantFit:
        prompt = request["prompt"]
        filled = prompt.replace("{}", request["subject"]) if "{}" in prompt else prompt
        return fits.get((filled, request["subject"]), VariantFit())

    def compute_v(model, tok, request, hparams, layer, left_vector, context_templates, *a, **kw):
        return optimise_value(model, tok, request, hparams, layer, left_vector, context_templates,
                              fit_of(request))

    # the anchors' shares read the left vector, so backends that build it themselves (R-ROME and
    # EMMET, where written from their papers) hand it along their update's direction
    compute_v.uses_update_direction = True

    def compute_z(model, tok, request, hparams, layer, context_templates, *a, **kw):
        return optimise_target(model, tok, request, hparams, layer, context_templates, fit_of(request))

    swaps = [(m, name, getattr(m, name)) for m in dict.fromkeys(modules)
             for name in ("compute_v", "compute_z") if getattr(m, name, None) is not None]
    for m, name, _ in swaps:
        setattr(m, name, compute_v if name == "compute_v" else compute_z)
    try:
        yield bool(swaps)
    finally:
        for m, name, original in swaps:
            setattr(m, name, original)
