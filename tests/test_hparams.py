from pathlib import Path

import pytest
import yaml

import rep_easyedit
from rep_easyedit import HParamsError, REPHyperParams

ROOT = Path(__file__).resolve().parents[1]
YAML = ROOT / "hparams" / "REP-ROME" / "smollm2-135m.yaml"


def _write(tmp_path, data):
    p = tmp_path / "h.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _raw():
    return yaml.safe_load(YAML.read_text())


def test_loads_shipped_yaml(tmp_path):
    hp = REPHyperParams.from_hparams(YAML)
    assert hp.alg_name == "REP-ROME" and hp.backend_name == "ROME"
    assert hp.layers == [3] and isinstance(hp.v_lr, float) and hp.v_lr == 0.5
    assert hp.rep == rep_easyedit.REPConfig()  # the shipped file uses the default recipe
    text = YAML.read_text().replace("rep:\n", "rep:\n  lr: 3e-3\n  rank: 16\n", 1)
    (tmp_path / "hp.yaml").write_text(text)
    changed = REPHyperParams.from_hparams(tmp_path / "hp.yaml")
    assert changed.rep.rank == 16 and isinstance(changed.rep.lr, float)
    assert changed.rep.lr == pytest.approx(3e-3)  # "3e-3" in YAML 1.1 is a string
    base = hp.backend_hparams()
    assert type(base).__name__ == "ROMEHyperParams" and base.alg_name == "ROME"


@pytest.mark.parametrize("backend", ["ROME", "MEMIT", "R-ROME", "EMMET", "AlphaEdit"])
def test_every_rep_method_is_registered(backend):
    from rep_easyedit.compat.easyedit import installed_algorithm

    assert f"REP-{backend}" in rep_easyedit.REGISTERED
    assert installed_algorithm(f"REP-{backend}") is rep_easyedit.apply_rep_to_model


def test_unknown_rep_key_named(tmp_path):
    raw = _raw(); raw["rep"]["rnak"] = 4
    with pytest.raises(HParamsError, match="rnak"):
        REPHyperParams.from_hparams(_write(tmp_path, raw))


def test_unknown_backend_key_named(tmp_path):
    raw = _raw(); raw["v_lrr"] = 0.1
    with pytest.raises(HParamsError, match="v_lrr"):
        REPHyperParams.from_hparams(_write(tmp_path, raw))


def test_wrong_type_named(tmp_path):
    raw = _raw(); raw["rep"]["steps"] = "many"
    with pytest.raises(HParamsError, match="steps"):
        REPHyperParams.from_hparams(_write(tmp_path, raw))
    raw = _raw(); raw["v_num_grad_steps"] = "lots"
    with pytest.raises(HParamsError, match="v_num_grad_steps"):
        REPHyperParams.from_hparams(_write(tmp_path, raw))


def test_wrong_alg_name(tmp_path):
    raw = _raw(); raw["alg_name"] = "ROME"
    with pytest.raises(HParamsError, match="alg_name"):
        REPHyperParams.from_hparams(_write(tmp_path, raw))
    raw["alg_name"] = "REP-FOO"
    with pytest.raises(HParamsError, match="REP-FOO"):
        REPHyperParams.from_hparams(_write(tmp_path, raw))


def test_missing_required_key(tmp_path):
    raw = _raw(); del raw["layers"]
    with pytest.raises(HParamsError, match="layers"):
        REPHyperParams.from_hparams(_write(tmp_path, raw))


def test_bad_rep_value(tmp_path):
    raw = _raw(); raw["rep"]["train_on"] = ["subject", "paraphrase"]
    with pytest.raises(HParamsError, match="paraphrase"):
        REPHyperParams.from_hparams(_write(tmp_path, raw))


def test_scientific_notation_is_a_float(tmp_path):
    raw = _raw(); raw["rep"]["lr"] = "5e-4"
    hp = REPHyperParams.from_hparams(_write(tmp_path, raw))
    assert hp.rep.lr == pytest.approx(5e-4)


@pytest.mark.parametrize("model", ["llama-7b", "mistral-7b", "qwen2-7b", "smollm2-135m"])
@pytest.mark.parametrize("alg", ["REP-ROME", "REP-MEMIT", "REP-R-ROME", "REP-EMMET"])
def test_every_shipped_yaml_loads(alg, model):
    path = ROOT / "hparams" / alg / f"{model}.yaml"
    if not path.exists():
        pytest.fail(f"{path} is missing")
    hp = REPHyperParams.from_hparams(path)
    assert hp.alg_name == alg
