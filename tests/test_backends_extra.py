"""R-ROME and EMMET backends (rep_easyedit.backends_extra) on a tiny random LLaMA."""

from __future__ import annotations

import dataclasses

import pytest
import torch

TEMPLATES = ["{}", "Hello there. {}", "I went home yesterday. {}"]
GROUPED = [["{}"], ["Hello there. {}", "I went home yesterday. {}"]]
REQUESTS = [
    {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome"},
    {"prompt": "Danielle Darrieux speaks the language", "subject": "Danielle Darrieux",
     "target_new": "English"},
    {"prompt": "{} was created by", "subject": "Toyota Celica", "target_new": " Honda"},
]
LAYER = 1

@pytest.fixture()
def tok(tokenizer):
    return tokenizer


@pytest.fixture()
def model(tiny_model):
    return tiny_model


def _common(**over):
    base = dict(
        layers=[LAYER], fact_token="subject_last", v_num_grad_steps=4, v_lr=0.5, v_loss_layer=3,
        v_weight_decay=1e-3, clamp_norm_factor=4.0, kl_factor=0.0625, mom2_adjustment=False,
        rewrite_module_tmp="model.layers.{}.mlp.down_proj", layer_module_tmp="model.layers.{}",
        mlp_module_tmp="model.layers.{}.mlp", attn_module_tmp="model.layers.{}.self_attn",
        ln_f_module="model.norm", lm_head_module="lm_head", mom2_dataset="wikipedia",
        mom2_n_samples=1000, mom2_dtype="float32", device="cpu", model_name="tiny",
        stats_dir="/nonexistent/stats")
    base.update(over)
    return base


def r_rome_hp(**over):
    from rep_easyedit.backends_extra import R_ROMEHyperParams

    kw = _common(alg_name="R-ROME", context_template_length_params=[[5, 5]])
    kw.update(over)
    return R_ROMEHyperParams(**kw)


def emmet_hp(**over):
    from rep_easyedit.backends_extra import EMMETHyperParams

    kw = _common(alg_name="EMMET", layer_selection="all", mom2_update_weight=1.0)
    kw.update(over)
    return EMMETHyperParams(**kw)


def _random_spd(dim, seed=1):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, 4 * dim, generator=g)
    return a @ a.T / (4 * dim) + 0.1 * torch.eye(dim)


def _down_proj_outputs(model, tok, request, templates):
    """Down-projection outputs at the subject's last token, read with a plain forward hook."""
    from rep_easyedit.backends_extra.common import normalise_request

    req = normalise_request(request)
    outs = []
    module = model.model.layers[LAYER].mlp.down_proj
    for t in templates:
        text_prefix = t.format(req["prompt"]).split("{}")[0] + req["subject"]
        idx = len(tok.encode(text_prefix)) - 1
        captured = {}
        handle = module.register_forward_hook(lambda m, i, o: captured.__setitem__("o", o))
        with torch.no_grad():
            model(**tok(t.format(req["prompt"]).format(req["subject"]), return_tensors="pt"))
        handle.remove()
        outs.append(captured["o"][0, idx].double())
    return torch.stack(outs)


# ---------------------------------------------------------------------------------------------
# hparams and registration


def test_hparams_from_yaml_scientific_notation(tmp_path):
    import yaml

    from rep_easyedit.backends_extra import EMMETHyperParams, R_ROMEHyperParams

    data = dataclasses.asdict(r_rome_hp())
    data.update(v_lr="5e-1", v_weight_decay="1e-3", mom2_n_samples="1e5")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    hp = R_ROMEHyperParams.from_hparams(str(tmp_path / "r"))
    assert hp.v_lr == 0.5 and hp.v_weight_decay == 1e-3 and hp.mom2_n_samples == 100000
    assert hp.enable_random_prefix_keys and not hp.original_implementation and hp.fp16 is False

    data = dataclasses.asdict(emmet_hp())
    data.update(emmet_lambda="1e-1", update_norm_lambda=0, mom2_update_weight="1.5e4")
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(data))
    hp = EMMETHyperParams.from_hparams(str(tmp_path / "e.yaml"))
    assert hp.emmet_lambda == 0.1 and hp.mom2_update_weight == 15000.0
    assert hp.update_norm_lambda == 0.0 and isinstance(hp.update_norm_lambda, float)

    with pytest.raises(ValueError, match="alg_name"):
        R_ROMEHyperParams.from_hparams(str(tmp_path / "e.yaml"))
    data["bogus_key"] = 1
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match="bogus_key"):
        EMMETHyperParams.from_hparams(str(tmp_path / "bad.yaml"))


