"""Training one adapter on cached keys: aggregation, consistency and gate losses.

Keys are collected once, without gradients (`keys.collect_keys`); every step then runs only the
adapter on those cached keys, which is why REP adds little to an edit's cost.

Losses (see docs/design.md "The method, step by step"):
- aggregation, ``match`` (default): ‖k_s + Δ(k_s) − k*‖² / ‖k*‖², pulls each trained variant's
  key onto the edit key, bounded (no overshoot); ``cosine``: the paper's −⟨k̂_s/‖k̂_s‖, C⁻¹k*/‖C⁻¹k*‖⟩
  (signed; ``abs`` optional), in the whitened geometry when an inverse covariance is given.
- consistency: ‖Δ(k*)‖² / ‖k*‖² keeps the edit's own key where it is (α weights it).
- gate: balanced BCE, positives at the subject's last token of trained texts, negatives at every
  other token of those texts and at tokens of unrelated text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .adapter import GatedLowRankAdapter
from .delta_init import least_squares_delta

STOP_CHECK_EVERY = 10  # steps between adaptive-stop checks (each costs one host-device sync)


@dataclass
class TrainingKeys:
    positives: torch.Tensor      # [P, D] keys at the subject's last token of trained variants
    negatives: torch.Tensor      # [N, D] keys the gate must not fire on
    target: torch.Tensor         # [D] the edit key k*, or [P, D]: each positive's own (merged adapters)
    target_whitened: torch.Tensor | None = None  # C⁻¹k* where covariance is used, shaped as target
    collection: dict | None = None  # what collecting them cost: texts, forwards, tokens, padded tokens
    hard_negatives: torch.Tensor | None = None  # [H, D] negatives weighted as a group of their own
    kin_rows: int = 0  # how many of the hard negatives, at the end, are names of the subject's kind
    answer_rows: int = 0  # how many, just before those, are the answer's tokens (rep.answer_negatives)

    def edit_keys(self) -> torch.Tensor:
        """[G, D]: the distinct edit keys, which the consistency loss keeps in place."""
        return self.target.unsqueeze(0) if self.target.dim() == 1 else torch.unique(self.target, dim=0)


@dataclass
class TrainingReport:
    steps: int
    loss: float
    aggregation: float
    consistency: float
    gate: float
    gate_pos_fire: float   # share of positives with gate > τ after training
    gate_neg_fire: float   # share of negatives with gate > τ after training
    activation: float      # mean (k̂_s·k*)/(k*·k*) over positives with the hard gate
    distance_before: float = 0.0  # mean ‖k_s − k*‖/‖k*‖ of the positives before training
    distance_after: float = 0.0   # the same with the trained adapter (hard gate)
    gate_hard_fire: float | None = None  # share of hard negatives (rep.sibling_/partial_negatives) that fire
    negatives_kept: float | None = None  # rep.screen_negatives: mean share of negatives in the gate loss per step
    seconds_keys: float = 0.0
    seconds_train: float = 0.0
    seconds_per_step: float = 0.0
    collection: dict | None = None


def aggregation_loss(adapted: torch.Tensor, keys: TrainingKeys, kind: str, use_abs: bool) -> torch.Tensor:
    if kind == "match":
        return ((adapted - keys.target) ** 2).sum(-1).mean() / keys.target.pow(2).sum(-1).mean()
    if kind == "cosine":
        direction = keys.target_whitened if keys.target_whitened is not None else keys.target
        sim = (F.normalize(adapted, dim=-1) * F.normalize(direction, dim=-1)).sum(-1)
        return -(sim.abs() if use_abs else sim).mean()
    raise ValueError(f"unknown aggregation {kind!r}: use 'match' or 'cosine'")


def relative_distance(keys: torch.Tensor, target: torch.Tensor) -> float:
    """Mean ‖k − target‖ / ‖target‖ over keys (target: [D] or one row per key)."""
    if len(keys) == 0:
        return 0.0
    return float(((keys - target).norm(dim=-1) / target.norm(dim=-1).clamp_min(1e-12)).mean())


def fire_shares(adapter: GatedLowRankAdapter, pos: torch.Tensor, neg: torch.Tensor) -> tuple[float, float]:
    """Shares of positives and of negatives where the hard gate fires (gate > τ)."""
    with torch.no_grad():
        fire = (adapter.gate_prob(torch.cat([pos, neg])).squeeze(-1) > adapter.tau).float()
        shares = torch.stack([fire[:len(pos)].mean(), fire[len(pos):].mean() if len(neg) else fire.new_zeros(())])
        pos_fire, neg_fire = shares.tolist()  # one host sync
    return pos_fire, neg_fire


def _require_finite(loss: torch.Tensor) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"REP adapter training diverged (loss={loss.item()}); "
                                 f"lower `rep.lr` or `rep.alpha`")


def fresh_adapter(dim: int, rank: int, rep, seed: int, device) -> GatedLowRankAdapter:
    """An untrained adapter with `rep`'s gate, its initial weights drawn from `seed` alone (the global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = GatedLowRankAdapter(dim, rank, rep.gate_ratio, rep.tau)
    return adapter.to(device)


