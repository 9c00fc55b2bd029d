"""AlphaEdit (rep_easyedit.backends_extra.alphaedit) against its equations, on a tiny random LLaMA."""

from __future__ import annotations

import pytest
import torch

from test_backends_extra import GROUPED, LAYER, REQUESTS, _common

DIM = 128  # the tiny LLaMA's MLP width (down_proj input)


@pytest.fixture()
def model(tiny_model):
    from rep_easyedit.backends_extra import clear_second_moment_cache
    from rep_easyedit.backends_extra.alphaedit import reset_history

    yield tiny_model
    clear_second_moment_cache(tiny_model)
    reset_history(tiny_model)


def alphaedit_hp(**over):
    from rep_easyedit.backends_extra import AlphaEditHyperParams

    kw = _common(alg_name="AlphaEdit", layer_selection="all", mom2_update_weight=1.0,
                 nullspace_threshold=1e-3, L2=1e-7)  # tiny keys: |k| ~ 0.1
    kw.update(over)
    return AlphaEditHyperParams(**kw)


def low_rank_moment(rank: int, seed: int = 3):
    """E[k kᵀ] of keys confined to a `rank`-dimensional subspace (its basis returned too)."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(DIM, rank, generator=g, dtype=torch.float64))
    scales = torch.rand(rank, generator=g, dtype=torch.float64) + 0.5
    return basis @ torch.diag(scales) @ basis.T, basis


def test_projector_is_the_null_space_of_the_moment():
    from rep_easyedit.backends_extra.alphaedit import null_space_projector

    moment, basis = low_rank_moment(40)
    p = null_space_projector(moment, 1e-6)
    torch.testing.assert_close(p @ p, p, atol=1e-10, rtol=0)          # a projector
    assert round(p.trace().item()) == DIM - 40                       # of the right rank
    assert (p @ basis).abs().max() < 1e-10                           # that kills preserved keys


def test_update_leaves_preserved_keys_and_writes_the_edit(model, tokenizer):
    from rep_easyedit.backends_extra import apply_AlphaEdit_to_model, seed_second_moment
    from rep_easyedit.backends_extra.alphaedit import execute_alphaedit

    moment, basis = low_rank_moment(40)
    hp = alphaedit_hp()
    seed_second_moment(model, hp, LAYER, moment)
    w = model.model.layers[LAYER].mlp.down_proj.weight
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    (upd,) = execute_alphaedit(model, tokenizer, REQUESTS, hp, context_templates=GROUPED).values()
    assert all(torch.equal(v, state0[k]) for k, v in model.state_dict().items())  # not applied yet

    preserved = basis @ torch.randn(40, 50, dtype=torch.float64)     # any key the moment spans
    rel = (upd.delta.double() @ preserved).norm() / (upd.delta.double().norm() * preserved.norm())
    assert rel < 1e-6                                                # (an unprojected update: ~0.1)
    # the edit is written (α small): (W + Δ) K1 reaches V1 where K1 leaves the preserved space
    w0 = w.detach().double()
    miss = ((w0 + upd.delta.double()) @ upd.keys.double() - upd.values.double()).norm()
    assert miss < 1e-2 * upd.residual.double().norm()

    _, weights_copy = apply_AlphaEdit_to_model(model, tokenizer, REQUESTS, hp, return_orig_weights=True,
                                               context_templates=GROUPED)
    assert list(weights_copy) == [upd.weight_name]
    with torch.no_grad():
        for name, value in weights_copy.items():
            model.get_parameter(name).copy_(value)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state0[k]), k                          # exact restore


def test_cumulative_term_keeps_earlier_edits_and_forgets_restored_ones(model, tokenizer):
    from rep_easyedit.backends_extra import apply_AlphaEdit_to_model, seed_second_moment
    from rep_easyedit.backends_extra.alphaedit import edited_keys
    from rep_easyedit.backends_extra.common import edited_weight

    moment, _ = low_rank_moment(40)
    hp = alphaedit_hp()
    seed_second_moment(model, hp, LAYER, moment)
    w = edited_weight(model, hp, LAYER)

    _, first_copy = apply_AlphaEdit_to_model(model, tokenizer, REQUESTS[:1], hp, return_orig_weights=True,
                                             context_templates=GROUPED)
    (k1,) = edited_keys(model, w)
    out1 = w.output(k1.float())
    apply_AlphaEdit_to_model(model, tokenizer, REQUESTS[1:], hp, context_templates=GROUPED)
    assert len(edited_keys(model, w)) == 2
    # the second edit leaves the first edit's key where it was (within the ridge term's reach)
    drift = (w.output(k1.float()) - out1).norm() / out1.norm()
    assert drift < 1e-2

    # restoring the weights to before the first edit (as the editor does) drops both records
    with torch.no_grad():
        for name, value in first_copy.items():
            model.get_parameter(name).copy_(value)
    assert edited_keys(model, w) == []


def test_alphaedit_errors_name_the_fix(model, tokenizer):
    from rep_easyedit.backends_extra import apply_AlphaEdit_to_model, seed_second_moment

    seed_second_moment(model, alphaedit_hp(), LAYER, torch.eye(DIM, dtype=torch.float64))
    with pytest.raises(ValueError, match="raise nullspace_threshold"):
        apply_AlphaEdit_to_model(model, tokenizer, REQUESTS[:1], alphaedit_hp(), context_templates=GROUPED)
    with pytest.raises(ValueError, match="L2 must be > 0"):
        apply_AlphaEdit_to_model(model, tokenizer, REQUESTS[:1], alphaedit_hp(L2=0.0, nullspace_threshold=2.0),
                                 context_templates=GROUPED)


def test_alphaedit_registered_only_where_missing():
    from rep_easyedit.backends_extra import apply_AlphaEdit_to_model
    from rep_easyedit.compat.easyedit import installed_algorithm
    import rep_easyedit

    assert "REP-AlphaEdit" in rep_easyedit.register()
    fn = installed_algorithm("AlphaEdit")
    assert fn is not None
    # ours where the installed EasyEdit has none, upstream's own where it has one
    assert (fn is apply_AlphaEdit_to_model) == (fn.__module__.startswith("rep_easyedit"))
