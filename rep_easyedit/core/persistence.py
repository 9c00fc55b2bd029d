"""Saving and loading REP pathways, and edited models with their pathway.

Layout of a pathway directory:

- ``adapters.safetensors``: every installed adapter's tensors (float32), keyed
  ``<module path>.rep_pathway.adapters.<i>.<param>`` (the names `model.state_dict()` gives them).
- ``kept_keys.safetensors`` (only where adapters keep their edits' keys for later merges,
  `rep.merge_rank`): keyed ``<module path>.rep_pathway.adapters.<i>.kept.<j>.<field>``.
- ``pathway.json``: format version, the model it was saved from (``config._name_or_path``,
  ``model_type``, ``num_hidden_layers``, ``intermediate_size``), per module path the adapters'
  shapes and settings (dim, rank, gate hidden size, τ, active), and optionally the edit's hparams.

`load_pathway` checks the layout against the model before it installs anything and raises
`PathwayLayoutError` naming the mismatch. `save_edited_model` writes the edited base model with
`save_pretrained` (without the adapter tensors, so a plain `from_pretrained` reads it without
unexpected keys), the tokenizer, and the pathway, into one directory:

    model = AutoModelForCausalLM.from_pretrained(directory)
    rep_easyedit.load_pathway(model, directory)     # the edited model, logits bit for bit
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .adapter import GatedLowRankAdapter
from .merging import KEPT
from .training import TrainingKeys
from .pathway import ATTR, get_module, install, installed_paths, pathway_of, remove_pathways

FORMAT_VERSION = 1
ADAPTERS_FILE = "adapters.safetensors"
KEPT_FILE = "kept_keys.safetensors"
_KEPT_FIELDS = ("positives", "negatives", "target", "target_whitened")
PATHWAY_FILE = "pathway.json"
_FORMAT_TAG = "rep_easyedit.core.pathway"


class PathwayLayoutError(ValueError):
    """A saved pathway does not fit the model it is loaded into (or the files are not a pathway)."""


# --------------------------------------------------------------------------------------------
# helpers


def _config_info(model: nn.Module) -> dict:
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg

    def attr(name):
        for c in (text_cfg, cfg):
            value = getattr(c, name, None) if c is not None else None
            if value is not None:
                return value
        return None

    return {
        "name_or_path": str(getattr(cfg, "_name_or_path", "") or "") if cfg is not None else "",
        "model_type": attr("model_type"),
        "num_hidden_layers": attr("num_hidden_layers"),
        "intermediate_size": attr("intermediate_size"),
    }


def _in_features(module: nn.Module) -> int | None:
    """The input feature size of a (down-projection) module."""
    if isinstance(getattr(module, "in_features", None), int):
        return module.in_features
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    if type(module).__name__ == "Conv1D":  # GPT-2 style: weight is (in, out)
        return int(weight.shape[0])
    return int(weight.shape[1])


def _adapter_info(adapter: GatedLowRankAdapter) -> dict:
    info = {
        "dim": int(adapter.dim),
        "rank": int(adapter.rank),
        "gate_hidden": int(adapter.gate[0].out_features),
        "tau": float(adapter.tau),
        "active": float(adapter.active.detach().float().cpu()),
    }
    if getattr(adapter, KEPT, None) is not None:
        info["kept_edits"] = len(getattr(adapter, KEPT))
    return info


def kept_key_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every installed adapter's kept training keys (`rep.merge_rank`), flat for safetensors."""
    out = {}
    for path in installed_paths(model):
        for i, adapter in enumerate(pathway_of(get_module(model, path)).adapters):
            for j, keys in enumerate(getattr(adapter, KEPT, None) or []):
                for field in _KEPT_FIELDS:
                    value = getattr(keys, field)
                    if value is not None:
                        out[f"{path}.{ATTR}.adapters.{i}.kept.{j}.{field}"] = \
                            value.detach().to("cpu", torch.float32).contiguous().clone()
    return out


