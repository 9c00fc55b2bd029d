"""The variant-aware value fit reduces to ROME's own value when there are no variants."""

import importlib

import torch

from rep_easyedit.compat.easyedit import installed_algorithm, shims_applied
from rep_easyedit.robust_value import optimise_value

from test_rep_edit_tiny import REQ, tiny_hparams


def test_matches_rome_compute_v_without_variants(tiny_model, tokenizer, tmp_path):
    hp = tiny_hparams(tmp_path, v_num_grad_steps=5).backend_hparams()
    rome = importlib.import_module(installed_algorithm("ROME").__module__)
    request = {"prompt": "{} is produced by", "subject": REQ["subject"], "target_new": " BMW"}
    templates = ["{}", "Hello there. {}", "In a word. {}"]
    left = torch.randn(tiny_model.config.intermediate_size)
    left = left / left.norm()
    with shims_applied():
        theirs = rome.compute_v(tiny_model, tokenizer, dict(request), hp, 1, left, templates)
    ours = optimise_value(tiny_model, tokenizer, dict(request), hp, 1, left, templates, variants=[])
    assert torch.allclose(ours, theirs, rtol=1e-3, atol=1e-4)


def test_variants_change_the_value(tiny_model, tokenizer, tmp_path):
    hp = tiny_hparams(tmp_path, v_num_grad_steps=5).backend_hparams()
    request = {"prompt": "{} is produced by", "subject": REQ["subject"], "target_new": " BMW"}
    left = torch.ones(tiny_model.config.intermediate_size) / tiny_model.config.intermediate_size ** 0.5
    plain = optimise_value(tiny_model, tokenizer, dict(request), hp, 1, left, ["{}"], variants=[])
    robust = optimise_value(tiny_model, tokenizer, dict(request), hp, 1, left, ["{}"],
                            variants=["The F355", "F355 by Ferrari"])
    assert torch.isfinite(robust).all() and not torch.allclose(plain, robust)
