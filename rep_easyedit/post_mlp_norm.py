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
nearly as an RMSNorm allows (its output always has unit RMS in units of `g`, so of `r` only the
part tangent to that surface is reachable):

    u = v / rms(v)    t = the t orthogonal to u with g * t nearest r    v' = rms(v) (u + t) / rms(u + t)

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

    An RMS norm's output stays on the surface `rms(out / g) = 1`, so only moves tangent to it are
    reachable: the tangent move `g * t` (`t` orthogonal to `u = v / rms(v)`) nearest to `residual`
    is taken, and `u + t` is put back on the surface (a second-order correction). Float64.
    Dimensions whose gain is (near) zero cannot be moved by the MLP: they get no share.
    """
    v = values.double()
    r = residual.double().to(v.device)
    g = gain.to(v.device)[:, None]
    usable = g.abs() > 1e-6 * float(g.abs().max())
    g_safe = torch.where(usable, g, torch.ones_like(g))
    inv_g = torch.where(usable, 1.0 / g_safe, torch.zeros_like(g))
    tiny = torch.finfo(torch.float64).tiny
    rms_v = v.pow(2).mean(0, keepdim=True).sqrt().clamp_min(tiny)
    u = v / rms_v
    # nearest tangent move: t = r/g + lam * u/g^2 with u.t = 0 (least squares in the output)
    lam = -(u * r * inv_g).sum(0, keepdim=True) / (u * u * inv_g ** 2).sum(0, keepdim=True).clamp_min(tiny)
    u_t = u + r * inv_g + lam * u * inv_g ** 2
    rms_t = u_t.pow(2).mean(0, keepdim=True).sqrt().clamp_min(tiny)
    return rms_v * u_t / rms_t - v


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
