"""An agent whose nipype differs from the controller's refuses the run's jobs, and the
run stops naming both versions, with nothing left running (no image needed: the
controller here says it runs another nipype)."""

import boto3
import pytest
from nipype import Function, Node, Workflow

from nipype_s3 import EC2Plugin
from nipype_s3.exceptions import ConfigurationError
from nipype_s3.remote.versions import runtime_versions
from nipype_s3.testing import LocalCloud

pytestmark = pytest.mark.slow


def _double(x):
    return 2 * x


def test_an_agent_that_cannot_match_the_controller_refuses_and_the_run_stops(tmp_path):
    wf = Workflow("versions", base_dir=str(tmp_path))
    node = Node(Function(input_names=["x"], output_names=["y"], function=_double), "double")
    node.inputs.x = 2
    wf.add_nodes([node])
    plugin = EC2Plugin(plugin_args={"s3_prefix": "s3://versions-bucket/runs",
                                    "idle_timeout": 5})
    plugin._versions = dict(runtime_versions(), nipype="1.8.6")  # what agents are told
    with LocalCloud(boot="direct") as cloud:
        boto3.client("s3").create_bucket(Bucket="versions-bucket")
        with pytest.raises(ConfigurationError) as err:
            wf.run(plugin=plugin)
        assert cloud.wait_idle(30)
        assert cloud.live_instances() == []
        logs = "".join(inst.log() for inst in cloud.instance_list())
    ours = runtime_versions()["nipype"]
    assert f"nipype {ours} where the controller runs 1.8.6" in str(err.value)
    assert "Run the controller in that image" in str(err.value)
    assert "not serving run" in logs and "started" not in logs  # no job was run
