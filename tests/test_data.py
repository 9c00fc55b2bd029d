"""Data loading: the project's CounterFact-with-rephrases file and EasyEdit's CounterFact/ZsRE formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rep_easyedit.eval.datasets import (ALL_METRICS, RECORD_FIELDS, DataFormatError, detect_format, load_records,
                               normalise_records)

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT / "data" / "counterfact_smollm2_dev.json"

ROME_CF = {
    "case_id": 0,
    "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                          "target_new": {"str": "English", "id": "Q1860"},
                          "target_true": {"str": "French", "id": "Q150"}, "subject": "Danielle Darrieux"},
    "paraphrase_prompts": ["Shayna does this. Danielle Darrieux spoke the language"],
    "neighborhood_prompts": ["Michel Rocard is a native speaker of", "Pierre Curie spoke the language"],
    "attribute_prompts": ["J.R.R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}
EASYEDIT_CF = {
    "case_id": 3, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
    "target_new": "English", "ground_truth": "French",
    "rephrase_prompt": "Danielle Darrieux spoke the language",
    "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French",
}
ZSRE = {
    "subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
    "pred": "Trinity College", "rephrase": "What university did Watts Humphrey take part in?",
    "alt": "University of Michigan", "answers": ["Illinois Institute of Technology"],
    "loc": "nq question: who played desmond doss father in hacksaw ridge",
    "loc_ans": "Hugo Weaving", "cond": "Trinity College >> University of Michigan || ...",
}
NO_SUBJECT_METRICS = [m for m in ALL_METRICS if m != "rephrase"]


def _write(tmp_path, records, name="d.json"):
    p = tmp_path / name
    p.write_text(json.dumps(records))
    return p


def test_project_dev_data():
    recs = load_records(DEV)
    assert len(recs) == 100
    for r in recs:
        assert set(RECORD_FIELDS) <= set(r)
        assert r["subject"] in r["prompt"] and len(r["subject_rephrase"]) == 10
    assert recs[0]["case_id"] == 300 and recs[0]["target_true"] == "Ferrari"
    assert len(load_records(DEV, limit=5)) == 5


def test_zsre_dev_data_and_its_runner_config():
    import yaml

    conf = yaml.safe_load((ROOT / "benchmarks/conf/data/zsre_dev.yaml").read_text())
    recs = load_records(ROOT / conf["path"], conf["format"], conf["metrics"])
    assert len(recs) == 100 and conf["scoring"] == "token" and "paraphrase" not in conf["metrics"]
    for r in recs:
        assert r["subject"] in r["prompt"] and len(r["subject_rephrase"]) == 10
        assert len(r["locality_prompt"]) == 1 and r["locality_prompt"][0].startswith("nq question:")


def test_rome_counterfact():
    assert detect_format(ROME_CF) == "counterfact_rome"
    [r] = normalise_records([ROME_CF], metrics=NO_SUBJECT_METRICS)
    assert r["prompt"] == "The mother tongue of Danielle Darrieux is"
    assert (r["target_new"], r["target_true"], r["locality_ground_truth"]) == ("English", "French", "French")
    assert r["rephrase_prompt"] == ROME_CF["paraphrase_prompts"]
    assert r["locality_prompt"] == ROME_CF["neighborhood_prompts"]


def test_easyedit_counterfact(tmp_path):
    path = _write(tmp_path, [EASYEDIT_CF])
    [r] = load_records(path, metrics=NO_SUBJECT_METRICS)
    assert r["case_id"] == 3 and r["target_true"] == "French"
    assert r["rephrase_prompt"] == ["Danielle Darrieux spoke the language"]
    assert r["locality_prompt"] == ["Michel Rocard is a native speaker of"]


def test_zsre(tmp_path):
    path = _write(tmp_path, [ZSRE, dict(ZSRE, subject="Watts Humphrey")])
    recs = load_records(path, metrics=NO_SUBJECT_METRICS)
    r = recs[0]
    assert detect_format(ZSRE) == "zsre"
    assert r["case_id"] == 0 and recs[1]["case_id"] == 1
    assert r["prompt"] == ZSRE["src"] and r["target_new"] == "University of Michigan"
    assert r["target_true"] == "Illinois Institute of Technology"
    assert r["locality_prompt"] == [ZSRE["loc"]] and r["locality_ground_truth"] == "Hugo Weaving"


def test_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in [EASYEDIT_CF, dict(EASYEDIT_CF, case_id=4)]))
    assert [r["case_id"] for r in load_records(p, metrics=NO_SUBJECT_METRICS)] == [3, 4]


def test_missing_field_names_field_and_case(tmp_path):
    # ZsRE has no subject rephrases: the rephrase robustness metric cannot run on it
    path = _write(tmp_path, [ZSRE])
    with pytest.raises(DataFormatError, match=r"record 0 \(case_id 0\).*`subject_rephrase`.*'rephrase'"):
        load_records(path)
    dev = json.loads(DEV.read_text())[:3]
    del dev[2]["locality_ground_truth"]
    with pytest.raises(DataFormatError, match=r"record 2 \(case_id %d\).*`locality_ground_truth`.*locality"
                       % dev[2]["case_id"]):
        normalise_records(dev)
    # without the locality metric the same records load
    assert len(normalise_records(dev, metrics=["success", "paraphrase"])) == 3
    bad = dict(EASYEDIT_CF)
    bad.pop("target_new")
    with pytest.raises(DataFormatError, match="`target_new`"):
        normalise_records([bad], metrics=["success"])


def test_subject_must_be_in_prompt():
    rec = dict(EASYEDIT_CF, subject="Someone Else")
    with pytest.raises(DataFormatError, match="does not occur in prompt"):
        normalise_records([rec], metrics=["success"])


def test_unknown_metric_and_format(tmp_path):
    with pytest.raises(DataFormatError, match="unknown metric"):
        normalise_records([EASYEDIT_CF], metrics=["bogus"])
    with pytest.raises(DataFormatError, match="unknown data format"):
        normalise_records([EASYEDIT_CF], fmt="nope")
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "missing.json")


def test_repeated_case_ids():
    with pytest.raises(DataFormatError, match="case_id values repeat"):
        normalise_records([EASYEDIT_CF, EASYEDIT_CF], metrics=["success"])
