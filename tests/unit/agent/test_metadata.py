"""The agent's reading of the metadata service: only a real notice counts."""

import pytest

from nipype_s3.agent.metadata import Metadata


@pytest.mark.parametrize("text, notice", [
    (None, None), ("", None), ("not json", None), ("[]", None), ('{"action": "reboot"}', None),
    ('{"action": "terminate", "time": "2026-12-06T04:00:00Z"}',
     {"action": "terminate", "time": "2026-12-06T04:00:00Z"}),
    ('{"action": "stop", "time": "t"}', {"action": "stop", "time": "t"}),
])
def test_only_a_spot_notice_is_a_notice(monkeypatch, text, notice):
    meta = Metadata("http://127.0.0.1:9/i-x")
    monkeypatch.setattr(meta, "get", lambda path: text)
    assert meta.interruption() == notice


def test_no_metadata_service_means_no_notice_and_no_wait(monkeypatch):
    monkeypatch.delenv("NIPYPE_S3_IMDS_URL", raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    meta = Metadata()
    assert meta.disabled and meta.interruption() is None and meta.instance_id() is None
    unreachable = Metadata("http://127.0.0.1:9/i-x", timeout=0.2)  # nothing listens
    assert unreachable.interruption() is None
