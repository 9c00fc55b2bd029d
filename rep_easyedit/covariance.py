"""Second-moment statistics of the edited down-projection's input, where EasyEdit looks for them.

ROME/MEMIT with `mom2_adjustment: true` call EasyEdit's `layer_stats`, which loads

    {stats_dir}/{model}/{mom2_dataset}_stats/{rewrite_module}_{mom2_dtype}_mom2_{mom2_n_samples}.npz

and otherwise downloads Wikipedia through `datasets` (impossible offline: it fails obscurely or
hangs). `{model}` is `model.config._name_or_path` with "/" replaced by "_" in the PyPI release and
the last path component in upstream EasyEdit; `build_stats` writes both (the second as a hard
link where the file system allows). The files are written with EasyEdit's own runningstats
(`CombinedStat(mom2=SecondMoment())` + `save_cached_state`), so the format is theirs:
`mom2.mom2` = Σ k kᵀ (a sum, not a mean), `mom2.count`, `mom2.constructor`, `sample_size`.

About `mom2_n_samples`: in EasyEdit it counts *texts* drawn from Wikipedia (and `layer_stats`
refuses a cache whose `sample_size` differs). Our corpus is whatever the user gives (or model
samples), so the file stores `sample_size = hparams.mom2_n_samples` to match EasyEdit's cache key,
while `mom2.count` holds the true number of tokens the statistic was computed over.
"""

from __future__ import annotations

import inspect
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .core.devices import model_device
from .core.pathway import get_module

BUILD_COMMAND = "python -m rep_easyedit.stats --hparams <your hparams .yaml>"


class MissingCovarianceError(FileNotFoundError):
    """Covariance statistics needed for `mom2_adjustment: true` are not on disk."""


class _StopStats(Exception):
    pass


# -- where ---------------------------------------------------------------------------------

def _hp(hparams, key):
    value = hparams.get(key) if isinstance(hparams, dict) else getattr(hparams, key, None)
    if value is None:
        raise ValueError(f"hparams has no {key!r}, needed for covariance statistics")
    return value


def layer_name(hparams, layer: int) -> str:
    return str(_hp(hparams, "rewrite_module_tmp")).format(layer)


def _model_names(model) -> tuple[str, str]:
    """(legacy, upstream) model folder names, computed exactly as each EasyEdit does."""
    name = str(model.config._name_or_path)
    return name.replace("/", "_"), name.rsplit("/")[-1]


def _relative(hparams, layer: int, folder: str) -> Path:
    return (Path(folder) / f"{_hp(hparams, 'mom2_dataset')}_stats"
            / f"{layer_name(hparams, layer)}_{_hp(hparams, 'mom2_dtype')}_mom2_"
              f"{_hp(hparams, 'mom2_n_samples')}.npz")


def stats_paths(model, hparams, layer: int) -> list[Path]:
    """The file(s) EasyEdit's `layer_stats` would load: [legacy path, upstream path] (deduplicated)."""
    root = Path(os.path.expanduser(str(_hp(hparams, "stats_dir"))))
    paths: list[Path] = []
    for folder in _model_names(model):
        p = root / _relative(hparams, layer, folder)
        if p not in paths:
            paths.append(p)
    return paths


def _installed_convention() -> str | None:
    """'legacy' or 'upstream' for the installed EasyEdit's `layer_stats`; None if undecidable."""
    try:
        from .compat.easyedit import easyeditor

        easyeditor()
        import importlib

        mod = importlib.import_module("easyeditor.models.rome.layer_stats")
        code = [ln.split("#", 1)[0] for ln in inspect.getsource(mod.layer_stats).splitlines()]
    except Exception:  # noqa: BLE001 - no EasyEdit, or no source: check every convention
        return None
    code_text = "\n".join(code)
    if ".rsplit(" in code_text:
        return "upstream"
    if '.replace("/", "_")' in code_text or ".replace('/', '_')" in code_text:
        return "legacy"
    return None


def installed_stats_path(model, hparams, layer: int) -> Path | None:
    """The one path the installed EasyEdit reads, when its convention can be told."""
    legacy, upstream = _model_names(model)
    folder = {"legacy": legacy, "upstream": upstream}.get(_installed_convention() or "")
    if folder is None:
        return None
    return Path(os.path.expanduser(str(_hp(hparams, "stats_dir")))) / _relative(hparams, layer, folder)


