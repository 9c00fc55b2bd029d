"""The fast key path equals the straightforward one (tiny random llama): bucketed collection vs one
text per forward, batched subject positions vs per text, REP's training keys vs the per-text
gathering they replaced, the corpus-negatives cache (hits, and misses when weights under the layer
change), and the fused training step vs the unfused one."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from rep_easyedit.core import key_cache
from rep_easyedit.core.adapter import GatedLowRankAdapter
from rep_easyedit.core.config import REPConfig
from rep_easyedit.core.keys import (collect_keys, collect_keys_flat, collect_keys_per_text, length_buckets,
                                    subject_last_index, subject_last_indices)
from rep_easyedit.core.pathway import get_module, pathway_installed
from rep_easyedit.core.perturbations import build_perturbations
from rep_easyedit.core.training import TrainingKeys, aggregation_loss, train_adapter
from rep_easyedit.rep_main import _variant_texts, gather_training_keys, sibling_rng, training_variants

PATH = "model.layers.2.mlp.down_proj"
TEXTS = ["The Eiffel Tower is in", "Hello", "A much longer text that goes on and on about nothing "
         "in particular, for quite a few tokens, so that it lands in its own bucket.",
         "Ferrari F355 is produced by", "x", "Paris is the capital of France, which lies in Europe",
         "Toyota Celica is created by", "Q"]
REQ = {"prompt": "Ferrari F355 is produced by", "subject": "Ferrari F355", "target_new": "BMW",
       "case_id": 1, "subject_rephrase": ["The F355", "F355 by Ferrari", "Ferrari's F355", "F355"]}
CORPUS = ["Some unrelated corpus text about rivers and mountains and the sea. " * 3,
          "Another span: cooking pasta takes water, salt and patience, and a pot. " * 2,
          "A third one, short.", "And a fourth span about trains and stations."]
TOL = dict(rtol=1e-5, atol=1e-5)



def _one_hard_group_rep() -> REPConfig:
    """A small recipe with no hard negative group on by default, so a test turns on the one it checks."""
    return REPConfig(n_shuffles=3, n_long_contexts=0, corpus_negative_texts=0, num_negatives=40,
                     kin_negatives=0, answer_negatives=False)

def test_buckets_cover_every_text_once_and_respect_the_budget():
    lengths = [3, 50, 4, 4, 200, 7, 3, 51]
    batches = length_buckets(lengths, token_budget=64)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 64


@pytest.mark.parametrize("budget", [16, 64, 8192])
def test_bucketed_collection_equals_per_text(tiny_model, tokenizer, budget):
    positions = [0, 0, 5, 3, 0, 2, 4, 0]
    ref_picked, ref_every = collect_keys_per_text(tiny_model, tokenizer, TEXTS, PATH, positions, all_tokens=True)
    flat = collect_keys_flat(tiny_model, tokenizer, TEXTS, PATH, positions, all_tokens=True, token_budget=budget)
    assert torch.allclose(flat.picked.cpu(), ref_picked, **TOL)
    for got, want in zip(flat.per_text(), ref_every):
        assert got.shape == want.shape and torch.allclose(got.cpu(), want, **TOL)
    tokens_only = collect_keys_flat(tiny_model, tokenizer, TEXTS, PATH, None, all_tokens=True, token_budget=budget)
    assert tokens_only.picked is None
    assert torch.allclose(tokens_only.tokens.cpu(), torch.cat(ref_every), **TOL)  # every bucket kept
    if budget == 16:
        assert flat.stats.forwards > 1
    assert flat.stats.tokens == sum(len(e) for e in ref_every) <= flat.stats.padded_tokens
    picked, every = collect_keys(tiny_model, tokenizer, TEXTS, PATH, positions, all_tokens=True)
    assert picked.device.type == "cpu" and torch.allclose(picked, ref_picked, **TOL)
    assert len(every) == len(TEXTS)


def test_batched_subject_positions_equal_per_text(tokenizer):
    texts = ["Ferrari F355 is produced by", "The F355 is made by", "In Paris, Ferrari F355s are rare",
             "Ferrari F355", " leading space Ferrari F355 ", "F355"]
    ends = [12, 8, 22, 12, 28, 4]
    got, _ = subject_last_indices(tokenizer, texts, ends)
    assert got == [subject_last_index(tokenizer, t, e) for t, e in zip(texts, ends)]


def _gather_per_text(model, tok, request, pert, template_groups, path, rep, corpus, rng):
    """REP's training keys as they were gathered before the fast path (one key list per text)."""
    templates = [t for group in template_groups for t in group]
    variants = training_variants(request, pert, rep.train_on)
    contexts = pert.long_in if "long" in rep.train_on else []
    pos_texts = _variant_texts(request, variants, templates, contexts)
    target_texts = _variant_texts(request, [request["subject"]], templates, [])
    texts = [t for t, _ in pos_texts] + [t for t, _ in target_texts]
    positions = [subject_last_index(tok, t, end) for t, end in pos_texts + target_texts]
    picked, every = collect_keys_per_text(model, tok, texts, path, positions, all_tokens=True)
    n_pos = len(pos_texts)
    sizes = [len(g) for g in template_groups]
    target = torch.stack([c.mean(0) for c in torch.split(picked[n_pos:], sizes)]).mean(0)
    negatives = []
    for i in range(n_pos):
        keep = torch.ones(len(every[i]), dtype=torch.bool)
        keep[positions[i]] = False
        negatives.append(every[i][keep])
    if rep.corpus_negative_texts and corpus:
        negatives.extend(collect_keys_per_text(model, tok, corpus[: rep.corpus_negative_texts], path, None, True)[1])
    negatives = torch.cat(negatives)
    if rep.num_negatives and len(negatives) > rep.num_negatives:
        idx = rng.choice(len(negatives), size=rep.num_negatives, replace=False)
        negatives = negatives[torch.as_tensor(np.sort(idx))]
    return TrainingKeys(positives=picked[:n_pos], negatives=negatives, target=target)


