"""Which parameters a job saves (dbnps.common.selection): pure logic, no MPI."""

from __future__ import annotations

import math

import numpy as np

from dbnps.common.selection import Selection


def snap(v: float) -> np.ndarray:
    return np.full(3, v, np.float32)


def test_without_options_the_last_parameters_are_saved():
    sel = Selection()
    sel.offer(0.99, 10, snap(1))
    last = snap(2)
    c = sel.choose(last, 20, 0.5)
    assert c.which == "last" and c.params is last and c.version == 20 and c.accuracy == 0.5


def test_target_saves_the_snapshot_that_reached_it_not_a_later_one():
    sel = Selection(target=0.95)
    sel.offer(0.90, 1, snap(1))
    assert not sel.target_reached
    sel.offer(0.96, 2, reached := snap(2))
    sel.offer(0.97, 3, snap(3))  # evaluated after the stop was requested
    assert sel.target_reached
    c = sel.choose(snap(9), 4, 0.94)
    assert (c.which, c.version, c.accuracy) == ("target", 2, 0.96) and c.params is reached


def test_keep_best_takes_the_highest_and_the_first_of_ties():
    sel = Selection(keep_best=True)
    for v, acc in enumerate([0.5, 0.8, 0.8, 0.7]):
        sel.offer(acc, v, snap(v))
    c = sel.choose(snap(9), 9, 0.75)
    assert (c.which, c.version, c.accuracy) == ("best", 1, 0.8)
    assert np.all(c.params == 1)


def test_keep_best_prefers_the_last_parameters_when_they_are_better():
    sel = Selection(keep_best=True)
    sel.offer(0.8, 1, snap(1))
    last = snap(2)
    c = sel.choose(last, 2, 0.85)
    assert c.which == "best" and c.params is last and c.accuracy == 0.85


def test_keep_best_with_no_evaluation_saves_the_last_and_says_so():
    c = Selection(keep_best=True).choose(last := snap(1), 5)
    assert c.which == "last" and c.params is last and math.isnan(c.accuracy)


def test_keep_best_beats_target_when_both_are_set():
    sel = Selection(keep_best=True, target=0.9)
    sel.offer(0.91, 1, snap(1))
    sel.offer(0.93, 2, snap(2))
    assert sel.target_reached and sel.choose(snap(3), 3, 0.92).version == 2
