"""Path rewriting while a pickle is read: every protocol, nothing executed."""

import gzip
import pickle

import pytest

from nipype_s3.pickles import PathMap, rewrite_pickle, rewrite_pickle_file, rewrite_text_file

MAP = PathMap("/worker/root", ("/home/me/work", "/data/in.nii"))


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_round_trip_every_protocol(protocol):
    obj = {"base": "/home/me/work", "out": ["/home/me/work/wf/a/out.nii", "/data/in.nii"],
           "other": "/etc/hosts", "rel": "wf/a", "long": "/home/me/work/" + "x" * 400,
           "unicode": "/home/me/work/séance", "similar": "/home/me/workshop"}
    data = pickle.dumps(obj, protocol=protocol)
    moved = pickle.loads(rewrite_pickle(data, MAP.to_worker))
    assert moved["base"] == "/worker/root/home/me/work"
    assert moved["out"] == ["/worker/root/home/me/work/wf/a/out.nii", "/worker/root/data/in.nii"]
    assert moved["other"] == "/etc/hosts" and moved["rel"] == "wf/a"
    assert moved["similar"] == "/home/me/workshop"
    assert moved["unicode"] == "/worker/root/home/me/work/séance"
    back = pickle.loads(rewrite_pickle(rewrite_pickle(data, MAP.to_worker), MAP.to_controller))
    assert back == obj


def test_nothing_in_the_pickle_runs_while_it_is_rewritten():
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('executed')",))

    data = pickle.dumps({"x": Boom(), "p": "/data/in.nii"})
    rewritten = rewrite_pickle(data, MAP.to_worker)  # no SystemExit here
    assert b"/worker/root/data/in.nii" in rewritten


def test_unchanged_pickle_is_returned_as_is():
    data = pickle.dumps({"a": "/elsewhere"}, protocol=2)
    assert rewrite_pickle(data, MAP.to_worker) is data


def test_files_in_place(tmp_path):
    pklz = tmp_path / "result_a.pklz"
    pklz.write_bytes(gzip.compress(pickle.dumps({"out": "/worker/root/home/me/work/o.nii"})))
    rewrite_pickle_file(str(pklz), MAP.to_controller)
    assert pickle.loads(gzip.decompress(pklz.read_bytes())) == {"out": "/home/me/work/o.nii"}
    rst = tmp_path / "report.rst"
    rst.write_text("* out : /worker/root/home/me/work/o.nii\n")
    rewrite_text_file(str(rst), MAP.text_to_controller)
    assert rst.read_text() == "* out : /home/me/work/o.nii\n"


def test_pathmap_leaves_worker_paths_alone():
    assert MAP.to_worker("/worker/root/home/me/work/x") == "/worker/root/home/me/work/x"
    assert MAP.to_controller("/home/me/work/x") == "/home/me/work/x"


def test_a_pickle_whose_strings_do_not_change_is_left_byte_for_byte(tmp_path):
    """nipype's results are protocol-4 pickles with frames; a frame alone is no reason
    to rewrite (and re-gzip) a result: that cost ~20 s for a 24 MB array at level 9."""
    import gzip
    import pickle

    from nipype_s3.pickles import rewrite_pickle_file

    path = tmp_path / "result_n.pklz"
    raw = gzip.compress(pickle.dumps({"out": "/elsewhere/x", "data": list(range(50_000))},
                                     protocol=4), mtime=0)
    path.write_bytes(raw)
    before = path.stat().st_mtime_ns
    rewrite_pickle_file(str(path), lambda s: s.replace("/w/root", ""))
    assert path.read_bytes() == raw and path.stat().st_mtime_ns == before


def test_a_rewritten_pickle_is_gzipped_at_the_fast_level(tmp_path):
    import gzip
    import pickle

    from nipype_s3.pickles import rewrite_pickle_file

    path = tmp_path / "result_n.pklz"
    value = {"out": "/w/root/data/x.nii", "data": [float(i) for i in range(50_000)]}
    path.write_bytes(gzip.compress(pickle.dumps(value, protocol=4), mtime=0))
    rewrite_pickle_file(str(path), lambda s: s.replace("/w/root", ""))
    raw = path.read_bytes()
    assert raw[8] == 4  # gzip's XFL byte: 4 = fastest compression, 2 = best (level 9)
    assert pickle.loads(gzip.decompress(raw)) == dict(value, out="/data/x.nii")