@pytest.mark.parametrize("num_negatives", [0, 40])
def test_training_keys_equal_the_per_text_gathering(tiny_model, tokenizer, tmp_path, num_negatives):
    key_cache.clear_memory()
    rep = REPConfig(n_shuffles=3, n_long_contexts=2, long_context_tokens=24, corpus_negative_texts=3,
                    num_negatives=num_negatives)
    pert = build_perturbations(dict(REQ), tokenizer, CORPUS, n_shuffles=3, n_long=2, long_tokens=24)
    groups = [["{}", "Once upon a time. {}", "It was. {}"], ["Long ago in a land. {}", "{}"]]
    args = (tiny_model, tokenizer, dict(REQ), pert, groups, PATH, rep, CORPUS)
    want = _gather_per_text(*args, np.random.default_rng(3))
    for cache_dir in (None, tmp_path, tmp_path):  # computed, computed and stored, from memory
        got = gather_training_keys(*args, np.random.default_rng(3), negatives_cache=cache_dir)
        assert torch.allclose(got.positives.cpu(), want.positives, **TOL)
        assert torch.allclose(got.target.cpu(), want.target, **TOL)
        assert got.negatives.shape == want.negatives.shape
        assert torch.allclose(got.negatives.cpu(), want.negatives, **TOL)
    assert got.collection["corpus_negatives"] == "memory"
    key_cache.clear_memory()
    got = gather_training_keys(*args, np.random.default_rng(3), negatives_cache=tmp_path)
    assert got.collection["corpus_negatives"] == "disk"
    assert torch.allclose(got.negatives.cpu(), want.negatives, **TOL)


def _corpus_keys(model, tok, directory=None):
    return key_cache.cached_token_keys(model, tok, CORPUS, PATH, collect_keys_flat, directory=directory)


def test_negatives_cache_misses_when_weights_under_the_layer_change(tiny_model, tokenizer, tmp_path):
    key_cache.clear_memory()
    first, source = _corpus_keys(tiny_model, tokenizer, tmp_path)
    assert source == "computed"
    assert _corpus_keys(tiny_model, tokenizer, tmp_path)[1] == "memory"
    # the edited module's own weight and the layers above it do not move its input
    with torch.no_grad():
        get_module(tiny_model, PATH).weight.add_(1.0)
        tiny_model.model.layers[3].mlp.up_proj.weight.add_(1.0)
    assert _corpus_keys(tiny_model, tokenizer, tmp_path)[1] == "memory"
    # a weight under it does, also when written through `.data` (no version bump)
    for change in (lambda: tiny_model.model.layers[1].mlp.down_proj.weight.add_(0.5),
                   lambda: tiny_model.model.layers[2].mlp.up_proj.weight.data.mul_(1.5),
                   lambda: tiny_model.model.layers[0].input_layernorm.weight.data.add_(0.25)):
        with torch.no_grad():
            change()
        keys, source = _corpus_keys(tiny_model, tokenizer, tmp_path)
        assert source == "computed"
        fresh = collect_keys_flat(tiny_model, tokenizer, CORPUS, PATH, None, all_tokens=True)
        assert torch.allclose(keys.tokens, fresh.tokens, **TOL)
    # an adapter installed below the layer counts as a weight under it
    adapter = GatedLowRankAdapter(tiny_model.config.intermediate_size, rank=4)
    with pathway_installed(tiny_model, "model.layers.1.mlp.down_proj", adapter):
        assert _corpus_keys(tiny_model, tokenizer, tmp_path)[1] == "computed"
    # from disk in a fresh process (memory cleared), for an unchanged model
    key_cache.clear_memory()
    again, source = _corpus_keys(tiny_model, tokenizer, tmp_path)
    assert source == "disk"
    assert len(list((tmp_path / "model" / "rep_negatives").glob("*.pt"))) <= key_cache.MAX_FILES


