"""Offline corpus and covariance statistics, checked against the installed EasyEdit's `layer_stats`."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch



@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REP_EASYEDIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tok(tokenizer):
    from rep_easyedit.model_loading import prepare_tokenizer

    prepare_tokenizer(tokenizer)
    return tokenizer


@pytest.fixture(scope="module")
def model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=len(tok),
                      pad_token_id=tok.pad_token_id)
    m = LlamaForCausalLM(cfg).eval()
    m.config._name_or_path = "tiny-org/tiny-llama"  # legacy and upstream folder names differ
    return m


def _hparams(tmp_path, dtype="float64", n=7):
    return SimpleNamespace(
        stats_dir=str(tmp_path / "stats"), mom2_dataset="wikipedia", mom2_n_samples=n,
        mom2_dtype=dtype, rewrite_module_tmp="model.layers.{}.mlp.down_proj", device="cpu",
        layers=[1])


TEXTS = [
    "The capital of France is Paris, a city on the Seine.",
    "In 1969 two astronauts walked on the Moon.",
    "A short one.",
    "It rained for three days and the river rose over its banks near the old mill.",
    "This sentence is here to make the batch uneven.",
]


def _reference_moment(model, tok, hp, layer, texts):
    from rep_easyedit.core.keys import collect_keys

    _, every = collect_keys(model, tok, texts, hp.rewrite_module_tmp.format(layer),
                            all_tokens=True, batch_size=2)
    k = torch.cat(every).double()
    return k.t() @ k, k.shape[0]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_easyedit_layer_stats_reads_our_files(model, tok, tmp_path, dtype):
    from rep_easyedit.compat.easyedit import easyeditor, shims_applied
    from rep_easyedit.covariance import build_stats, has_stats, stats_paths

    easyeditor()
    from easyeditor.models.rome import layer_stats as ls_mod

    hp = _hparams(tmp_path, dtype)
    layers = [1, 2]
    figs = build_stats(model, tok, hp, layers, TEXTS, batch_size=2, progress=False)
    n_tok = sum(len(tok(t)["input_ids"]) for t in TEXTS)
    assert figs["tokens"] == n_tok and figs["tokens_per_s"] > 0
    assert set(figs["paths"]) == set(layers)

    def no_download(*a, **k):
        raise AssertionError("layer_stats tried to load a dataset")

    for layer in layers:
        paths = stats_paths(model, hp, layer)
        assert len(paths) == 2
        assert "tiny-org_tiny-llama" in str(paths[0]) and "/tiny-llama/" in str(paths[1])
        assert all(p.is_file() for p in paths) and has_stats(model, hp, layer)
        with np.load(paths[0]) as d:
            assert {"mom2.mom2", "mom2.count", "mom2.constructor", "sample_size"} <= set(d.files)
            assert int(d["sample_size"]) == hp.mom2_n_samples
            assert int(d["mom2.count"]) == n_tok
            assert d["mom2.mom2"].dtype == np.dtype(dtype)

        ref_sum, ref_n = _reference_moment(model, tok, hp, layer, TEXTS)
        # EasyEdit's own loader, called as compute_u's get_inv_cov calls it
        orig = ls_mod.load_dataset
        ls_mod.load_dataset = no_download
        try:
            with shims_applied():
                stat = ls_mod.layer_stats(
                    model, tok, hp.rewrite_module_tmp.format(layer), hp.stats_dir,
                    hp.mom2_dataset, to_collect=["mom2"], sample_size=hp.mom2_n_samples,
                    precision=hp.mom2_dtype, hparams=hp)
        finally:
            ls_mod.load_dataset = orig
        moment = stat.mom2.moment()
        assert stat.mom2.count == ref_n
        # float64 sums of float32 keys: the batch order (thread count) moves them by ~1e-10
        tol = 1e-9 if dtype == "float64" else 1e-5
        torch.testing.assert_close(moment.double(), ref_sum / ref_n, rtol=tol, atol=tol)

        from rep_easyedit.covariance import load_inverse_covariance

        inv = load_inverse_covariance(model, hp, layer)
        assert inv.dtype == torch.float32
        expected = torch.inverse(moment).float()
        torch.testing.assert_close(inv, expected, rtol=1e-4, atol=1e-4)


def test_fallback_writer_matches_easyedit_format(model, tok, tmp_path, monkeypatch):
    import rep_easyedit.covariance as cov

    hp_a = _hparams(tmp_path / "a")
    hp_b = _hparams(tmp_path / "b")
    cov.build_stats(model, tok, hp_a, [1], TEXTS, progress=False)
    monkeypatch.setattr(cov, "_runningstats", lambda: None)
    cov.build_stats(model, tok, hp_b, [1], TEXTS, progress=False)
    with np.load(cov.stats_paths(model, hp_a, 1)[0]) as a, np.load(cov.stats_paths(model, hp_b, 1)[0]) as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            if a[k].dtype.kind in "fc":
                np.testing.assert_allclose(a[k], b[k], rtol=1e-12)
            else:
                assert a[k] == b[k], k


def test_require_stats_names_missing_file_and_command(model, tmp_path, monkeypatch):
    from rep_easyedit.compat.easyedit import easyeditor
    from rep_easyedit.covariance import MissingCovarianceError, require_stats, stats_paths

    easyeditor()
    from easyeditor.models.rome import layer_stats as ls_mod

    def no_download(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(ls_mod, "load_dataset", no_download)
    hp = _hparams(tmp_path)
    with pytest.raises(MissingCovarianceError) as err:
        require_stats(model, hp, [2, 3])
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert "python -m rep_easyedit.stats" in msg and "--layers 2 3" in msg
    for layer in (2, 3):
        assert any(str(p) in msg for p in stats_paths(model, hp, layer))
    assert not (tmp_path / "stats").exists()


def test_load_corpus_reads_files(tmp_path, model, tok):
    from rep_easyedit.corpus import load_corpus

    a = tmp_path / "a.txt"
    a.write_text("First paragraph\nstill first.\n\n\n  \nSecond one.\n\n", encoding="utf-8")
    b = tmp_path / "b.txt"
    b.write_text("Third.", encoding="utf-8")
    assert load_corpus([str(a), str(b)], model, tok) == [
        "First paragraph\nstill first.", "Second one.", "Third."]


def test_load_corpus_missing_file(tmp_path, model, tok):
    from rep_easyedit.corpus import load_corpus

    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_corpus([str(missing)], model, tok)


def test_load_corpus_samples_and_caches(tmp_path, model, tok, monkeypatch):
    import rep_easyedit.corpus as corpus
    from rep_easyedit.model_loading import cache_dir

    rng = torch.get_rng_state()
    texts = corpus.load_corpus(None, model, tok, n_texts=3, n_tokens=5, seed=1, batch_size=2,
                               progress=False)
    assert torch.equal(rng, torch.get_rng_state())  # global RNG untouched
    assert len(texts) == 3 and all(isinstance(t, str) and t for t in texts)
    path = cache_dir() / "corpus" / "tiny-llama-3x5-s1.json"
    assert path.is_file() and str(path).startswith(str(tmp_path))
    assert json.loads(path.read_text())["texts"] == texts

    def boom(*a, **k):
        raise AssertionError("sampled again instead of reading the cache")

    monkeypatch.setattr(corpus, "sample_texts", boom)
    assert corpus.load_corpus(None, model, tok, n_texts=3, n_tokens=5, seed=1) == texts


def test_sampling_is_seeded(model, tok):
    from rep_easyedit.corpus import sample_texts

    a = sample_texts(model, tok, n_texts=2, n_tokens=4, seed=3, progress=False)
    b = sample_texts(model, tok, n_texts=2, n_tokens=4, seed=3, progress=True)  # progress bar path
    assert a == b
    assert sample_texts(model, tok, n_texts=2, n_tokens=4, seed=4, progress=False) != a
