"""Dynamic micro-batching: concurrent single-image requests share one model call.

Requests that arrive while the model is busy wait in a queue; the next call takes all of them (up to `max_batch`) as
one batch. A lone request never waits for company unless `max_wait_s` asks it to, so batching costs nothing at low
load and, under load, trades one forward pass per image for one per batch (per TTA view).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

from pneumolab.errors import SettingError


class MicroBatcher:
    """Collects items from concurrent requests and runs them through `run_batch` together.

    An item is whatever one request contributes (the service: an image and its file's metadata); `run_batch` gets
    them as a list and returns one answer per item, in order (the service: a `Decision` each).

    Args:
        run_batch: list of N items -> N answers; runs in `executor`, one call at a time.
        max_batch: Most items in one call (1 turns batching off).
        max_wait_s: How long the first item of a batch waits for more (0: take only what is already queued).
    """

    def __init__(
        self,
        run_batch: Callable[[list[Any]], Sequence[Any]],
        executor: Executor,
        *,
        max_batch: int = 16,
        max_wait_s: float = 0.0,
    ) -> None:
        if max_batch < 1:
            raise SettingError(f"max_batch: must be at least 1, got {max_batch}")
        self._run_batch, self._executor = run_batch, executor
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self._queue: asyncio.Queue[tuple[Any, asyncio.Future[Any]]] | None = None
        self._worker: asyncio.Task[None] | None = None
        # the sizes of the latest calls (bounded: a service runs for months), for statistics and the tests
        self.batch_sizes: deque[int] = deque(maxlen=10_000)

    async def submit(self, item: Any) -> Any:
        """The item's answer, computed in whichever batch it joins."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.get_loop() is not loop or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._serve(self._queue), name="pneumolab-micro-batcher")
        assert self._queue is not None
        future: asyncio.Future[Any] = loop.create_future()
        await self._queue.put((item, future))
        return await future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)

    async def _next_batch(self, queue: asyncio.Queue) -> list[tuple[Any, asyncio.Future[Any]]]:
        batch = [await queue.get()]
        if self.max_wait_s > 0:
            await asyncio.sleep(self.max_wait_s)
        while len(batch) < self.max_batch and not queue.empty():
            batch.append(queue.get_nowait())
        return [(item, future) for item, future in batch if not future.done()]  # done: its request timed out

    async def _serve(self, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch(queue)
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            items = [item for item, _ in batch]
            try:
                answers = await loop.run_in_executor(self._executor, self._run_batch, items)
            except Exception as error:  # each waiting request answers with the failure (a 500)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), answer in zip(batch, answers, strict=True):
                if not future.done():
                    future.set_result(answer)
