"""Evaluation metrics, the benchmark loop (resume, shards, summary) and compare_runs, on a tiny model."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from rep_easyedit.eval.metrics import (METRIC_KEYS, SUMMARY_KEYS, evaluate_case, exact_match,
                                     key_similarities, locality, locality_reference, ngram_entropy,
                                     summarize, teacher_forced_predictions)
from rep_easyedit.core.perturbations import build_perturbations

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = Path.home() / ".cache" / "rep_easyedit" / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def tok():
    if not (TOKENIZER / "tokenizer.json").exists() and not (TOKENIZER / "tokenizer_config.json").exists():
        pytest.skip("SmolLM2 tokenizer not cached")
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(TOKENIZER))
    t.padding_side = "right"
    t.pad_token = t.eos_token
    return t


@pytest.fixture(scope="module")
def model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=len(tok))
    return LlamaForCausalLM(cfg).eval()


CORPUS = ["The river runs past the old mill and into the valley below the town. " * 20,
          "Numbers and letters fill the pages of the ledger kept by the clerk. " * 20]


@pytest.fixture()
def record():
    return {
        "case_id": 7, "prompt": "Ferrari F355 is produced by", "subject": "Ferrari F355",
        "target_new": "BMW", "target_true": "Ferrari",
        "rephrase_prompt": ["", "Ferrari F355 is made by", "The F355 is a product of"],
        "locality_prompt": ["Ferrari F40 is created by", "Enzo Ferrari is produced by"],
        "locality_ground_truth": "Ferrari",
        "subject_rephrase": ["Ferrari Model F355", "F355 by Ferrari", "Ferrari's F355", "The F355"],
    }


def greedy_continuation(model, tok, prompt: str, n: int = 3) -> str:
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, do_sample=False, max_new_tokens=n, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:])


def test_exact_match_on_own_greedy_continuation(model, tok, record):
    prompt = record["prompt"]
    cont = greedy_continuation(model, tok, prompt)
    # the metric tokenises " " + target: check that round-trips to the generated ids here
    assert cont.startswith(" ")
    assert exact_match(model, tok, [prompt], cont.strip()) == [1]
    other = "Paris" if cont.strip() != "Paris" else "London"
    assert exact_match(model, tok, [prompt], other) == [0]
    # a target whose first token is right but a later one wrong scores 0 as well
    first = tok.decode(tok(" " + cont.strip(), add_special_tokens=False)["input_ids"][:1])
    assert exact_match(model, tok, [prompt], first.strip() + " zebra quantum") == [0]


def test_batched_predictions_match_one_by_one(model, tok):
    pairs = [("A", "b c"), ("The capital of France is a city called", "Paris"),
             ("x " * 60 + "and then", "something long here"), ("Hello", "world")]
    batched = teacher_forced_predictions(model, tok, pairs, batch_size=3, max_tokens=80)
    for (prompt, target), (t_ids, pred) in zip(pairs, batched):
        p_ids = tok(prompt)["input_ids"]
        ids = torch.tensor([p_ids + t_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        expect = logits[len(p_ids) - 1:len(p_ids) - 1 + len(t_ids)].argmax(-1).tolist()
        assert pred == expect


def test_locality_is_one_without_edit(model, tok, record):
    ref = locality_reference(model, tok, record)
    assert len(ref["argmax"]) == 2
    assert locality(model, tok, record, ref) == 1.0


def test_locality_drops_when_model_changes(model, tok, record):
    ref = locality_reference(model, tok, record)
    head = model.get_output_embeddings().weight
    saved = head.detach().clone()
    try:
        with torch.no_grad():
            head.copy_(torch.randn_like(head))
        assert locality(model, tok, record, ref) < 1.0
    finally:
        with torch.no_grad():
            head.copy_(saved)


def test_evaluate_case_shape_and_none(model, tok, record):
    pert = build_perturbations(record, tok, CORPUS, n_shuffles=4, n_long=0, long_tokens=0)
    ref = locality_reference(model, tok, record)
    res = evaluate_case(model, tok, record, pert, ref, fluency=True)
    assert set(METRIC_KEYS) <= set(res)
    assert res["long_in"] is None and res["long_out"] is None  # no long contexts asked for
    assert res["locality"] == 1.0
    for key in ("success", "paraphrase", "reversion", "rephrase_in", "rephrase_out", "shuffle_in"):
        assert 0.0 <= res[key] <= 1.0
    assert len(res["details"]["scores"]["paraphrase"]) == 2  # the empty paraphrase is skipped
    assert res["fluency"] > 0 and res["details"]["generation"].startswith(record["prompt"])
    # success agrees with the stand-alone metric; deterministic on a second call
    assert res["success"] == exact_match(model, tok, [record["prompt"]], record["target_new"])[0]
    again = evaluate_case(model, tok, record, pert, ref, fluency=True)
    assert {k: again[k] for k in METRIC_KEYS} == {k: res[k] for k in METRIC_KEYS}


def test_evaluate_case_scores_its_own_prediction(model, tok, record):
    rec = dict(record, target_new=greedy_continuation(model, tok, record["prompt"]).strip())
    res = evaluate_case(model, tok, rec, None, None, fluency=False)
    assert res["success"] == 1.0 and res["fluency"] is None and res["locality"] is None


def test_token_scoring_gives_partial_credit(model, tok, record):
    """zsRE scoring: a target whose first tokens the model predicts and whose last it does not scores
    the matching share (exact match: 0)."""
    rec = dict(record, target_new=greedy_continuation(model, tok, record["prompt"]).strip() + " zebra")
    (t_ids, pred), = teacher_forced_predictions(model, tok, [(rec["prompt"], rec["target_new"])])
    share = sum(int(a == b) for a, b in zip(t_ids, pred)) / len(t_ids)
    assert 0 < share < 1
    token = evaluate_case(model, tok, rec, None, None, fluency=False, scoring="token")
    exact = evaluate_case(model, tok, rec, None, None, fluency=False)
    assert token["success"] == pytest.approx(share) and exact["success"] == 0.0
    with pytest.raises(ValueError, match="unknown scoring"):
        evaluate_case(model, tok, rec, None, None, fluency=False, scoring="f1")


def test_ngram_entropy_rome_definition():
    words = "a b c d e"
    h2, h3 = math.log2(4), math.log2(3)
    assert ngram_entropy(words) == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert ngram_entropy("a a a a a a") == 0.0
    assert ngram_entropy("the cat sat on the mat.") > ngram_entropy("the the the the the the")


def test_summary_keys_and_percent():
    cases = [
        {"case_id": 1, "metrics": {**{k: 1.0 for k in METRIC_KEYS}, "fluency": 5.0, "long_in": None},
         "seconds": {"edit": 2.0, "rep": None}},
        {"case_id": 2, "metrics": {**{k: 0.0 for k in METRIC_KEYS}, "fluency": 3.0, "long_in": None},
         "seconds": {"edit": 4.0, "rep": None}},
    ]
    s = summarize(cases)
    assert tuple(s) == SUMMARY_KEYS
    assert list(s) == ["n_cases", "success", "paraphrase", "locality", "reversion", "fluency",
                       "rephrase_in", "rephrase_out", "shuffle_in", "shuffle_out", "long_in",
                       "long_out", "distract_in", "distract_out", "long_old", "generation_new",
                       "generation_old", "edit_seconds_median", "rep_seconds_median"]
    assert s["n_cases"] == 2 and s["success"] == 50.0 and s["long_old"] == 50.0 and s["fluency"] == 4.0
    assert s["long_in"] is None and s["edit_seconds_median"] == 3.0 and s["rep_seconds_median"] is None


def test_key_similarity_identity_pathway(model, tok, record):
    from rep_easyedit.core.adapter import GatedLowRankAdapter
    from rep_easyedit.core.pathway import install, remove_pathways

    pert = build_perturbations(record, tok, CORPUS, n_shuffles=4, n_long=2, long_tokens=20)
    path = "model.layers.1.mlp.down_proj"
    before_only = key_similarities(model, tok, record, pert, path, corpus=CORPUS, n_random=5)
    assert before_only["after"] is None and before_only["whitening"] == "identity"
    assert set(before_only["before"]) == {"rephrase_in", "rephrase_out", "shuffle_in", "shuffle_out",
                                          "long_in", "long_out", "random"}
    assert len(before_only["before"]["random"]) == 5
    install(model, path, GatedLowRankAdapter(128, rank=4))  # zero-initialised: the identity map
    try:
        ks = key_similarities(model, tok, record, pert, path, corpus=CORPUS, n_random=5)
    finally:
        remove_pathways(model)
    for g, vals in ks["before"].items():
        assert vals == pytest.approx(ks["after"][g], abs=1e-4)
        assert vals == pytest.approx(before_only["before"][g], abs=1e-4)
    # a whitening matrix changes the values but keeps k* at 1
    inv = torch.eye(128) * 2.0
    assert key_similarities(model, tok, record, pert, path, inv_cov=inv)["whitening"] == "C^-1"


# -- the runner ------------------------------------------------------------------------------

class _HP:
    alg_name = "FAKE"
    layers = [1]
    rewrite_module_tmp = "model.layers.{}.mlp.down_proj"


def _fake_edit_factory(log: list, rep_seed_offset: int | None = None):
    @contextlib.contextmanager
    def fake_edit(model, tok, requests, hparams):
        """Adds noise to one weight; restores it on exit (like rep_easyedit.editing.edited)."""
        log.append(requests[0]["case_id"])
        w = model.get_submodule("model.layers.1.mlp.down_proj").weight
        saved = w.detach().clone()
        with torch.no_grad():
            w.add_(0.5 * torch.randn_like(w))
        if rep_seed_offset is not None:
            pert = build_perturbations(requests[0], tok, CORPUS, n_shuffles=4, n_long=2, long_tokens=20,
                                       base_seed=rep_seed_offset)
            requests[0]["rep"] = {"perturbations": pert.to_dict(), "training": {},
                                  "seconds": {"rep_total": 0.25}}
        try:
            yield {}
        finally:
            with torch.no_grad():
                w.copy_(saved)
    return fake_edit


def _records(n: int) -> list[dict]:
    base = {"prompt": "Ferrari F355 is produced by", "subject": "Ferrari F355", "target_new": "BMW",
            "target_true": "Ferrari", "rephrase_prompt": ["Ferrari F355 is made by"],
            "locality_prompt": ["Ferrari F40 is created by"], "locality_ground_truth": "Ferrari",
            "subject_rephrase": ["F355 by Ferrari", "Ferrari's F355"]}
    return [dict(base, case_id=100 + i) for i in range(n)]


SETTINGS = {"n_shuffles": 4, "n_long": 2, "long_tokens": 20, "base_seed": 0}


def test_runner_scores_distracting_contexts_and_free_answers(model, tok, tmp_path):
    from rep_easyedit.eval import runner as rb
    from rep_easyedit.eval.contexts import distracting_contexts

    kw = dict(corpus=CORPUS, settings=SETTINGS, edit=_fake_edit_factory([]), progress=False,
              run_info={"alg": "FAKE"})
    (line,) = rb.run_cases(model, tok, _records(1), _HP(), tmp_path,
                           metrics=["success", "distract", "generation"], **kw)
    assert line["contexts"] == distracting_contexts(_records(1)[0])
    assert set(line["details"]["answers"]) >= {"prompt", "question"}
    assert 0.0 <= line["metrics"]["generation_new"] <= 1.0 and 0.0 <= line["metrics"]["generation_old"] <= 1.0
    assert 0.0 <= line["metrics"]["distract_in"] <= 1.0 and 0.0 <= line["metrics"]["distract_out"] <= 1.0
    assert len(line["details"]["scores"]["distract_in"]) == len(line["contexts"]["distract_in"])
    (plain,) = rb.run_cases(model, tok, _records(1), _HP(), tmp_path / "plain", metrics=["success"], **kw)
    assert "contexts" not in plain and plain["metrics"]["distract_in"] is None


def test_runner_scores_the_long_context_that_restates_the_old_fact(model, tok, tmp_path):
    """metric `long_old`: two ~1,024-token prefixes per case that restate the old fact, stored with
    the case, the same on a rerun, each scored before the prompt."""
    from rep_easyedit.eval import runner as rb
    from rep_easyedit.eval.contexts import HURTING_CONTEXTS, HURTING_TOKENS, hurting_long_contexts

    corpus = [" ".join(f"Line {i} of the clerk's ledger lists barrels of grain and oil." for i in range(400))]
    kw = dict(corpus=corpus, settings=SETTINGS, edit=_fake_edit_factory([]), progress=False,
              run_info={"alg": "FAKE"})
    record = _records(1)[0]
    (line,) = rb.run_cases(model, tok, [record], _HP(), tmp_path, metrics=["success", "long_old"], **kw)
    prefixes = line["contexts"]["long_old"]
    assert prefixes == hurting_long_contexts(record, tok, corpus)["long_old"]       # fixed per case
    assert len(prefixes) == HURTING_CONTEXTS and prefixes[0] != prefixes[1]
    for text in prefixes:
        assert 0.9 * HURTING_TOKENS <= len(tok(text, add_special_tokens=False)["input_ids"]) <= 1.1 * HURTING_TOKENS
        assert text.replace(record["subject"], "").count(record["target_true"]) >= 4     # the old fact, again and again
    assert len(line["details"]["scores"]["long_old"]) == HURTING_CONTEXTS
    assert 0.0 <= line["metrics"]["long_old"] <= 1.0
    (again,) = rb.run_cases(model, tok, [record], _HP(), tmp_path / "again", metrics=["success", "long_old"], **kw)
    assert again["contexts"] == line["contexts"] and again["metrics"]["long_old"] == line["metrics"]["long_old"]
    bare = {k: v for k, v in record.items() if k != "target_true"}
    assert hurting_long_contexts(bare, tok, corpus) == {"long_old": []}
    with pytest.raises(ValueError, match="needs a corpus"):
        hurting_long_contexts(record, tok, [])


def test_runner_resume_shard_and_summary(model, tok, tmp_path):
    from rep_easyedit.eval import runner as rb
    log: list = []
    kw = dict(corpus=CORPUS, settings=SETTINGS, edit=_fake_edit_factory(log), progress=False,
              run_info={"alg": "FAKE"})
    w = model.get_submodule("model.layers.1.mlp.down_proj").weight.detach().clone()
    first = rb.run_cases(model, tok, _records(3), _HP(), tmp_path, **kw)
    assert [c["case_id"] for c in first] == [100, 101, 102] and log == [100, 101, 102]
    assert torch.equal(w, model.get_submodule("model.layers.1.mlp.down_proj").weight)
    lines = (tmp_path / "cases.jsonl").read_text().splitlines()
    assert len(lines) == 3
    line = json.loads(lines[0])
    assert set(METRIC_KEYS) == set(line["metrics"]) and line["seconds"]["edit"] >= 0
    assert line["perturbations"]["long_in"] and line["inputs"]["case_id"] == 100
    # a torn last line (killed run) is dropped; finished cases are skipped
    with open(tmp_path / "cases.jsonl", "a") as f:
        f.write('{"case_id": 103, "metr')
    log.clear()
    second = rb.run_cases(model, tok, _records(5), _HP(), tmp_path, **kw)
    assert [c["case_id"] for c in second] == [103, 104] and log == [103, 104]
    assert len(rb.read_cases(tmp_path / "cases.jsonl")) == 5
    summary = rb.write_summary(tmp_path, "fake")
    assert tuple(summary) == SUMMARY_KEYS and summary["n_cases"] == 5
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert "| success (%) |" in (tmp_path / "summary.md").read_text()
    # shards: 1/2 takes every second case from index 1
    log.clear()
    shard_dir = tmp_path / "shard"
    rb.run_cases(model, tok, _records(5), _HP(), shard_dir, shard=(1, 2), **kw)
    assert log == [101, 103]


def test_runner_checks_rep_perturbations(model, tok, tmp_path):
    from rep_easyedit.eval import runner as rb

    class RepHP(_HP):
        alg_name = "REP-FAKE"

    ok = rb.run_cases(model, tok, _records(1), RepHP(), tmp_path / "ok", corpus=CORPUS, settings=SETTINGS,
                      edit=_fake_edit_factory([], rep_seed_offset=0), progress=False,
                      key_similarity=True, metrics=["success", "rephrase", "shuffle", "long"])
    assert ok[0]["seconds"]["rep"] == 0.25
    assert ok[0]["key_similarity"]["whitening"] == "identity"
    assert ok[0]["metrics"]["locality"] is None and ok[0]["metrics"]["fluency"] is None
    with pytest.raises(AssertionError, match="other perturbations"):
        rb.run_cases(model, tok, _records(1), RepHP(), tmp_path / "bad", corpus=CORPUS, settings=SETTINGS,
                     edit=_fake_edit_factory([], rep_seed_offset=1), progress=False)


def test_rewrite_argv_and_shard():
    from rep_easyedit.eval import runner as rb
    assert rb.rewrite_argv(["x.py", "data=counterfact_smollm2_dev", "model=smollm2-135m"]) == \
        ["x.py", "data=counterfact_smollm2_dev", "model=smollm2-135m"]
    assert rb.rewrite_argv(["x.py", "data=/tmp/zsre.json"]) == ["x.py", "data=custom", "data.path=/tmp/zsre.json"]
    assert rb.parse_shard("2/4") == (2, 4)
    with pytest.raises(ValueError):
        rb.parse_shard("4/4")


def test_compare_runs(model, tok, tmp_path):
    from rep_easyedit.eval import runner as rb
    from rep_easyedit.eval import compare as cr
    for alg, offset in (("ROME", None), ("REP-ROME", 0)):

        class HP(_HP):
            alg_name = alg

        rb.run_cases(model, tok, _records(2), HP(), tmp_path / alg, corpus=CORPUS, settings=SETTINGS,
                     edit=_fake_edit_factory([], rep_seed_offset=offset), progress=False,
                     key_similarity=True, run_info={"alg": alg, "model": "tiny", "device": "cpu"},
                     fluency_tokens=5)
    written = cr.compare([tmp_path / "ROME", tmp_path / "REP-ROME"], tmp_path / "cmp")
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| ROME [tiny] |" in table and "| Δ |" in table
    assert "- ROME: cpu 2" in table  # the device each case ran on (run_info's, as the runner records it)
    names = sorted(p.name for p in written["plots"])
    assert "robustness.png" in names and any(n.startswith("key_similarity_REP-ROME") for n in names)
    for p in written["plots"]:
        assert p.stat().st_size > 1000


def test_runner_refuses_to_resume_with_other_settings(tmp_path):
    """A resumed run must not mix cases made with other settings into one summary."""
    from rep_easyedit.eval import runner as rb
    stored = {"alg": "REP-MEMIT", "model": "m", "data": "d", "config": {"model": {"dtype": None}},
              "hparams": {"layers": [2, 3], "device": "cuda", "rep": {"rank": 32}},
              "perturbation_settings": {"n_shuffles": 10}}
    (tmp_path / "run.json").write_text(json.dumps(stored))
    same_on_cpu = json.loads(json.dumps(stored))
    same_on_cpu["hparams"]["device"] = "cpu"
    # nothing finished yet: any settings may start over in the dir
    changed = json.loads(json.dumps(same_on_cpu))
    changed["hparams"]["rep"]["fit_after_update"] = True
    rb.check_resumable(tmp_path, changed)
    (tmp_path / "cases.jsonl").write_text(json.dumps({"case_id": 1, "metrics": {}}) + "\n")
    # another device, and a field the stored run predates left at its default, resume
    same_on_cpu["hparams"]["rep"]["fit_after_update"] = False
    rb.check_resumable(tmp_path, same_on_cpu)
    with pytest.raises(ValueError, match=r"hparams\.rep\.fit_after_update: False → True.*out=DIR"):
        rb.check_resumable(tmp_path, changed)
    bf16 = json.loads(json.dumps(same_on_cpu))
    bf16["config"]["model"]["dtype"] = "bfloat16"
    with pytest.raises(ValueError, match="model_dtype: None → 'bfloat16'"):
        rb.check_resumable(tmp_path, bf16)
    # the metrics list is a setting too: its order is not, a metric added or left out is
    stored["config"]["data"] = {"metrics": ["success", "locality", "distract"]}
    (tmp_path / "run.json").write_text(json.dumps(stored))
    reordered = json.loads(json.dumps(stored))
    reordered["config"]["data"]["metrics"] = ["distract", "success", "locality"]
    rb.check_resumable(tmp_path, reordered)
    fewer = json.loads(json.dumps(stored))
    fewer["config"]["data"]["metrics"] = ["success", "locality"]
    with pytest.raises(ValueError, match=r"data_metrics: \['distract', 'locality', 'success'\] → "):
        rb.check_resumable(tmp_path, fewer)


def test_runner_reads_a_changed_default_for_a_field_the_stored_run_predates(tmp_path, monkeypatch):
    """A stored run without a field ran with that field's default of its day, not today's."""
    from rep_easyedit.core import config as rep_config
    from rep_easyedit.eval import runner as rb
    stored = {"alg": "REP-ROME", "model": "m", "data": "d", "hparams": {"rep": {"rank": 32}}}
    (tmp_path / "run.json").write_text(json.dumps(stored))
    (tmp_path / "cases.jsonl").write_text(json.dumps({"case_id": 1, "metrics": {}}) + "\n")
    today = json.loads(json.dumps(stored))
    today["hparams"]["rep"]["negatives_per_step"] = 0   # today's default: the old behaviour
    rb.check_resumable(tmp_path, today)
    monkeypatch.setattr(rep_config, "CHANGED_DEFAULTS", {"negatives_per_step": 128})
    with pytest.raises(ValueError, match=r"hparams\.rep\.negatives_per_step: 128 → 0"):
        rb.check_resumable(tmp_path, today)


def test_runner_case_results_do_not_depend_on_the_process(model, tok, tmp_path):
    """Seeded before every edit, a case scores the same whichever shard, resume or rerun ran it
    (EasyEdit's ROME samples its context templates from torch's generator)."""
    from rep_easyedit.eval import runner as rb
    kw = dict(corpus=CORPUS, settings=SETTINGS, progress=False, fluency_tokens=5)
    torch.manual_seed(123)
    whole = rb.run_cases(model, tok, _records(3), _HP(), tmp_path / "whole", edit=_fake_edit_factory([]), **kw)
    torch.manual_seed(456)
    shard = rb.run_cases(model, tok, _records(3), _HP(), tmp_path / "shard", edit=_fake_edit_factory([]),
                         shard=(1, 2), **kw)
    assert shard[0]["case_id"] == 101
    assert shard[0]["metrics"] == whole[1]["metrics"]
    # the noisy fake edit does move the metrics when the draw is not controlled
    unseeded = rb.run_cases(model, tok, _records(2), _HP(), tmp_path / "unseeded", edit=_fake_edit_factory([]),
                            seed=None, **kw)
    assert unseeded[1]["metrics"] != whole[1]["metrics"]


def test_paired_deltas_pair_cases_by_id_and_bracket_the_mean():
    spec = importlib.util.spec_from_file_location("paired_deltas", ROOT / "benchmarks" / "paired_deltas.py")
    pd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pd)
    base = [{"case_id": i, "metrics": {"shuffle_in": 0.0 if i < 3 else None}} for i in range(4)]
    # the REP run finished its cases in another order (shards) and one case base never ran
    rep = [{"case_id": i, "metrics": {"shuffle_in": v}} for i, v in ((2, 1.0), (0, 0.5), (1, 0.0), (3, 1.0), (9, 1.0))]
    d = pd.paired_differences(base, rep, "shuffle_in")
    assert sorted(d.tolist()) == [0.0, 50.0, 100.0]  # case 3 has no base score, case 9 no base line
    low, high = pd.bootstrap_interval(d)
    assert 0.0 <= low <= d.mean() <= high <= 100.0
