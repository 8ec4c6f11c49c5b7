"""When the server's loop looks at its mailboxes next: forecast pushes, sleep until then.

The server has no doorbell: a push is an RMA Put plus a mailbox word, and
nothing in MPI's passive-target RMA wakes the target when one lands.  The
loop polls, and what polling costs is wake-ups: a look at the mailboxes is a
few microseconds, but every sleep/wake-up costs ~12 us of CPU on these
machines (30 us under load), so polling every 50 us would take a core.
Workers are regular, though: worker w pushes about once per step, so the
loop forecasts

    next_w = last_w + period_w        (period_w: running mean of w's intervals)

and sleeps until just before the earliest forecast, then looks every
`spacing_w` until the push is in: period_w / 100, or a sixth of the due
window when the worker is erratic, between `fine_s` and `max_fine_s` (50 and
500 us), so a push waits for its look ~0.5-2% of a step on average and a
window costs a handful of looks.  The window opens `spacing + jitter_factor
x` the running mean of |arrival - forecast| before the forecast (at most a
quarter period).  A push that comes much earlier than forecast (a phase
change, a slow step that ended) waits at most `max_sleep_s` (5 ms); a worker
later than its forecast by more than its margin is taken off the forecast
until it pushes again, and the loop backs off exponentially to `max_sleep_s`.

Across hosts none of that holds: Open MPI's one-sided path over TCP
(`osc/rdma` on `btl/tcp`, active messages) moves a worker's Lock, Put, Get
and atomics only while the *target* is inside an MPI call, so every
round trip of a worker's step waits for the server's next look.  With
`progress_s` set (the server does so when not every rank shares its node,
`Topology.one_node`) no sleep is longer than it: the loop looks every
`progress_s` like the sleep-poll it replaced.  Measured: the 3-host test
job (configs/small.toml) took 74.7 s with 5 ms sleeps, 13.4 s with the old
0.2 ms poll and 8.8-9.4 s with 50 us (docs/benchmarks.md, "Across hosts").

What it saves and costs, measured: docs/benchmarks.md, "The server's CPU".

Pure Python, no MPI: `tests/unit/test_wakeup.py` drives it with a fake clock.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from dataclasses import dataclass, field

EMA = 0.2  # weight of the newest interval / error in the running means


@dataclass
class Wakeup:
    n_workers: int
    fine_s: float = 5e-5  # shortest poll period while a push is due
    max_fine_s: float = 5e-4  # longest poll period while a push is due
    looks_per_window: int = 6  # at most about this many looks in a due window
    spacing_fraction: float = 0.01  # poll period while due, as a fraction of the period
    max_margin_fraction: float = 0.25  # the due window is at most this part of the period
    max_sleep_s: float = 5e-3  # longest sleep: the worst extra wait of an unforecast push
    jitter_factor: float = 3.0
    # Across hosts: the longest sleep, so the target makes RMA progress (0: no cap)
    progress_s: float = 0.0
    last: list[float | None] = field(init=False)
    period: list[float | None] = field(init=False)
    jitter: list[float] = field(init=False)
    # pushes seen before their worker's due window, inside it, or after it (diagnostics)
    seen: dict[str, int] = field(init=False)
    _backoff: float = field(init=False, default=0.0)

    @classmethod
    def for_records(cls, n_workers: int, progress_s: float = 0.0) -> Wakeup:
        """Accumulate mode: a push is already in the parameters when the server sees its
        record; only the worker's next push, a step later, waits for the record to be
        counted.  So look every fifth of the period in the due window (0.2-2 ms, not
        a hundredth of it) and sleep up to 10 ms when no push is forecast."""
        return cls(
            n_workers,
            fine_s=2e-4,
            max_fine_s=2e-3,
            spacing_fraction=0.2,
            max_sleep_s=1e-2,
            progress_s=progress_s,
        )

    def __post_init__(self) -> None:
        K = self.n_workers
        self.last = [None] * K
        self.period = [None] * K
        self.jitter = [0.0] * K
        self.seen = {"early": 0, "due": 0, "late": 0}
        self._backoff = self.fine_s

    def pushed(self, worker: int, now: float) -> None:
        """Worker `worker`'s push was seen at `now`: learn its period and how well it was forecast."""
        last, period = self.last[worker], self.period[worker]
        if last is not None:
            interval = now - last
            if period is None:
                self.period[worker] = interval
            else:
                off, m = now - (last + period), self.margin(worker)
                self.seen["early" if off < -m else "late" if off > m else "due"] += 1
                err = abs(off)
                self.jitter[worker] += EMA * (err - self.jitter[worker])
                self.period[worker] = period + EMA * (interval - period)
        self.last[worker] = now
        self._backoff = self.fine_s

    def forget(self, worker: int) -> None:
        """A dead or departed worker: no more forecasts for it."""
        self.last[worker] = self.period[worker] = None
        self.jitter[worker] = 0.0

    def spacing(self, worker: int) -> float:
        """Poll period while `worker`'s push is due (its period must be known): period/100,
        or a sixth of a wide window (an erratic worker costs a few looks, not dozens)."""
        window = 2 * self.jitter_factor * self.jitter[worker]
        s = max(self.spacing_fraction * self.period[worker], window / self.looks_per_window)
        return min(max(s, self.fine_s), self.max_fine_s)

    def margin(self, worker: int) -> float:
        """How long before `worker`'s forecast the loop starts looking."""
        m = self.spacing(worker) + self.jitter_factor * self.jitter[worker]
        return min(m, self.max_margin_fraction * self.period[worker])

    def delay(self, now: float) -> float:
        """Seconds to sleep before the next look at the mailboxes (nothing was pending at `now`)."""
        soonest = None
        for w in range(self.n_workers):
            last, period = self.last[w], self.period[w]
            if last is None or period is None:
                continue
            due, m = last + period, self.margin(w)
            if now > due + m:  # late beyond its margin: off the forecast until it pushes
                continue
            lead = due - m - now
            pause = lead if lead > 0 else self.spacing(w)  # before its window, or inside it
            soonest = pause if soonest is None else min(soonest, pause)
        if soonest is None:  # nothing forecast: back off
            pause = self._backoff
            self._backoff = min(2 * self._backoff, self.max_sleep_s)
        else:
            pause = min(max(soonest, self.fine_s), self.max_sleep_s)
        return min(pause, self.progress_s) if self.progress_s else pause


def tighten_timer_slack(ns: int = 1000) -> None:
    """Let this thread's short sleeps end on time (Linux rounds them up by 50 us by default).

    A polling loop that sleeps 50 us between looks otherwise sleeps ~100 us,
    so it is late to a push by twice what it meant.  Best effort: elsewhere a no-op.
    """
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(29, ns, 0, 0, 0)  # PR_SET_TIMERSLACK
