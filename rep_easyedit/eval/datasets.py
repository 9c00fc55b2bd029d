"""Editing data sets, read into one record shape.

Every loader returns records with the fields of `data/counterfact_smollm2_dev.json`
(CounterFact with subject rephrases, Yan et al. ACL 2025):

    case_id, prompt (the subject appears in it verbatim), subject, target_new, target_true,
    rephrase_prompt (list), locality_prompt (list), locality_ground_truth (str, or one str per
    locality prompt), subject_rephrase (list)

Formats understood (detected per file from its first record, or named with `fmt=`):

- ``counterfact_rephrase``: the shape above (the project's own data).
- ``counterfact_rome``: ROME's CounterFact (`requested_rewrite: {prompt "{} ...", subject,
  target_new: {str}, target_true: {str}}`, `paraphrase_prompts`, `neighborhood_prompts`).
- ``counterfact_easyedit``: EasyEdit's flat CounterFact (`prompt, subject, target_new,
  ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth`).
- ``zsre``: EasyEdit's ZsRE (`src, subject, alt, answers, rephrase, loc, loc_ans`).

A field that a chosen metric needs but a record lacks raises `DataFormatError` naming the field,
the record's index and its case_id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

FORMATS = ("counterfact_rephrase", "counterfact_rome", "counterfact_easyedit", "zsre")

# metric name -> record fields it needs ("rephrase"/"shuffle"/"long" are the robustness families)
METRIC_FIELDS: dict[str, tuple[str, ...]] = {
    "success": ("prompt", "subject", "target_new"),
    "paraphrase": ("rephrase_prompt",),
    "reversion": ("target_true",),
    "locality": ("locality_prompt", "locality_ground_truth"),
    "fluency": ("prompt",),
    "rephrase": ("subject_rephrase",),
    "shuffle": ("subject",),
    "long": ("prompt",),
    "distract": ("prompt", "subject"),
    "long_old": ("prompt", "target_true"),
    "generation": ("prompt",),
}
ALL_METRICS: tuple[str, ...] = tuple(METRIC_FIELDS)
RECORD_FIELDS = ("case_id", "prompt", "subject", "target_new", "target_true", "rephrase_prompt",
                 "locality_prompt", "locality_ground_truth", "subject_rephrase")


class DataFormatError(ValueError):
    """A data file or record that cannot be used as given."""


def required_fields(metrics: Iterable[str]) -> list[str]:
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in METRIC_FIELDS]
    if unknown:
        raise DataFormatError(f"unknown metric(s) {unknown}; choose from {list(ALL_METRICS)}")
    fields = ["prompt", "subject", "target_new"]
    for m in metrics:
        fields += [f for f in METRIC_FIELDS[m] if f not in fields]
    return fields


def detect_format(raw: dict) -> str:
    if not isinstance(raw, dict):
        raise DataFormatError(f"records must be JSON objects, got {type(raw).__name__}")
    if "requested_rewrite" in raw:
        return "counterfact_rome"
    if "src" in raw or "alt" in raw or "loc_ans" in raw:
        return "zsre"
    if "target_true" in raw or "subject_rephrase" in raw:
        return "counterfact_rephrase"
    if "ground_truth" in raw:
        return "counterfact_easyedit"
    return "counterfact_rephrase"


def _as_list(value) -> list | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _str_or_first(value):
    """`target_new: {"str": ...}` (ROME), `["x", ...]` (ZsRE answers) or a plain string."""
    if isinstance(value, dict):
        return value.get("str")
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


def _fill(prompt, subject):
    if isinstance(prompt, str) and isinstance(subject, str) and "{}" in prompt:
        return prompt.replace("{}", subject)
    return prompt


def _normalise(raw: dict, index: int, fmt: str) -> dict:
    if fmt == "counterfact_rephrase":
        rec = {k: raw.get(k) for k in RECORD_FIELDS}
    elif fmt == "counterfact_rome":
        rw = raw.get("requested_rewrite") or {}
        subject = rw.get("subject")
        true = _str_or_first(rw.get("target_true"))
        rec = {
            "case_id": raw.get("case_id"),
            "prompt": _fill(rw.get("prompt"), subject),
            "subject": subject,
            "target_new": _str_or_first(rw.get("target_new")),
            "target_true": true,
            "rephrase_prompt": _as_list(raw.get("paraphrase_prompts")),
            "locality_prompt": _as_list(raw.get("neighborhood_prompts")),
            "locality_ground_truth": true,
            "subject_rephrase": _as_list(raw.get("subject_rephrase")),
        }
    elif fmt == "counterfact_easyedit":
        rec = {
            "case_id": raw.get("case_id"),
            "prompt": raw.get("prompt"),
            "subject": raw.get("subject"),
            "target_new": _str_or_first(raw.get("target_new")),
            "target_true": _str_or_first(raw.get("ground_truth", raw.get("target_true"))),
            "rephrase_prompt": _as_list(raw.get("rephrase_prompt")),
            "locality_prompt": _as_list(raw.get("locality_prompt")),
            "locality_ground_truth": raw.get("locality_ground_truth"),
            "subject_rephrase": _as_list(raw.get("subject_rephrase")),
        }
    elif fmt == "zsre":
        rec = {
            "case_id": raw.get("case_id"),
            "prompt": raw.get("src"),
            "subject": raw.get("subject"),
            "target_new": _str_or_first(raw.get("alt")),
            "target_true": _str_or_first(raw.get("answers")),
            "rephrase_prompt": _as_list(raw.get("rephrase")),
            "locality_prompt": _as_list(raw.get("loc")),
            "locality_ground_truth": _str_or_first(raw.get("loc_ans")),
            "subject_rephrase": _as_list(raw.get("subject_rephrase")),
        }
    else:
        raise DataFormatError(f"unknown data format {fmt!r}; choose from {list(FORMATS)}")
    if rec["case_id"] is None:
        rec["case_id"] = index
    rec["prompt"] = _fill(rec["prompt"], rec["subject"])
    for key in ("rephrase_prompt", "locality_prompt", "subject_rephrase"):
        rec[key] = _as_list(rec[key])
    return rec


def _missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):
        return len(value) == 0
    return False


def check_record(rec: dict, index: int, metrics: Sequence[str] = ALL_METRICS, source: str = "data") -> None:
    """Raise DataFormatError naming the first field the metrics need that `rec` lacks."""
    where = f"{source}: record {index} (case_id {rec.get('case_id')!r})"
    for field in required_fields(metrics):
        if _missing(rec.get(field)):
            users = [m for m in metrics if field in METRIC_FIELDS[m]] or ["success"]
            raise DataFormatError(
                f"{where} has no `{field}`, needed by the metric(s) {users}; add the field or "
                f"leave those metrics out (data.metrics=[...] in the benchmark config)")
    for field in ("prompt", "subject", "target_new"):
        if not isinstance(rec[field], str):
            raise DataFormatError(f"{where}: `{field}` must be a string, got {type(rec[field]).__name__}")
    if rec["subject"] not in rec["prompt"]:
        raise DataFormatError(f"{where}: subject {rec['subject']!r} does not occur in prompt "
                              f"{rec['prompt']!r}")
    for field in ("rephrase_prompt", "locality_prompt", "subject_rephrase"):
        value = rec.get(field)
        if value is not None and not all(isinstance(x, str) for x in value):
            raise DataFormatError(f"{where}: `{field}` must be a list of strings")
    gt = rec.get("locality_ground_truth")
    if "locality" in metrics and isinstance(gt, list) and len(gt) != len(rec["locality_prompt"]):
        raise DataFormatError(f"{where}: `locality_ground_truth` has {len(gt)} answers for "
                              f"{len(rec['locality_prompt'])} locality prompts; give one string, "
                              f"or one per prompt")


def normalise_records(raws: Sequence[dict], fmt: str = "auto", metrics: Sequence[str] = ALL_METRICS,
                      source: str = "data") -> list[dict]:
    if not isinstance(raws, (list, tuple)):
        raise DataFormatError(f"{source}: expected a JSON list of records, got {type(raws).__name__}")
    if not raws:
        raise DataFormatError(f"{source}: holds no records")
    if fmt == "auto":
        fmt = detect_format(raws[0])
    elif fmt not in FORMATS:
        raise DataFormatError(f"unknown data format {fmt!r}; choose from ['auto', *{list(FORMATS)}]")
    out = []
    for i, raw in enumerate(raws):
        if not isinstance(raw, dict):
            raise DataFormatError(f"{source}: record {i} is a {type(raw).__name__}, not an object")
        rec = _normalise(raw, i, fmt)
        check_record(rec, i, metrics, source)
        out.append(rec)
    ids = [r["case_id"] for r in out]
    if len(set(map(str, ids))) != len(ids):
        raise DataFormatError(f"{source}: case_id values repeat; each record needs its own case_id")
    return out


def load_records(path: str | Path, fmt: str = "auto", metrics: Sequence[str] = ALL_METRICS,
                 limit: int | None = None) -> list[dict]:
    """Read a JSON (list) or JSON-lines file of editing cases in any known format."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        raws = json.loads(text)
    except json.JSONDecodeError:
        try:
            raws = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}: neither JSON nor JSON lines ({e})") from None
    if isinstance(raws, dict) and isinstance(raws.get("data"), list):
        raws = raws["data"]
    records = normalise_records(raws, fmt, metrics, str(path))
    return records[:limit] if limit is not None else records