def has_stats(model, hparams, layer: int) -> bool:
    """True when the file the installed EasyEdit loads exists (any convention, if undecidable)."""
    path = installed_stats_path(model, hparams, layer)
    if path is not None:
        return path.is_file()
    return any(p.is_file() for p in stats_paths(model, hparams, layer))


def require_stats(model, hparams, layers: Iterable[int]) -> None:
    """Raise MissingCovarianceError (naming the files and the command to build them) if any is absent.

    Call this before an edit with `mom2_adjustment: true`: EasyEdit would otherwise try to
    download Wikipedia.
    """
    layers = [int(x) for x in layers]
    missing = [layer for layer in layers if not has_stats(model, hparams, layer)]
    if not missing:
        return
    lines = []
    for layer in missing:
        path = installed_stats_path(model, hparams, layer) or stats_paths(model, hparams, layer)[0]
        lines.append(f"  layer {layer}: {path}")
    layer_args = " ".join(str(x) for x in missing)
    raise MissingCovarianceError(
        "Covariance statistics for mom2_adjustment are missing (EasyEdit would try to download "
        "Wikipedia for them):\n" + "\n".join(lines) + "\n"
        f"Build them offline with:\n  {BUILD_COMMAND} --layers {layer_args} [--corpus FILE.txt ...]\n"
        "(without --corpus, text sampled from the model is used), or set `mom2_adjustment: false`.")


# -- build ---------------------------------------------------------------------------------

def _runningstats():
    """EasyEdit's own runningstats module (so the file format is theirs), or None."""
    try:
        from .compat.easyedit import easyeditor

        easyeditor()
        import importlib

        return importlib.import_module("easyeditor.util.runningstats")
    except Exception:  # noqa: BLE001
        return None


class _SecondMoment:
    """Fallback with the same state_dict as runningstats.SecondMoment, used without EasyEdit."""

    def __init__(self):
        self.count, self.mom2 = 0, None

    def add(self, a: torch.Tensor) -> None:
        if len(a) == 0:
            return
        if self.mom2 is None:
            self.mom2 = a.new_zeros(a.shape[1], a.shape[1])
        self.count += a.shape[0]
        self.mom2 += a.t().mm(a)

    def moment(self) -> torch.Tensor:
        return self.mom2 / self.count


def _new_stat(rs):
    if rs is not None:
        return rs.CombinedStat(mom2=rs.SecondMoment())
    return None


