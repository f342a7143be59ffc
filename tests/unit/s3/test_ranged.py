"""Ranges of large objects (``s3.ranged``): how an object is cut, and an answer that is
not the range asked for."""

import io

import boto3
import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber
from hypothesis import given
from hypothesis import strategies as st

from nipype_s3.s3 import ranged

MiB = 1024 * 1024


@given(st.integers(min_value=0, max_value=10 * ranged.RANGE_SIZE))
def test_ranges_cover_the_object_once_in_ranges_of_about_one_size(size):
    parts = list(ranged.ranges(size))
    assert parts[0][0] == 0
    # each range starts where the one before it ends: no gap, no overlap
    assert all(a + n == b for (a, n), (b, _) in zip(parts, parts[1:], strict=False))
    assert sum(n for _, n in parts) == size
    assert all(n <= ranged.RANGE_SIZE for _, n in parts)
    assert len(parts) == ranged.range_count(size) == max(1, -(-size // ranged.RANGE_SIZE))
    assert max(n for _, n in parts) - min(n for _, n in parts) <= len(parts)


def _stubbed():
    client = boto3.client("s3", region_name="us-east-1")
    return client, Stubber(client)


def _answer(data, etag="abc", content_range=None):
    answer = {"ContentLength": len(data), "ETag": f'"{etag}"',
              "Body": StreamingBody(io.BytesIO(data), len(data))}
    if content_range:
        answer["ContentRange"] = content_range
    return answer


DATA = b"0123456789"


@pytest.fixture
def small_ranges(monkeypatch):
    monkeypatch.setattr(ranged, "RANGE_SIZE", 4)  # 10 bytes: 0-3, 4-7, 8-9


def test_each_range_asks_for_its_bytes_of_the_etag_listed(tmp_path, small_ranges):
    client, stub = _stubbed()
    for start, end in ((0, 3), (4, 7), (8, 9)):
        stub.add_response("get_object",
                          _answer(DATA[start:end + 1], content_range=f"bytes {start}-{end}/10"),
                          {"Bucket": "b", "Key": "k", "Range": f"bytes={start}-{end}",
                           "IfMatch": '"abc"', "RequestPayer": "requester"})
    tmp = tmp_path / "a.part"
    done = []
    with stub:
        failed = ranged.ranged_download(client, "b", [("k", str(tmp), 10, '"abc"')],
                                        threads=1, extra={"RequestPayer": "requester"},
                                        on_done=done.append)
    assert failed == {} and done == [0] and tmp.read_bytes() == DATA
    stub.assert_no_pending_responses()


def test_without_a_listed_etag_the_first_answers_is_asked_for(tmp_path, small_ranges):
    client, stub = _stubbed()
    stub.add_response("get_object", _answer(DATA[0:4], "v1", "bytes 0-3/10"),
                      {"Bucket": "b", "Key": "k", "Range": "bytes=0-3"})
    stub.add_response("get_object", _answer(DATA[4:8], "v1", "bytes 4-7/10"),
                      {"Bucket": "b", "Key": "k", "Range": "bytes=4-7", "IfMatch": '"v1"'})
    # a server that ignores If-Match answers with another object: caught all the same
    stub.add_response("get_object", _answer(DATA[8:10], "v2", "bytes 8-9/10"),
                      {"Bucket": "b", "Key": "k", "Range": "bytes=8-9", "IfMatch": '"v1"'})
    tmp = tmp_path / "a.part"
    with stub:
        failed = ranged.ranged_download(client, "b", [("k", str(tmp), 10, None)],
                                        threads=1, extra={})
    assert isinstance(failed[0], ranged.WrongAnswer)
    assert "s3://b/k changed while it was downloaded" in str(failed[0])
    assert "Run again" in str(failed[0])
    assert not tmp.exists()


@pytest.mark.parametrize("answer", [
    _answer(b"x" * 10),  # Range ignored: the whole object
    _answer(DATA[0:4], content_range="bytes 0-3/12"),  # the object grew since its LIST
    _answer(DATA[4:8], content_range="bytes 4-7/10"),  # another range
], ids=["whole", "grown", "elsewhere"])
def test_an_answer_that_is_not_the_range_asked_for_fails_that_object_only(
        tmp_path, small_ranges, answer):
    client, stub = _stubbed()
    stub.add_response("get_object", answer)
    stub.add_response("get_object", _answer(b"fine", content_range="bytes 0-3/4"))
    tmp, other = tmp_path / "a.part", tmp_path / "b.part"
    done = []
    with stub:
        failed = ranged.ranged_download(
            client, "b", [("k", str(tmp), 10, "abc"), ("k2", str(other), 4, "abc")],
            threads=1, extra={}, on_done=done.append)
    assert list(failed) == [0] and isinstance(failed[0], ranged.WrongAnswer)
    assert "Asked for 4 bytes of s3://b/k at 0 (of 10, as listed)" in str(failed[0])
    assert not tmp.exists() and done == [1] and other.read_bytes() == b"fine"


def test_a_temporary_path_taken_already_is_not_written_through(tmp_path):
    client, stub = _stubbed()
    target = tmp_path / "precious"
    target.write_bytes(b"keep me")
    link = tmp_path / "a.part"
    link.symlink_to(target)
    with stub:  # no request is made
        failed = ranged.ranged_download(client, "b", [("k", str(link), 10, "abc")],
                                        threads=1, extra={})
    assert isinstance(failed[0], FileExistsError)
    assert target.read_bytes() == b"keep me"


def test_a_listed_size_beyond_what_s3_stores_is_not_believed(tmp_path):
    client, stub = _stubbed()
    with stub:  # 2**62 bytes: refused before any request, without a list of its ranges
        failed = ranged.ranged_download(client, "b", [("k", str(tmp_path / "a"), 2 ** 62,
                                                       "abc")], threads=4, extra={})
    assert isinstance(failed[0], ranged.WrongAnswer)
    assert "more than S3 stores in one object" in str(failed[0])
    assert ranged.range_count(2 ** 62) > 10 ** 11
