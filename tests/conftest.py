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
    from rep_easyedit.models import load_model_and_tokenizer, bundled_model_dir
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
    from rep_easyedit.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("smollm2-135m", device="cpu")
    return model, tok


@pytest.fixture(scope="session")
def dev_cases():
    return json.loads(DEV_DATA.read_text())


def request_from_case(case: dict) -> dict:
    return {"prompt": case["prompt"], "subject": case["subject"], "target_new": case["target_new"],
            "ground_truth": case["target_true"], "subject_rephrase": case["subject_rephrase"],
            "case_id": case["case_id"]}
