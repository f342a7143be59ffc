"""How many small objects are in flight: more at a distance, as many as asked when the
user chose, never without bound."""

import pytest

from nipype_s3 import config as cfg
from nipype_s3.s3.transfer import MAX_SMALL_CONCURRENCY, TransferSettings, fit_concurrency


@pytest.mark.parametrize("rtt, small, expected", [
    (None, 500, cfg.DEFAULT_MAX_CONCURRENCY),     # nothing measured yet
    (0.001, 500, cfg.DEFAULT_MAX_CONCURRENCY),    # loopback: the CPU sets the pace
    (0.020, 500, 64),                              # 20 ms: four times as many
    (0.050, 500, MAX_SMALL_CONCURRENCY),           # 50 ms: the cap
    (0.050, 40, 64),                               # the files, to a power of two
    (0.050, 64, 64),
    (0.050, 10, cfg.DEFAULT_MAX_CONCURRENCY),     # few files: as they were
])
def test_the_default_grows_with_the_distance(rtt, small, expected):
    assert fit_concurrency(TransferSettings(), rtt, small).max_concurrency == expected


def test_a_concurrency_the_user_chose_is_kept():
    assert fit_concurrency(TransferSettings(max_concurrency=4), 0.05, 500).max_concurrency == 4


def test_a_lists_round_trip_is_its_time_less_the_servers_time_for_its_keys():
    """A LIST's page takes longer with more keys (SeaweedFS: 4 ms empty, 17 ms for 500):
    taken whole for a round trip, a long listing on loopback looked like distance."""
    from nipype_s3.s3 import listing

    listing._seen("http://near", 0.017, 500)
    listing._seen("http://far", 0.057, 500)
    listing._seen("http://empty", 0.004, 0)
    near, far = listing._SEEN_RTT["http://near"], listing._SEEN_RTT["http://far"]
    assert near < 0.015 < far and listing._SEEN_RTT["http://empty"] == 0.004
    assert fit_concurrency(TransferSettings(), near, 500).max_concurrency == 16
    assert fit_concurrency(TransferSettings(), far, 500).max_concurrency == MAX_SMALL_CONCURRENCY
    listing._seen("http://odd", 0.010, 1000)  # never less than half of what it took
    assert listing._SEEN_RTT["http://odd"] == 0.005
