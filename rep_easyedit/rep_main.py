"""`apply_rep_to_model`: EasyEdit's `apply_X_to_model` contract around an installed backend.

Order of work: validate everything (requests, layout, covariance cache) → train one adapter per
request and edited layer on cached keys → install the pathway → run the backend (its k*/v* are
computed through the pathway) → return `weights_copy`, which also holds each new adapter's
`active` switch, so EasyEdit's restore turns the pathway off with the weights. If anything fails,
weights and hooks are put back as they were before the call.
"""

from __future__ import annotations

import contextlib
import copy as copy_module
import dataclasses
import logging
import time
from typing import Iterator

import numpy as np
import torch

from .core.adapter import GatedLowRankAdapter
from .backends import get_backend, templates_keyed_by_model
from .compat.easyedit import editor_uses_sequential_flag, shims_applied
from .core.health import check_health, pathway_health
from .hparams import REPHyperParams
from .core.key_cache import cached_token_keys
from .core.kin_names import kin_names
from .core.merging import KEPT, KeysNotKept, merge_in_place, slimmed
from .core.keys import collect_keys_flat, subject_last_index, subject_last_indices
from .core.devices import padding_side
from .core.pathway import detach_adapter, get_module, install, pathway_installed, prune_inactive
from .core.perturbations import (Perturbations, build_perturbations, partial_subjects, sibling_subjects, with_context,
                                 with_subject)
from .core.requests import validate_requests
from .core.replay import BlockReplay
from .core.training import TrainingKeys, freeze, fresh_adapter, train_adapter


logger = logging.getLogger(__name__)


class LayoutError(ValueError):
    """The hparams name layers or modules the model does not have."""


def _num_layers(model) -> int | None:
    cfg = getattr(model, "config", None)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if cfg is not None and isinstance(getattr(cfg, attr, None), int):
            return getattr(cfg, attr)
    return None


def edited_module_paths(model, base_hp) -> dict[int, str]:
    """Layer → module path of each edited down-projection, checked against the model."""
    layers = list(base_hp.layers)
    if not layers:
        raise LayoutError("hparams `layers` is empty; name at least one layer to edit")
    n = _num_layers(model)
    for layer in layers:
        if not isinstance(layer, int) or layer < 0 or (n is not None and layer >= n):
            raise LayoutError(f"hparams `layers` holds {layer}, outside the model's 0..{(n or 0) - 1}")
    paths = {}
    for layer in layers:
        path = base_hp.rewrite_module_tmp.format(layer)
        try:
            module = get_module(model, path)
        except LookupError as e:
            raise LayoutError(str(e)) from None
        if not hasattr(module, "weight"):
            raise LayoutError(f"`rewrite_module_tmp` gives {path}, which has no weight to edit")
        paths[layer] = path
    _check_module_fields(model, base_hp, layers)
    return paths


def blocks_to_replay(model, base_hp, paths: dict[int, str]) -> list | None:
    """The blocks a multi-layer edit's key collections replay (`BlockReplay`): 0 up to the highest edited.

    None where there is nothing to replay (one layer) or the layout is not the plain one
    (`layer_module_tmp` missing, or an edited module outside its block)."""
    template = getattr(base_hp, "layer_module_tmp", None)
    if len(paths) < 2 or not isinstance(template, str) or "{}" not in template:
        return None
    if not all(path.startswith(template.format(layer) + ".") for layer, path in paths.items()):
        return None
    try:
        return [get_module(model, template.format(i)) for i in range(max(paths) + 1)]
    except LookupError:
        return None


def _check_module_fields(model, base_hp, layers) -> None:
    """Every other module the backend will look up (`*_module_tmp` per layer, `*_module`) exists."""
    for name in sorted(vars(base_hp)):
        value = getattr(base_hp, name)
        if not isinstance(value, str) or not (name.endswith("_module_tmp") or name.endswith("_module")):
            continue
        for path in ([value.format(layer) for layer in layers] if "{}" in value else [value]):
            try:
                get_module(model, path)
            except LookupError:
                raise LayoutError(
                    f"hparams `{name}: {value}` names {path}, which {type(model).__name__} does not have; "
                    f"set it to this model's module path (see `model.named_modules()`)") from None