def test_register_missing_backends_only_where_missing():
    from rep_easyedit.backends_extra import (
        apply_emmet_to_model,
        apply_r_rome_to_model,
        register_missing_backends,
    )
    from rep_easyedit.compat.easyedit import alg_dicts, installed_algorithm

    dicts = alg_dicts()
    saved = [dict(d) for d in dicts]
    try:
        sentinel = object()
        for d in dicts:
            d.pop("R-ROME", None)
            d["EMMET"] = sentinel          # as if the installed EasyEdit had its own EMMET
        assert register_missing_backends() == ["R-ROME"]
        assert installed_algorithm("R-ROME") is apply_r_rome_to_model
        assert installed_algorithm("EMMET") is sentinel
        assert register_missing_backends() == []
        for d in dicts:
            d.pop("EMMET")
        assert register_missing_backends() == ["EMMET"]
        assert installed_algorithm("EMMET") is apply_emmet_to_model
    finally:
        for d, s in zip(dicts, saved):
            d.clear()
            d.update(s)


# ---------------------------------------------------------------------------------------------
# R-ROME


def test_r_rome_closed_form_identity_cov(model, tok):
    from rep_easyedit.backends_extra import apply_r_rome_to_model
    from rep_easyedit.backends_extra.common import average_key, normalise_request, rome_value

    hp = r_rome_hp()
    req = normalise_request(REQUESTS[0])
    w = model.model.layers[LAYER].mlp.down_proj.weight
    w0 = w.detach().clone().double()

    # k*, v* with the module's own functions (the value optimisation is deterministic)
    from rep_easyedit.backends_extra.common import legacy_context

    with legacy_context(tok):
        k_star = average_key(model, tok, req, hp, LAYER, TEMPLATES).double()
        v_star, k_p, _ = rome_value(model, tok, req, hp, LAYER, TEMPLATES)
    v_star = v_star.double()
    assert not torch.allclose(k_star, k_p.double())  # prefixes do move the key

    _, weights_copy = apply_r_rome_to_model(model, tok, [REQUESTS[0]], hp,
                                            return_orig_weights=True,
                                            context_templates=TEMPLATES)
    delta = w.detach().double() - w0
    expected = torch.outer(v_star - w0 @ k_star, k_star) / k_star.dot(k_star)
    torch.testing.assert_close(delta, expected, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(w.detach().double() @ k_star, v_star, atol=1e-5, rtol=1e-4)
    # rank one with row space C^-1 k* = k*
    s = torch.linalg.svdvals(delta)
    assert s[1] < 1e-6 * s[0]
    ortho = torch.randn(k_star.shape[0], dtype=torch.float64)
    ortho -= ortho.dot(k_star) / k_star.dot(k_star) * k_star
    assert (delta @ ortho).abs().max() < 1e-8 * delta.abs().max() * ortho.norm() * 1e3

    # the averaged down-projection output over the templates (read by a hook) is now v*
    outs = _down_proj_outputs(model, tok, REQUESTS[0], TEMPLATES)
    torch.testing.assert_close(outs.mean(0), v_star, atol=1e-4, rtol=1e-3)

    # weights_copy restores exactly
    assert set(weights_copy) == {f"model.layers.{LAYER}.mlp.down_proj.weight"}
    with torch.no_grad():
        w.copy_(weights_copy[f"model.layers.{LAYER}.mlp.down_proj.weight"])
    assert torch.equal(w.detach().double(), w0)


def test_r_rome_with_covariance_and_key_modes(model, tok):
    from rep_easyedit.backends_extra import clear_second_moment_cache, execute_r_rome, seed_second_moment

    hp = r_rome_hp(mom2_adjustment=True)
    cov = _random_spd(128).double()
    seed_second_moment(model, hp, LAYER, cov)
    try:
        w = model.model.layers[LAYER].mlp.down_proj.weight
        w0 = w.detach().clone().double()
        (upd,) = execute_r_rome(model, tok, REQUESTS[1], hp, context_templates=TEMPLATES).values()
        assert torch.equal(w.detach().double(), w0)  # execute leaves the model unchanged
        k, v = upd.key.double(), upd.value.double()
        cinv_k = torch.linalg.solve(cov, k)
        expected = torch.outer(v - w0 @ k, cinv_k) / cinv_k.dot(k)
        torch.testing.assert_close(upd.delta.double(), expected, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close((w0 + upd.delta) @ k, v, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(upd.left.double(), cinv_k, atol=1e-6, rtol=1e-4)

        # ROME's released mix: C^-1 k* in the numerator, the prompt key in denominator/residual
        (orig,) = execute_r_rome(model, tok, REQUESTS[1], dataclasses.replace(
            hp, original_implementation=True), context_templates=TEMPLATES).values()
        k_p = orig.prompt_key.double()
        mix = torch.outer(v - w0 @ k_p, cinv_k) / cinv_k.dot(k_p)
        torch.testing.assert_close(orig.delta.double(), mix, atol=1e-6, rtol=1e-4)
        assert not torch.allclose(orig.delta.double(), expected, atol=1e-6)

        # prompt keys everywhere
        (pk,) = execute_r_rome(model, tok, REQUESTS[1], dataclasses.replace(
            hp, enable_prompt_keys=True, enable_random_prefix_keys=False),
            context_templates=TEMPLATES).values()
        torch.testing.assert_close((w0 + pk.delta) @ k_p, v, atol=1e-5, rtol=1e-4)
        with pytest.raises(ValueError, match="exactly one"):
            execute_r_rome(model, tok, REQUESTS[1], dataclasses.replace(hp, enable_prompt_keys=True),
                           context_templates=TEMPLATES)
    finally:
        clear_second_moment_cache(model)


def test_r_rome_rejects_batches(model, tok):
    from rep_easyedit.backends_extra import apply_r_rome_to_model

    w0 = model.model.layers[LAYER].mlp.down_proj.weight.detach().clone()
    with pytest.raises(ValueError, match="exactly one request per call; got 2"):
        apply_r_rome_to_model(model, tok, REQUESTS[:2], r_rome_hp(), context_templates=TEMPLATES)
    with pytest.raises(ValueError, match="got 0"):
        apply_r_rome_to_model(model, tok, [], r_rome_hp(), context_templates=TEMPLATES)
    assert torch.equal(model.model.layers[LAYER].mlp.down_proj.weight, w0)


def test_r_rome_bfloat16_model(model, tok):
    from rep_easyedit.backends_extra import apply_r_rome_to_model

    model = model.to(torch.bfloat16)
    w = model.model.layers[LAYER].mlp.down_proj.weight
    w0 = w.detach().clone()
    _, wc = apply_r_rome_to_model(model, tok, REQUESTS[2], r_rome_hp(v_num_grad_steps=2),
                                  return_orig_weights=True, context_templates=TEMPLATES)
    assert w.dtype == torch.bfloat16 and not torch.equal(w, w0)
    (orig,) = wc.values()
    assert orig.dtype == torch.bfloat16 and torch.equal(orig, w0)


# ---------------------------------------------------------------------------------------------
# EMMET


def _emmet_reference(residual, keys, c0, lam):
    residual, keys, c0 = residual.double(), keys.double(), c0.double()
    c0_inv = torch.linalg.inv(c0)
    gram = keys.T @ c0_inv @ keys
    return residual @ torch.linalg.inv(lam * torch.eye(keys.shape[1], dtype=torch.float64) + gram) \
        @ keys.T @ c0_inv


def test_emmet_batch_closed_form_and_restore(model, tok):
    from rep_easyedit.backends_extra import apply_emmet_to_model, clear_second_moment_cache, seed_second_moment
    from rep_easyedit.backends_extra.emmet import execute_emmet

    hp = emmet_hp(mom2_adjustment=True, emmet_lambda=0.1, mom2_update_weight=3.0,
                  update_norm_lambda=0.05, calculate_objective_value=True)
    cov = _random_spd(128, seed=2).double()
    seed_second_moment(model, hp, LAYER, cov)
    try:
        w = model.model.layers[LAYER].mlp.down_proj.weight
        w0 = w.detach().clone().double()
        state0 = {k: v.clone() for k, v in model.state_dict().items()}

        updates = execute_emmet(model, tok, REQUESTS, hp, context_templates=GROUPED)
        (upd,) = updates.values()
        K, V, R = upd.keys.double(), upd.values.double(), upd.residual.double()
        assert K.shape == (128, 3) and V.shape == (64, 3)
        torch.testing.assert_close(V, w0 @ K + R)
        c0 = 3.0 * cov + 0.05 * torch.eye(128, dtype=torch.float64)
        torch.testing.assert_close(upd.delta.double(), _emmet_reference(R, K, c0, 0.1),
                                   atol=1e-7, rtol=1e-5)
        # with lambda > 0 the constraints hold only approximately; the miss shrinks with lambda
        miss = ((w0 + upd.delta) @ K - V).norm()
        assert miss > 1e-6 and upd.objective["memorization"] == pytest.approx(miss.item(), rel=1e-6)

        # the same keys as averaging per template group by hand (MEMIT's compute_ks)
        from rep_easyedit.backends_extra.r_rome import average_key, legacy_context, normalise_request

        with legacy_context(tok):
            k0 = average_key(model, tok, normalise_request(REQUESTS[0]), hp, LAYER, GROUPED)
        torch.testing.assert_close(K[:, 0], k0.double(), atol=1e-5, rtol=1e-4)

        # lambda -> 0 with independent keys: W' K_E = V_E (the values are deterministic)
        tiny = execute_emmet(model, tok, REQUESTS, dataclasses.replace(hp, emmet_lambda=1e-9),
                             context_templates=GROUPED)[upd.weight_name]
        torch.testing.assert_close(tiny.values.double(), V, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close((w0 + tiny.delta.double()) @ K, V, atol=1e-4, rtol=1e-4)

        # apply + restore from weights_copy is exact, and nothing else moved
        _, weights_copy = apply_emmet_to_model(model, tok, REQUESTS, hp, return_orig_weights=True,
                                               context_templates=GROUPED)
        torch.testing.assert_close(w.detach().double() - w0, upd.delta.double(), atol=1e-6, rtol=1e-5)
        assert list(weights_copy) == [upd.weight_name]
        with torch.no_grad():
            for name, value in weights_copy.items():
                model.get_parameter(name).copy_(value)
        for k, v in model.state_dict().items():
            assert torch.equal(v, state0[k]), k
    finally:
        clear_second_moment_cache(model)


def test_emmet_identity_cov_matches_direct_solve(model, tok):
    from rep_easyedit.backends_extra.emmet import emmet_update, execute_emmet

    hp = emmet_hp(emmet_lambda=0.5)
    (upd,) = execute_emmet(model, tok, REQUESTS[:2], hp, context_templates=GROUPED).values()
    eye = torch.eye(128, dtype=torch.float64)
    torch.testing.assert_close(upd.delta.double(),
                               _emmet_reference(upd.residual, upd.keys, eye, 0.5), atol=1e-8, rtol=1e-6)
    # the pure function, with lambda = 0 and a singular (duplicated) batch: pseudo-inverse
    K = upd.keys.double()
    dup = torch.cat([K[:, :1], K[:, :1]], 1)
    R = torch.randn(64, 2, dtype=torch.float64)
    R[:, 1] = R[:, 0]
    d = emmet_update(R, dup, None, 0.0)
    torch.testing.assert_close(d @ dup, R, atol=1e-6, rtol=1e-5)


def test_emmet_two_layers_and_copy(model, tok):
    from rep_easyedit.backends_extra import apply_emmet_to_model

    hp = emmet_hp(layers=[1, 2], v_num_grad_steps=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    edited, wc = apply_emmet_to_model(model, tok, REQUESTS[:2], hp, copy=True,
                                      return_orig_weights=True, context_templates=GROUPED)
    assert edited is not model
    assert set(wc) == {"model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}
    for k, v in model.state_dict().items():  # copy=True leaves the original alone
        assert torch.equal(v, before[k])
    for name in wc:
        assert not torch.equal(edited.get_parameter(name), before[name])
        torch.testing.assert_close(wc[name], before[name], atol=0, rtol=0)
    # without return_orig_weights nothing is captured
    _, wc2 = apply_emmet_to_model(model, tok, REQUESTS[:1], emmet_hp(v_num_grad_steps=1),
                                  context_templates=GROUPED)
    assert wc2 == {}
