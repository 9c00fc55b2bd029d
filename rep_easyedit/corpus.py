"""Generic text for covariance statistics (and long contexts) without a network.

`load_corpus` takes the user's text files when given (one text per paragraph), and otherwise
samples text from the model itself (top-k sampling from one-word prompts), caching the sample on
disk so that every later run, and every layer, sees the same texts.

Measured on the bundled SmolLM2-135M (float32, 2 shared CPU cores, one thread): sampling 64 texts x
256 tokens took 120 s in one batch of 64 (185 s in batches of 16), once; later runs read the JSON
cache in milliseconds.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from .cache import cache_dir

PROMPTS = ("The", "In", "A", "It", "This", "When", "After", "There")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


def read_text_files(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Paragraphs (split at blank lines, stripped, empty ones dropped) of every file, in order."""
    missing = [str(p) for p in paths if not Path(p).expanduser().is_file()]
    if missing:
        raise FileNotFoundError(
            f"corpus file(s) not found: {', '.join(missing)} (give existing UTF-8 text files, "
            "or no --corpus at all to sample text from the model)")
    texts: list[str] = []
    for p in paths:
        raw = Path(p).expanduser().read_text(encoding="utf-8", errors="replace")
        raw = raw.replace("\r\n", "\n").replace("\r", "\n")
        texts.extend(t.strip() for t in _PARAGRAPH_BREAK.split(raw) if t.strip())
    if not texts:
        raise ValueError(f"the corpus file(s) {', '.join(map(str, paths))} contain no text")
    return texts


def model_folder_name(model) -> str:
    """A file-name-safe name for the model: the last component of its name or path."""
    name = str(getattr(model.config, "_name_or_path", "") or "").rstrip("/\\")
    name = re.split(r"[/\\]", name)[-1] if name else ""
    if not name:
        name = getattr(model.config, "model_type", None) or type(model).__name__
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def corpus_cache_path(model, n_texts: int, n_tokens: int, seed: int) -> Path:
    return cache_dir() / "corpus" / f"{model_folder_name(model)}-{n_texts}x{n_tokens}-s{seed}.json"


def load_corpus(paths: Sequence[str | os.PathLike] | None, model, tok, *, n_texts: int = 64,
                n_tokens: int = 256, seed: int = 0, batch_size: int = 64,
                progress: bool = True) -> list[str]:
    """Texts for covariance statistics.

    paths: text files; each is split into paragraphs at blank lines (all paragraphs are returned,
        `n_texts`/`n_tokens` do not apply). A missing file raises FileNotFoundError naming it.
    None or empty: `n_texts` texts of `n_tokens` new tokens sampled from `model` (top-k 50, from
        generic one-word prompts), seeded with a forked RNG so the global torch RNG is untouched,
        and cached as JSON under `cache_dir()/corpus/` (reused when present).
    """
    if paths:
        return read_text_files(paths)
    path = corpus_cache_path(model, n_texts, n_tokens, seed)
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            texts = data["texts"] if isinstance(data, dict) else data
            if isinstance(texts, list) and len(texts) == n_texts and all(isinstance(t, str) for t in texts):
                return texts
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache: sample again and overwrite it
    texts = sample_texts(model, tok, n_texts=n_texts, n_tokens=n_tokens, seed=seed,
                         batch_size=batch_size, progress=progress)
    _write_json_atomic(path, {
        "model": str(getattr(model.config, "_name_or_path", "")),
        "n_texts": n_texts, "n_tokens": n_tokens, "seed": seed, "top_k": 50,
        "prompts": list(PROMPTS), "texts": texts,
    })
    return texts


@torch.no_grad()
def sample_texts(model, tok, *, n_texts: int, n_tokens: int, seed: int = 0, batch_size: int = 64,
                 top_k: int = 50, progress: bool = True) -> list[str]:
    """`n_texts` texts of exactly `n_tokens` sampled tokens each (end-of-text suppressed).

    The RNG seed of batch b is derived from (seed, b): results depend on `batch_size` too.
    """
    from tqdm.auto import tqdm

    from .core.devices import model_device

    device = model_device(model)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n_texts)]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    old_side, was_training = tok.padding_side, model.training
    tok.padding_side = "left"  # generation continues after the prompt's last token
    model.eval()
    texts: list[str] = []
    fork_devices = [device] if device.type == "cuda" else []
    try:
        starts = range(0, n_texts, batch_size)
        bar = tqdm(total=len(starts) * n_tokens, desc=f"sampling {n_texts}x{n_tokens} tokens",
                   unit="step", disable=not progress)
        streamer = _StepCounter(bar)
        for b, start in enumerate(starts):
            chunk = prompts[start:start + batch_size]
            enc = tok(chunk, return_tensors="pt", padding=True).to(device)
            with torch.random.fork_rng(devices=fork_devices):
                torch.manual_seed(seed * 1_000_003 + b)
                out = model.generate(
                    **enc, do_sample=True, top_k=top_k, top_p=1.0, temperature=1.0,
                    max_new_tokens=n_tokens, min_new_tokens=n_tokens, pad_token_id=pad_id,
                    num_beams=1, repetition_penalty=1.0,
                    streamer=streamer if progress else None)
            for row, attn in zip(out, enc["attention_mask"]):
                n_pad = int((attn == 0).sum())
                texts.append(tok.decode(row[n_pad:], skip_special_tokens=True).strip())
        bar.close()
    finally:
        tok.padding_side = old_side
        model.train(was_training)
    return texts


class _StepCounter:
    """A `generate` streamer that only advances a progress bar, one tick per generated step."""

    def __init__(self, bar):
        self.bar, self.first = bar, True

    def put(self, value) -> None:
        if self.first:  # the prompt
            self.first = False
            return
        self.bar.update(1)

    def end(self) -> None:
        self.first = True


def _write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
