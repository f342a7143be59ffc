"""LIST pages followed by hand (botocore's paginator model is not loaded)."""

import datetime as dt

import boto3
import pytest
from botocore.stub import Stubber

from nipype_s3.exceptions import NipypeS3Error
from nipype_s3.s3.listing import list_objects

WHEN = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)


def _page(keys, token=None):
    page = {"Contents": [{"Key": k, "Size": 3, "ETag": '"abc"', "LastModified": WHEN}
                         for k in keys], "IsTruncated": token is not None}
    if token:
        page["NextContinuationToken"] = token
    return page


def test_every_page_is_followed_with_its_token():
    client = boto3.client("s3", region_name="us-east-1")
    with Stubber(client) as stub:
        stub.add_response("list_objects_v2", _page(["p/a", "p/b"], "t1"),
                          {"Bucket": "bkt", "Prefix": "p/", "RequestPayer": "requester"})
        stub.add_response("list_objects_v2", _page(["p/c"], "t2"),
                          {"Bucket": "bkt", "Prefix": "p/", "RequestPayer": "requester",
                           "ContinuationToken": "t1"})
        stub.add_response("list_objects_v2", _page([]),
                          {"Bucket": "bkt", "Prefix": "p/", "RequestPayer": "requester",
                           "ContinuationToken": "t2"})
        listing = list_objects(client, "bkt", "p/", request_payer=True)
        stub.assert_no_pending_responses()
    assert sorted(listing) == ["p/a", "p/b", "p/c"]
    assert listing["p/c"].etag == "abc" and listing["p/c"].last_modified == WHEN


def test_a_server_repeating_its_token_is_an_error_not_a_loop():
    client = boto3.client("s3", region_name="us-east-1")
    with Stubber(client) as stub:
        stub.add_response("list_objects_v2", _page(["p/a"], "same"))
        stub.add_response("list_objects_v2", _page(["p/a"], "same"))
        with pytest.raises(NipypeS3Error, match=r"s3://bkt/p/ did not advance"):
            list_objects(client, "bkt", "p/")


def test_a_truncated_page_without_a_token_ends_the_listing():
    client = boto3.client("s3", region_name="us-east-1")
    with Stubber(client) as stub:
        page = _page(["p/a"])
        page["IsTruncated"] = True  # some servers: botocore's paginator stops here too
        stub.add_response("list_objects_v2", page)
        assert list(list_objects(client, "bkt", "p/")) == ["p/a"]


def test_a_native_page_that_fails_is_taken_over_by_botocore_from_its_token(monkeypatch):
    from nipype_s3.s3 import listing

    class Engine:
        calls = []

        def list_page(self, prefix, token, **kwargs):
            self.calls.append(token)
            if token is None:
                return {"objects": [("p/a", 1, "e", WHEN)], "truncated": True, "token": "t1"}
            raise ConnectionError("dropped")

    monkeypatch.setattr(listing, "_engine", lambda client, bucket: Engine())
    client = boto3.client("s3", region_name="us-east-1")
    with Stubber(client) as stub:
        stub.add_response("list_objects_v2", _page(["p/b"], "t2"),
                          {"Bucket": "bkt", "Prefix": "p/", "ContinuationToken": "t1"})
        stub.add_response("list_objects_v2", _page(["p/c"]),
                          {"Bucket": "bkt", "Prefix": "p/", "ContinuationToken": "t2"})
        listing_ = list_objects(client, "bkt", "p/")
        stub.assert_no_pending_responses()
    assert list(listing_) == ["p/a", "p/b", "p/c"]
    assert Engine.calls == [None, "t1"]  # not asked again once it failed
