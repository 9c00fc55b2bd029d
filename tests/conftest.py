"""Shared fixtures: a tiny random llama for plumbing, the bundled SmolLM2 for behaviour."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parents[1]
DEV_DATA = ROOT / "data" / "counterfact_smollm2_dev.json"


@pytest.fixture(scope="session")
def tokenizer():
    from rep_easyedit.model_loading import load_model_and_tokenizer, bundled_model_dir
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bundled_model_dir()))
    tok.padding_side = "right"
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture()
def tiny_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=len(tokenizer),
                      max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def real_model():
    """The bundled SmolLM2-135M-Instruct (float32, CPU), shared by the session's real-model tests."""
    from rep_easyedit.model_loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("smollm2-135m", device="cpu")
    return model, tok


@pytest.fixture(scope="session")
def dev_cases():
    return json.loads(DEV_DATA.read_text())


def request_from_case(case: dict) -> dict:
    """The request the benchmark runner builds from a dev record."""
    from rep_easyedit.eval.runner import edit_request

    return edit_request(case)


def tiny_hparams_dict(alg: str, tmp_path, **changes) -> dict:
    """The shipped SmolLM2 hparams of `alg`, cut down for the tiny model (layer 1, 2 value steps,
    few templates, no long contexts). `rep_<field>=` changes a field of the `rep:` section."""
    import yaml

    raw = yaml.safe_load((ROOT / f"hparams/{alg}/smollm2-135m.yaml").read_text())
    # v_num_grad_steps 2: ROME's compute_v breaks before its optimiser step on the last
    # iteration, so with 1 step `delta` stays 0 and the edit is a no-op
    raw.update(layers=[1], v_loss_layer=3, v_num_grad_steps=2, stats_dir=str(tmp_path / "stats"))
    if "context_template_length_params" in raw:
        raw["context_template_length_params"] = [[3, 5]]
    if "rep" in raw:
        raw["rep"].update(steps=5, n_long_contexts=0, corpus_negative_texts=0)
    for key, value in changes.items():
        if key.startswith("rep_"):
            raw["rep"][key[4:]] = value
        else:
            raw[key] = value
    return raw


# -- which EasyEdit: `legacy_easyedit` / `upstream_easyedit` tests skip on the other one -------------

def easyedit_is_upstream() -> bool:
    """An upstream checkout restores through `editors.utils.restore_after_edit`; PyPI's has none."""
    import importlib

    import rep_easyedit  # noqa: F401 - imports the installed EasyEdit (stubs included)
    try:
        utils = importlib.import_module("easyeditor.editors.utils")
    except ImportError:
        return False
    return callable(getattr(utils, "restore_after_edit", None))


def pytest_runtest_setup(item):
    if item.get_closest_marker("upstream_easyedit") and not easyedit_is_upstream():
        pytest.skip("needs an upstream EasyEdit checkout on PYTHONPATH (make test-upstream EASYEDIT=...)")
    if item.get_closest_marker("legacy_easyedit") and easyedit_is_upstream():
        pytest.skip("tests the PyPI easyeditor==0.0.1.dev0 (make test)")
    if item.get_closest_marker("export_upstream") and not os.environ.get("EASYEDIT"):
        pytest.skip("set EASYEDIT to an EasyEdit checkout (make test-upstream EASYEDIT=...)")
