"""The benchmark's running order: every contender follows every other equally often."""

import collections
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _balanced_order():
    spec = importlib.util.spec_from_file_location(
        "bench_run", os.path.join(ROOT, "benchmarks", "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.balanced_order


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
