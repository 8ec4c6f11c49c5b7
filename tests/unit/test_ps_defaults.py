"""`[ps] split_batch` / `staleness_lr` = "auto": what K workers get (in-process, no MPI)."""

from __future__ import annotations

import pytest

from dbnps.common.config import SHARE_BATCH_FROM, from_dict


@pytest.mark.parametrize("k", [1, 2])
def test_auto_keeps_whole_batches_and_no_staleness_rule_below_three_workers(k):
    ps = from_dict({}).ps
    assert (ps.shares_batch(k), ps.staleness_rule(k)) == (False, "none")


@pytest.mark.parametrize("k", [3, 4, 8, 32])
def test_auto_shares_the_batch_and_compensates_from_three_workers(k):
    ps = from_dict({}).ps
    assert SHARE_BATCH_FROM == 3
    assert (ps.shares_batch(k), ps.staleness_rule(k)) == (True, "compensate")


def test_accumulate_mode_never_shares_under_auto():
    ps = from_dict({"ps": {"mode": "accumulate"}}).ps
    assert (ps.shares_batch(32), ps.staleness_rule(32)) == (False, "none")


def test_explicit_settings_win_at_any_k_and_toml_booleans_still_read():
    ps = from_dict({"ps": {"split_batch": True, "staleness_lr": "none"}}).ps
    assert ps.split_batch == "on"
    assert (ps.shares_batch(2), ps.staleness_rule(2)) == (True, "none")
    ps = from_dict({"ps": {"split_batch": False, "staleness_lr": "inverse"}}).ps
    assert ps.split_batch == "off"
    assert (ps.shares_batch(32), ps.staleness_rule(32)) == (False, "inverse")
