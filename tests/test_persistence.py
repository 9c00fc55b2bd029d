"""Saving and loading REP pathways and edited models (tiny random llama)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rep_easyedit import REPHyperParams, apply_rep_to_model
from rep_easyedit.core.adapter import GatedLowRankAdapter
from rep_easyedit.core.pathway import installed_paths, install, pathway_of, remove_pathways
from rep_easyedit.core.persistence import (ADAPTERS_FILE, PATHWAY_FILE, PathwayLayoutError, load_pathway,
                                      save_edited_model, save_pathway)

ROOT = Path(__file__).resolve().parents[1]
PATH1 = "model.layers.1.mlp.down_proj"
REQ = {"prompt": "Ferrari F355 is produced by", "subject": "Ferrari F355", "target_new": "BMW",
       "case_id": 1, "subject_rephrase": ["The F355", "F355 by Ferrari", "Ferrari's F355", "F355"]}


def cheap_hparams(tmp_path, **changes):
    raw = yaml.safe_load((ROOT / "hparams/REP-ROME/smollm2-135m.yaml").read_text())
    # v_num_grad_steps 2: with 1, ROME's compute_v never steps its optimiser and the update is 0
    raw.update(layers=[1], v_loss_layer=3, v_num_grad_steps=2, context_template_length_params=[[3, 5]],
               stats_dir=str(tmp_path / "stats"))
    raw["rep"].update(steps=2, n_long_contexts=0, corpus_negative_texts=0)
    raw.update(changes)
    return REPHyperParams.from_dict(raw)


def tiny_llama(tok, layers=4, intermediate=128, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=len(tok),
                      max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).eval()


def hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def logits(model, tok):
    enc = tok(["Ferrari F355 is produced by", "The F355 by Ferrari is made by", "Paris is in"],
              return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


def base_state(model):
    """The model's own tensors (no pathway keys)."""
    return {k: v.clone() for k, v in model.state_dict().items() if ".rep_pathway." not in k}


