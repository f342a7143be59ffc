"""What a report says reaches logs and crash files as plain text: no terminal escapes,
no forged lines, capped; tracebacks keep their newlines and tabs."""

from nipype_s3.backends.batch.jobs import _holds
from nipype_s3.remote.collect import plain


def test_plain_text_of_a_claim():
    assert plain("i-0123\n[nipype_s3] forged\x1b[2J") == "i-0123?[nipype_s3] forged?[2J"
    assert plain("x" * 200) == "x" * 120 + "..."
    assert plain(["not", "a", "string"]) == "['not', 'a', 'string']"
    assert plain("Traceback:\n\tline\x07\n", 1000, lines=True) == "Traceback:\n\tline?\n"


def test_a_job_definition_with_only_empty_defaults_is_reused_and_anything_set_is_not():
    props = {"image": "a/b:1", "command": ["python3"], "resourceRequirements": [
        {"type": "VCPU", "value": "2"}]}
    described = {"jobDefinitionName": "nipype-s3-x", "revision": 3, "type": "container",
                 "status": "ACTIVE", "parameters": {}, "platformCapabilities": ["EC2"],
                 "containerProperties": dict(props, volumes=[], linuxParameters={
                     "devices": []}, consumableResourceProperties={
                     "consumableResourceList": []})}
    assert _holds(described, props)
    for extra in ({"linuxParameters": {"devices": [{"hostPath": "/dev/mem"}]}},
                  {"volumes": [{"host": {"sourcePath": "/"}, "name": "root"}]},
                  {"logConfiguration": {"logDriver": "splunk"}}):
        bad = dict(described, containerProperties=dict(described["containerProperties"],
                                                       **extra))
        assert not _holds(bad, props), extra
    assert not _holds(dict(described, retryStrategy={"attempts": 10}), props)
    assert not _holds(dict(described, parameters={"a": "b"}), props)