def _prompt_filled(request: dict) -> str:
    prompt = request["prompt"]
    return prompt.replace("{}", request["subject"]) if "{}" in prompt else prompt


def _variant_texts(request: dict, variants: list[str], templates: list[str], contexts: list[str]):
    """(text, char_end of the variant) for each variant in each template and long context."""
    prompt, subject = _prompt_filled(request), request["subject"]
    start = prompt.index(subject)
    out = []
    for variant in variants:
        prompt_v = with_subject(prompt, subject, variant)
        end_in_prompt = start + len(variant)
        for template in templates:
            prefix = template.split("{}")[0]
            out.append((template.replace("{}", prompt_v), len(prefix) + end_in_prompt))
    for context in contexts:
        text = with_context(context, prompt)
        out.append((text, len(text) - len(prompt) + start + len(subject)))
    return out


def answer_texts(request: dict, variants: list[str]) -> list[tuple[str, int]]:
    """(the edit prompt with each trained variant, then " " and `target_new`; where the answer starts).

    Teacher-forced scoring and free answers read the answer's tokens with the prompt before them.
    Where the answer repeats a token of the subject ("Deportivo Garcilaso" → "Estadio Municipal
    Garcilaso"), a gate trained on the subject's last tokens fires there and the edit's value lands
    inside the answer (`rep.answer_negatives`)."""
    prompt, subject = _prompt_filled(request), request["subject"]
    answer = request["target_new"].strip()  # a string: apply_rep_to_model validates requests first
    out = []
    for variant in variants:
        prompt_v = with_subject(prompt, subject, variant)
        out.append((f"{prompt_v} {answer}", len(prompt_v)))
    return list(dict.fromkeys(out))


def template_mean(subject_keys: torch.Tensor, template_groups: list[list[str]]) -> torch.Tensor:
    """k*: the subject's keys (one row per template, in group order) averaged within each group of
    templates, then over groups, as the backends average them."""
    sizes = [len(g) for g in template_groups]
    return torch.stack([chunk.mean(0) for chunk in torch.split(subject_keys, sizes)]).mean(0)


def training_variants(request: dict, pert: Perturbations, train_on: list[str]) -> list[str]:
    variants = [request["subject"]] if "subject" in train_on else []
    if "rephrase" in train_on:
        variants += pert.rephrase_in
    if "shuffle" in train_on:
        variants += pert.shuffle_in
    return list(dict.fromkeys(variants))


def sibling_rng(pert: Perturbations) -> np.random.Generator:
    """The siblings' own stream (per case), so drawing them leaves the sampled negatives alone."""
    return np.random.default_rng([pert.seed, 1])


