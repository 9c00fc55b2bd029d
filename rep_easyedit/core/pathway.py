"""Hooking adapters onto a layer's down-projection input, and taking them off again.

A `RobustEditPathway` holds the adapters of one module (one per edit; later edits stack) and is
attached to that module as the child `rep_pathway`, so `state_dict()`, `.to()` and `device_map`
placement see it. A forward pre-hook on the module passes its input through the pathway.
`pathway_installed(...)` is a context manager that always removes what it added; `install` /
`remove_pathways` manage pathways that outlive an edit.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .adapter import GatedLowRankAdapter

ATTR = "rep_pathway"


class RobustEditPathway(nn.Module):
    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleList()
        self._handle = None

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        for adapter in self.adapters:
            keys = adapter(keys)
        return keys

    def any_active(self) -> bool:
        return any(float(a.active) != 0.0 for a in self.adapters)

    def _pre_hook(self, module, args):
        if not self.any_active():
            # every adapter was switched off by a restore of `weights_copy`: leave the model
            # exactly as it was, hook and child module included
            _drop(module, self)
            return None
        if not args:
            return None
        return (self(args[0]), *args[1:])


def get_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise LookupError(
            f"module path {path!r} does not exist in {type(model).__name__}; check "
            f"`rewrite_module_tmp` and `layers` in the hparams against the model's layout "
            f"(e.g. `model.layers.{{}}.mlp.down_proj` for LLaMA/Mistral/Qwen2)"
        ) from None


def pathway_of(module: nn.Module) -> RobustEditPathway | None:
    return getattr(module, ATTR, None)


def install(model: nn.Module, path: str, adapter: GatedLowRankAdapter) -> RobustEditPathway:
    """Attach `adapter` (moved to the module's device, eval mode) to the pathway at `path`."""
    module = get_module(model, path)
    pathway = pathway_of(module)
    if pathway is None:
        pathway = RobustEditPathway()
        module.add_module(ATTR, pathway)
    if pathway._handle is None:
        pathway._handle = module.register_forward_pre_hook(pathway._pre_hook)
    device = _module_device(module)
    adapter.to(device).eval()
    pathway.adapters.append(adapter)
    return pathway


def detach_adapter(model: nn.Module, path: str, adapter: GatedLowRankAdapter) -> None:
    """Undo `install` for one adapter; the hook and child go when no adapter is left."""
    module = get_module(model, path)
    pathway = pathway_of(module)
    if pathway is None:
        return
    kept = [a for a in pathway.adapters if a is not adapter]
    pathway.adapters = nn.ModuleList(kept)
    if not kept:
        _drop(module, pathway)


def prune_inactive(model: nn.Module) -> int:
    """Remove adapters switched off by a restore; returns how many were removed."""
    removed = 0
    for module in list(model.modules()):
        pathway = pathway_of(module)
        if pathway is None:
            continue
        kept = [a for a in pathway.adapters if float(a.active) != 0.0]
        removed += len(pathway.adapters) - len(kept)
        pathway.adapters = nn.ModuleList(kept)
        if not kept:
            _drop(module, pathway)
    return removed


def remove_pathways(model: nn.Module) -> None:
    """Take every REP pathway off the model (hooks and modules)."""
    for module in list(model.modules()):
        pathway = pathway_of(module)
        if pathway is not None:
            _drop(module, pathway)


def installed_paths(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if pathway_of(module) is not None]


def _drop(module: nn.Module, pathway: RobustEditPathway) -> None:
    if pathway._handle is not None:
        pathway._handle.remove()
        pathway._handle = None
    if ATTR in module._modules:
        del module._modules[ATTR]


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters(recurse=False):
        return p.device
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def pathway_installed(model: nn.Module, path: str, adapter: GatedLowRankAdapter) -> Iterator[RobustEditPathway]:
    """Install `adapter` for the duration of the block; removed on exit, errors included."""
    pathway = install(model, path, adapter)
    try:
        yield pathway
    finally:
        detach_adapter(model, path, adapter)