def _kept_keys_of(tensors: dict[str, torch.Tensor], prefix: str, count: int) -> list[TrainingKeys]:
    kept = []
    for j in range(count):
        fields = {f: tensors.get(f"{prefix}kept.{j}.{f}") for f in _KEPT_FIELDS}
        missing = [f for f in ("positives", "negatives", "target") if fields[f] is None]
        if missing:
            raise PathwayLayoutError(f"{KEPT_FILE} lacks {prefix}kept.{j}.{missing[0]}")
        kept.append(TrainingKeys(**fields))
    return kept


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    elif not isinstance(value, (dict, list, tuple, str, int, float, bool, type(None))) and hasattr(value, "__dict__"):
        value = {k: v for k, v in vars(value).items() if not k.startswith("_")}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    return str(value)


def _new_adapter(info: dict) -> GatedLowRankAdapter:
    dim, rank, hidden = int(info["dim"]), int(info["rank"]), int(info["gate_hidden"])
    adapter = GatedLowRankAdapter(dim, rank, gate_ratio=hidden / dim, tau=float(info["tau"]))
    if adapter.gate[0].out_features != hidden:  # float rounding of the ratio: build the gate exactly
        adapter.gate = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
    return adapter


# --------------------------------------------------------------------------------------------
# pathway


