"""`rep.kin_mine` / `rep.answer_mine`: only the candidate hard negatives (kin names, answer tokens) the gate
would fire on stay as its hard negatives."""

import dataclasses

import torch

from rep_easyedit.core.config import REPConfig
from rep_easyedit.core.training import TrainingKeys, fresh_adapter, train_adapter
from rep_easyedit.rep_main import train_with_mined_negatives

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


def _first_run(keys, hard, rep, make):
    """The first adapter's report, trained with `hard` as its hard negatives, and where its gate fires
    among all of `keys.hard_negatives`."""
    first = make()
    report = train_adapter(first, dataclasses.replace(keys, hard_negatives=hard), rep)
    with torch.no_grad():
        return report, first.gate_prob(keys.hard_negatives).squeeze(-1) > first.tau


def test_the_kept_names_are_those_the_gate_fires_on_and_a_fresh_adapter_trains_on_them():
    keys = _keys()
    rep = REPConfig(kin_negatives=8, kin_mine=True)
    make = lambda: fresh_adapter(DIM, rep.rank, rep, 7, "cpu")  # noqa: E731
    adapter, report = train_with_mined_negatives(keys, rep, make)

    first_report, fired = _first_run(keys, None, rep, make)
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
    adapter, _ = train_with_mined_negatives(keys, rep, make)
    alone = make()
    train_adapter(alone, dataclasses.replace(keys, hard_negatives=None), rep)
    assert _same(adapter, alone)

    off = dataclasses.replace(rep, kin_mine=False)
    adapter, _ = train_with_mined_negatives(keys, off, make)
    every = make()
    train_adapter(every, keys, off)
    assert _same(adapter, every)


def test_answer_tokens_and_kin_names_are_mined_together_and_other_hard_negatives_always_stay():
    """Hard negatives laid out as [other, answer tokens, kin names]: one first adapter trains on the
    others alone; the candidates of both groups it fires on join them, in place, for the second."""
    g = torch.Generator().manual_seed(1)
    base = _keys()
    k_star = base.target
    other = -k_star + torch.randn(2, DIM, generator=g)
    answer = torch.cat([k_star + torch.randn(2, DIM, generator=g), -k_star + torch.randn(3, DIM, generator=g)])
    keys = dataclasses.replace(base, hard_negatives=torch.cat([other, answer, base.hard_negatives]),
                               answer_rows=5, kin_rows=8)
    rep = REPConfig(kin_negatives=8, kin_mine=True, answer_negatives=True, answer_mine=True)
    make = lambda: fresh_adapter(DIM, rep.rank, rep, 7, "cpu")  # noqa: E731
    adapter, report = train_with_mined_negatives(keys, rep, make)

    first_report, fired = _first_run(keys, other, rep, make)
    assert fired[2:4].any() and fired[7:10].any()  # candidates on the subject's side fire
    expected = make()
    keep = fired.clone()
    keep[:2] = True
    second = train_adapter(expected, dataclasses.replace(keys, hard_negatives=keys.hard_negatives[keep]), rep)
    assert _same(adapter, expected)
    assert report.steps == first_report.steps + second.steps

    # answer tokens not mined: all of them are ordinary hard negatives, in both runs
    rep = dataclasses.replace(rep, answer_mine=False)
    adapter, _ = train_with_mined_negatives(keys, rep, make)
    first = make()
    train_adapter(first, dataclasses.replace(keys, hard_negatives=keys.hard_negatives[:7]), rep)
    with torch.no_grad():
        fired_kin = first.gate_prob(keys.hard_negatives[7:]).squeeze(-1) > first.tau
    expected = make()
    train_adapter(expected, dataclasses.replace(
        keys, hard_negatives=torch.cat([keys.hard_negatives[:7], keys.hard_negatives[7:][fired_kin]])), rep)
    assert _same(adapter, expected)
