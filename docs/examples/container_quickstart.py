"""EC2ContainerRun: one command next to the data (runtime='none' runs it as is, with
what the instance has: here the AMI's own python3, reading the NIfTI header's size)."""

import os
import tempfile

import boto3
import nibabel

from nipype_s3 import EC2ContainerRun
from nipype_s3.testing import LocalCloud

t1 = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")
work = tempfile.mkdtemp()

with LocalCloud():
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="abcd-data")
    s3.create_bucket(Bucket="my-results")
    s3.upload_file(t1, "abcd-data", "sub-01/anat/sub-01_T1w.nii")

    # With a container: runtime="docker", image="neuronets/kwyk:latest-cpu",
    # command="kwyk -m bvwn_multi_prior {input} {output_dir}/kwyk"
    header = ("python3 -c \"import struct, sys; h = open(sys.argv[1], 'rb').read(56); "
              "e = '<' if struct.unpack('<i', h[:4])[0] == 348 else '>'; "
              "d = struct.unpack(e + '8h', h[40:]); open(sys.argv[2] + '/dims.txt', 'w')"
              ".write(' '.join(map(str, d[1:d[0] + 1])))\" {input} {output_dir}")
    run = EC2ContainerRun(runtime="none", command=header,
                          input_s3="s3://abcd-data/sub-01/anat/sub-01_T1w.nii",
                          output_s3="s3://my-results/headers/sub-01/",
                          instance_type="c6i.large", timeout=600)
    result = run.run(cwd=work)
    print(result.outputs.output_uris, result.outputs.instance_id, result.outputs.log_uri)
    assert result.outputs.output_uris == ["s3://my-results/headers/sub-01/dims.txt"]
    dims = s3.get_object(Bucket="my-results", Key="headers/sub-01/dims.txt")["Body"].read()
    assert dims == b"33 41 25", dims
