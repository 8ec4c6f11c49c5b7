"""The server loop's wake-up forecast (dbnps.common.wakeup), on a fake clock."""

from __future__ import annotations

import pytest

from dbnps.common.wakeup import Wakeup


def steady(w: Wakeup, worker: int, period: float, n: int, t0: float = 0.0) -> float:
    t = t0
    for _ in range(n):
        w.pushed(worker, t)
        t += period
    return t - period  # the last push


def test_nothing_forecast_backs_off_to_the_cap():
    w = Wakeup(2, fine_s=1e-4, max_sleep_s=1e-3)
    pauses = [w.delay(0.0) for _ in range(6)]
    assert pauses[:4] == pytest.approx([1e-4, 2e-4, 4e-4, 8e-4])
    assert pauses[4:] == pytest.approx([1e-3, 1e-3])


def test_a_push_resets_the_back_off():
    w = Wakeup(1, fine_s=1e-4, max_sleep_s=1e-3)
    for _ in range(5):
        w.delay(0.0)
    w.pushed(0, 0.0)  # first push: no period yet, so still no forecast
    assert w.delay(0.0) == pytest.approx(1e-4)


def test_steady_worker_sleeps_until_just_before_its_next_push():
    w = Wakeup(1, fine_s=5e-5, max_fine_s=2.5e-4, max_sleep_s=1.0)
    last = steady(w, 0, 0.020, 10)
    assert w.period[0] == pytest.approx(0.020)
    assert w.jitter[0] == pytest.approx(0.0, abs=1e-12)
    # polls every period/100 while due, so its window opens one spacing before the forecast
    assert w.spacing(0) == pytest.approx(2e-4)
    assert w.delay(last) == pytest.approx(0.020 - 2e-4)
    # inside the window: look every spacing
    assert w.delay(last + 0.0199) == pytest.approx(2e-4)


def test_spacing_follows_the_period_between_its_bounds():
    w = Wakeup(3, fine_s=5e-5, max_fine_s=2.5e-4, max_sleep_s=1.0)
    steady(w, 0, 0.002, 4)  # a 2 ms step: 20 us would be period/100, fine_s is the floor
    steady(w, 1, 0.010, 4)
    steady(w, 2, 0.100, 4)  # 1 ms would be period/100, max_fine_s is the ceiling
    assert [w.spacing(i) for i in range(3)] == pytest.approx([5e-5, 1e-4, 2.5e-4])


def test_sleep_is_capped_so_an_early_push_waits_at_most_max_sleep():
    w = Wakeup(1, fine_s=5e-5, max_sleep_s=2e-3)
    last = steady(w, 0, 0.050, 5)
    assert w.delay(last) == pytest.approx(2e-3)


def test_across_hosts_no_sleep_is_longer_than_the_progress_poll():
    """Over TCP the workers' RMA moves only while the server is in MPI: with
    progress_s set, neither a forecast sleep nor the back-off may exceed it."""
    w = Wakeup(2, fine_s=5e-5, max_sleep_s=5e-3, progress_s=1e-4)
    assert max(w.delay(0.0) for _ in range(10)) == pytest.approx(1e-4)  # back-off capped
    last = steady(w, 0, 0.050, 5)
    assert w.delay(last) == pytest.approx(1e-4)  # 50 ms until the forecast: still 0.1 ms
    assert Wakeup(1, fine_s=5e-5, max_sleep_s=5e-3).delay(0.0) == pytest.approx(5e-5)


def test_jitter_widens_the_margin_up_to_a_quarter_period():
    w = Wakeup(1, fine_s=5e-5, max_sleep_s=1.0, jitter_factor=3.0)
    t = 0.0
    for i in range(40):  # intervals alternate 18 and 22 ms: mean 20, error ~2 ms
        w.pushed(0, t)
        t += 0.018 if i % 2 else 0.022
    assert w.period[0] == pytest.approx(0.020, abs=1e-3)
    assert 1e-3 < w.jitter[0] < 3e-3
    last = w.last[0]
    lead = w.delay(last)
    assert lead == pytest.approx(w.period[0] - w.margin(0))
    assert lead < 0.020 - 3e-3  # woke several ms early, not at the mean
    for i in range(40):  # intervals 10 and 30 ms: error ~10 ms, margin capped at period / 4
        w.pushed(0, t)
        t += 0.010 if i % 2 else 0.030
    assert w.margin(0) == pytest.approx(w.period[0] / 4)


def test_the_soonest_of_several_workers_wins():
    w = Wakeup(2, fine_s=5e-5, max_sleep_s=1.0)
    steady(w, 0, 0.020, 5, t0=0.0)  # last push 0.080, next 0.100
    steady(w, 1, 0.020, 5, t0=0.010)  # last push 0.090, next 0.110
    assert w.delay(0.090) == pytest.approx(0.100 - w.spacing(0) - 0.090)


def test_a_late_worker_drops_off_the_forecast_and_the_loop_backs_off():
    w = Wakeup(2, fine_s=5e-5, max_sleep_s=1e-3)
    steady(w, 0, 0.020, 5)  # next due 0.100
    steady(w, 1, 0.020, 5, t0=0.005)  # next due 0.105
    # both overdue beyond their margins: back-off, not a fine-poll spin
    pauses = [w.delay(0.2) for _ in range(3)]
    assert pauses == pytest.approx([5e-5, 1e-4, 2e-4])


def test_forget_stops_forecasting_a_dead_worker():
    w = Wakeup(2, fine_s=5e-5, max_sleep_s=1.0)
    steady(w, 0, 0.020, 5)
    steady(w, 1, 0.050, 5)
    w.forget(0)
    last1 = w.last[1]
    assert w.delay(last1) == pytest.approx(0.050 - w.spacing(1))


def test_an_erratic_worker_costs_a_few_looks_per_window_not_dozens():
    w = Wakeup(1, fine_s=5e-5, max_fine_s=1.0, max_sleep_s=1.0, looks_per_window=6)
    t = 0.0
    for i in range(60):  # intervals 18 and 22 ms: a window of 2 x 3 x ~2 ms
        w.pushed(0, t)
        t += 0.018 if i % 2 else 0.022
    window = 2 * w.jitter_factor * w.jitter[0]
    assert w.spacing(0) == pytest.approx(window / 6)
    assert w.spacing(0) > w.spacing_fraction * w.period[0]  # wider than period / 100


def _looks_and_lateness(w: Wakeup, period: float, pushes: int) -> tuple[float, float]:
    """Drive the server loop's looks against one worker that pushes every `period`:
    (looks per push, the worst time a push waited to be seen), after a warm-up."""
    t, arrivals, looks, worst = 0.0, [period * (i + 1) for i in range(pushes)], 0, 0.0
    nxt = 0
    while nxt < len(arrivals):
        looks += 1
        if arrivals[nxt] <= t:
            if nxt >= 10:
                worst = max(worst, t - arrivals[nxt])
            w.pushed(0, t)
            nxt += 1
            continue
        t += w.delay(t)
    return looks / pushes, worst


def test_accumulate_mode_looks_a_few_times_per_step_not_a_hundred():
    """A record only has to be counted before the worker's next push, a step later."""
    per_push, late = _looks_and_lateness(Wakeup.for_records(1), 0.015, 200)
    apply_per_push, apply_late = _looks_and_lateness(Wakeup(1), 0.015, 200)
    assert late <= 2.5e-3 < 0.015  # counted long before the next push
    assert per_push < 0.75 * apply_per_push and apply_late < late
