"""Each REP backend through EasyEdit's editor on each available device, on the tiny llama.

The same call a user makes (`BaseEditor.edit` with `keep_original_weight=True`): the edit runs,
every adapter sits on the edited layer's device in float32, the model's outputs stay finite while
REP is on, and the editor's restore gives back the exact weights with no hook left behind.
"""

import pytest
import torch

import rep_easyedit
from conftest import tiny_hparams_dict
from rep_easyedit import REPHyperParams
from rep_easyedit.core.pathway import installed_paths, pathway_of

REQ = {"prompt": "Ferrari F355 is produced by", "subject": "Ferrari F355", "target_new": "BMW",
       "ground_truth": "Ferrari", "subject_rephrase": ["The F355", "F355 by Ferrari", "Ferrari's F355"]}
TEXTS = [f"Some text number {i} about cars, towers, cities and the people who make them." for i in range(24)]
LAYERS = {"REP-ROME": [1], "REP-R-ROME": [1], "REP-EMMET": [1], "REP-MEMIT": [1, 2]}
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                    reason="needs a CUDA device"))]


def _hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alg", sorted(LAYERS))
def test_rep_backend_edits_and_restores_on_device(alg, device, tiny_model, tokenizer, tmp_path):
    from rep_easyedit.compat.easyedit import editor_class
    from rep_easyedit.covariance import build_stats

    torch.manual_seed(0)
    model = tiny_model.to(device)
    model.config._name_or_path = f"tiny-llama-{alg}-{device}"  # its own statistics and caches
    raw = tiny_hparams_dict(alg, tmp_path, model_name="tiny", layers=LAYERS[alg], lm_head_module="lm_head",
                            mom2_n_samples=1000, device=device)
    hp = REPHyperParams.from_dict(raw)
    build_stats(model, tokenizer, hp, LAYERS[alg], TEXTS, progress=False)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hooks_before = _hooks(model)

    hp.model_name = (model, tokenizer)
    editor = editor_class()(hp)
    editor.model_name = "tiny-llama"
    metrics, edited, weights_copy = editor.edit(
        prompts=[REQ["prompt"]], target_new=[REQ["target_new"]], ground_truth=[REQ["ground_truth"]],
        subject=[REQ["subject"]], subject_rephrase=[REQ["subject_rephrase"]],
        keep_original_weight=True, verbose=False)

    assert len(metrics) == 1
    assert sorted(installed_paths(edited)) == [f"model.layers.{l}.mlp.down_proj" for l in LAYERS[alg]]
    for path in installed_paths(edited):
        module = edited.get_submodule(path)
        for adapter in pathway_of(module).adapters:
            assert all(p.device == module.weight.device and p.dtype == torch.float32
                       for p in adapter.parameters())
    # the editor restored the weights and switched REP off: the model is exactly as before
    rep_easyedit.prune_inactive(edited)
    assert installed_paths(edited) == [] and _hooks(edited) == hooks_before
    after = edited.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    enc = tokenizer([REQ["prompt"]], return_tensors="pt").to(device)
    with torch.no_grad():
        assert torch.isfinite(edited(**enc).logits).all()
