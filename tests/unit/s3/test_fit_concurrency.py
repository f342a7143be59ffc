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
    (0.050, 40, 40),                               # no more than there are files
    (0.050, 10, cfg.DEFAULT_MAX_CONCURRENCY),     # few files: as they were
])
def test_the_default_grows_with_the_distance(rtt, small, expected):
    assert fit_concurrency(TransferSettings(), rtt, small).max_concurrency == expected


def test_a_concurrency_the_user_chose_is_kept():
    assert fit_concurrency(TransferSettings(max_concurrency=4), 0.05, 500).max_concurrency == 4
