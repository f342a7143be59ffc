"""The public names are a promise: this test locks them."""

import nipype_s3

EXPECTED = {
    "__version__",
    "S3DataSink",
    "S3DataGrabber",
    "EC2Plugin",
    "BatchPlugin",
    "EC2ContainerRun",
    "NipypeS3Error",
    "ConfigurationError",
    "CredentialsError",
    "InputFileNotFound",
    "S3Error",
    "S3BucketNotFound",
    "S3ObjectNotFound",
    "S3AccessDenied",
    "S3WrongRegion",
    "TransferFailed",
    "EC2Error",
    "BatchError",
    "InstanceLaunchError",
    "InstanceTimeout",
    "RemoteNodeError",
    "UnsafePath",
}


def test_all_is_locked():
    assert set(nipype_s3.__all__) == EXPECTED


def test_every_public_name_exists():
    for name in nipype_s3.__all__:
        assert getattr(nipype_s3, name) is not None


def test_exception_tree_matches_builtins():
    assert issubclass(nipype_s3.ConfigurationError, ValueError)
    assert issubclass(nipype_s3.S3ObjectNotFound, FileNotFoundError)
    assert issubclass(nipype_s3.S3BucketNotFound, FileNotFoundError)
    assert issubclass(nipype_s3.S3AccessDenied, PermissionError)
    assert issubclass(nipype_s3.InstanceTimeout, TimeoutError)
    for name in nipype_s3.__all__:
        obj = getattr(nipype_s3, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, nipype_s3.NipypeS3Error)


def test_package_ships_py_typed():
    import os

    assert os.path.exists(os.path.join(os.path.dirname(nipype_s3.__file__), "py.typed"))


def test_the_plugin_can_be_named_by_a_string_as_nipype_users_do():
    import nipype.pipeline.plugins as plugins

    assert plugins.EC2Plugin is nipype_s3.EC2Plugin