def gather_training_keys(model, tok, request: dict, pert: Perturbations, template_groups: list[list[str]],
                         path: str, rep, corpus: list[str], rng: np.random.Generator,
                         negatives_cache: str | None = None, cache_negatives: bool = True,
                         kin: list[str] | None = None, replay: BlockReplay | None = None) -> TrainingKeys:
    """Positives, negatives and the edit key k* at one module, from one batched key collection.

    k* is the backend's own: the subject's key averaged over each group of context templates,
    then over groups (ROME: one group; MEMIT/EMMET: one group per template length).

    The texts are tokenized once and collected length-bucketed (`keys.collect_keys_flat`); a text
    that is both a trained variant and a k* text (the subject in each template) runs once. The
    corpus spans' keys (gate negatives) come from `key_cache.cached_token_keys`: computed once per
    model, layer, weights under the layer and corpus, kept in memory and, when `negatives_cache`
    names a directory (the covariance statistics' `stats_dir`), on disk. With `cache_negatives`
    false (weights under the layer that no later edit will see again, e.g. an upper layer after
    MEMIT's update) the spans join the one collection instead. The keys stay on the edited
    module's device (float32). The negatives are sampled by index before they are gathered, with
    the same draw as over their concatenation. `kin`: the request's sibling names
    (`request_kin_names`), sampled here when not given and `rep.kin_negatives` is on. `replay`: one
    `BlockReplay` for all layers of one request (the spans then always join the collection, so
    every layer runs the same texts).
    """
    templates = [t for group in template_groups for t in group]
    variants = training_variants(request, pert, rep.train_on)
    contexts = pert.long_in if "long" in rep.train_on else []
    pos_texts = _variant_texts(request, variants, templates, contexts)
    target_texts = _variant_texts(request, [request["subject"]], templates, [])
    siblings = sibling_subjects(request["subject"], corpus, rep.sibling_negatives, sibling_rng(pert),
                                exclude=variants)
    partials = partial_subjects(tok, request["subject"], rep.partial_negatives,  # [] when off (-1)
                                np.random.default_rng([pert.seed, 2]), exclude=variants + siblings)
    if kin is None:
        kin = request_kin_names(model, tok, request, pert, rep)
    kin = [name for name in kin if name not in siblings + partials]
    hard_texts = _variant_texts(request, siblings + partials + kin, templates[:1], [])
    answers = answer_texts(request, variants) if rep.answer_negatives else []
    slot: dict[tuple[str, int], int] = {}
    unique: list[tuple[str, int]] = []
    for pair in pos_texts + target_texts + hard_texts + [(text, None) for text, _ in answers]:
        if pair not in slot:
            slot[pair] = len(unique)
            unique.append(pair)
    spans = corpus[: rep.corpus_negative_texts] if rep.corpus_negative_texts and corpus else []
    inline = bool(spans) and (not cache_negatives or replay is not None)
    if inline:  # the spans ride along in the same tokenization and bucketed collection
        unique = unique + [(span, None) for span in spans]  # no position wanted
    texts = [t for t, _ in unique]
    positions, enc = subject_last_indices(tok, texts, [end for _, end in unique])
    if inline:
        unique = unique[: len(unique) - len(spans)]
    flat = collect_keys_flat(model, tok, texts, path, positions, all_tokens=True, encoded=enc, replay=replay)
    device = flat.picked.device
    pos_rows = torch.tensor([slot[p] for p in pos_texts], dtype=torch.long)
    target_rows = torch.tensor([slot[p] for p in target_texts], dtype=torch.long)
    positives = flat.picked[pos_rows.to(device)]
    subject_keys = flat.picked[target_rows.to(device)]
    target = template_mean(subject_keys, template_groups)

    # negatives: every other token of each positive text (in positive order), then corpus tokens
    starts = torch.cumsum(flat.lengths, 0) - flat.lengths
    lengths = flat.lengths[pos_rows]
    pos_starts = starts[pos_rows]
    within = torch.arange(int(lengths.sum())) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    text_rows = torch.repeat_interleave(pos_starts, lengths) + within
    picked_at = torch.repeat_interleave(torch.as_tensor(positions, dtype=torch.long)[pos_rows], lengths)
    text_rows = text_rows[within != picked_at]
    sources = [(flat.tokens, text_rows)]
    collect_stats = flat.stats
    corpus_source = None
    if inline:
        first = int(starts[len(unique)])
        sources.append((flat.tokens, torch.arange(first, len(flat.tokens))))
        corpus_source = "collected"
    elif spans:
        corpus_keys, corpus_source = cached_token_keys(model, tok, spans, path, collect_keys_flat,
                                                       directory=negatives_cache,
                                                       model_name=_model_name(model), device=device)
        if corpus_source == "computed":
            collect_stats = collect_stats.add(corpus_keys.stats)
        sources.append((corpus_keys.tokens, torch.arange(len(corpus_keys.tokens))))
    total = sum(len(rows) for _, rows in sources)
    chosen = torch.arange(total)
    if rep.num_negatives and total > rep.num_negatives:
        chosen = torch.as_tensor(np.sort(rng.choice(total, size=rep.num_negatives, replace=False)))
    parts, offset = [], 0
    for tokens, rows in sources:
        mine = chosen[(chosen >= offset) & (chosen < offset + len(rows))] - offset
        if len(mine):
            parts.append(tokens[rows[mine].to(tokens.device)].to(device))
        offset += len(rows)
    negatives = torch.cat(parts) if parts else positives[:0]
    hard = flat.picked[torch.tensor([slot[p] for p in hard_texts], dtype=torch.long).to(device)] \
        if hard_texts else None
    if answers:  # every token of the answer, after the non-kin hard negatives (the kin stay last)
        rows = []
        for text, answer_start in answers:
            j = slot[(text, None)]
            at = ((enc.offsets[j, :, 1] > answer_start) & enc.attention_mask[j].bool()).nonzero().squeeze(-1)
            rows.append(starts[j] + at)
        answer_keys = flat.tokens[torch.cat(rows).to(flat.tokens.device)].to(device)
        n_other = len(hard_texts) - len(kin)
        hard = answer_keys if hard is None else torch.cat([hard[:n_other], answer_keys, hard[n_other:]])
    collection = {"texts": collect_stats.texts, "forwards": collect_stats.forwards,
                  "tokens": collect_stats.tokens, "padded_tokens": collect_stats.padded_tokens,
                  "corpus_negatives": corpus_source or "none"}
    return TrainingKeys(positives=positives, negatives=negatives, target=target, collection=collection,
                        hard_negatives=hard, kin_rows=len(kin), answer_rows=len(answer_keys) if answers else 0)


