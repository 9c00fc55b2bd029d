"""`rep.kin_mine`: only the kin names the gate would fire on stay as its hard negatives."""

import dataclasses

import torch

from rep_easyedit.core.config import REPConfig
from rep_easyedit.core.training import TrainingKeys, fresh_adapter, train_adapter
from rep_easyedit.rep_main import train_with_mined_kin

DIM = 64


def _keys(seed=0):
    g = torch.Generator().manual_seed(seed)
    k_star = 3 * torch.randn(DIM, generator=g)
    pos = k_star + torch.randn(40, DIM, generator=g)
    neg = 3 * torch.randn(400, DIM, generator=g)
    near = k_star + torch.randn(3, DIM, generator=g)      # kin names the gate would take for the subject
    far = -k_star + torch.randn(5, DIM, generator=g)      # kin names it rejects anyway
    return TrainingKeys(pos, neg, k_star, hard_negatives=torch.cat([near, far]), kin_rows=8)


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_kept_names_are_those_the_gate_fires_on_and_a_fresh_adapter_trains_on_them():
    keys = _keys()
    rep = REPConfig(kin_negatives=8, kin_mine=True)
    make = lambda: fresh_adapter(DIM, rep.rank, rep, 7, "cpu")  # noqa: E731
    adapter, report = train_with_mined_kin(keys, rep, make)

    first = make()
    first_report = train_adapter(first, dataclasses.replace(keys, hard_negatives=None), rep)
    with torch.no_grad():
        fired = first.gate_prob(keys.hard_negatives).squeeze(-1) > first.tau
    assert fired[:3].any() and not fired[3:].any()
    expected = make()
    second = train_adapter(expected, dataclasses.replace(keys, hard_negatives=keys.hard_negatives[fired]), rep)
    assert _same(adapter, expected)
    assert report.steps == first_report.steps + second.steps


def test_no_name_fires_keeps_the_first_adapter_and_off_trains_on_every_name():
    keys = _keys()
    keys = dataclasses.replace(keys, hard_negatives=keys.hard_negatives[3:], kin_rows=5)
    rep = REPConfig(kin_negatives=5, kin_mine=True)
    make = lambda: fresh_adapter(DIM, rep.rank, rep, 7, "cpu")  # noqa: E731
    adapter, _ = train_with_mined_kin(keys, rep, make)
    alone = make()
    train_adapter(alone, dataclasses.replace(keys, hard_negatives=None), rep)
    assert _same(adapter, alone)

    off = dataclasses.replace(rep, kin_mine=False)
    adapter, _ = train_with_mined_kin(keys, off, make)
    every = make()
    train_adapter(every, keys, off)
    assert _same(adapter, every)
