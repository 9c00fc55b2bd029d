import pytest

from rep_easyedit.core.requests import EditRequestError, validate_requests

OK = {"prompt": "Ferrari F355 is produced by", "subject": "Ferrari F355", "target_new": "BMW"}


def test_valid():
    validate_requests([OK])
    validate_requests([dict(OK, prompt="{} is produced by")])


@pytest.mark.parametrize("change, message", [
    ({"subject": "Porsche"}, "does not occur"),
    ({"prompt": "Ferrari F355 beats Ferrari F355 by"}, "occurs 2 times"),
    ({"target_new": "  "}, "target_new` is empty"),
    ({"subject": ""}, "subject` is empty"),
    ({"prompt": None}, "prompt` must be a string"),
])
def test_bad_request(change, message):
    with pytest.raises(EditRequestError, match=message):
        validate_requests([dict(OK, **change)])


def test_batch_limit():
    with pytest.raises(EditRequestError, match="1 fact"):
        validate_requests([OK, OK], max_batch=1, alg_name="REP-ROME")
    with pytest.raises(EditRequestError, match="no requests"):
        validate_requests([])


@pytest.mark.parametrize("prompt", ["The {0} Ferrari F355 is produced by", "Ferrari F355 { is produced by",
                                    "Ferrari F355 {name} is produced by"])
def test_stray_braces(prompt):
    with pytest.raises(EditRequestError, match="braces"):
        validate_requests([dict(OK, prompt=prompt)])


def test_slot_and_literal_subject():
    with pytest.raises(EditRequestError, match="slot and also contains"):
        validate_requests([dict(OK, prompt="Ferrari F355 and {} is produced by")])


def test_bad_subject_rephrases():
    with pytest.raises(EditRequestError, match="subject_rephrase"):
        validate_requests([dict(OK, subject_rephrase=[None, "F355"])])
