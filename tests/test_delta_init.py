"""`rep.delta_init: least_squares`: the adapter's map starts at the rank-r fit of the match losses."""

import dataclasses

import pytest
import torch

from rep_easyedit.core.config import REPConfig
from rep_easyedit.core.delta_init import least_squares_delta
from rep_easyedit.core.training import TrainingKeys, fresh_adapter, train_adapter


def _keys(seed=0, dim=96, n_pos=40, n_neg=512):
    g = torch.Generator().manual_seed(seed)
    k_star = 3 * torch.randn(dim, generator=g)
    shared = torch.randn(1, dim, generator=g)  # what the variants share apart from k*
    pos = k_star + 2 * torch.randn(n_pos, dim, generator=g) + shared
    neg = 3 * torch.randn(n_neg, dim, generator=g)
    return TrainingKeys(pos, neg, k_star)


def test_the_start_is_the_reduced_rank_ridge_solution():
    """Against the D × D solution written out: ridge, then projected on the top-r fitted directions."""
    keys = _keys()
    pos, k_star = keys.positives.double(), keys.target.double().unsqueeze(0)
    alpha, rank, ridge = 0.7, 8, 1e-2
    down, up = least_squares_delta(pos, k_star.expand_as(pos), k_star, alpha, rank, ridge)

    x = torch.cat([pos, k_star])
    y = torch.cat([k_star - pos, torch.zeros_like(k_star)])
    w = torch.cat([torch.full((len(pos),), 1 / len(pos)), torch.tensor([alpha])]).double()
    lam = ridge * float((w.unsqueeze(-1) * x * x).sum()) / len(x)
    m = torch.linalg.solve(x.T @ (w.unsqueeze(-1) * x) + lam * torch.eye(x.shape[1], dtype=x.dtype),
                           x.T @ (w.unsqueeze(-1) * y))
    _, _, vh = torch.linalg.svd(w.sqrt().unsqueeze(-1) * (x @ m))
    m_r = m @ vh[:rank].T @ vh[:rank]
    probe = torch.randn(5, x.shape[1], dtype=x.dtype)
    assert torch.allclose(probe @ down.T @ up.T, probe @ m_r, atol=1e-8, rtol=1e-6)


def test_the_start_already_sits_where_training_from_identity_ends():
    keys = _keys()
    rep = REPConfig(delta_init="least_squares")
    adapter = fresh_adapter(keys.positives.shape[-1], rep.rank, rep, 0, "cpu")
    identity = train_adapter(fresh_adapter(keys.positives.shape[-1], rep.rank, rep, 0, "cpu"), keys,
                             dataclasses.replace(rep, delta_init="identity"))
    with torch.no_grad():
        down, up = least_squares_delta(keys.positives, keys.target.expand_as(keys.positives),
                                       keys.edit_keys(), rep.alpha, rep.rank, rep.delta_init_ridge)
        adapter.down.weight.copy_(down)
        adapter.up.weight.copy_(up)
        start = ((keys.positives + adapter.delta(keys.positives) - keys.target) ** 2).sum(-1).mean() \
            / keys.target.pow(2).sum()
    assert float(start) <= identity.aggregation * 1.01


def test_a_solved_map_stays_solved_and_training_stops_sooner_at_least_as_close():
    keys = _keys(seed=1)
    reports, adapters = {}, {}
    for init in ("identity", "least_squares"):
        rep = REPConfig(delta_init=init)
        adapters[init] = fresh_adapter(keys.positives.shape[-1], rep.rank, rep, 0, "cpu")
        reports[init] = train_adapter(adapters[init], keys, rep)
    fast, slow = reports["least_squares"], reports["identity"]
    assert fast.steps < slow.steps
    assert fast.distance_after <= slow.distance_after + 1e-3
    assert fast.gate_pos_fire >= 0.95 and fast.gate_neg_fire <= 0.01
    down, up = least_squares_delta(keys.positives, keys.target.expand_as(keys.positives), keys.edit_keys(),
                                   1.0, 32, 1e-2)
    assert torch.equal(adapters["least_squares"].down.weight, down)  # only the gate was trained
    assert torch.equal(adapters["least_squares"].up.weight, up)


def test_a_solved_map_without_gate_training_takes_no_step():
    keys = _keys()
    rep = REPConfig(delta_init="least_squares", gate_weight=0.0)
    adapter = fresh_adapter(keys.positives.shape[-1], rep.rank, rep, 0, "cpu")
    report = train_adapter(adapter, keys, rep)
    with torch.no_grad():
        moved = (keys.positives + adapter.delta(keys.positives) - keys.target).norm(dim=-1).mean()
    assert report.steps == 0
    assert moved < 0.9 * (keys.positives - keys.target).norm(dim=-1).mean()  # the map is there all the same


def test_fewer_rows_than_the_rank_leave_the_spare_directions_zero():
    keys = _keys(n_pos=3)
    down, up = least_squares_delta(keys.positives, keys.target.expand_as(keys.positives),
                                   keys.edit_keys(), 1.0, 32, 1e-2)
    assert down.shape == (32, 96) and up.shape == (96, 32)
    assert down[4:].abs().max() == 0 and up[:, 4:].abs().max() == 0


@pytest.mark.parametrize("fields, message", [
    ({"delta_init": "zeros"}, "use 'identity' or 'least_squares'"),
    ({"delta_init": "least_squares", "aggregation": "cosine"}, "with aggregation 'cosine'"),
    ({"delta_init_ridge": 0.0}, "delta_init_ridge must be > 0"),
])
def test_bad_settings_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        REPConfig(**fields).check()