def test_negatives_cache_key_holds_the_corpus(tiny_model, tokenizer):
    key_cache.clear_memory()
    _corpus_keys(tiny_model, tokenizer)
    keys, source = key_cache.cached_token_keys(tiny_model, tokenizer, CORPUS[:2], PATH, collect_keys_flat)
    assert source == "computed" and len(keys.lengths) == 2


def _train_unfused(adapter, keys, rep, steps):
    """The training step before fusion, fixed steps."""
    pos, neg, k_star = keys.positives, keys.negatives, keys.edit_keys()
    opt = torch.optim.Adam([p for p in adapter.parameters() if p.requires_grad], lr=rep.lr)
    adapter.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        agg = aggregation_loss(pos + adapter.delta(pos), keys, rep.aggregation, rep.aggregation_abs)
        cons = adapter.delta(k_star).pow(2).sum(-1).mean() / k_star.pow(2).sum(-1).mean()
        lp, ln = adapter.gate(pos).squeeze(-1), adapter.gate(neg).squeeze(-1)
        gate = (torch.nn.functional.binary_cross_entropy_with_logits(lp, torch.ones_like(lp))
                + torch.nn.functional.binary_cross_entropy_with_logits(ln, torch.zeros_like(ln)))
        (agg + rep.alpha * cons + rep.gate_weight * gate).backward()
        opt.step()


def test_fused_training_equals_unfused():
    torch.manual_seed(0)
    dim = 48
    target = torch.randn(dim)
    keys = TrainingKeys(positives=target + 0.5 * torch.randn(12, dim), negatives=torch.randn(60, dim), target=target)
    rep = REPConfig(adaptive_stop=False, screen_negatives=0.0)  # the reference below trains on every negative
    torch.manual_seed(1)
    a = GatedLowRankAdapter(dim, rank=4, gate_ratio=0.25)
    b = copy.deepcopy(a)
    report = train_adapter(a, keys, rep, steps=40)
    _train_unfused(b, keys, rep, 40)
    assert report.steps == 40
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fast_collection_in_low_precision(tiny_model, tokenizer, dtype):
    model = tiny_model.to(dtype)
    flat = collect_keys_flat(model, tokenizer, TEXTS, PATH, [0] * len(TEXTS), all_tokens=True, token_budget=32)
    assert flat.picked.dtype == torch.float32 and flat.tokens.dtype == torch.float32
    ref, _ = collect_keys_per_text(model, tokenizer, TEXTS, PATH, [0] * len(TEXTS))
    assert torch.allclose(flat.picked.cpu(), ref, rtol=2e-2, atol=2e-2)


