"""Ranges of large objects (``s3.ranged``): how an object is cut, and an answer that is
not the range asked for."""

import io
import os
import threading

import boto3
from botocore.response import StreamingBody
from botocore.stub import Stubber
from hypothesis import given
from hypothesis import strategies as st

from nipype_s3.s3 import ranged

MiB = 1024 * 1024


@given(st.integers(min_value=0, max_value=10 * ranged.RANGE_SIZE))
def test_ranges_cover_the_object_once_in_ranges_of_about_one_size(size):
    parts = ranged.ranges(size)
    assert parts[0][0] == 0
    # each range starts where the one before it ends: no gap, no overlap
    assert all(a + n == b for (a, n), (b, _) in zip(parts, parts[1:], strict=False))
    assert sum(n for _, n in parts) == size
    assert all(n <= ranged.RANGE_SIZE for _, n in parts)
    assert len(parts) == max(1, -(-size // ranged.RANGE_SIZE))
    assert max(n for _, n in parts) - min(n for _, n in parts) <= len(parts)


def _stubbed():
    client = boto3.client("s3", region_name="us-east-1")
    return client, Stubber(client)


def test_an_answer_of_another_length_than_asked_fails_that_object_only(tmp_path):
    # a server that ignores Range sends the whole object: it is not written at the offset
    client, stub = _stubbed()
    size = 2 * ranged.RANGE_SIZE
    whole = b"x" * 64
    stub.add_response("get_object", {"ContentLength": len(whole),
                                     "Body": StreamingBody(io.BytesIO(whole), len(whole))})
    stub.add_response("get_object", {"ContentLength": len(whole),
                                     "Body": StreamingBody(io.BytesIO(whole), len(whole))})
    tmp = tmp_path / "a.part"
    with stub:
        failed = ranged.ranged_download(client, "b", [("k", str(tmp), size, "abc")],
                                        threads=1, extra={})
    assert list(failed) == [0] and isinstance(failed[0], ranged._WrongAnswer)
    assert "asked for" in str(failed[0]) and "s3://b/k" in str(failed[0])
    assert not tmp.exists()  # nothing left behind


def test_a_range_asks_for_its_bytes_of_the_etag_listed(tmp_path):
    client, stub = _stubbed()
    data = b"0123456789"
    stub.add_response("get_object", {"ContentLength": 4,
                                     "Body": StreamingBody(io.BytesIO(data[3:7]), 4)},
                      {"Bucket": "b", "Key": "k", "Range": "bytes=3-6", "IfMatch": '"abc"',
                       "RequestPayer": "requester"})
    tmp = tmp_path / "a.part"
    tmp.write_bytes(b"\0" * 10)
    fd = os.open(tmp, os.O_WRONLY)
    try:
        with stub:
            ranged._get_range(client, "b", "k", '"abc"', fd, 3, 4, whole=False,
                              extra={"RequestPayer": "requester"}, on_bytes=None,
                              stop=threading.Event())
    finally:
        os.close(fd)
    assert tmp.read_bytes() == b"\0\0\0" + data[3:7] + b"\0\0\0"
    stub.assert_no_pending_responses()
