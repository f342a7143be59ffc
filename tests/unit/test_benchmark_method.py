"""The benchmark's method: every contender follows every other equally often, and what a
run wrote is checked and removed before the next one."""

import collections
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench_module():
    spec = importlib.util.spec_from_file_location(
        "bench_run", os.path.join(ROOT, "benchmarks", "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _balanced_order():
    return _bench_module().balanced_order


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_each_contender_follows_each_other_equally_often(n):
    balanced_order = _balanced_order()
    rounds = n if n % 2 == 0 else 2 * n
    follows = collections.Counter()
    starts = collections.Counter()
    for rep in range(rounds):
        order = balanced_order(n, rep)
        assert sorted(order) == list(range(n))
        starts[order[0]] += 1
        follows.update(zip(order, order[1:], strict=False))
    assert set(starts) == set(range(n))  # each starts a repeat in turn
    if n > 1:
        assert len(follows) == n * (n - 1)  # every ordered pair occurs...
        assert len(set(follows.values())) == 1  # ...equally often


def test_no_contender_always_runs_after_the_same_one():
    """Rotating one cycle (A B C D, B C D A, ...) would give each one predecessor only."""
    balanced_order = _balanced_order()
    predecessors = collections.defaultdict(set)
    for rep in range(4):
        order = balanced_order(4, rep)
        for before, after in zip(order, order[1:], strict=False):
            predecessors[after].add(before)
    assert all(len(p) == 3 for p in predecessors.values())


def _write(folder, sizes):
    for i, size in enumerate(sizes):
        sub = os.path.join(folder, "sub") if i % 2 else folder
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, f"f{i}"), "wb") as fobj:
            fobj.write(b"x" * size)


def test_a_runs_files_are_removed_once_counted(tmp_path):
    check_and_remove = _bench_module().check_and_remove
    out = tmp_path / "out"
    _write(out, [10, 20, 30])
    check_and_remove(str(out), 3, 60, "tool")
    assert not out.exists()


@pytest.mark.parametrize("files, nbytes", [(2, 60), (3, 59), (4, 60)])
def test_a_run_that_wrote_other_files_fails_and_keeps_them(tmp_path, files, nbytes):
    """A short file or a missing one is a failed contender, not a fast one: the run
    stops, naming the tool and what it wrote, and leaves the files to look at."""
    check_and_remove = _bench_module().check_and_remove
    out = tmp_path / "out"
    _write(out, [10, 20, 30])
    with pytest.raises(RuntimeError, match=r"s5cmd wrote 3 files of 60 bytes") as err:
        check_and_remove(str(out), files, nbytes, "s5cmd")
    assert err.value.path == str(out)
    assert sorted(p.name for p in out.rglob("f*")) == ["f0", "f1", "f2"]


def test_a_run_that_wrote_other_files_stops_the_benchmark_and_its_files_are_kept(
        tmp_path, monkeypatch, capsys):
    """The benchmark removes its work folder at the end; what a failed contender wrote is
    moved out of it first, and the message says where."""
    bench = _bench_module()
    wrong = tmp_path / "work" / "dl" / "s5cmd" / "0"
    _write(wrong, [10, 20])

    class FailingBench:
        def __init__(self, *args):
            self.work = args[2]

        def transfer_case(self, *args):
            bench.check_and_remove(str(wrong), 3, 60, "s5cmd")

        def close(self):
            pass

    monkeypatch.setattr(bench, "Bench", FailingBench)
    monkeypatch.setattr(bench.tempfile, "tempdir", str(tmp_path))
    assert bench.main(["--quick", "--no-plugin", "--out", str(tmp_path / "r.md")]) == 1
    message = capsys.readouterr().err
    assert "s5cmd wrote 2 files of 30 bytes" in message
    kept = next(tmp_path.glob("nipype-s3-bench-wrong-output-*"))
    assert str(kept) in message
    assert sorted(p.name for p in kept.rglob("f*")) == ["f0", "f1"]