def train_with_mined_negatives(keys: TrainingKeys, rep, make_adapter):
    """(adapter, report). Candidate hard negatives are rows the gate may or may not fire on: the sampled
    names of the subject's kind (the last `keys.kin_rows` hard negatives) with `rep.kin_mine`, and the
    answer's tokens (the `keys.answer_rows` before them) with `rep.answer_mine`. A first adapter trains
    without the candidates; those its gate fires on are kept as hard negatives and a fresh adapter
    trains with them (steps of both runs reported). Otherwise, one adapter trained on `keys` as they are."""
    hard = keys.hard_negatives
    n_hard = 0 if hard is None else len(hard)
    candidate = torch.zeros(n_hard, dtype=torch.bool)
    if rep.kin_mine and keys.kin_rows:
        candidate[n_hard - keys.kin_rows:] = True
    if rep.answer_mine and keys.answer_rows:
        candidate[n_hard - keys.kin_rows - keys.answer_rows:n_hard - keys.kin_rows] = True
    adapter = make_adapter()
    if not candidate.any():
        return adapter, train_adapter(adapter, keys, rep)
    candidate = candidate.to(hard.device)
    others, candidates = hard[~candidate], hard[candidate]
    first = train_adapter(adapter, dataclasses.replace(keys, hard_negatives=others if len(others) else None), rep)
    with torch.no_grad():
        fired = adapter.gate_prob(candidates).squeeze(-1) > adapter.tau
    if not fired.any():
        return adapter, first
    kept = candidate.clone()
    kept[candidate] = fired  # the fired candidates, in their places among the other hard negatives
    adapter = make_adapter()
    report = train_adapter(adapter, dataclasses.replace(keys, hard_negatives=hard[~candidate | kept]), rep)
    report.steps += first.steps
    return adapter, report


def request_kin_names(model, tok, request: dict, pert: Perturbations, rep, count: int | None = None,
                      stream: int = 3) -> list[str]:
    """`count` (default `rep.kin_negatives`) names of the subject's kind, from the model (none when 0);
    one draw per request, from the case's seed plus `stream`."""
    count = rep.kin_negatives if count is None else count
    if count <= 0:
        return []
    truth = request.get("ground_truth")
    truth = truth if isinstance(truth, str) and truth.strip() and truth != "<|endoftext|>" else None
    return kin_names(model, tok, _prompt_filled(request), request["subject"], truth, count,
                     seed=pert.seed + stream, exclude=training_variants(request, pert, rep.train_on))


