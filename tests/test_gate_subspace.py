"""`rep.gate_subspace`: the gate's first layer trains on keys projected onto their top directions."""

import dataclasses

import pytest
import torch

from rep_easyedit.core.config import REPConfig
from rep_easyedit.core.training import ProjectedGate, TrainingKeys, fresh_adapter, train_adapter


def _keys(seed=0, dim=96, n_pos=40, n_neg=512):
    g = torch.Generator().manual_seed(seed)
    k_star = 3 * torch.randn(dim, generator=g)
    pos = k_star + 2 * torch.randn(n_pos, dim, generator=g)
    neg = 3 * torch.randn(n_neg, dim, generator=g)
    hard = k_star * 0.3 + 3 * torch.randn(16, dim, generator=g)
    return TrainingKeys(pos, neg, k_star, hard_negatives=hard)


def test_the_written_back_gate_is_the_projected_one_on_full_keys():
    rep = REPConfig()
    adapter = fresh_adapter(96, rep.rank, rep, 0, "cpu")
    keys = _keys()
    basis = ProjectedGate.top_directions(torch.cat([keys.positives, keys.negatives]), 24, seed=0)
    assert basis.shape == (96, 24)
    assert torch.allclose(basis.T @ basis, torch.eye(24), atol=1e-5)  # orthonormal columns
    gate = ProjectedGate(adapter.gate, basis)
    with torch.no_grad():
        gate.first.weight.add_(torch.randn_like(gate.first.weight))  # as if trained
        probe = torch.randn(7, 96)
        wanted = gate(gate.project(probe))
        gate.write_back(adapter.gate)
        assert torch.allclose(adapter.gate(probe), wanted, atol=1e-5)
        # the full-width layer reads nothing outside the subspace
        outside = probe - probe @ basis @ basis.T
        assert torch.allclose(adapter.gate[0](outside), adapter.gate[0].bias.expand(7, -1), atol=1e-5)


@pytest.mark.parametrize("per_step", [0, 128])
def test_training_in_a_subspace_separates_and_reports_on_the_full_gate(per_step):
    keys = _keys(seed=1)
    # stop_plateau 1: the stop waits only for the gate to separate (read on the projected gate)
    rep = REPConfig(gate_subspace=16, negatives_per_step=per_step, stop_plateau=1.0)
    adapter = fresh_adapter(96, rep.rank, rep, 0, "cpu")
    before = adapter.gate[0].weight.detach().clone()
    report = train_adapter(adapter, keys, rep)
    assert report.gate_pos_fire >= 0.95 and report.gate_neg_fire <= 0.01
    assert report.steps < rep.steps  # the adaptive stop saw the separation
    w = adapter.gate[0].weight.detach()
    assert not torch.equal(w, before)
    assert torch.linalg.matrix_rank(w).item() <= 16  # trained inside the subspace
    # the report is the installed (full-width) gate's: recompute it
    with torch.no_grad():
        fire = adapter.gate_prob(keys.positives).squeeze(-1) > adapter.tau
    assert float(fire.float().mean()) == pytest.approx(report.gate_pos_fire)


def test_off_by_default_and_a_width_at_or_above_the_keys_is_the_full_gate():
    keys = _keys(seed=2)
    rep = REPConfig()
    assert rep.gate_subspace == 0
    full = fresh_adapter(96, rep.rank, rep, 0, "cpu")
    wide = fresh_adapter(96, rep.rank, rep, 0, "cpu")
    train_adapter(full, keys, rep)
    train_adapter(wide, keys, dataclasses.replace(rep, gate_subspace=96))
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), wide.state_dict().values()))


def test_a_negative_width_is_refused():
    with pytest.raises(ValueError, match="gate_subspace"):
        REPConfig(gate_subspace=-1).check()
