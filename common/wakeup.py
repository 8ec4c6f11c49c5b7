"""When the server's loop looks at its mailboxes next: forecast pushes, sleep until then.

The server has no doorbell: a push is an RMA Put plus a mailbox word, and
nothing in MPI's passive-target RMA wakes the target when one lands.  The
loop polls.  Polling often costs a core (each look is a self-RMA read of the
mailbox words plus the loop's bookkeeping, ~20-40 us of Python); polling
rarely makes every worker wait longer for its ack.  But workers are regular:
worker w pushes about once per step, so the loop can forecast

    next_w = last_w + period_w        (period_w: running mean of w's intervals)

and sleep until just before the earliest forecast, then look every `fine_s`
until the push is in.  The margin before a forecast is `jitter_factor` times
the running mean of |arrival - forecast| for that worker (plus `fine_s`), so
a steady worker is caught within ~`fine_s` of its arrival and an erratic one
is polled for longer.  A push that comes much earlier than forecast (a phase
change, a slow step that ended) waits at most `max_sleep_s`; a worker that
is later than its forecast by more than its margin is taken off the forecast
until it pushes again, and the loop backs off exponentially to `max_sleep_s`.

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
    fine_s: float = 5e-5  # poll period while a push is due
    max_sleep_s: float = 2e-3  # longest sleep: the worst extra wait of an unforecast push
    jitter_factor: float = 3.0
    last: list[float | None] = field(init=False)
    period: list[float | None] = field(init=False)
    jitter: list[float] = field(init=False)
    _backoff: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        K = self.n_workers
        self.last = [None] * K
        self.period = [None] * K
        self.jitter = [0.0] * K
        self._backoff = self.fine_s

    def pushed(self, worker: int, now: float) -> None:
        """Worker `worker`'s push was seen at `now`: learn its period and how well it was forecast."""
        last, period = self.last[worker], self.period[worker]
        if last is not None:
            interval = now - last
            if period is None:
                self.period[worker] = interval
            else:
                err = abs(now - (last + period))
                self.jitter[worker] += EMA * (err - self.jitter[worker])
                self.period[worker] = period + EMA * (interval - period)
        self.last[worker] = now
        self._backoff = self.fine_s

    def forget(self, worker: int) -> None:
        """A dead or departed worker: no more forecasts for it."""
        self.last[worker] = self.period[worker] = None
        self.jitter[worker] = 0.0

    def margin(self, worker: int) -> float:
        return self.fine_s + self.jitter_factor * self.jitter[worker]

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
            soonest = lead if soonest is None else min(soonest, lead)
        if soonest is None:  # nothing forecast: back off
            pause = self._backoff
            self._backoff = min(2 * self._backoff, self.max_sleep_s)
            return pause
        return min(max(soonest, self.fine_s), self.max_sleep_s)


def tighten_timer_slack(ns: int = 1000) -> None:
    """Let this thread's short sleeps end on time (Linux rounds them up by 50 us by default).

    A polling loop that sleeps 50 us between looks otherwise sleeps ~100 us,
    so it is late to a push by twice what it meant.  Best effort: elsewhere a no-op.
    """
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(29, ns, 0, 0, 0)  # PR_SET_TIMERSLACK
