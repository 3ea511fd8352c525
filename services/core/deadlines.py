"""Deadlines for many concurrent operations of one length (every request's, every write's), as
`asyncio.timeout` behaves, but checked by one timer per period instead of a timer per operation:
on uvloop a timer is a libuv handle created and closed each time, and `asyncio.timeout` around
each request was ~15 µs of it (two per single-event request).

A deadline fires between its time and one `resolution_s` later (a tenth of the timeout, at most
a second).
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class Deadlines:
    """The deadlines of one length; `within()` is `asyncio.timeout(timeout_s)`."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.resolution_s = min(1.0, timeout_s / 10)
        # In order of their time, as all have the same length: a sweep stops at the first one
        # still running.
        self._pending: dict[Deadline, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def within(self) -> Deadline:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # another event loop (tests run one each): start afresh
            self._loop, self._pending, self._timer = loop, {}, None
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline must be used inside a task")
        return Deadline(self, task, loop.time() + self.timeout_s)

    def _add(self, deadline: Deadline) -> None:
        self._pending[deadline] = deadline.when
        if self._timer is None:
            assert self._loop is not None
            self._timer = self._loop.call_later(self.resolution_s, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        assert self._loop is not None
        now = self._loop.time()
        expired = []
        for deadline, when in self._pending.items():
            if when > now:
                break
            expired.append(deadline)
        for deadline in expired:
            del self._pending[deadline]
            deadline._expire()
        if self._pending:
            self._timer = self._loop.call_later(self.resolution_s, self._sweep)


class Deadline:
    """One operation's deadline (an async context manager): when it passes, the task is
    cancelled and the block raises TimeoutError, exactly as with `asyncio.timeout`."""

    __slots__ = ("_deadlines", "_task", "when", "_cancelling", "_expired")

    def __init__(self, deadlines: Deadlines, task: asyncio.Task, when: float) -> None:
        self._deadlines = deadlines
        self._task = task
        self.when = when
        self._cancelling = 0
        self._expired = False

    def expired(self) -> bool:
        return self._expired

    def clear(self) -> None:
        """No deadline any more (as `reschedule(None)`): e.g. a response is under way."""
        self._deadlines._pending.pop(self, None)

    def _expire(self) -> None:
        self._expired = True
        self._task.cancel()

    async def __aenter__(self) -> Deadline:
        self._cancelling = self._task.cancelling()
        self._deadlines._add(self)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._deadlines._pending.pop(self, None)
        # As asyncio.Timeout.__aexit__: our cancellation becomes TimeoutError, unless someone else
        # cancelled the task too.
        if self._expired and self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc
