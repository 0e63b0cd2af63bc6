"""The lane itself, driven by events instead of clocks: a request that times out keeps its slot while its work runs,
and work still queued when its request ends never starts."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from pneumolab.errors import SettingError
from pneumolab.serve.lanes import Lane, LaneFull


async def _timed_out_requests(lane: Lane, release: threading.Event, ran: list[str]) -> None:
    def blocker() -> None:
        ran.append("blocker")
        release.wait(30)

    async def request(function) -> None:
        with lane.slot() as slot:
            await asyncio.wait_for(slot.run(function), timeout=0.2)

    first = asyncio.ensure_future(request(blocker))
    while lane.started < 1:  # the only worker is now held by the blocker
        await asyncio.sleep(0.01)
    second = asyncio.ensure_future(request(lambda: ran.append("queued")))
    for ended in (first, second):
        with pytest.raises(TimeoutError):
            await ended


def test_a_timed_out_request_keeps_its_slot_and_queued_work_never_runs():
    lane = Lane("explain", workers=1, queue=1)
    release, ran = threading.Event(), []
    try:
        asyncio.run(_timed_out_requests(lane, release, ran))
        assert lane.in_use == 1, "the blocker still runs: its slot is not free"
        with pytest.raises(LaneFull), lane.slot(), lane.slot():
            pass
        release.set()
        deadline = time.monotonic() + 30
        while lane.in_use:
            assert time.monotonic() < deadline, "the slot was never given back"
            time.sleep(0.01)
        time.sleep(0.1)  # room for the queued job to start, if it wrongly could
        assert ran == ["blocker"] and lane.started == 1
    finally:
        release.set()
        lane.close()


def test_a_lane_needs_a_worker():
    with pytest.raises(SettingError, match="at least 1 worker"):
        Lane("predict", workers=0, queue=1)
