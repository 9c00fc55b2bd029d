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
    if "{}" in prompt:
        count = 1 if prompt.count("{}") == 1 else prompt.count("{}")
        if count != 1:
            raise EditRequestError(f"{where}: the prompt template has {count} `{{}}` slots; use one")
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


def validate_requests(requests: list[dict], max_batch: int | None = None, alg_name: str = "") -> None:
    if not isinstance(requests, (list, tuple)) or not requests:
        raise EditRequestError("no requests given: pass a non-empty list of edit requests")
    if max_batch is not None and len(requests) > max_batch:
        raise EditRequestError(
            f"{alg_name} edits {max_batch} fact(s) per call but got {len(requests)}; use "
            f"`editor.edit(...)` (one at a time) or a batch method such as REP-MEMIT/REP-EMMET")
    for i, request in enumerate(requests):
        validate_request(request, i)
