"""Checking edit requests before anything changes, with errors that say what to fix."""

from __future__ import annotations


class EditRequestError(ValueError):
    """A request that cannot be edited as given."""


def validate_request(request: dict, index: int = 0) -> None:
    where = f"request {index}"
    for key in ("prompt", "subject", "target_new"):
        value = request.get(key)
        if not isinstance(value, str):
            raise EditRequestError(f"{where}: `{key}` must be a string, got {type(value).__name__}")
        if not value.strip():
            raise EditRequestError(f"{where}: `{key}` is empty; give a non-empty {key}")
    prompt, subject = request["prompt"], request["subject"]
    slots = prompt.count("{}")
    stray = prompt.replace("{}", "")
    if "{" in stray or "}" in stray:
        raise EditRequestError(
            f"{where}: prompt {prompt!r} has braces other than one `{{}}` subject slot; EasyEdit "
            f"formats prompts with str.format, so remove them")
    if slots > 1:
        raise EditRequestError(f"{where}: the prompt template has {slots} `{{}}` slots; use one")
    if slots == 1:
        if subject in prompt:
            raise EditRequestError(
                f"{where}: prompt {prompt!r} has a `{{}}` slot and also contains the subject "
                f"{subject!r}; use one or the other")
        _validate_variants(request, where)
        return
    count = prompt.count(subject)
    if count == 0:
        raise EditRequestError(
            f"{where}: subject {subject!r} does not occur in prompt {prompt!r}; "
            f"the subject must appear verbatim (same case and spacing) in the prompt")
    if count > 1:
        raise EditRequestError(
            f"{where}: subject {subject!r} occurs {count} times in prompt {prompt!r}; "
            f"rephrase the prompt so the subject appears exactly once")
    _validate_variants(request, where)


def _validate_variants(request: dict, where: str) -> None:
    for key in ("subject_rephrase", "rephrase_subjects"):
        value = request.get(key)
        if value is None or isinstance(value, str):
            continue
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise EditRequestError(f"{where}: `{key}` must be a list of strings, got {value!r}")


def validate_requests(requests: list[dict], max_batch: int | None = None, alg_name: str = "") -> None:
    if not isinstance(requests, (list, tuple)) or not requests:
        raise EditRequestError("no requests given: pass a non-empty list of edit requests")
    if max_batch is not None and len(requests) > max_batch:
        raise EditRequestError(
            f"{alg_name} edits {max_batch} fact(s) per call but got {len(requests)}; use "
            f"`editor.edit(...)` (one at a time) or a batch method such as REP-MEMIT/REP-EMMET")
    for i, request in enumerate(requests):
        validate_request(request, i)
