"""psctl run's last line comes from the summary; a job without one is a failure, not a traceback."""

from __future__ import annotations

import json

import pytest

from dbnps.common.errors import UserError
from dbnps.jobs.format import outcome


def test_a_missing_summary_is_one_user_error(tmp_path):
    # mpiexec may exit 0 after losing a host's daemon (PRRTE 3.0); no summary was written.
    with pytest.raises(UserError, match="ended without a summary"):
        outcome(tmp_path / "summary.json")


def test_the_line_says_what_was_saved(tmp_path):
    s = {
        "test_accuracy": 0.98,
        "version": 10,
        "applied": 10,
        "rejected": {"stale": 1},
        "saved": {"which": "best", "version": 7, "eval_split": "validation", "eval_accuracy": 0.99},
    }
    (tmp_path / "summary.json").write_text(json.dumps(s))
    line = outcome(tmp_path / "summary.json")
    assert "test accuracy 0.9800, validation 0.9900" in line
    assert "best on validation parameters (version 7)" in line and "1 rejected" in line


def test_the_line_says_when_the_saved_parameters_are_the_average(tmp_path):
    s = {
        "test_accuracy": 0.99,
        "version": 10,
        "applied": 10,
        "rejected": {},
        "saved": {"which": "last", "averaged": True, "version": 10, "eval_split": "test"},
    }
    (tmp_path / "summary.json").write_text(json.dumps(s))
    assert "saved the last averaged parameters (version 10)" in outcome(tmp_path / "summary.json")