def test_sibling_negatives_are_the_siblings_subject_keys(tiny_model, tokenizer):
    """`rep.sibling_negatives`: the subject's leading words alone and names sharing them are hard
    negatives, each keyed at its own last token, every one of them (not a sample), beside the
    sampled negatives; 0 leaves the keys as they were."""
    from rep_easyedit.core.perturbations import sibling_subjects

    key_cache.clear_memory()
    corpus = CORPUS + ["Maranello Review and Modena Gazette met Enzo at Fiorano."]
    base = _one_hard_group_rep()
    pert = build_perturbations(dict(REQ), tokenizer, corpus, n_shuffles=3, n_long=0, long_tokens=24)
    groups = [["{}", "Once upon a time. {}"]]
    args = (tiny_model, tokenizer, dict(REQ), pert, groups, PATH)
    plain = gather_training_keys(*args, base, corpus, np.random.default_rng(3))
    hard = gather_training_keys(*args, dataclasses.replace(base, sibling_negatives=4), corpus,
                                np.random.default_rng(3))
    siblings = sibling_subjects(REQ["subject"], corpus, 4, sibling_rng(pert),
                                exclude=training_variants(dict(REQ), pert, base.train_on))
    assert siblings[0] == "Ferrari" and len(siblings) == 5   # the leading word, then 4 names
    assert all(s.startswith("Ferrari ") and s != REQ["subject"] for s in siblings[1:])
    assert plain.hard_negatives is None and torch.allclose(hard.negatives, plain.negatives, **TOL)
    texts = _variant_texts(dict(REQ), siblings, ["{}"], [])
    want, _ = collect_keys_per_text(tiny_model, tokenizer, [t for t, _ in texts], PATH,
                                    [subject_last_index(tokenizer, t, e) for t, e in texts], all_tokens=False)
    assert torch.allclose(hard.hard_negatives.cpu(), want, **TOL)
    # causal: the leading word's key is the key a neighbour starting with that word has there
    at = subject_last_index(tokenizer, "Ferrari Testarossa is made by", len("Ferrari"))
    assert at == subject_last_index(tokenizer, texts[0][0], texts[0][1])
    neighbour, _ = collect_keys_per_text(tiny_model, tokenizer, ["Ferrari Testarossa is made by"], PATH, [at],
                                         all_tokens=False)
    assert torch.allclose(hard.hard_negatives[0].cpu(), neighbour[0], **TOL)
    assert torch.allclose(hard.positives, plain.positives) and torch.allclose(hard.target, plain.target)
    assert sibling_subjects("Toyota", corpus, 4, np.random.default_rng(0)) == []


def test_hard_negatives_are_trained_off(tiny_model, tokenizer):
    """A hard negative placed among the positives' keys stops firing once it is a group of its own."""
    torch.manual_seed(0)
    pos = torch.randn(20, 128) + 2.0
    neg = torch.randn(200, 128) - 2.0
    hard = pos[:3] + 0.3 * torch.randn(3, 128)             # close to the positives
    rep = REPConfig(rank=4, steps=300, adaptive_stop=False)
    target = pos.mean(0)
    fires = {}
    for name, keys in (("plain", TrainingKeys(pos[3:], neg, target, hard_negatives=None)),
                       ("hard", TrainingKeys(pos[3:], neg, target, hard_negatives=hard))):
        torch.manual_seed(1)
        adapter = GatedLowRankAdapter(128, rank=4)
        report = train_adapter(adapter, keys, rep)
        fires[name] = float((adapter.gate_prob(hard).squeeze(-1) > adapter.tau).float().mean())
        assert report.gate_pos_fire > 0.9
    assert fires["plain"] == 1.0 and fires["hard"] == 0.0 and report.gate_hard_fire == 0.0


def test_negatives_sampled_per_step_still_shut_the_gate_on_every_negative():
    """`rep.negatives_per_step`: each step sees a sample, yet the trained gate stays shut on all negatives, reproducibly."""
    torch.manual_seed(0)
    pos = torch.randn(20, 64) + 1.5
    neg = torch.cat([torch.randn(300, 64) - 1.5, pos[:1] + 1.5 * torch.randn(60, 64)])  # a near cluster too
    keys = TrainingKeys(pos, neg, pos.mean(0))
    params = []
    for per_step in (32, 32, 0, 10_000):
        torch.manual_seed(1)
        adapter = GatedLowRankAdapter(64, rank=4)
        report = train_adapter(adapter, keys, REPConfig(rank=4, steps=200, adaptive_stop=False,
                                                        negatives_per_step=per_step))
        assert report.gate_pos_fire > 0.9 and report.gate_neg_fire < 0.02, (per_step, report)
        params.append(torch.cat([p.detach().flatten() for p in adapter.parameters()]))
    assert torch.equal(params[0], params[1])           # the sample is drawn from rep.seed alone
    assert not torch.equal(params[0], params[2])       # sampling is a different training...
    assert torch.equal(params[2], params[3])           # ...and a sample as large as the set is no sample


