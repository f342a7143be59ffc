"""Which version differences an agent refuses (a node pickled by one may not load or
behave the same under the other), and which it accepts."""

import pytest

from nipype_s3.remote.versions import mismatch, runtime_versions

OURS = {"python": "3.11.7", "nipype": "1.11.0", "nibabel": "5.4.2"}


@pytest.mark.parametrize("theirs", [
    OURS,
    dict(OURS, python="3.11.2"),  # another patch release of Python
    dict(OURS, nipype="1.11.1"),
    dict(OURS, nibabel="5.3.0"),  # the same major version of nibabel
])
def test_accepted(theirs):
    assert mismatch(OURS, theirs) is None


@pytest.mark.parametrize("theirs, said", [
    (dict(OURS, python="3.12.1"), "python 3.12.1 where the controller runs 3.11.7"),
    (dict(OURS, nipype="1.10.0"), "nipype 1.10.0 where the controller runs 1.11.0"),
    (dict(OURS, nibabel="4.0.2"), "nibabel 4.0.2 where the controller runs 5.4.2"),
    (dict(OURS, nipype="missing"), "nipype missing where the controller runs 1.11.0"),
])
def test_refused_naming_both_and_what_to_do(theirs, said):
    why = mismatch(OURS, theirs, "the image nipype/nipype:py311")
    assert why.startswith("the image nipype/nipype:py311 runs ")
    assert said in why
    assert "Run the controller in that image" in why
    assert "pin 'nipype==1.11.0 nibabel==5.4.2'" in why


def test_an_agent_that_says_nothing_is_not_refused():
    assert mismatch(OURS, None) is None


def test_runtime_versions_are_this_process():
    import platform

    import nipype

    ours = runtime_versions()
    assert ours["python"] == platform.python_version()
    assert ours["nipype"] == nipype.__version__


def test_hints_for_what_only_the_controller_has(tmp_path):
    from nipype_s3.remote.collect import _hints

    here = tmp_path / "settings.txt"
    here.write_text("x")
    said = _hints(f"FileNotFoundError: [Errno 2] No such file or directory: '{here}'\n"
                  "FileNotFoundError: No such file or directory: '/nowhere/at/all'\n"
                  'IOError: No command "mcflirt" found on host i-1. Please check that the '
                  "corresponding package is installed.\n"
                  "ModuleNotFoundError: No module named 'nitime.algorithms'\n" * 50)
    assert f"{here} exists on this machine but not on the instance" in said
    assert "/nowhere/at/all" not in said  # not here either: nothing to say
    assert "the instance has no command 'mcflirt'" in said
    assert "no module 'nitime'" in said and "plugin_args['requirements']" in said
    assert said.count("\n") == 3  # each once, however often the traceback says it
