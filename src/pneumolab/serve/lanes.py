"""Bounded lanes of work: each endpoint's own threads and its own short queue, so one kind of request cannot starve
another, and a full lane answers at once (HTTP 503 with ``Retry-After``) instead of timing out later.

A request takes a slot in its lane for as long as it lasts; work it runs in the lane's threads keeps that slot until
the work is really done, even when the request timed out first (a Python thread cannot be stopped), so the lane never
admits more than it can run. Work that had not started when its request ended never starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from pneumolab.errors import SettingError

__all__ = ["Abandoned", "Lane", "LaneFull", "Slot"]

T = TypeVar("T")


class LaneFull(Exception):
    """Every slot of the lane is taken: the request is answered 503 with ``Retry-After`` at once."""

    def __init__(self, lane: Lane) -> None:
        super().__init__(f"{lane.name}: busy ({lane.capacity} requests in progress or waiting); retry shortly")
        self.retry_after_s = lane.retry_after_s


class Abandoned(Exception):
    """Raised in a lane's thread when the request that wanted the work has ended (timed out): skip the rest."""


def _lower_priority(increment: int) -> None:
    # Linux: a thread's nice value is its own and passes to the threads it starts (torch's intra-op workers)
    with contextlib.suppress(AttributeError, OSError):
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + increment))


class Lane:
    """`workers` threads and room for `queue` more requests waiting for them; the rest are refused.

    Args:
        name: What the 503 detail calls the lane (the endpoint).
        workers: Threads that run the lane's work.
        queue: Requests that may wait beyond those being worked on.
        retry_after_s: The ``Retry-After`` of a refusal (seconds).
        nice: Added to the threads' nice value (Linux): background work that yields the CPU to other lanes.
    """

    def __init__(self, name: str, *, workers: int, queue: int, retry_after_s: int = 1, nice: int = 0) -> None:
        if workers < 1 or queue < 0:
            raise SettingError(f"{name} lane: needs at least 1 worker and a queue of 0 or more, got {workers}, {queue}")
        self.name, self.capacity, self.retry_after_s = name, workers + queue, retry_after_s
        initializer = (_lower_priority, (nice,)) if nice else (None, ())
        self._executor = ThreadPoolExecutor(
            workers, thread_name_prefix=f"pneumolab-{name}", initializer=initializer[0], initargs=initializer[1]
        )
        self._lock = threading.Lock()
        self._in_use = 0
        self.started = 0  # jobs that began to run (statistics, tests)

    @property
    def in_use(self) -> int:
        """Slots taken: requests in progress or waiting, and the work of ended requests still running."""
        return self._in_use

    @contextlib.contextmanager
    def slot(self) -> Iterator[Slot]:
        """A slot for one request, given back when the request and all its work have ended.

        Raises:
            LaneFull: no slot is free.
        """
        with self._lock:
            if self._in_use >= self.capacity:
                raise LaneFull(self)
            self._in_use += 1
        slot = Slot(self)
        try:
            yield slot
        finally:
            slot.abandoned.set()
            slot.release()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class Slot:
    """One request's place in a lane; `run` sends work to the lane's threads under it."""

    def __init__(self, lane: Lane) -> None:
        self._lane = lane
        self._holders = 1  # the request itself, plus each job submitted and not yet done
        self.abandoned = threading.Event()  # set when the request has ended

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` in the lane's threads. Cancelled (the request timed out): not started, it never runs;
        running, it keeps the slot until it returns."""
        lane = self._lane
        with lane._lock:
            self._holders += 1
        future: Future[T] = lane._executor.submit(self._job, function, args)
        future.add_done_callback(lambda _: self.release())
        return await asyncio.wrap_future(future)  # cancelling this cancels `future` if it has not started

    def check(self) -> None:
        """Between two steps of long work: stop if the request has ended.

        Raises:
            Abandoned: the request has ended.
        """
        if self.abandoned.is_set():
            raise Abandoned(self._lane.name)

    def _job(self, function: Callable[..., T], args: tuple) -> T:
        self.check()
        with self._lane._lock:
            self._lane.started += 1
        return function(*args)

    def release(self) -> None:
        lane = self._lane
        with lane._lock:
            self._holders -= 1
            if self._holders == 0:
                lane._in_use -= 1
