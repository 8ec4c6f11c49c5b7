"""Work the gRPC threads hand to the training loop's main thread, the only one that may call MPI."""

from __future__ import annotations

import threading
from collections import deque
from concurrent import futures
from dataclasses import dataclass


class Unavailable(Exception):
    """The loop cannot take a call now: it is starting, finishing, or did not take it in time."""


@dataclass
class _Call:
    fn: object  # fn(ps) -> result, run on the main thread
    future: futures.Future


class MainThreadQueue:
    """Calls queued by any thread, run by `drain` on the main thread (from the loop's tick).

    Closed while starting (no windows yet) and again once the loop has
    ended; a caller that gives up waiting cancels its call, so the main
    thread never runs work nobody waits for.
    """

    def __init__(self):
        self._calls: deque[_Call] = deque()
        self._lock = threading.Lock()
        self._open = False
        self._closed = False

    def open(self) -> None:
        """The windows exist: calls are taken from now on."""
        self._open = True

    def close(self) -> None:
        """The loop has ended: calls are refused from now on (those queued still run)."""
        with self._lock:
            self._closed = True

    def pending(self) -> bool:
        return bool(self._calls)

    def call(self, fn, timeout_s: float, *, when_closed=None):
        """Run `fn(ps)` on the main thread and return its result, or raise Unavailable.

        Once closed, `when_closed()` answers instead where given (the check and
        the queueing are one step under the lock, so a call is either run or
        answered by it, never lost between the two).
        """
        with self._lock:
            if self._closed and when_closed is not None:
                return when_closed()
            if self._closed or not self._open:
                state = "finishing" if self._closed else "starting (windows not ready)"
                raise Unavailable(f"the job is {state}")
            call = _Call(fn, futures.Future())
            self._calls.append(call)
        try:
            return call.future.result(timeout=timeout_s)
        except futures.TimeoutError:
            call.future.cancel()
            raise Unavailable(
                f"the training loop did not take the request within {timeout_s:.0f}s"
            ) from None

    def drain(self, ps) -> None:
        """Main thread: run every queued call against the server `ps`."""
        while self._calls:
            call = self._calls.popleft()
            if not call.future.set_running_or_notify_cancel():
                continue  # the caller gave up waiting
            try:
                call.future.set_result(call.fn(ps))
            except Exception as exc:  # never let a control request kill training
                call.future.set_exception(exc)