def _model_name(model) -> str:
    from .corpus import model_folder_name

    return model_folder_name(model)


def fit_adapters(model, tok, request: dict, pert: Perturbations, template_groups: list[list[str]],
                 paths: dict[int, str], rep, corpus: list[str],
                 inverse_covariance: dict[int, torch.Tensor] | None = None,
                 negatives_cache: str | None = None, blocks: list | None = None):
    """Train one adapter per edited layer for one request; nothing stays installed.

    Layers are trained bottom-up, each lower adapter installed while the keys of the layers above
    are collected, so a higher adapter learns on the keys it will see at use time (a lower
    adapter changes the inputs of every layer above it). Returns [(module path, adapter,
    TrainingReport)], the report carrying the seconds spent collecting keys and training.
    `blocks` (`blocks_to_replay`): each layer's collection records what the block below it returns and
    the next layer's starts there, running only the blocks in between.
    """
    fitted = []
    replay = BlockReplay(blocks) if blocks else None
    t_kin = time.perf_counter()
    kin = request_kin_names(model, tok, request, pert, rep)  # once, before any adapter is installed
    t_kin = time.perf_counter() - t_kin
    with contextlib.ExitStack() as lower_adapters:
        for layer, path in sorted(paths.items()):
            rng = np.random.default_rng(pert.seed + layer)
            t0 = time.perf_counter()
            # only the lowest layer's corpus keys outlive this edit: above it sit this edit's own
            # adapters (and, after the update, its weights), which no later edit sees again
            keys = gather_training_keys(model, tok, request, pert, template_groups, path, rep, corpus, rng,
                                        negatives_cache=negatives_cache,
                                        cache_negatives=not fitted, kin=kin, replay=replay)
            if inverse_covariance and layer in inverse_covariance:
                keys.target_whitened = inverse_covariance[layer].to(keys.target.device, torch.float32) @ keys.target
            t_keys = time.perf_counter() - t0 + (0.0 if fitted else t_kin)  # sampling the names counts once
            device = get_module(model, path).weight.device
            t1 = time.perf_counter()
            adapter, report = train_with_mined_negatives(
                keys, rep, lambda: fresh_adapter(keys.positives.shape[-1], rep.rank, rep, pert.seed + layer, device))
            report.seconds_keys = t_keys
            report.seconds_train = time.perf_counter() - t1
            report.seconds_per_step = report.seconds_train / max(1, report.steps)
            report.collection = dict(keys.collection or {})
            if rep.kin_negatives:
                report.collection["kin_names"] = list(kin)
            freeze(adapter)
            if rep.merge_rank:  # what a later merge retrains this edit on
                setattr(adapter, KEPT, [slimmed(keys, rep.merge_negatives_per_edit, seed=pert.seed + layer)])
            fitted.append((path, adapter, report))
            if len(fitted) < len(paths):
                lower_adapters.enter_context(pathway_installed(model, path, adapter))
    return fitted


def _inverse_covariances(model, base_hp, paths: dict[int, str], rep) -> dict[int, torch.Tensor] | None:
    """C⁻¹ per layer when the cosine aggregation pulls towards the whitened target C⁻¹k*."""
    if rep.aggregation != "cosine":
        return None
    whiten = rep.whiten_target
    if whiten is None:  # the backend's own choice: does its update use covariance statistics?
        whiten = bool(getattr(base_hp, "mom2_adjustment", False)) or hasattr(base_hp, "mom2_update_weight")
    if not whiten:
        return None
    from .covariance import load_inverse_covariance

    return {layer: load_inverse_covariance(model, base_hp, layer) for layer in paths}


