"""MEMIT's residual shares on a model that normalises its MLP output (Gemma-3), and nowhere else.

Tiny random Gemma-3 and LLaMA layers for the arithmetic; the real Gemma-3-270M for the edit itself
(before the mapping, every Gemma MEMIT edit failed).
"""

from __future__ import annotations

import json
import types

import pytest
import torch

from rep_easyedit.post_mlp_norm import mlp_output_shift, mlp_residual, post_mlp_norm, rms_norm_gain

from conftest import ROOT, request_from_case


def _tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64,
                           max_position_embeddings=64)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # trained Gemma-3 post-MLP gains are large and uneven (1 + w, w up to ~600)
        for layer in model.model.layers:
            layer.post_feedforward_layernorm.weight.uniform_(0.0, 30.0)
    return model


HP = types.SimpleNamespace(layer_module_tmp="model.layers.{}", rewrite_module_tmp="model.layers.{}.mlp.down_proj")


def test_gain_is_read_from_the_norm_itself():
    gemma = _tiny_gemma3()
    norm = post_mlp_norm(gemma, HP.layer_module_tmp, 1)
    assert norm is gemma.model.layers[1].post_feedforward_layernorm
    torch.testing.assert_close(rms_norm_gain(norm, 32), 1.0 + norm.weight.double(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not an RMS norm"):
        rms_norm_gain(torch.nn.LayerNorm(32), 32)


def test_share_moves_the_norm_output_by_the_share():
    """Written unmapped, a share of 2 % of the layer's contribution moves that contribution by over
    five times the share; mapped, it moves by the share, up to the part an RMS norm cannot reach
    (the share's component off the norm's output surface, computed here independently)."""
    norm = _tiny_gemma3().model.layers[0].post_feedforward_layernorm
    gain = rms_norm_gain(norm, 32)
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(32, 3, dtype=torch.float64, generator=gen)
    post = norm(values.T.float()).T.double()
    direction = torch.nn.functional.normalize(torch.randn(32, 3, dtype=torch.float64, generator=gen), dim=0)
    share = 0.02 * post.norm(dim=0) * direction

    def moved_by(change):
        return norm((values + change).T.float()).T.double() - post

    def rel_error(change):
        return (moved_by(change) - share).norm(dim=0) / share.norm(dim=0)

    g, u = gain[:, None], values / values.pow(2).mean(0, keepdim=True).sqrt()
    # unreachable part: the least-squares error of g*t against the share over t orthogonal to u
    lam = (u * share / g).sum(0) / (u * u / g ** 2).sum(0)
    floor = (lam * u / g).norm(dim=0) / share.norm(dim=0)
    assert (rel_error(mlp_output_shift(values, share, gain)) <= floor + 0.05).all()
    assert (rel_error(share) > 5.0).all()
    # a share of 30 % is far outside the linear regime: the nearest output the norm can give
    share = 15 * share
    assert (rel_error(mlp_output_shift(values, share, gain)) < 0.5).all()
    assert (rel_error(share) > 2.0).all()


def test_models_without_a_post_mlp_norm_get_the_share_unchanged(tiny_model):
    assert post_mlp_norm(tiny_model, HP.layer_module_tmp, 1) is None
    share = torch.randn(64, 2)
    assert mlp_residual(tiny_model, HP, 1, torch.randn(128, 2), share) is share


def test_memit_writes_its_shares_through_the_mapping():
    """The rewrite sits on execute_memit's share line only (the same line upstream)."""
    from rep_easyedit.compat.easyedit import shimmed_functions

    rewritten = [k for k, v in shimmed_functions().items() if "memit_post_mlp_norm" in v]
    assert rewritten == ["easyeditor.models.memit.memit_main.execute_memit"]


@pytest.mark.real_model
def test_memit_edits_gemma3():
    """Regression: with the shares written unmapped, MEMIT's z error grew 137 -> 524 -> 1845 over
    layers 1-3 and no Gemma dev edit succeeded."""
    from easyeditor import BaseEditor

    from rep_easyedit.editing import load_hparams
    from rep_easyedit.stats import main as build_stats

    yaml = ROOT / "hparams/MEMIT/gemma3-270m.yaml"
    assert build_stats(["--hparams", str(yaml)]) == 0
    editor = BaseEditor.from_hparams(load_hparams(yaml))
    model = editor.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    case = next(c for c in json.loads((ROOT / "data/counterfact_gemma3_dev.json").read_text())
                if c["case_id"] == 32)
    request = request_from_case(case)
    torch.manual_seed(0)
    metrics, _, _ = editor.edit(prompts=[request["prompt"]], ground_truth=[request["ground_truth"]],
                                target_new=[request["target_new"]], subject=[request["subject"]],
                                keep_original_weight=True)
    assert metrics[0]["post"]["rewrite_acc"][0] == 1.0
    after = model.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state)