def _save(rs, stat_or_mom, path: Path, sample_size) -> None:
    """Write atomically (temp file + rename) in runningstats' npz format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    os.close(fd)
    try:
        if rs is not None:
            stat_or_mom.to_("cpu")
            rs.save_cached_state(tmp, stat_or_mom, {"sample_size": sample_size})
        else:
            np.savez(tmp, **{
                "mom2.constructor": "easyeditor.util.runningstats.SecondMoment()",
                "mom2.count": stat_or_mom.count,
                "mom2.mom2": stat_or_mom.mom2.cpu().numpy(),
                "sample_size": sample_size,
            })
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".tmp-{os.getpid()}-{dst.name}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


@torch.no_grad()
def build_stats(model, tok, hparams, layers: Sequence[int], texts: Sequence[str], *,
                batch_size: int = 8, max_length: int = 512, progress: bool = True) -> dict:
    """Accumulate Σ k kᵀ of the down-projection inputs at `layers` over `texts`; write the npz files.

    One batched forward per batch, without gradients, for all layers at once (forward pre-hooks,
    prepended so they see the raw key even if a pathway is installed), stopped right after the
    highest layer's key is read. Padding is excluded via the attention mask; keys are accumulated
    in `hparams.mom2_dtype` on the model's device. Texts are truncated to `max_length` tokens.

    Returns figures: tokens, texts, seconds, tokens_per_s, seconds_per_layer, paths {layer: [..]}.
    """
    from tqdm.auto import tqdm

    layers = sorted({int(x) for x in layers})
    if not layers:
        raise ValueError("no layers given")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("no texts to compute covariance statistics from")
    dtype = getattr(torch, str(_hp(hparams, "mom2_dtype")))
    sample_size = _hp(hparams, "mom2_n_samples")
    rs = _runningstats()
    stats = {layer: (_new_stat(rs) if rs is not None else _SecondMoment()) for layer in layers}
    device = model_device(model)
    box: dict = {}

    def make_hook(layer: int, last: bool):
        def hook(_module, args):
            x = args[0]
            feats = x.reshape(-1, x.shape[-1])[box["mask"].to(x.device)].to(dtype)
            stats[layer].add(feats)
            if last:
                raise _StopStats
        return hook

    handles = []
    old_side, was_training = tok.padding_side, model.training
    if tok.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token (set tok.pad_token = tok.eos_token)")
    # longest first: similar lengths share a batch (less padding), and memory peaks at once
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    n_tokens = 0
    start_time = time.perf_counter()
    try:
        for layer in layers:
            module = get_module(model, layer_name(hparams, layer))
            handles.append(module.register_forward_pre_hook(
                make_hook(layer, layer == layers[-1]), prepend=True))
        tok.padding_side = "right"
        model.eval()
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc=f"covariance, layers {layers}", unit="batch",
                          disable=not progress):
            chunk = [texts[i] for i in order[start:start + batch_size]]
            enc = tok(chunk, return_tensors="pt", padding=True, truncation=True,
                      max_length=max_length).to(device)
            box["mask"] = enc["attention_mask"].reshape(-1).bool()
            n_tokens += int(enc["attention_mask"].sum())
            try:
                model(**enc, use_cache=False)
            except _StopStats:
                pass
            else:
                raise RuntimeError(f"the forward never reached {layer_name(hparams, layers[-1])}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        compute_s = time.perf_counter() - start_time
    finally:
        for h in handles:
            h.remove()
        tok.padding_side = old_side
        model.train(was_training)

    written: dict[int, list[str]] = {}
    for layer in layers:
        paths = stats_paths(model, hparams, layer)
        _save(rs, stats[layer], paths[0], sample_size)
        for extra in paths[1:]:
            _link_or_copy(paths[0], extra)
        written[layer] = [str(p) for p in paths]
    _INV_CACHE.clear()
    seconds = time.perf_counter() - start_time
    return {
        "texts": len(texts),
        "tokens": n_tokens,
        "layers": layers,
        "seconds": seconds,
        "compute_seconds": compute_s,
        "tokens_per_s": n_tokens / compute_s if compute_s > 0 else float("inf"),
        "seconds_per_layer": seconds / len(layers),
        "paths": written,
    }


# -- read ----------------------------------------------------------------------------------

_INV_CACHE: dict = {}


def _existing_path(model, hparams, layer: int) -> Path:
    path = installed_stats_path(model, hparams, layer)
    if path is not None and path.is_file():
        return path
    for p in stats_paths(model, hparams, layer):
        if p.is_file():
            return p
    require_stats(model, hparams, [layer])  # raises MissingCovarianceError
    raise AssertionError("unreachable")


def load_second_moment(model, hparams, layer: int) -> tuple[torch.Tensor, int]:
    """(mean second moment E[k kᵀ] = mom2 / count, in the stored dtype, on CPU; count)."""
    path = _existing_path(model, hparams, layer)
    with np.load(path) as data:
        mom2 = torch.from_numpy(np.array(data["mom2.mom2"]))
        count = int(data["mom2.count"])
    if count <= 0:
        raise ValueError(f"{path} holds no samples (mom2.count = {count})")
    return mom2 / count, count


def load_inverse_covariance(model, hparams, layer: int,
                            device: str | torch.device | None = "cpu") -> torch.Tensor:
    """C⁻¹ (float32) of the mean second moment mom2/count, as EasyEdit's `get_inv_cov` computes it.

    Inverted in the stored dtype (`mom2_dtype`), then cast to float32; cached per file and
    modification time (unlike EasyEdit's module-level cache, which is keyed by name only).
    `device=None` puts it on the model's device.
    """
    path = _existing_path(model, hparams, layer)
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _INV_CACHE:
        moment, _count = load_second_moment(model, hparams, layer)
        _INV_CACHE[key] = torch.inverse(moment).float()
    target = model_device(model) if device is None else torch.device(device)
    return _INV_CACHE[key].to(target)
