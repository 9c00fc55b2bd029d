"""Per-layer cache of the corpus negatives' keys (the gate's unrelated-text negatives).

Every REP edit trains its gate on the keys of the same corpus spans at the same layer, and those
keys depend only on the weights the forward runs through before the edited module. So they are
kept in memory and, when a directory is given (REP puts it beside the covariance statistics,
`{stats_dir}/{model}/rep_negatives/`), on disk, under a key made of:

- the module path and the model's name,
- a fingerprint of every parameter and buffer the forward runs through before the module
  (found once per model and module by a probe forward that records the modules it calls; a REP
  pathway installed on one of them counts with its adapters),
- a hash of the corpus spans, and the keys' device type and the model's dtype.

Change any weight under the layer (a lower layer's edit, an adapter installed below) and the
fingerprint changes, so the cache misses and the keys are collected again. The fingerprint of a
tensor is its float64 sum, its sum of squares and a hash of a strided sample of its bytes, memoised
per tensor version (`Tensor._version` moves with every in-place write), so an unchanged model is
not read again. A directory keeps its `MAX_FILES` newest entries.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import weakref
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .devices import model_device
from .keys import FlatKeys, _StopForward, encode
from .pathway import get_module, pathway_of

MAX_FILES = 8
MAX_MEMORY_ENTRIES = 4
_SAMPLE_STRIDE = 4099

_run_modules: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_tensor_digests: dict = {}
_memory: dict = {}


def modules_before(model: nn.Module, module_path: str, tok) -> list[nn.Module]:
    """The modules a forward calls before reaching `module_path` (a one-token probe, cached)."""
    per_model = _run_modules.setdefault(model, {})
    if module_path in per_model:
        return [m for m in (r() for r in per_model[module_path]) if m is not None]
    target = get_module(model, module_path)
    seen: list[nn.Module] = []
    ids: set[int] = set()

    def record(module, _args):
        if module is target:
            raise _StopForward
        if id(module) not in ids:
            ids.add(id(module))
            seen.append(module)

    handles = [m.register_forward_pre_hook(record, prepend=True) for m in model.modules()]
    try:
        enc = encode(tok, ["a"])
        dev = model_device(model)
        with torch.no_grad():
            try:
                model(input_ids=enc.input_ids.to(dev), attention_mask=enc.attention_mask.to(dev).long(), use_cache=False)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    per_model[module_path] = [weakref.ref(m) for m in seen]
    return seen


def _sample_hash(flat: torch.Tensor) -> bytes:
    sample = flat[::_SAMPLE_STRIDE].contiguous().cpu()
    if sample.dtype == torch.bfloat16:
        sample = sample.view(torch.int16)
    return hashlib.blake2b(sample.numpy().tobytes(), digest_size=16).digest()


def _tensor_digest(t: torch.Tensor) -> str:
    """A content digest of `t`: its float64 sum and norm and a hash of a strided sample of it.

    Computed once per tensor and memoised; a later call reuses it when the tensor is the same object
    at the same address and version and its strided sample still hashes the same (`p.data.copy_`
    does not move `_version`; an edit's dense update moves the sample)."""
    flat = t.detach().reshape(-1)
    sample = _sample_hash(flat)
    key = (id(t), t.data_ptr(), t._version, tuple(t.shape), t.dtype, str(t.device))
    memo = _tensor_digests.get(key)
    if memo is not None and memo[0]() is t and memo[1] == sample:
        return memo[2]
    with torch.no_grad():
        if flat.numel() and flat.is_floating_point():
            sums = torch.stack([flat.sum(dtype=torch.float64),
                                torch.linalg.vector_norm(flat, dtype=torch.float64)]).cpu().tolist()
        elif flat.numel() and not flat.is_complex():
            sums = [float(flat.sum(dtype=torch.float64))]
        else:
            sums = []
    h = hashlib.blake2b(repr((tuple(t.shape), str(t.dtype), sums)).encode(), digest_size=16)
    h.update(sample)
    digest = h.hexdigest()
    if len(_tensor_digests) > 4096:
        _tensor_digests.clear()
    _tensor_digests[key] = (weakref.ref(t), sample, digest)
    return digest


def weights_fingerprint(model: nn.Module, module_path: str, tok) -> str:
    """A digest of every parameter and buffer the forward runs through before `module_path`."""
    tensors: list[tuple[str, torch.Tensor]] = []
    seen_ids: set[int] = set()
    for i, m in enumerate(modules_before(model, module_path, tok)):
        own = list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
        pathway = pathway_of(m)
        if pathway is not None:
            own += list(pathway.named_parameters()) + list(pathway.named_buffers())
        for name, t in own:
            if id(t) not in seen_ids:
                seen_ids.add(id(t))
                tensors.append((f"{i}.{name}", t))
    h = hashlib.blake2b(digest_size=16)
    for name, t in tensors:
        h.update(name.encode())
        h.update(_tensor_digest(t).encode())
    return h.hexdigest()


def texts_digest(texts: Sequence[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in texts:
        h.update(len(t).to_bytes(8, "little"))
        h.update(t.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def cached_token_keys(model: nn.Module, tok, texts: Sequence[str], module_path: str,
                      collect: Callable[..., FlatKeys], *, directory: str | os.PathLike | None = None,
                      model_name: str = "model", device: torch.device | None = None) -> tuple[FlatKeys, str]:
    """Every token's key of `texts` at `module_path` (as `collect(...)` gives them), from the cache
    where the weights under the module and the texts are the ones cached. Returns (keys, source)
    with source "memory", "disk" or "computed"."""
    dtype = next(model.parameters()).dtype
    fingerprint = weights_fingerprint(model, module_path, tok)
    dev = torch.device(device) if device is not None else get_module(model, module_path).weight.device
    key = f"{_safe(module_path)}-{fingerprint[:20]}-{texts_digest(texts)[:20]}-{str(dtype).replace('torch.', '')}-{dev.type}"
    path = Path(os.path.expanduser(str(directory))) / _safe(model_name) / "rep_negatives" / f"{key}.pt" \
        if directory else None
    hit = _memory.get(key)
    if hit is not None:
        if path is not None and not path.is_file():
            _write(path, {"tokens": hit[0].detach().cpu().contiguous(), "lengths": hit[1].cpu()})
        return FlatKeys(None, hit[0].to(dev), hit[1].clone(), hit[2]), "memory"
    if path is not None and path.is_file():
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            flat = FlatKeys(None, data["tokens"].to(dev), data["lengths"])
            _remember(key, flat)
            os.utime(path)
            return flat, "disk"
        except Exception:  # noqa: BLE001 - an unreadable entry is recomputed and overwritten
            pass
    flat = collect(model, tok, texts, module_path, None, all_tokens=True, device=dev)
    _remember(key, flat)
    if path is not None:
        _write(path, {"tokens": flat.tokens.detach().cpu().contiguous(), "lengths": flat.lengths.cpu()})
    return flat, "computed"


def _remember(key: str, flat: FlatKeys) -> None:
    if len(_memory) >= MAX_MEMORY_ENTRIES:
        _memory.pop(next(iter(_memory)))
    _memory[key] = (flat.tokens, flat.lengths.clone(), flat.stats)


def clear_memory() -> None:
    _memory.clear()
    _tensor_digests.clear()


def _write(path: Path, data: dict) -> None:
    """Atomic write (temp file + rename); then keep the directory's MAX_FILES newest entries."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
        os.close(fd)
        try:
            torch.save(data, tmp)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        entries = sorted(path.parent.glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[MAX_FILES:]:
            old.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only or full disk: the memory cache still serves this process
