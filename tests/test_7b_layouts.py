"""The 7B YAMLs against their real architectures, built from the published configs on `meta`.

No 7B weights are reachable here; a model built on the meta device has every module and shape
and no storage, which is all a layout check needs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# published configs (config.json of each model on the hub), the fields that fix the layout
CONFIGS = {
    "llama-7b": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                      tie_word_embeddings=False)),
    "mistral-7b": ("MistralConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                          num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                          tie_word_embeddings=False)),
    "qwen2-7b": ("Qwen2Config", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                      num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                      tie_word_embeddings=False)),
}

_MODELS: dict = {}


def meta_model(name: str):
    if name not in _MODELS:
        import transformers
        from transformers import AutoModelForCausalLM

        cls_name, fields = CONFIGS[name]
        config = getattr(transformers, cls_name)(**fields)
        with torch.device("meta"):
            _MODELS[name] = AutoModelForCausalLM.from_config(config)
    return _MODELS[name]


YAMLS = sorted(p for p in (REPO / "hparams").glob("REP-*/*-7b*.yaml"))


def test_every_7b_model_has_its_yamls():
    names = {(p.parent.name, p.stem) for p in YAMLS}
    for alg in ("REP-ROME", "REP-MEMIT", "REP-R-ROME", "REP-EMMET"):
        for model in CONFIGS:
            assert (alg, model) in names and (alg, f"{model}-paper") in names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_yaml_resolves_on_its_architecture(path):
    import rep_easyedit
    from rep_easyedit.core.adapter import GatedLowRankAdapter
    from rep_easyedit.core.pathway import get_module
    from rep_easyedit.rep_main import blocks_to_replay, edited_module_paths

    model = meta_model(path.stem.removesuffix("-paper"))
    hp = rep_easyedit.REPHyperParams.from_hparams(path)
    paths = edited_module_paths(model, hp.backend_hparams())  # every module field, every layer
    assert sorted(paths) == sorted(hp.layers)
    n_layers = model.config.num_hidden_layers
    assert all(0 <= layer < n_layers for layer in hp.layers)
    for path_ in paths.values():
        down = get_module(model, path_)
        # the adapter acts on the down-projection's input: D = intermediate size
        assert down.in_features == model.config.intermediate_size
        adapter = GatedLowRankAdapter(down.in_features, hp.rep.rank, hp.rep.gate_ratio, hp.rep.tau)
        assert adapter.down.in_features == down.weight.shape[1]
        assert adapter.up.out_features == down.weight.shape[1]
    # a multi-layer YAML's key collections replay the blocks below (rep.replay_blocks) on this layout
    blocks = blocks_to_replay(model, hp.backend_hparams(), paths)
    if len(paths) > 1:
        assert blocks == [model.model.layers[i] for i in range(max(paths) + 1)]
    else:
        assert blocks is None


def test_the_default_recipe_yamls_carry_no_per_model_rep_tuning():
    """Only backend fields differ per model; the rep: section is REPConfig's (MEMIT: key timing)."""
    import dataclasses

    import rep_easyedit

    defaults = dataclasses.asdict(rep_easyedit.REPConfig())
    # a -value.yaml preset adds only the measured value-fit settings to the default recipe
    value_fit = {"value_on_variants", "value_variant_templates", "value_anchors", "value_anchor_weight",
                 "value_anchor_max_share", "kin_negatives", "kin_mine", "answer_negatives"}
    for path in sorted((REPO / "hparams").glob("REP-*/*.yaml")):
        if path.stem.endswith("-paper"):
            continue
        rep = dataclasses.asdict(rep_easyedit.REPHyperParams.from_hparams(path).rep)
        differs = {k for k in defaults if rep[k] != defaults[k]}
        allowed = {"fit_after_update"} | (value_fit if path.stem.endswith("-value") else set())
        assert differs <= allowed, f"{path}: {differs}"


def test_a_yaml_naming_a_missing_module_is_a_clear_error():
    import rep_easyedit
    from rep_easyedit.rep_main import LayoutError, edited_module_paths

    model = meta_model("llama-7b")
    raw = rep_easyedit.REPHyperParams.from_hparams(REPO / "hparams/REP-ROME/llama-7b.yaml").to_dict()
    raw["ln_f_module"] = "transformer.ln_f"   # GPT-2's name, not LLaMA's
    hp = rep_easyedit.REPHyperParams.from_dict(raw)
    with pytest.raises(LayoutError, match=r"ln_f_module.*transformer\.ln_f"):
        edited_module_paths(model, hp.backend_hparams())
    raw["ln_f_module"] = "model.norm"
    raw["layers"] = [32]
    with pytest.raises(LayoutError, match="outside the model's 0..31"):
        edited_module_paths(model, rep_easyedit.REPHyperParams.from_dict(raw).backend_hparams())