@contextlib.contextmanager
def _value_fit(backend, model, tok, requests: list[dict], rep):
    """`rep.value_on_variants`: the backend's v* is fitted over the trained variants too, and with
    `rep.value_anchors` over that many names of the subject's kind as neighbours to leave alone.
    Each request's record gets the names, their shares of the update and the names left out."""
    if not rep.value_on_variants:
        yield
        return
    from .robust_value import VariantFit, value_fitted_on_variants

    fits = {}
    for request in requests:
        pert = Perturbations(**request["rep"]["perturbations"])
        trained = [v for v in training_variants(request, pert, rep.train_on) if v != request["subject"]]
        t0 = time.perf_counter()
        anchors = request_kin_names(model, tok, request, pert, rep, count=rep.value_anchors, stream=5)
        if anchors:
            request["rep"]["value_anchors"] = list(anchors)
            request["rep"]["seconds"]["value_anchors"] = time.perf_counter() - t0
        fits[(_prompt_filled(request), request["subject"])] = VariantFit(
            tuple(trained), rep.value_variant_templates, rep.value_variant_weight, tuple(anchors),
            rep.value_anchor_weight, rep.value_anchor_max_share)
    with value_fitted_on_variants(backend.apply, fits):
        yield
    for request in requests:
        report = fits[(_prompt_filled(request), request["subject"])].report
        if "anchor_shares" in report:
            request["rep"]["value_anchor_shares"] = report["anchor_shares"]
            request["rep"]["value_anchors_left_out"] = report["anchors_left_out"]


def _param_names(model, params) -> dict[int, str]:
    wanted = {id(p) for p in params}
    return {id(p): n for n, p in model.named_parameters() if id(p) in wanted}


