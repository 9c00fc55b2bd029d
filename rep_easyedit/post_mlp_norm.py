"""MEMIT-style residual targets on models that normalise the MLP output before adding it.

MEMIT (and multi-layer EMMET) fits one residual-stream change `z - h` at the last edited layer,
spreads it over the edited layers and writes each share `r` as a change of that layer's MLP
output, which assumes the layer adds its MLP output to the residual stream as it is. Gemma-2/3
(and OLMo-2) add `post_norm(mlp(x))` instead: an RMSNorm whose gains `g` reach the hundreds, after
an MLP whose output is small (Gemma-3-270M at a subject token, layers 1-3: MLP output norm 5-9,
after the norm 215-640). Written as it is, a share replaces the MLP output's direction and, through
the norm, the layer's whole contribution: MEMIT's z error grew 137 -> 524 -> 1845 over layers
1, 2, 3 and every dev edit failed.

Here each share is mapped to the change of the MLP output that moves the norm's output by `r`, as
nearly as an RMSNorm allows (its outputs lie on the ellipsoid `{g * u : rms(u) = 1}`; the target is
replaced by the nearest point on it):

    u = v / rms(v)    u' = argmin over rms(u') = 1 of |g * u' - (g * u + r)|    v' = rms(v) * u'

For a model without such a norm the share is returned unchanged, so MEMIT's arithmetic is
untouched on every other architecture.
"""

from __future__ import annotations

import torch

# names under which decoder layers hold a norm applied to the MLP output before the residual add
POST_MLP_NORM_NAMES = ("post_feedforward_layernorm",)


def post_mlp_norm(model, layer_module_tmp: str, layer: int):
    """The norm layer `layer` applies to its MLP output before the residual add, or None."""
    block = model.get_submodule(layer_module_tmp.format(layer))
    for name in POST_MLP_NORM_NAMES:
        norm = getattr(block, name, None)
        if isinstance(norm, torch.nn.Module):
            return norm
    return None


@torch.no_grad()
def rms_norm_gain(norm: torch.nn.Module, dim: int) -> torch.Tensor:
    """The gains `g` of an RMS norm (`norm(x) = g * x / rms(x)`), float64 on the norm's device.

    Read from the module's output, so Gemma's `1 + weight` and LLaMA's `weight` both come out
    right; a norm that is not of this form (a LayerNorm with a mean or bias) is a clear error.
    """
    param = next(norm.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    ones = torch.ones(1, dim, device=device, dtype=dtype)
    gain = norm(ones)[0].double()
    probe = torch.randn(4, dim, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    expect = gain * probe.double() / probe.double().pow(2).mean(-1, keepdim=True).sqrt()
    got = norm(probe).double()
    tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
    if not torch.allclose(got, expect, rtol=tol, atol=tol * float(gain.abs().max())):
        raise ValueError(
            f"{type(norm).__name__} after the MLP is not an RMS norm (norm(x) = g * x / rms(x)); "
            f"MEMIT's residual targets cannot be mapped through it. Edit one layer with ROME, "
            f"whose value is fitted at the MLP output itself")
    return gain


def mlp_output_shift(values: torch.Tensor, residual: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """The change of the MLP outputs `values` (hidden, n) that moves `g * v / rms(v)` by `residual`.

    An RMS norm's outputs are the ellipsoid `{g * u : rms(u) = 1}`; the target `g * u + residual` is
    replaced by the nearest point on it, `u' = g y / (g^2 + mu)` with `mu` set by `rms(u') = 1`
    (for a small share this is the nearest tangent move; for a large one it is still the best the
    norm can output), and the MLP output keeps its RMS: `v' = rms(v) u'`. Float64.
    """
    v = values.double()
    y = (gain.double()[:, None].to(v.device) * v / _rms(v)) + residual.double().to(v.device)
    g2 = gain.double().to(v.device).pow(2)[:, None]
    gy = gain.double().to(v.device)[:, None] * y
    n = v.shape[0]

    def excess(mu):  # sum(u'^2) - n: decreasing in mu above -min(g^2)
        return (gy / (g2 + mu)).pow(2).sum(0, keepdim=True) - n

    lo = torch.full_like(v[:1], -float(g2.min())) * (1 - 1e-12)
    hi = torch.ones_like(lo)
    while bool((excess(hi) > 0).any()):
        hi = torch.where(excess(hi) > 0, hi * 4, hi)
    for _ in range(200):  # bisection, to float64 resolution
        mid = (lo + hi) / 2
        above = excess(mid) > 0
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    u_new = gy / (g2 + hi)
    return _rms(v) * u_new / _rms(u_new) - v


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(0, keepdim=True).sqrt().clamp_min(torch.finfo(torch.float64).tiny)


def mlp_residual(model, hparams, layer: int, keys: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """MEMIT's share `residual` (hidden, n) for `layer`, as a change of its MLP output.

    `keys` (in, n) are the inputs of the edited module (`hparams.rewrite_module_tmp`, whose output
    is the MLP output, read with its current weights); returned in `residual`'s dtype and device.
    Unchanged where the layer has no post-MLP norm.
    """
    norm = post_mlp_norm(model, hparams.layer_module_tmp, layer)
    if norm is None:
        return residual
    module = model.get_submodule(hparams.rewrite_module_tmp.format(layer))
    w = module.weight.detach().to(device=keys.device, dtype=torch.float64)
    if w.shape[1] != keys.shape[0]:  # stored (in, out), as GPT-2's Conv1D
        w = w.T
    values = w @ keys.double()
    bias = getattr(module, "bias", None)
    if bias is not None:
        values = values + bias.detach().to(device=keys.device, dtype=torch.float64)[:, None]
    shift = mlp_output_shift(values, residual, rms_norm_gain(norm, values.shape[0]))
    return shift.to(device=residual.device, dtype=residual.dtype)
