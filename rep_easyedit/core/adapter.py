"""The gated low-rank key adapter: k̂ = k + gate(k) · up(down(k)).

It knows nothing about where it is hooked in (see `pathway.py`). The math runs in float32 whatever
the model's dtype; the result is cast back at the boundary. With the hard gate (eval mode) a token
whose gate stays at or below τ keeps its key bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class GatedLowRankAdapter(nn.Module):
    def __init__(self, dim: int, rank: int = 32, gate_ratio: float = 0.1, tau: float = 0.9):
        super().__init__()
        if dim <= 0 or rank <= 0:
            raise ValueError(f"adapter needs dim > 0 and rank > 0, got dim={dim}, rank={rank}")
        if not 0.0 < tau < 1.0:
            raise ValueError(f"tau must lie in (0, 1), got {tau}")
        self.dim, self.rank, self.tau = dim, rank, float(tau)
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.up.weight)  # identity map at the start
        hidden = max(1, math.ceil(gate_ratio * dim))
        self.gate = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
        # Switch written by EasyEdit's restore of `weights_copy` (a parameter so that
        # `nethook.get_parameter` finds it); 0 turns the adapter off exactly.
        self.active = nn.Parameter(torch.ones((), dtype=torch.float32), requires_grad=False)

    def _apply(self, fn, recurse=True):
        # `model.to(dtype)` / `.half()` / `.bfloat16()` on a model carrying the pathway must not
        # cast the adapter: its math is float32 (and casting would lose its weights' bits). Device
        # moves still apply; a dtype change is dropped, the values kept exactly.
        def keep_float32(t):
            out = fn(t)
            if t.dtype == torch.float32 and out.dtype != torch.float32:
                return t.to(out.device)
            return out
        return super()._apply(keep_float32, recurse)

    def gate_prob(self, keys: torch.Tensor) -> torch.Tensor:
        """Per-token gate in [0, 1], shape (..., 1)."""
        return torch.sigmoid(self.gate(keys.float()))

    def delta(self, keys: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(keys.float()))

    def forward(self, keys: torch.Tensor, hard: bool | None = None) -> torch.Tensor:
        hard = (not self.training) if hard is None else hard
        if float(self.active) == 0.0:
            return keys
        k32 = keys.float()
        g = self.gate_prob(k32)
        if hard:
            fire = g > self.tau
            if not bool(fire.any()):
                return keys
            adapted = (k32 + self.delta(k32)).to(keys.dtype)
            return torch.where(fire, adapted, keys)
        return (k32 + g * self.delta(k32)).to(keys.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rank={self.rank}, tau={self.tau}"
