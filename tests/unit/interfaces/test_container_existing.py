"""EC2ContainerRun's pieces that need no cloud: the script sent to an existing instance,
and env names refused before anything is paid for."""

import boto3
import pytest

from nipype_s3 import ConfigurationError, EC2ContainerRun
from nipype_s3.ec2.userdata import agent_config_from_user_data, render_user_data
from nipype_s3.exceptions import EC2Error
from nipype_s3.interfaces.container import ssm_script


def _bootstrap(**kw):
    return render_user_data(run_id="container-r1", config_json='{"run_id": "container-r1"}',
                            region="us-east-1", worker_root="/opt/nipype-s3-work",
                            requirements=["nipype==1.8.6"], **kw)


def test_the_script_for_an_existing_instance_never_shuts_it_down():
    bootstrap = _bootstrap(setup_commands="systemctl start docker")
    assert "shutdown" in bootstrap  # the launched instance's bootstrap does
    script = ssm_script(bootstrap)
    assert "shutdown" not in script and "poweroff" not in script and "trap" not in script
    assert script.startswith("#!/bin/bash\n")
    # everything else is the bootstrap's: the agent, its configuration, the setup
    assert agent_config_from_user_data(script) == '{"run_id": "container-r1"}'
    assert "systemctl start docker" in script and "-m nipype_s3.agent" in script


@pytest.mark.parametrize("line", [
    "set -e; trap 'shutdown -h now' EXIT",
    "shutdown -h +1",
    "  poweroff",
])
def test_a_shutdown_it_cannot_take_out_is_refused(line):
    with pytest.raises(EC2Error, match="would shut it down"):
        ssm_script(f"#!/bin/bash\nset -uo pipefail\n{line}\npython -m nipype_s3.agent\n")


def test_bad_env_names_are_refused_before_any_request(monkeypatch):
    secret = "FS-LICENCE-8c1f2e77b0c94d21"
    node = EC2ContainerRun(runtime="none", command="recon {input} {output_dir}",
                           input_s3="s3://abcd-data/sub-01/anat/sub-01_T1w.nii.gz",
                           output_s3="s3://my-results/recon/sub-01/",
                           env={"FS LICENSE": secret})
    made = []

    def client(self, service, *args, **kwargs):  # no AWS client: nothing is asked
        made.append(service)
        raise AssertionError(f"a {service} client was made")

    monkeypatch.setattr(boto3.session.Session, "client", client)
    with pytest.raises(ConfigurationError) as err:
        node.run()
    assert "env name 'FS LICENSE' is not a valid environment variable name" in str(err.value)
    assert secret not in str(err.value)
    assert made == []
