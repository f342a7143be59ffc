"""Run layout, signed messages, user-data and cost estimates."""

import json
import subprocess

import pytest

from nipype_s3.agent.config import AgentConfig
from nipype_s3.ec2.jobs import (
    MessageRejected,
    RunLayout,
    make_message,
    new_run_id,
    open_message,
    parse_s3_prefix,
    sign,
    verify,
)
from nipype_s3.ec2.pricing import billed_seconds, estimate_cost, instance_shape
from nipype_s3.ec2.userdata import USER_DATA_LIMIT, agent_config_from_user_data, render_user_data
from nipype_s3.exceptions import ConfigurationError

LAYOUT = RunLayout("bkt", "runs-prefix", "20261122-000000-abcdef")


def test_layout_keys():
    assert LAYOUT.run_prefix == "runs-prefix/runs/20261122-000000-abcdef/"
    assert LAYOUT.spec_key("j1") == "runs-prefix/runs/20261122-000000-abcdef/jobs/j1/spec.json"
    assert LAYOUT.done_key("j1") == "runs-prefix/runs/20261122-000000-abcdef/done/j1.json"
    assert LAYOUT.queue_name("jobs") == "nipype-s3-20261122-000000-abcdef-jobs"
    assert len(new_run_id()) == 22


def test_signed_message_round_trip_and_tamper():
    key = b"k" * 32
    spec = b'{"job_id": "j1"}'
    msg = open_message(make_message(LAYOUT, "j1", spec, key), LAYOUT)
    assert verify(key, spec, msg["hmac"])
    assert not verify(key, spec + b" ", msg["hmac"])
    assert not verify(b"x" * 32, spec, msg["hmac"])
    assert sign(key, spec) == msg["hmac"]


@pytest.mark.parametrize("body, why", [
    ("not json", "malformed job message"),
    (json.dumps({"run_id": "other", "job_id": "j", "spec_key": "x", "hmac": "0"}),
     "message of run 'other'"),
    (json.dumps({"run_id": LAYOUT.run_id, "job_id": "j",
                 "spec_key": "runs-prefix/runs/other/jobs/j/spec.json", "hmac": "0"}),
     "is not below this run's prefix"),
])
def test_foreign_messages_are_rejected(body, why):
    with pytest.raises(MessageRejected, match=why):
        open_message(body, LAYOUT)


def test_s3_prefix_is_required_and_checked():
    with pytest.raises(ConfigurationError, match="needs plugin_args\\['s3_prefix'\\]"):
        parse_s3_prefix("")
    with pytest.raises(ConfigurationError, match="Not an S3 URI"):
        parse_s3_prefix("my-bucket/runs")
    assert parse_s3_prefix("s3://my-bucket/a/b/") == ("my-bucket", "a/b")


def _config(**kw):
    return AgentConfig(bucket="bkt", prefix="p", run_id=LAYOUT.run_id, region="us-east-1",
                       jobs_queue_url="http://q/jobs", events_queue_url="http://q/events",
                       job_key_parameter="/nipype-s3/runs/x/job-key", **kw)


def test_user_data_is_valid_bash_small_and_carries_the_config(tmp_path):
    cfg = _config()
    script = render_user_data(run_id=LAYOUT.run_id, config_json=cfg.to_json(),
                              region="us-east-1", worker_root="/var/lib/nipype-s3/work",
                              requirements=["nipype==1.11.0", "boto3==1.43.11"],
                              package_s3_uri="s3://bkt/p/cas/sha256/abc",
                              package_sha256="ab" * 32,
                              setup_commands="echo 'it''s ok'")
    path = tmp_path / "ud.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert len(script.encode()) < USER_DATA_LIMIT
    assert AgentConfig.from_json(agent_config_from_user_data(script)) == cfg
    assert "trap 'shutdown -h now' EXIT" in script


def test_an_older_agent_runs_a_newer_controllers_config(caplog):
    """Settings this version does not know are dropped, with a warning naming them;
    a config that is not one is still refused."""
    import json

    data = json.loads(_config().to_json())
    data["some_future_setting"] = 5
    assert AgentConfig.from_json(json.dumps(data)) == _config()
    assert "ignoring settings this nipype_s3 version does not know: some_future_setting" \
        in caplog.text
    for bad in ("[1, 2]", "{not json", json.dumps({"bucket": "b"})):
        with pytest.raises(ConfigurationError, match="Invalid agent configuration"):
            AgentConfig.from_json(bad)


def test_user_data_limit_is_enforced():
    with pytest.raises(ConfigurationError, match="AWS allows 16384"):
        render_user_data(run_id="r", config_json="{}", region="us-east-1", worker_root="/w",
                         requirements=[], setup_commands="echo x\n" * 3000)


def test_cost_estimates():
    assert billed_seconds(5) == 60 and billed_seconds(61.2) == 62
    assert estimate_cost("c6i.large", 3600) == pytest.approx(0.085)
    assert estimate_cost("c6i.large", 3600, spot=True) == pytest.approx(0.0255)
    assert estimate_cost("x9.unknown", 100) is None
    assert instance_shape("c6i.2xlarge") == (8, 16)


def _stubbed_ec2(code, message):
    import boto3
    from botocore.stub import Stubber

    ec2 = boto3.client("ec2", region_name="eu-west-1")
    stub = Stubber(ec2)
    stub.add_client_error("describe_instance_types", service_error_code=code,
                          service_message=message,
                          expected_params={"InstanceTypes": ["c9.huge"]})
    stub.activate()
    return ec2, stub


def test_an_instance_type_the_region_lacks_is_a_configuration_error():
    ec2, stub = _stubbed_ec2("InvalidInstanceType", "The following supplied instance types "
                                                    "do not exist: [c9.huge]")
    with pytest.raises(ConfigurationError) as err:
        instance_shape("c9.huge", ec2)
    assert str(err.value) == (
        "Instance type 'c9.huge' does not exist in eu-west-1 (The following supplied "
        "instance types do not exist: [c9.huge]). Check the instance_type (e.g. "
        "'c6i.2xlarge'), in plugin_args or a node's plugin_args.")
    stub.assert_no_pending_responses()


def test_an_instance_type_lookup_refused_by_policy_packs_as_two_cpus(caplog):
    ec2, stub = _stubbed_ec2("UnauthorizedOperation", "not authorized")
    with caplog.at_level("WARNING", logger="nipype_s3.ec2.pricing"):
        assert instance_shape("c9.huge", ec2) == (2, 4.0)
    assert "could not look up instance type c9.huge in eu-west-1 (UnauthorizedOperation)" \
        in caplog.text
    stub.assert_no_pending_responses()
