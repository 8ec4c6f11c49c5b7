"""psctl run's view of a job's output (dbnps.joboutput): banners dropped, NULs gone, progress parsed."""

from __future__ import annotations

from dbnps.joboutput import LineFilter, parse_progress

# Verbatim from an Open MPI 5.0.11 job under --with-ft ulfm (stderr of mpiexec).
BANNER = """\
--------------------------------------------------------------------------
WARNING: The selected 'osc' module 'sm' is not tested for post-failure
operation, yet you have requested support for fault tolerance.
When using this component, normal failure free operation is expected;
However, failures may cause the application to abort, crash or deadlock.

In this framework, the following components are tested to operate under
failure scenarios: {}
--------------------------------------------------------------------------"""
AGGREGATED = (
    "[host:01234] 9 more processes have sent help message help-mpi-ft.txt / "
    "module:untested:failundef\n"
    '[host:01234] Set MCA parameter "rmaps_base_help_aggregate" to 0 to see all help / '
    "error messages"
)
OTHER_HELP = """\
--------------------------------------------------------------------------
prterun noticed that process rank 2 with PID 123 on node h exited on signal 9 (Killed).
--------------------------------------------------------------------------"""


def run(text: str) -> list[str]:
    f = LineFilter()
    out = [line for raw in text.split("\n") for line in f.feed(raw)]
    return out + f.close()


def test_the_fault_tolerance_banner_and_its_aggregation_lines_are_dropped():
    text = f"[server] phase pretrain-1 starts\n{BANNER}\n[server] a\n{AGGREGATED}\n[server] b"
    assert run(text) == ["[server] phase pretrain-1 starts", "[server] a", "[server] b"]


def test_other_help_blocks_are_kept_whole():
    assert run(f"x\n{OTHER_HELP}\ny") == ["x", *OTHER_HELP.split("\n"), "y"]


def test_set_mca_line_without_a_dropped_message_before_it_is_kept():
    line = 'Set MCA parameter "rmaps_base_help_aggregate" to 0 to see all help / error messages'
    assert run(f"a\n{line}") == ["a", line]


def test_nul_bytes_are_removed_and_nul_only_lines_vanish():
    assert run("\x00psctl: done\n\x00\x00\nlast\x00") == ["psctl: done", "last"]


def test_an_unterminated_or_long_dash_block_is_output_not_swallowed():
    long = ["-" * 30] + [f"row {i}" for i in range(60)]
    assert run("\n".join(long)) == long
    assert run("-" * 30 + "\npartial") == ["-" * 30, "partial"]


def test_progress_lines_parse_and_anything_else_does_not():
    p = parse_progress('[progress] {"phase": "finetune", "done": 5, "total": 10}')
    assert p == {"phase": "finetune", "done": 5, "total": 10}
    assert parse_progress("[server] phase finetune starts") is None
    assert parse_progress("[progress] {not json") is None
    assert parse_progress("[progress] [1, 2]") is None


def test_bars_follow_phases_and_ignore_records_after_done():
    import io

    from dbnps.joboutput import ProgressBars

    out = io.StringIO()
    bars = ProgressBars(out)
    bars.update({"phase": "pretrain-1", "index": 0, "phases": 2, "done": 5, "total": 10})
    bars.update({"phase": "finetune", "index": 1, "phases": 2, "done": 2, "total": 10})
    bars.update({"phase": "done", "index": 2, "phases": 2})
    bars.update({"phase": "done", "index": 2, "phases": 2})  # a second one: no bar, no error
    bars.close()
    text = out.getvalue()
    assert "pretrain-1 1/2" in text and "finetune 2/2" in text
    assert "10.0/10.0" in text  # pretrain-1 ran to its end: filled before it closed