def test_negative_delta_weight_keeps_the_negatives_keys_in_place():
    """`rep.negative_delta_weight`: the adapter still brings the positives onto k*, but moves the
    negatives' keys (which a gate misfire would hand to the edit) far less than without it."""
    torch.manual_seed(0)
    pos = torch.randn(20, 64) + 1.0
    neg = torch.cat([torch.randn(200, 64), pos[:5].repeat(8, 1) + 0.5 * torch.randn(40, 64)])  # near ones too
    keys = TrainingKeys(pos, neg, pos.mean(0) + 2.0)
    moved, reports = {}, {}
    for weight in (0.0, 1.0):
        torch.manual_seed(1)
        adapter = GatedLowRankAdapter(64, rank=8)
        reports[weight] = train_adapter(adapter, keys, REPConfig(rank=8, steps=300, adaptive_stop=False,
                                                                 negative_delta_weight=weight))
        with torch.no_grad():
            moved[weight] = float(adapter.delta(neg).norm(dim=-1).mean() / keys.target.norm())
    assert reports[1.0].distance_after < 0.7 * reports[1.0].distance_before
    assert moved[1.0] < 0.5 * moved[0.0], moved
    with pytest.raises(ValueError, match="negative_delta_weight"):
        REPConfig(negative_delta_weight=-1.0).check()


def test_partial_negatives_are_the_subjects_own_tokens_but_not_all(tiny_model, tokenizer):
    """`rep.partial_negatives`: every proper token prefix of the subject, then shuffles of the tokens
    before its last word, are hard negatives keyed at their own last token; never the subject, a
    trained variant or a token of its last word in a shuffle; reproducible; -1 leaves the keys as they were."""
    from rep_easyedit.core.perturbations import partial_subjects

    key_cache.clear_memory()
    subject = "Norwegian News Agency"
    ids = tokenizer(subject, add_special_tokens=False)["input_ids"]
    last_word_ids = set(tokenizer(" Agency", add_special_tokens=False)["input_ids"])
    parts = partial_subjects(tokenizer, subject, 6, np.random.default_rng(0), exclude=["Norwegian News"])
    assert parts == partial_subjects(tokenizer, subject, 6, np.random.default_rng(0), exclude=["Norwegian News"])
    prefixes = [" ".join(tokenizer.decode(ids[:k]).split()) for k in range(1, len(ids))]
    assert parts[:len(prefixes) - 1] == [p for p in prefixes if p != "Norwegian News"]
    shuffles = parts[len(prefixes) - 1:]
    assert 0 < len(shuffles) <= 6 and subject not in parts and "Norwegian News" not in parts
    for text in shuffles:
        assert not set(tokenizer(text, add_special_tokens=False)["input_ids"]) & last_word_ids, text
    assert len(tokenizer("Paris", add_special_tokens=False)["input_ids"]) == 1
    assert partial_subjects(tokenizer, "Paris", 6, np.random.default_rng(0)) == []   # nothing to leave out

    base = _one_hard_group_rep()
    pert = build_perturbations(dict(REQ), tokenizer, CORPUS, n_shuffles=3, n_long=0, long_tokens=24)
    args = (tiny_model, tokenizer, dict(REQ), pert, [["{}", "Once upon a time. {}"]], PATH)
    plain = gather_training_keys(*args, base, CORPUS, np.random.default_rng(3))
    hard = gather_training_keys(*args, dataclasses.replace(base, partial_negatives=2), CORPUS,
                                np.random.default_rng(3))
    want_parts = partial_subjects(tokenizer, REQ["subject"], 2, np.random.default_rng([pert.seed, 2]),
                                  exclude=training_variants(dict(REQ), pert, base.train_on))
    texts = _variant_texts(dict(REQ), want_parts, ["{}"], [])
    want, _ = collect_keys_per_text(tiny_model, tokenizer, [t for t, _ in texts], PATH,
                                    [subject_last_index(tokenizer, t, e) for t, e in texts], all_tokens=False)
    assert plain.hard_negatives is None and torch.allclose(hard.hard_negatives.cpu(), want, **TOL)
    assert torch.allclose(hard.negatives, plain.negatives, **TOL) and torch.allclose(hard.positives, plain.positives)
    with pytest.raises(ValueError, match="partial_negatives"):
        REPConfig(partial_negatives=-2).check()