def randomise(adapter: GatedLowRankAdapter, seed: int) -> GatedLowRankAdapter:
    """Non-trivial adapter weights, and a gate that fires (so the adapter changes outputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            if p is not adapter.active:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        adapter.gate[2].bias.fill_(5.0)
    return adapter


@pytest.fixture()
def edited(tiny_model, tokenizer, tmp_path):
    hp = cheap_hparams(tmp_path)
    model, _ = apply_rep_to_model(tiny_model, tokenizer, [dict(REQ)], hp, return_orig_weights=True,
                                  keep_original_weight=True)
    assert installed_paths(model) == [PATH1]
    return model, hp


def test_save_pathway_writes_keys_and_layout(edited, tmp_path):
    from safetensors.torch import load_file

    model, hp = edited
    save_pathway(model, tmp_path / "p", hparams={"alg_name": hp.alg_name, "layers": [1]})
    tensors = load_file(str(tmp_path / "p" / ADAPTERS_FILE))
    own = {k: v for k, v in model.state_dict().items() if ".rep_pathway." in k}
    assert set(tensors) == set(own) and tensors
    assert all(k.startswith(f"{PATH1}.rep_pathway.adapters.0.") for k in tensors)
    assert all(torch.equal(tensors[k], own[k].cpu()) and tensors[k].dtype == torch.float32 for k in own)
    meta = json.loads((tmp_path / "p" / PATHWAY_FILE).read_text())
    assert meta["format_version"] == 1
    assert meta["model"] == {"name_or_path": "", "model_type": "llama", "num_hidden_layers": 4,
                             "intermediate_size": 128}
    entry = meta["pathways"][PATH1]
    assert entry["num_adapters"] == 1
    adapter = pathway_of(model.get_submodule(PATH1)).adapters[0]
    assert entry["adapters"] == [{"dim": 128, "rank": adapter.rank, "gate_hidden": adapter.gate[0].out_features, "tau": adapter.tau,
                                  "active": 1.0}]
    assert meta["hparams"] == {"alg_name": "REP-ROME", "layers": [1]}


def test_load_pathway_reproduces_logits(edited, tokenizer, tmp_path):
    model, hp = edited
    save_pathway(model, tmp_path / "p", hparams=hp)  # an hparams object is stored as a dict
    assert json.loads((tmp_path / "p" / PATHWAY_FILE).read_text())["hparams"]["alg_name"] == "REP-ROME"
    fresh = tiny_llama(tokenizer)
    fresh.load_state_dict(base_state(model))
    assert hooks(fresh) == 0
    assert load_pathway(fresh, tmp_path / "p") == [PATH1]
    loaded = pathway_of(fresh.get_submodule(PATH1)).adapters[0]
    assert not loaded.training and all(p.dtype == torch.float32 and not p.requires_grad
                                       for p in loaded.parameters())
    assert torch.equal(logits(fresh, tokenizer), logits(model, tokenizer))
    assert fresh.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())


def test_stacked_adapters_and_several_paths_round_trip(tiny_model, tokenizer, tmp_path):
    paths = [PATH1, PATH1, "model.layers.2.mlp.down_proj"]
    for i, path in enumerate(paths):
        install(tiny_model, path, randomise(GatedLowRankAdapter(128, rank=4 + i, tau=0.5), i))
    pathway_of(tiny_model.get_submodule(PATH1)).adapters[1].active.zero_()  # an inactive one too
    reference = logits(tiny_model, tokenizer)  # (drops nothing: layer 1 still has an active adapter)
    assert not torch.equal(reference, logits(tiny_llama(tokenizer), tokenizer))  # the adapters act
    save_pathway(tiny_model, tmp_path / "p")
    meta = json.loads((tmp_path / "p" / PATHWAY_FILE).read_text())
    assert meta["pathways"][PATH1]["num_adapters"] == 2
    assert [a["active"] for a in meta["pathways"][PATH1]["adapters"]] == [1.0, 0.0]
    assert [a["rank"] for a in meta["pathways"][PATH1]["adapters"]] == [4, 5]
    fresh = tiny_llama(tokenizer)
    load_pathway(fresh, tmp_path / "p")
    assert installed_paths(fresh) == [PATH1, paths[2]]
    assert torch.equal(logits(fresh, tokenizer), reference)


def _meta_edit(directory, fn):
    f = Path(directory) / PATHWAY_FILE
    meta = json.loads(f.read_text())
    fn(meta)
    f.write_text(json.dumps(meta))


@pytest.mark.parametrize("case, message", [
    ("layers", "num_hidden_layers=4.*num_hidden_layers=3"),
    ("dim", "dim 128 but the module's input feature size is 96"),
    ("path", "'model.layers.1.mlp.nope' of the saved pathway does not exist"),
    ("model_type", "model_type='gpt2'"),
    ("missing_tensor", "lacks tensor"),
    ("count", "num_adapters"),
])
def test_layout_mismatch_is_refused_before_installing(tokenizer, tmp_path, case, message):
    source = tiny_llama(tokenizer)
    install(source, PATH1, randomise(GatedLowRankAdapter(128, rank=4), 0))
    save_pathway(source, tmp_path / "p")
    target = tiny_llama(tokenizer)
    if case == "layers":
        target = tiny_llama(tokenizer, layers=3)
    elif case == "dim":
        target = tiny_llama(tokenizer, intermediate=96)
    elif case == "path":
        _meta_edit(tmp_path / "p", lambda m: m["pathways"].update(
            {"model.layers.1.mlp.nope": m["pathways"].pop(PATH1)}))
    elif case == "model_type":
        _meta_edit(tmp_path / "p", lambda m: m["model"].update(model_type="gpt2"))
    elif case == "missing_tensor":
        from safetensors.torch import load_file, save_file

        f = str(tmp_path / "p" / ADAPTERS_FILE)
        tensors = load_file(f)
        tensors.pop(next(k for k in tensors if k.endswith("up.weight")))
        save_file(tensors, f)
    elif case == "count":
        _meta_edit(tmp_path / "p", lambda m: m["pathways"][PATH1].update(num_adapters=2))
    before = base_state(target)
    with pytest.raises(PathwayLayoutError, match=message):
        load_pathway(target, tmp_path / "p")
    assert isinstance(PathwayLayoutError("x"), ValueError)
    assert installed_paths(target) == [] and hooks(target) == 0
    assert target.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_extra_tensor_and_missing_files(tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file

    source = tiny_llama(tokenizer)
    install(source, PATH1, GatedLowRankAdapter(128, rank=4))
    save_pathway(source, tmp_path / "p")
    f = str(tmp_path / "p" / ADAPTERS_FILE)
    save_file(dict(load_file(f), **{"stray.weight": torch.zeros(2)}), f)
    target = tiny_llama(tokenizer)
    with pytest.raises(PathwayLayoutError, match="stray.weight"):
        load_pathway(target, tmp_path / "p")
    with pytest.raises(FileNotFoundError, match="no saved REP pathway"):
        load_pathway(target, tmp_path / "nothing")
    assert hooks(target) == 0


def test_loading_over_an_existing_pathway(tokenizer, tmp_path):
    source = tiny_llama(tokenizer)
    install(source, PATH1, randomise(GatedLowRankAdapter(128, rank=4), 0))
    save_pathway(source, tmp_path / "p")
    target = tiny_llama(tokenizer)
    install(target, PATH1, randomise(GatedLowRankAdapter(128, rank=3), 1))
    with pytest.raises(PathwayLayoutError, match="already carries"):
        load_pathway(target, tmp_path / "p")
    assert [a.rank for a in pathway_of(target.get_submodule(PATH1)).adapters] == [3]
    load_pathway(target, tmp_path / "p", replace=True)
    assert [a.rank for a in pathway_of(target.get_submodule(PATH1)).adapters] == [4]
    assert hooks(target) == 1
    assert torch.equal(logits(target, tokenizer), logits(source, tokenizer))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_into_low_precision_model_keeps_float32_adapters(tokenizer, tmp_path, dtype):
    source = tiny_llama(tokenizer)
    install(source, PATH1, randomise(GatedLowRankAdapter(128, rank=4), 0))
    save_pathway(source, tmp_path / "p")
    target = tiny_llama(tokenizer).to(dtype)
    load_pathway(target, tmp_path / "p")
    pathway = pathway_of(target.get_submodule(PATH1))
    assert all(p.dtype == torch.float32 for p in pathway.parameters())
    keys = torch.randn(2, 5, 128).to(dtype)
    assert pathway(keys).dtype == dtype
    out = logits(target, tokenizer)
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_save_edited_model_excludes_adapters_and_restores_children(edited, tokenizer, tmp_path):
    from safetensors import safe_open

    model, hp = edited
    n_hooks, keys = hooks(model), list(model.state_dict())
    reference = logits(model, tokenizer)
    out = save_edited_model(model, tokenizer, tmp_path / "m", hparams=hp)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", ADAPTERS_FILE, PATHWAY_FILE, "tokenizer_config.json"} <= files
    weight_files = sorted(out.glob("model*.safetensors"))
    assert weight_files
    saved = set()
    for wf in weight_files:
        with safe_open(str(wf), "pt") as f:
            saved |= set(f.keys())
    assert not any("rep_pathway" in k for k in saved)
    assert f"{PATH1}.weight" in saved
    # the pathway is back, exactly as it was
    assert installed_paths(model) == [PATH1] and hooks(model) == n_hooks
    assert list(model.state_dict()) == keys
    assert torch.equal(logits(model, tokenizer), reference)


def test_save_edited_model_restores_children_on_error(edited, tokenizer, tmp_path, monkeypatch):
    model, _ = edited
    n_hooks, reference = hooks(model), logits(model, tokenizer)

    def failing(*args, **kwargs):
        assert not any("rep_pathway" in k for k in model.state_dict())
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", failing)
    with pytest.raises(OSError, match="disk full"):
        save_edited_model(model, tokenizer, tmp_path / "m")
    assert installed_paths(model) == [PATH1] and hooks(model) == n_hooks
    assert torch.equal(logits(model, tokenizer), reference)


SCRIPT = r"""
import sys, torch
torch.set_num_threads(int(sys.argv[3]))
from transformers import AutoModelForCausalLM, AutoTokenizer
import rep_easyedit
from rep_easyedit.core import persistence
load_pathway = getattr(rep_easyedit, "load_pathway", persistence.load_pathway)
directory, reference = sys.argv[1], torch.load(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(directory).eval()
tok = AutoTokenizer.from_pretrained(directory)
assert model.dtype == torch.float32, model.dtype
ids = tok(reference["texts"], return_tensors="pt", padding=True)
assert torch.equal(ids["input_ids"], reference["input_ids"]), "tokenizer differs"
plain = model(**ids).logits
paths = load_pathway(model, directory)
with torch.no_grad():
    out = model(**ids).logits
print("PATHS", paths)
print("EQUAL", torch.equal(out, reference["logits"]))
print("PLAIN_DIFFERS", not torch.equal(plain, reference["logits"]))
"""


def test_fresh_process_reproduces_edited_logits(edited, tokenizer, tmp_path):
    model, hp = edited
    # a second, firing adapter, so the pathway surely changes the logits
    install(model, "model.layers.2.mlp.down_proj", randomise(GatedLowRankAdapter(128, rank=4, tau=0.5), 3))
    texts = ["Ferrari F355 is produced by", "The F355 by Ferrari is made by", "Paris is in"]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = model(**enc).logits
    save_edited_model(model, tokenizer, tmp_path / "m", hparams=hp)
    torch.save({"texts": texts, "input_ids": enc["input_ids"], "logits": reference}, tmp_path / "ref.pt")
    script = tmp_path / "check.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "m"), str(tmp_path / "ref.pt"),
                             str(torch.get_num_threads())], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"PATHS ['{PATH1}', 'model.layers.2.mlp.down_proj']" in result.stdout
    assert "EQUAL True" in result.stdout, result.stdout[-2000:]
    assert "PLAIN_DIFFERS True" in result.stdout
