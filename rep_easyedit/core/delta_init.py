"""The adapter's low-rank map solved where the `match` losses put it: a rank-r least-squares fit.

With `aggregation: match` the adapter's map Δ(k) = up(down(k)) is asked to send every trained
variant's key onto its target (Δ(k_s) = k* − k_s) and to leave the edit key where it is
(Δ(k*) = 0, weight α). Without the gate those two losses are one weighted linear least-squares
problem in the product M = downᵀ·upᵀ, so Adam spends most of its steps walking to an answer that
can be written down (`rep.delta_init: least_squares`): the ridge solution in its dual form (n × n,
n = positives + edit keys, whatever the key width), cut to rank r by reduced-rank regression (the
top r right singular vectors of the weighted fitted values), and split into the two factors.
Training then teaches only the gate: the map is solved, not trained (Adam's first steps, each
moving every weight by about the learning rate, would knock it off the fit and spend the steps
walking back; measured in docs/results.md "Solving the map instead of training it").
"""

from __future__ import annotations

import torch


def least_squares_delta(positives: torch.Tensor, targets: torch.Tensor, edit_keys: torch.Tensor,
                        alpha: float, rank: int, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(down [r, D], up [D, r]) minimising the `match` aggregation + α · consistency losses + ridge.

    positives [P, D], targets [P, D] (one target per positive), edit_keys [G, D]; float32.
    `ridge` is relative: λ = ridge × the mean weighted squared key norm, so it does not depend on
    the keys' scale. The rows weigh as the losses do: each positive 1/P, each edit key α/G.
    """
    x = torch.cat([positives, edit_keys])
    y = torch.cat([targets - positives, torch.zeros_like(edit_keys)])
    p, g = len(positives), len(edit_keys)
    w = torch.cat([positives.new_full((p,), 1.0 / p), positives.new_full((g,), alpha / g if g else 0.0)])
    sw = w.sqrt().unsqueeze(-1)
    xw, yw = x * sw, y * sw
    gram = xw @ xw.T                                     # [n, n]
    lam = ridge * float(gram.diagonal().sum()) / len(x)
    dual = torch.linalg.solve(gram + lam * torch.eye(len(x), dtype=x.dtype, device=x.device), yw)
    fitted = gram @ dual                                 # [n, D]: X·M with M = Xwᵀ·dual (never built: D × D)
    r = min(rank, *fitted.shape)
    _, _, vh = torch.linalg.svd(fitted, full_matrices=False)
    up = vh[:r].T                                        # [D, r]: up(h) = h @ vhᵣ
    down = (dual @ up).T @ xw                            # [r, D]: down(k) = k @ M @ vhᵣᵀ
    if r < rank:  # fewer rows than the rank: the spare directions stay zero
        down = torch.cat([down, down.new_zeros(rank - r, down.shape[1])])
        up = torch.cat([up, up.new_zeros(up.shape[0], rank - r)], dim=1)
    return down.contiguous(), up.contiguous()