def apply_rep_to_model(model, tok, requests, hparams: REPHyperParams, copy: bool = False,
                       return_orig_weights: bool = False, keep_original_weight: bool = False,
                       **kwargs):
    """Train REP adapters, install the pathway, run the backend; EasyEdit's contract."""
    if isinstance(requests, dict):
        requests = [requests]
    if not isinstance(hparams, REPHyperParams):
        raise TypeError("apply_rep_to_model needs REPHyperParams (load them with "
                        "rep_easyedit.REPHyperParams.from_hparams(path))")
    backend = get_backend(hparams.backend_name)
    validate_requests(requests, backend.max_batch, hparams.alg_name)
    base_hp = hparams.backend_hparams(backend)
    paths = edited_module_paths(model, base_hp)
    if getattr(base_hp, "mom2_adjustment", False):
        from .covariance import require_stats

        require_stats(model, base_hp, list(paths))
    if copy:
        model = copy_module.deepcopy(model)
    prune_inactive(model)

    weight_names = [f"{p}.weight" for p in paths.values()]
    params = {n: p for n, p in model.named_parameters() if n in weight_names}
    snapshot = {n: p.detach().clone() for n, p in params.items()}
    installed: list[tuple[str, GatedLowRankAdapter]] = []
    superseded: list[GatedLowRankAdapter] = []  # switched off by a merge; restore switches them on
    rep = hparams.rep
    try:
        with padding_side(tok, "right"), shims_applied(), templates_keyed_by_model(model, backend):
            t0 = time.perf_counter()
            templates = backend.context_templates(model, tok, base_hp)
            t_templates = time.perf_counter() - t0
            corpus = []
            if rep.n_long_contexts > 0 or rep.corpus_negative_texts > 0:
                from .corpus import load_corpus

                corpus = load_corpus(rep.corpus, model, tok, seed=rep.seed)
            inverse_covariance = _inverse_covariances(model, base_hp, paths, rep)
            blocks = blocks_to_replay(model, base_hp, paths) if rep.replay_blocks else None

            def fit_and_install(request):
                t1 = time.perf_counter()
                pert = build_perturbations(request, tok, corpus, n_shuffles=rep.n_shuffles,
                                           n_long=rep.n_long_contexts,
                                           long_tokens=rep.long_context_tokens, base_seed=rep.seed)
                fitted = fit_adapters(model, tok, request, pert, templates, paths, rep, corpus,
                                      inverse_covariance=inverse_covariance,
                                      negatives_cache=getattr(base_hp, "stats_dir", None),
                                      blocks=blocks)
                health = pathway_health({path: report for path, _, report in fitted})
                check_health(health, rep, request)
                reports = {}
                for path, adapter, report in fitted:
                    install(model, path, adapter)
                    installed.append((path, adapter))
                    reports[path] = vars(report)
                t_keys = sum(r["seconds_keys"] for r in reports.values())
                t_train = sum(r["seconds_train"] for r in reports.values())
                request["rep"] = {
                    "perturbations": pert.to_dict(),
                    "health": health,
                    "training": reports,
                    "seconds": {"context_templates": t_templates, "keys": t_keys, "train": t_train,
                                "rep_total": time.perf_counter() - t1 + t_templates},
                }

            def merge_layers():
                """`rep.merge_rank`: one adapter per layer again, before the backend reads keys through it."""
                merges = {}
                for path in paths.values():
                    t1 = time.perf_counter()
                    try:
                        done = merge_in_place(model, path, rep, rep.merge_rank)
                    except KeysNotKept as e:
                        logger.warning("REP: %s; this edit's adapters are stacked instead of merged", e)
                        merges[path] = {"merged": False, "reason": str(e)}
                        continue
                    if done is None:
                        continue
                    installed.append((path, done.merged))
                    superseded.extend(done.superseded)
                    merges[path] = {"merged": True, "adapters": len(done.superseded),
                                    "edits": len(getattr(done.merged, KEPT)), "steps": done.report.steps,
                                    "gate_pos_fire": done.report.gate_pos_fire,
                                    "gate_neg_fire": done.report.gate_neg_fire,
                                    "seconds": time.perf_counter() - t1}
                for request in requests:
                    request["rep"]["merge"] = merges

            def run_backend():
                base_requests = [{k: v for k, v in r.items() if k != "rep"} for r in requests]
                with _value_fit(backend, model, tok, requests, rep):
                    return backend.apply(model, tok, base_requests, base_hp, copy=False,
                                         return_orig_weights=True, keep_original_weight=True, **kwargs)[0]

            def fit_all():
                for request in requests:
                    fit_and_install(request)
                if rep.merge_rank:
                    merge_layers()

            if not rep.fit_after_update:
                fit_all()
            t2 = time.perf_counter()
            model = run_backend()
            t_backend = time.perf_counter() - t2
            if rep.fit_after_update:
                fit_all()
            for request in requests:
                request["rep"]["seconds"]["backend"] = t_backend
    except BaseException:
        with torch.no_grad():
            for name, original in snapshot.items():
                params[name].copy_(original)
            for adapter in superseded:
                adapter.active.fill_(1.0)
        for path, adapter in installed:
            detach_adapter(model, path, adapter)
        raise

    weights_copy: dict = {}
    if return_orig_weights and (keep_original_weight or editor_uses_sequential_flag()):
        weights_copy.update(snapshot)
        new = [a for _, a in installed]
        new_ids = {id(a) for a in new}
        names = _param_names(model, [a.active for a in new + superseded])
        for adapter in superseded:  # earlier edits' adapters a merge replaced: on again on restore
            if id(adapter) not in new_ids:
                weights_copy[names[id(adapter.active)]] = torch.ones_like(adapter.active)
        for adapter in new:
            weights_copy[names[id(adapter.active)]] = torch.zeros_like(adapter.active)
    return model, weights_copy


@contextlib.contextmanager
def recording_training_keys() -> Iterator[dict[str, list[TrainingKeys]]]:
    """Within the block, every REP edit's training keys are kept per layer path (what `merge_adapters` retrains on).

    Yields the dict it fills, in edit order. The kept objects are the ones training used (the
    whitened target is set on them after collection), so slim them only once their edit is done.
    """
    global gather_training_keys
    captured: dict[str, list[TrainingKeys]] = {}
    real = gather_training_keys

    def recording(model, tok, request, pert, templates, path, *args, **kwargs):
        keys = real(model, tok, request, pert, templates, path, *args, **kwargs)
        captured.setdefault(path, []).append(keys)
        return keys

    gather_training_keys = recording
    try:
        yield captured
    finally:
        gather_training_keys = real