def pathway_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(tensors keyed as in `model.state_dict()`, per-path layout) of every installed pathway."""
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict] = {}
    for path in installed_paths(model):
        pathway = pathway_of(get_module(model, path))
        infos = []
        for i, adapter in enumerate(pathway.adapters):
            infos.append(_adapter_info(adapter))
            for name, tensor in adapter.state_dict().items():
                key = f"{path}.{ATTR}.adapters.{i}.{name}"
                tensors[key] = tensor.detach().to("cpu", torch.float32).contiguous().clone()
        layout[path] = {"num_adapters": len(infos), "adapters": infos}
    return tensors, layout


def save_pathway(model: nn.Module, directory: str | os.PathLike, hparams: Any = None) -> Path:
    """Write every installed pathway of `model` to `directory` (created if needed).

    `hparams` (a dict, a dataclass or an hparams object) is stored as given for the record.
    Returns the path of ``pathway.json``. A model without any pathway writes an empty pathway.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, layout = pathway_state(model)
    meta = {
        "format": _FORMAT_TAG,
        "format_version": FORMAT_VERSION,
        "model": _config_info(model),
        "pathways": layout,
        "hparams": _jsonable(hparams) if hparams is not None else None,
    }
    save_file(tensors, str(directory / ADAPTERS_FILE),
              metadata={"format": _FORMAT_TAG, "format_version": str(FORMAT_VERSION)})
    kept = kept_key_tensors(model)
    if kept:
        save_file(kept, str(directory / KEPT_FILE))
    elif (directory / KEPT_FILE).exists():  # an older save's keys must not be read as this pathway's
        (directory / KEPT_FILE).unlink()
    out = directory / PATHWAY_FILE
    out.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def read_pathway_meta(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    meta_file, tensor_file = directory / PATHWAY_FILE, directory / ADAPTERS_FILE
    for f in (meta_file, tensor_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: {directory} holds no saved REP pathway "
                                    f"(write one with rep_easyedit.save_pathway)")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PathwayLayoutError(f"{meta_file} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT_TAG:
        raise PathwayLayoutError(f"{meta_file} is not a REP pathway file (format tag missing)")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise PathwayLayoutError(f"{meta_file} has format version {version!r}; this rep_easyedit "
                                 f"reads version {FORMAT_VERSION}")
    return meta


def check_layout(model: nn.Module, meta: dict) -> None:
    """Raise `PathwayLayoutError` where the saved pathway does not fit `model`."""
    saved, here = meta.get("model") or {}, _config_info(model)
    for key in ("model_type", "num_hidden_layers"):
        if saved.get(key) is not None and here.get(key) is not None and saved[key] != here[key]:
            raise PathwayLayoutError(
                f"the pathway was saved from a model with {key}={saved[key]!r} "
                f"({saved.get('name_or_path') or 'unnamed'}), but this model has {key}={here[key]!r}")
    pathways = meta.get("pathways")
    if not isinstance(pathways, dict):
        raise PathwayLayoutError("pathway.json has no `pathways` table")
    for path, entry in pathways.items():
        try:
            module = get_module(model, path)
        except LookupError:
            raise PathwayLayoutError(
                f"module path {path!r} of the saved pathway does not exist in "
                f"{type(model).__name__}") from None
        features = _in_features(module)
        adapters = entry.get("adapters") or []
        if entry.get("num_adapters") != len(adapters):
            raise PathwayLayoutError(f"{path}: pathway.json lists {len(adapters)} adapters but says "
                                     f"num_adapters={entry.get('num_adapters')!r}")
        for i, info in enumerate(adapters):
            if features is None:
                raise PathwayLayoutError(f"{path} has no 2-D weight, so no input feature size to "
                                         f"match against adapter {i} (dim {info.get('dim')})")
            if int(info["dim"]) != features:
                raise PathwayLayoutError(
                    f"{path}: adapter {i} has dim {info['dim']} but the module's input feature size "
                    f"is {features} (intermediate_size saved {saved.get('intermediate_size')!r}, "
                    f"here {here.get('intermediate_size')!r})")


def load_pathway(model: nn.Module, directory: str | os.PathLike, replace: bool = False) -> list[str]:
    """Install the pathway saved in `directory` on `model` (eval mode, adapters float32).

    Everything is checked first (layout, tensor names and shapes); on any mismatch
    `PathwayLayoutError` is raised and the model is left as it was. A model that already carries
    a pathway is refused unless `replace=True` (which removes the existing pathways first).
    Each adapter goes on its module's device. Returns the module paths now carrying a pathway.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = read_pathway_meta(directory)
    check_layout(model, meta)
    existing = installed_paths(model)
    if existing and not replace:
        raise PathwayLayoutError(f"the model already carries REP pathways at {existing}; pass "
                                 f"replace=True to swap them for the saved one")
    tensors = load_file(str(directory / ADAPTERS_FILE))
    kept = load_file(str(directory / KEPT_FILE)) if (directory / KEPT_FILE).is_file() else {}
    built: list[tuple[str, GatedLowRankAdapter]] = []
    expected_keys = set()
    for path, entry in meta["pathways"].items():
        for i, info in enumerate(entry["adapters"]):
            adapter = _new_adapter(info)
            prefix = f"{path}.{ATTR}.adapters.{i}."
            own = adapter.state_dict()
            state = {}
            for name, ref in own.items():
                key = prefix + name
                expected_keys.add(key)
                if key not in tensors:
                    raise PathwayLayoutError(f"{ADAPTERS_FILE} lacks tensor {key!r}")
                if tuple(tensors[key].shape) != tuple(ref.shape):
                    raise PathwayLayoutError(f"{ADAPTERS_FILE}: {key!r} has shape "
                                             f"{tuple(tensors[key].shape)}, expected {tuple(ref.shape)}")
                state[name] = tensors[key].to(torch.float32)
            adapter.load_state_dict(state, strict=True)
            for p in adapter.parameters():
                p.requires_grad_(False)
            if info.get("kept_edits"):
                setattr(adapter, KEPT, _kept_keys_of(kept, prefix, int(info["kept_edits"])))
            built.append((path, adapter.eval()))
    extra = sorted(set(tensors) - expected_keys)
    if extra:
        raise PathwayLayoutError(f"{ADAPTERS_FILE} holds tensors pathway.json does not describe: "
                                 f"{extra[:5]}{' …' if len(extra) > 5 else ''}")
    if replace:
        remove_pathways(model)
    for path, adapter in built:
        install(model, path, adapter)
    return installed_paths(model)


# --------------------------------------------------------------------------------------------
# edited model


@contextlib.contextmanager
def pathways_detached(model: nn.Module) -> Iterator[None]:
    """Take the `rep_pathway` children off their modules for the block (hooks stay registered).

    Inside, `model.state_dict()` has only the model's own keys; the children are always put back.
    """
    taken = []
    try:
        for module in model.modules():
            if ATTR in module._modules:
                taken.append((module, module._modules[ATTR]))
        for module, _ in taken:
            del module._modules[ATTR]
        yield
    finally:
        for module, pathway in taken:
            module._modules[ATTR] = pathway


def save_edited_model(model: nn.Module, tok, directory: str | os.PathLike, hparams: Any = None,
                      **save_kwargs) -> Path:
    """Save the edited model (`save_pretrained`, no adapter tensors), `tok`, and the pathway."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with pathways_detached(model):
        model.save_pretrained(str(directory), **save_kwargs)
    if tok is not None:
        tok.save_pretrained(str(directory))
    save_pathway(model, directory, hparams=hparams)
    return directory
