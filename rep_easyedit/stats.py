"""Build covariance statistics offline, where EasyEdit's `layer_stats` looks for them.

    python -m rep_easyedit.stats --hparams hparams/REP-ROME/smollm2-135m.yaml \
        [--corpus a.txt b.txt] [--layers 3 4] [--force]

Without --corpus, text is sampled from the model and cached (see `rep_easyedit.corpus`).
Reads only model_name, layers, rewrite_module_tmp, stats_dir, mom2_dataset, mom2_n_samples,
mom2_dtype and device from the YAML.
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace

KEYS = ("model_name", "layers", "rewrite_module_tmp", "stats_dir", "mom2_dataset",
        "mom2_n_samples", "mom2_dtype", "device")
DEFAULTS = {"stats_dir": "./data/stats", "mom2_dataset": "wikipedia", "mom2_n_samples": 100000,
            "mom2_dtype": "float32", "device": "cpu"}


def read_hparams(path: str) -> SimpleNamespace:
    from .hparams import read_hparams_file

    _, cfg = read_hparams_file(path)
    values = {k: cfg.get(k, DEFAULTS.get(k)) for k in KEYS}
    missing = [k for k in ("model_name", "layers", "rewrite_module_tmp") if values[k] is None]
    if missing:
        raise SystemExit(f"{path}: missing key(s) {missing}")
    if values["device"] is None:
        values["device"] = "cpu"
    return SimpleNamespace(**values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rep_easyedit.stats", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hparams", required=True, help="EasyEdit/REP hparams YAML")
    parser.add_argument("--corpus", nargs="+", default=None,
                        help="text files (one text per paragraph); default: sample from the model")
    parser.add_argument("--layers", nargs="+", type=int, default=None,
                        help="layers (default: the YAML's `layers`)")
    parser.add_argument("--n-texts", type=int, default=64, help="texts to sample (no --corpus)")
    parser.add_argument("--n-tokens", type=int, default=256, help="tokens per sampled text")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512, help="truncate texts to this")
    parser.add_argument("--device", default=None, help="override the YAML's device")
    parser.add_argument("--force", action="store_true", help="rebuild existing statistics")
    args = parser.parse_args(argv)

    from .corpus import load_corpus
    from .covariance import build_stats, has_stats, stats_paths
    from .model_loading import load_model_and_tokenizer

    hp = read_hparams(args.hparams)
    if args.device is not None:
        hp.device = args.device
    layers = args.layers if args.layers else list(hp.layers)
    print(f"[rep-easyedit] loading {hp.model_name} on {hp.device}", flush=True)
    model, tok = load_model_and_tokenizer(hp.model_name, device=hp.device)

    todo = [layer for layer in layers if args.force or not has_stats(model, hp, layer)]
    for layer in layers:
        if layer not in todo:
            print(f"layer {layer}: present, skipped (--force rebuilds): "
                  f"{stats_paths(model, hp, layer)[0]}")
    if not todo:
        return 0

    texts = load_corpus(args.corpus, model, tok, n_texts=args.n_texts, n_tokens=args.n_tokens,
                        seed=args.seed)
    source = ", ".join(args.corpus) if args.corpus else "text sampled from the model"
    print(f"[rep-easyedit] corpus: {len(texts)} texts ({source})", flush=True)
    figs = build_stats(model, tok, hp, todo, texts, batch_size=args.batch_size,
                       max_length=args.max_length)
    print(f"tokens: {figs['tokens']}  texts: {figs['texts']}  seconds: {figs['seconds']:.1f}  "
          f"tokens/s: {figs['tokens_per_s']:.0f}  seconds/layer: {figs['seconds_per_layer']:.2f}")
    for layer, paths in figs["paths"].items():
        for p in paths:
            print(f"layer {layer}: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