def test_screened_negatives_train_the_same_gate_on_fewer_rows():
    """`rep.screen_negatives`: leaving out the negatives the gate already rejects (gradient below the
    screen) trains on a fraction of them, yet the same keys fire and the adapter's move is the same."""
    torch.manual_seed(0)
    pos = torch.randn(20, 64) + 1.0
    neg = torch.cat([torch.randn(600, 64) - 1.0, pos[:4].repeat(10, 1) + 0.8 * torch.randn(40, 64)])
    keys = TrainingKeys(pos, neg, pos.mean(0) + 1.0)
    adapters, reports = {}, {}
    for screen in (0.0, 1e-2):
        torch.manual_seed(1)
        adapters[screen] = GatedLowRankAdapter(64, rank=8)
        reports[screen] = train_adapter(adapters[screen], keys, REPConfig(rank=8, steps=150, adaptive_stop=False,
                                                                          screen_negatives=screen))
    assert reports[0.0].negatives_kept is None
    assert reports[1e-2].negatives_kept < 0.5, reports[1e-2]      # most steps saw under half the negatives
    with torch.no_grad():
        every = torch.cat([pos, neg])
        p0, p1 = (adapters[s].gate_prob(every).squeeze(-1) for s in (0.0, 1e-2))
        assert torch.equal(p0 > 0.9, p1 > 0.9)                       # the same keys fire
        assert (p0 - p1).abs().max() < 0.05
        assert torch.equal(adapters[0.0].delta(pos), adapters[1e-2].delta(pos))  # the gate's loss alone changed
    for bad in (-0.1, 0.5):
        with pytest.raises(ValueError, match="screen_negatives"):
            REPConfig(screen_negatives=bad).check()


def test_stop_distance_ends_training_once_the_held_in_keys_are_close():
    """`rep.stop_distance`: with the gate separating, training stops once the keys are that close to
    k*, though the loss still falls; off (0) it runs on to the plateau or the cap."""
    torch.manual_seed(0)
    pos = torch.randn(20, 64) + 1.5
    keys = TrainingKeys(pos, torch.randn(300, 64) - 1.5, pos.mean(0) + 1.0)
    reports = {}
    for distance in (0.0, 0.3):
        torch.manual_seed(1)
        reports[distance] = train_adapter(GatedLowRankAdapter(64, rank=8),
                                          keys, REPConfig(rank=8, steps=300, stop_distance=distance, stop_plateau=0.0))
    assert reports[0.3].steps < reports[0.0].steps
    assert reports[0.3].distance_after < 0.35 and reports[0.3].gate_pos_fire >= 0.95
    with pytest.raises(ValueError, match="stop_distance"):
        REPConfig(stop_distance=1.5).check()


def test_answer_negatives_are_every_answer_token_after_each_trained_variant(tiny_model, tokenizer):
    """`rep.answer_negatives`: the keys of target_new's tokens, read after the edit prompt with each
    trained variant, are hard negatives (the gate must not fire inside the answer); off leaves the
    keys as they were; they sit before the kin names, which `rep.kin_mine` reads from the end."""
    from rep_easyedit.rep_main import answer_texts

    key_cache.clear_memory()
    req = dict(REQ, target_new="Ferrari Motors")  # the answer repeats the subject's first word
    base = _one_hard_group_rep()
    pert = build_perturbations(req, tokenizer, CORPUS, n_shuffles=3, n_long=0, long_tokens=24)
    args = (tiny_model, tokenizer, req, pert, [["{}", "Once upon a time. {}"]], PATH)
    plain = gather_training_keys(*args, base, CORPUS, np.random.default_rng(3))
    got = gather_training_keys(*args, dataclasses.replace(base, answer_negatives=True), CORPUS,
                               np.random.default_rng(3))
    variants = training_variants(req, pert, base.train_on)
    texts = answer_texts(req, variants)
    assert [t for t, _ in texts][0] == "Ferrari F355 is produced by Ferrari Motors"
    assert all(t[start:] == " Ferrari Motors" for t, start in texts)
    n_answer = len(tokenizer(" Ferrari Motors", add_special_tokens=False)["input_ids"])
    _, every = collect_keys_per_text(tiny_model, tokenizer, [t for t, _ in texts], PATH, [0] * len(texts),
                                     all_tokens=True)
    want = torch.cat([keys[-n_answer:] for keys in every])
    assert plain.hard_negatives is None
    assert got.hard_negatives.shape == want.shape and torch.allclose(got.hard_negatives.cpu(), want, **TOL)
    assert got.answer_rows == len(want) and got.kin_rows == 0  # what rep.answer_mine mines
    assert torch.allclose(got.negatives, plain.negatives, **TOL) and torch.allclose(got.positives, plain.positives)
