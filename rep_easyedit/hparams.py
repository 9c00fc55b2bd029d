"""`REPHyperParams`: EasyEdit's hparams for the wrapped backend plus a validated `rep:` section.

The YAML is EasyEdit's own (alg_name, model_name, layers, the backend's fields) with `alg_name:
REP-<BACKEND>` and a `rep:` block. Loading goes through OmegaConf against two schemas: the installed
backend's hparams dataclass (so a YAML the backend would reject is rejected here first, with the key
named) and `REPConfig`.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .core.config import REPConfig

REP_PREFIX = "REP-"
SUPPORTED_BACKENDS = ("ROME", "MEMIT", "R-ROME", "EMMET", "AlphaEdit")


class HParamsError(ValueError):
    """A hparams file or dict that does not describe a valid REP edit."""


def read_hparams_file(path: str | Path) -> tuple[Path, dict]:
    """The one reader of hparams YAML files (REP's, the backends', `python -m rep_easyedit.stats`):
    `.yaml` added when the name has none, OmegaConf's YAML (so `5e-1` is a float), a mapping."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml"):
        path = path.with_name(path.name + ".yaml")
    if not path.exists():
        raise FileNotFoundError(f"hparams file {path} does not exist")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(raw, dict):
        raise HParamsError(f"{path}: expected a mapping of hparams, got {type(raw).__name__}")
    return path, raw


def _schema_type(tp):
    """Map a backend field annotation to one OmegaConf can validate (or Any)."""
    origin = typing.get_origin(tp)
    if tp in (int, float, bool, str):
        return tp
    if origin in (list, typing.List):
        (inner,) = typing.get_args(tp) or (Any,)
        return typing.List[_schema_type(inner)] if inner in (int, float, bool, str) else typing.List[Any]
    return Any


def _backend_schema(cls) -> type:
    fields = []
    hints = _resolved_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in ("device",):  # int N (cuda:N) or a device string ("cpu", "cuda:1")
            tp = Any
        else:
            tp = typing.Optional[_schema_type(hints.get(f.name, Any))]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = dataclasses.field(default_factory=f.default_factory)  # type: ignore[misc]
        else:
            default = MISSING
        if isinstance(default, dataclasses.Field):
            fields.append((f.name, tp, default))
        else:
            fields.append((f.name, tp, dataclasses.field(default=default)))
    return dataclasses.make_dataclass(f"{cls.__name__}Schema", fields)


def _resolved_hints(cls) -> dict:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - forward refs in third-party code
        return {}


def _validate(schema_cls, data: dict, section: str) -> dict:
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema_cls), OmegaConf.create(data))
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise HParamsError(f"{section}: required key(s) {missing} missing")
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None)
        valid = sorted(f.name for f in dataclasses.fields(schema_cls))
        msg = str(e).splitlines()[0]
        raise HParamsError(f"{section}: bad key {key!r}: {msg}. Valid keys: {valid}") from None


class REPHyperParams:
    """Hparams object handed to `BaseEditor`: the backend's fields as attributes, plus `rep`."""

    def __init__(self, alg_name: str, rep: REPConfig, base: dict):
        self.alg_name = alg_name
        self.rep = rep
        self._base_fields = list(base)
        for key, value in base.items():
            setattr(self, key, value)

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_hparams(cls, path: str | Path) -> "REPHyperParams":
        path, raw = read_hparams_file(path)
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "hparams") -> "REPHyperParams":
        raw = dict(raw)
        alg_name = raw.get("alg_name")
        if not isinstance(alg_name, str) or not alg_name.startswith(REP_PREFIX) \
                or alg_name[len(REP_PREFIX):] not in SUPPORTED_BACKENDS:
            choices = [REP_PREFIX + b for b in SUPPORTED_BACKENDS]
            raise HParamsError(f"{source}: alg_name {alg_name!r} is not a REP method; use one of {choices}")
        backend_name = alg_name[len(REP_PREFIX):]
        from .backends import get_backend

        backend = get_backend(backend_name)
        rep_raw = raw.pop("rep", None) or {}
        if not isinstance(rep_raw, dict):
            raise HParamsError(f"{source}: `rep` must be a mapping")
        rep_dict = _validate(REPConfig, rep_raw, f"{source} [rep]")
        rep = REPConfig(**rep_dict)
        try:
            rep.check()
        except ValueError as e:
            raise HParamsError(f"{source}: {e}") from None
        raw["alg_name"] = backend_name
        base = _validate(_backend_schema(backend.hparams_cls), raw, source)
        base.pop("alg_name")
        if isinstance(base.get("stats_dir"), str):
            base["stats_dir"] = os.path.expanduser(base["stats_dir"])
        return cls(alg_name, rep, base)

    # -- views ---------------------------------------------------------------------------
    @property
    def backend_name(self) -> str:
        return self.alg_name[len(REP_PREFIX):]

    def base_dict(self) -> dict:
        return {key: getattr(self, key) for key in self._base_fields}

    def backend_hparams(self, backend=None):
        """The installed backend's hparams object (alg_name = the backend's own name); pass the
        `Backend` already resolved for this edit to avoid resolving it again."""
        if backend is None:
            from .backends import get_backend

            backend = get_backend(self.backend_name)
        return backend.hparams_cls(alg_name=self.backend_name, **self.base_dict())

    def to_dict(self) -> dict:
        out = {"alg_name": self.alg_name, **self.base_dict()}
        out["rep"] = dataclasses.asdict(self.rep)
        return out

    def __repr__(self) -> str:
        return f"REPHyperParams({self.to_dict()!r})"
