import pytest

from rep_easyedit.requests import EditRequestError, validate_requests

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
