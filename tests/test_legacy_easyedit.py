"""What only the PyPI release (`easyeditor==0.0.1.dev0`) needs (`make test`; skipped upstream).

The shims must find the release's known defects (hard-coded `cuda:{device}`, a tuple-indexing
`compute_z`), and the release's idea of a kept edit is `keep_original_weight=False`: a test of the
shims that passed on an EasyEdit without those defects would prove nothing.
"""

import pytest

import rep_easyedit  # noqa: F401 - imports the installed EasyEdit with its shims

pytestmark = pytest.mark.legacy_easyedit


def test_the_releases_defects_are_found_and_shimmed():
    from rep_easyedit.compat.easyedit import shimmed_functions
    from rep_easyedit.compat.legacy_shims import decoder_layer_returns_tensor

    shimmed = shimmed_functions()
    for name in ("easyeditor.models.rome.compute_v.compute_v", "easyeditor.models.memit.memit_main.get_cov",
                 "easyeditor.evaluate.evaluate_utils.test_prediction_acc"):
        assert "cuda_literal" in shimmed[name], name
    if decoder_layer_returns_tensor():
        assert "layer_output_tuple" in shimmed["easyeditor.models.memit.compute_z.compute_z"]


def test_the_release_keeps_edits_with_keep_original_weight_and_has_no_r_rome():
    from rep_easyedit.compat.easyedit import alg_dicts, editor_uses_sequential_flag
    from rep_easyedit.editing import keep_edit_kwargs

    assert not editor_uses_sequential_flag()
    assert keep_edit_kwargs() == {"keep_original_weight": False}
    # R-ROME, EMMET and AlphaEdit are ours (rep_easyedit/backends_extra/) on the release
    for name in ("R-ROME", "EMMET", "AlphaEdit"):
        fn = alg_dicts()[0][name]
        assert getattr(fn, "__rep_easyedit_original__", fn).__module__.startswith("rep_easyedit.backends_extra")
