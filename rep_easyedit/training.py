"""Training one adapter on cached keys: aggregation, consistency and gate losses.

Keys are collected once, without gradients (`keys.collect_keys`); every step then runs only the
adapter on those cached keys, which is why REP adds little to an edit's cost.

Losses (see README "Method"):
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


@dataclass
class TrainingKeys:
    positives: torch.Tensor      # [P, D] keys at the subject's last token of trained variants
    negatives: torch.Tensor      # [N, D] keys the gate must not fire on
    target: torch.Tensor         # [D] the edit key k*, or [P, D]: each positive's own (merged adapters)
    target_whitened: torch.Tensor | None = None  # C⁻¹k* where covariance is used, shaped as target

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
    seconds_keys: float = 0.0
    seconds_train: float = 0.0


def aggregation_loss(adapted: torch.Tensor, keys: TrainingKeys, kind: str, use_abs: bool) -> torch.Tensor:
    if kind == "match":
        return ((adapted - keys.target) ** 2).sum(-1).mean() / keys.target.pow(2).sum(-1).mean()
    if kind == "cosine":
        direction = keys.target_whitened if keys.target_whitened is not None else keys.target
        sim = (F.normalize(adapted, dim=-1) * F.normalize(direction, dim=-1)).sum(-1)
        return -(sim.abs() if use_abs else sim).mean()
    raise ValueError(f"unknown aggregation {kind!r}: use 'match' or 'cosine'")


def train_adapter(adapter: GatedLowRankAdapter, keys: TrainingKeys, *, steps: int, lr: float,
                  alpha: float, gate_weight: float, aggregation: str = "match",
                  use_abs: bool = False) -> TrainingReport:
    """Full-batch Adam on cached keys (float32, on the adapter's device)."""
    device = next(adapter.parameters()).device
    pos = keys.positives.to(device, torch.float32)
    neg = keys.negatives.to(device, torch.float32)
    target = TrainingKeys(pos, neg, keys.target.to(device, torch.float32),
                          None if keys.target_whitened is None else keys.target_whitened.to(device, torch.float32))
    k_star = target.edit_keys()
    params = [p for p in adapter.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    adapter.train()
    loss = agg = cons = gate = torch.zeros(())
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        agg = aggregation_loss(pos + adapter.delta(pos), target, aggregation, use_abs)
        cons = adapter.delta(k_star).pow(2).sum(-1).mean() / k_star.pow(2).sum(-1).mean()
        if gate_weight > 0:
            logits_pos = adapter.gate(pos).squeeze(-1)
            logits_neg = adapter.gate(neg).squeeze(-1) if len(neg) else logits_pos[:0]
            gate = F.binary_cross_entropy_with_logits(logits_pos, torch.ones_like(logits_pos))
            if len(neg):
                gate = gate + F.binary_cross_entropy_with_logits(logits_neg, torch.zeros_like(logits_neg))
        else:
            gate = torch.zeros((), device=device)
        loss = agg + alpha * cons + gate_weight * gate
        if not torch.isfinite(loss):
            raise FloatingPointError(f"REP adapter training diverged (loss={loss.item()}); "
                                     f"lower `rep.lr` or `rep.alpha`")
        loss.backward()
        opt.step()
    adapter.eval()
    loss, agg, cons, gate = (t.detach() for t in (loss, agg, cons, gate))
    with torch.no_grad():
        g_pos = adapter.gate_prob(pos).squeeze(-1)
        g_neg = adapter.gate_prob(neg).squeeze(-1) if len(neg) else g_pos[:0]
        hard = adapter(pos, hard=True)
        activation = ((hard * target.target).sum(-1) / target.target.pow(2).sum(-1)).mean().item()
    return TrainingReport(
        steps=steps, loss=loss.item(), aggregation=agg.item(), consistency=cons.item(),
        gate=gate.item(), gate_pos_fire=float((g_pos > adapter.tau).float().mean()),
        gate_neg_fire=float((g_neg > adapter.tau).float().mean()) if len(g_neg) else 0.0,
        activation=activation)