def freeze(adapter: GatedLowRankAdapter) -> GatedLowRankAdapter:
    """A trained adapter's parameters out of autograd (an installed adapter never trains again)."""
    for p in adapter.parameters():
        p.requires_grad_(False)
    return adapter


def train_adapter(adapter: GatedLowRankAdapter, keys: TrainingKeys, rep,
                  steps: int | None = None) -> TrainingReport:
    """Full-batch Adam on cached keys (float32, on the adapter's device), settings from `rep`.

    `rep` is the whole `REPConfig` (rank and gate are the adapter's). Training stops adaptively
    (`rep.adaptive_stop`): checked every `STOP_CHECK_EVERY` steps from `rep.min_steps` on, it stops once
    (a) the held-in keys are on their target: the aggregation loss improved by less than
    `rep.stop_plateau` (relative) over the last check window, and (b) the hard gate separates:
    at least `rep.stop_pos_fire` of the positives fire and at most `rep.stop_neg_fire` of the
    negatives. `steps` (default `rep.steps`) is the cap; the steps used are reported.
    With `rep.negatives_per_step` > 0 each step's gate loss sees a fresh sample of that many negatives
    (drawn from `rep.seed`; hard negatives every step); the stop and the report check all of them.
    Otherwise, with `rep.screen_negatives` > 0, each 10-step window after the first leaves out of the
    gate loss the negatives whose gate probability is below it (re-checked every window). With
    `rep.stop_distance` > 0 (`match`), keys within that relative distance of k* count as on target
    even while the loss still falls.
    """
    cap = rep.steps if steps is None else steps
    device = next(adapter.parameters()).device
    pos = keys.positives.to(device, torch.float32)
    neg = keys.negatives.to(device, torch.float32)
    hard_neg = None if keys.hard_negatives is None or not len(keys.hard_negatives) \
        else keys.hard_negatives.to(device, torch.float32)
    n_neg = len(neg)
    target = TrainingKeys(pos, neg, keys.target.to(device, torch.float32),
                          None if keys.target_whitened is None else keys.target_whitened.to(device, torch.float32))
    k_star = target.edit_keys()
    # rep.delta_init: least_squares solves the map (the match losses' rank-r fit) instead of training
    # it; Adam would only knock it off that fit (each first step moves every weight by ~lr) and walk back
    solved = rep.delta_init == "least_squares" and len(pos) > 0
    with torch.no_grad():
        distance_before = relative_distance(pos, target.target)
        if solved:
            down, up = least_squares_delta(pos, target.target.expand_as(pos), k_star, rep.alpha,
                                           adapter.rank, rep.delta_init_ridge)
            adapter.down.weight.copy_(down)
            adapter.up.weight.copy_(up)
    map_weights = {id(adapter.down.weight), id(adapter.up.weight)} if solved else set()
    params = [p for p in adapter.parameters() if p.requires_grad and id(p) not in map_weights]
    if solved and not rep.gate_weight > 0:
        cap = 0  # nothing left to train
    opt = torch.optim.Adam(params, lr=rep.lr) if params else None
    # fused per step: one delta over [positives; k*] (and the negatives, with negative_delta_weight),
    # one gate over [positives; negatives]
    n_pos = len(pos)
    n_fit = n_pos + len(k_star)  # rows of the delta the aggregation and consistency losses read
    k_star_norm = k_star.pow(2).sum(-1).mean()
    use_gate = rep.gate_weight > 0
    hard_rows = [hard_neg] if hard_neg is not None else []  # every step, as a group of their own
    hard_zeros = torch.zeros(len(hard_neg), device=device) if hard_neg is not None else None
    stop_neg = neg if hard_neg is None else torch.cat([neg, hard_neg])
    # keep the negatives' keys in place (a constant when the map is solved: nothing to train)
    still = rep.negative_delta_weight > 0 and len(neg) > 0 and not solved
    ones = torch.ones(n_pos, device=device)
    # a fresh sample of the negatives each step (rep.negatives_per_step), drawn on the device
    per_step = rep.negatives_per_step if use_gate and 0 < rep.negatives_per_step < n_neg else 0
    gate_in = torch.cat([pos, neg, *hard_rows]) if use_gate and not per_step else None
    delta_in = torch.cat([pos, k_star, stop_neg] if still and not per_step else [pos, k_star])
    if solved:  # the map is not trained: its Δ over [positives; k*] is computed once
        with torch.no_grad():
            fixed_delta = adapter.delta(delta_in)
    if per_step:
        sampler = torch.Generator(device=device).manual_seed(rep.seed)
        n_neg = per_step
    zeros = torch.zeros(n_neg, device=device)  # labels of every negative in the gate loss (a prefix when screened)
    # rep.screen_negatives: each window's gate loss leaves out the negatives whose gate probability is
    # already below `screen` (a negative's BCE gradient is its gate probability, so each left-out one
    # would move the step by less than `screen` over the number of negatives); the sum divides by all
    screen = rep.screen_negatives if use_gate and not per_step and n_neg else 0.0
    adapter.train()
    loss = agg = cons = gate = torch.zeros((), device=device)
    window_start = None
    used = 0
    kept_rows = 0  # negatives in the gate loss, summed over steps (rep.screen_negatives' report)
    for step in range(cap):
        opt.zero_grad(set_to_none=True)
        if screen and step % STOP_CHECK_EVERY == 0 and step:  # one host sync, at the stop check's step
            with torch.no_grad():
                kept = (adapter.gate_prob(neg).squeeze(-1) >= screen).nonzero().squeeze(-1)
            gate_in = torch.cat([pos, neg[kept], *hard_rows])
            n_neg = len(kept)
        if per_step:
            sampled = neg[torch.randperm(len(neg), generator=sampler, device=device)[:per_step]]
            gate_in = torch.cat([pos, sampled, *hard_rows])
        step_in = torch.cat([delta_in, sampled, *hard_rows]) if still and per_step else delta_in
        delta = fixed_delta if solved else adapter.delta(step_in)
        agg = aggregation_loss(pos + delta[:n_pos], target, rep.aggregation, rep.aggregation_abs)
        cons = delta[n_pos:n_fit].pow(2).sum(-1).mean() / k_star_norm
        if use_gate:
            logits = adapter.gate(gate_in).squeeze(-1)
            gate = F.binary_cross_entropy_with_logits(logits[:n_pos], ones)
            if screen:  # the kept negatives' BCE summed, over all negatives (the left-out add ~0)
                gate = gate + F.binary_cross_entropy_with_logits(
                    logits[n_pos:n_pos + n_neg], zeros[:n_neg], reduction="sum") / len(neg)
            elif n_neg:
                gate = gate + F.binary_cross_entropy_with_logits(logits[n_pos:n_pos + n_neg], zeros)
            if hard_neg is not None:  # a group as heavy as all other negatives together
                gate = gate + F.binary_cross_entropy_with_logits(logits[n_pos + n_neg:], hard_zeros)
        else:
            gate = torch.zeros((), device=device)
        loss = agg + rep.alpha * cons + rep.gate_weight * gate
        if still:
            loss = loss + rep.negative_delta_weight * delta[n_fit:].pow(2).sum(-1).mean() / k_star_norm
        if step % STOP_CHECK_EVERY == 0:  # one host sync per window, none in between
            finite, now = torch.stack([torch.isfinite(loss).float(), agg.detach()]).tolist()
            if not finite:
                _require_finite(loss)
            if rep.adaptive_stop and step >= max(rep.min_steps, STOP_CHECK_EVERY) and window_start is not None:
                plateau = (window_start - now) <= rep.stop_plateau * abs(window_start) or \
                    (rep.aggregation == "match" and now <= rep.stop_distance ** 2)
                if plateau:
                    pos_fire, neg_fire = fire_shares(adapter, pos, stop_neg)
                    if pos_fire >= rep.stop_pos_fire and neg_fire <= rep.stop_neg_fire:
                        break
            window_start = now
        loss.backward()
        opt.step()
        used = step + 1
        kept_rows += n_neg
    _require_finite(loss)
    adapter.eval()
    loss, agg, cons, gate = (t.detach() for t in (loss, agg, cons, gate))
    pos_fire, neg_fire = fire_shares(adapter, pos, neg)
    hard_fire = None if hard_neg is None else fire_shares(adapter, hard_neg, pos[:0])[0]
    with torch.no_grad():
        hard = adapter(pos, hard=True)
        activation = ((hard * target.target).sum(-1) / target.target.pow(2).sum(-1)).mean().item()
        distance_after = relative_distance(hard, target.target)
    return TrainingReport(
        steps=used, loss=loss.item(), aggregation=agg.item(), consistency=cons.item(),
        gate=gate.item(), gate_pos_fire=pos_fire, gate_neg_fire=neg_fire, activation=activation, distance_before=distance_before, distance_after=distance_after,
        gate_hard_fire=hard_fire, negatives_kept=kept_rows / (used * len(neg)) if screen and used else None)
