"""Property tests: the URI parser, and the key layout against nipype's DataSink."""

import os
import posixpath
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nipype.interfaces.io import DataSink

from nipype_s3.layout import destination_name, plan_sink, substitute
from nipype_s3.s3.uri import S3URI, join_key, parse_s3_uri

bucket_names = st.from_regex(r"[a-z0-9][a-z0-9-]{1,20}[a-z0-9]", fullmatch=True).filter(
    lambda n: "--" not in n and not n.startswith("xn--") and not n.endswith("-s3alias"))
key_parts = st.text(alphabet=string.ascii_letters + string.digits + "-_.éü ", min_size=1,
                    max_size=12).filter(lambda p: p not in (".", ".."))


@given(bucket_names, st.lists(key_parts, max_size=5))
def test_uri_round_trip(bucket, parts):
    uri = S3URI(bucket, "/".join(parts))
    assert parse_s3_uri(str(uri)) == uri
    assert parse_s3_uri(str(uri).replace("s3://", "S3://", 1)) == uri


@given(st.lists(key_parts, min_size=1, max_size=5))
def test_join_key_never_doubles_separators(parts):
    joined = join_key(*parts)
    assert "//" not in joined and joined == "/".join(parts)


folder = st.one_of(st.sampled_from(["_subject_id_sub001", "_run_2", "_a_b", "work", "x"]),
                   key_parts.map(lambda p: p.replace(" ", "")).filter(bool))
subs = st.lists(st.tuples(st.sampled_from(["_subject_id_", "sub", "run", ".nii", "_"]),
                          st.sampled_from(["", "sub-", "R", ".nii.gz", "-"])), max_size=3)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(folder, min_size=1, max_size=4), key_parts.map(lambda p: p + ".nii"),
       st.booleans(), subs)
def test_destination_and_substitution_match_nipype(tmp_path, folders, fname, param, pairs):
    src = os.path.join("/data", *folders, fname)
    sink = DataSink(parameterization=param)
    if pairs:
        sink.inputs.substitutions = pairs
    expected = sink._substitute(os.path.join("out", sink._get_dst(src)))
    mine = substitute(posixpath.join("out", destination_name(src, parameterization=param)),
                      pairs)
    assert mine == expected


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(folder, min_size=1, max_size=3), st.sampled_from(["a", "a.b", "a.@b", "@c"]),
       st.booleans())
def test_plan_sink_matches_nipype_on_disk(tmp_path_factory, folders, name, param):
    base = tmp_path_factory.mktemp("prop")
    src = base.joinpath("work", *folders, "img.nii")
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text("x")
    out = base / "out"
    sink = DataSink(base_directory=str(out), parameterization=param)
    setattr(sink.inputs, name, str(src))
    sink.run(cwd=str(base))
    written = sorted(os.path.relpath(os.path.join(d, f), out).replace(os.sep, "/")
                     for d, _, fs in os.walk(out) for f in fs)
    entries = plan_sink({name: str(src)}, root="", parameterization=param)
    assert [e.dest for e in entries] == written
