"""Dynamic micro-batching: concurrent single-image requests share one model call.

Requests that arrive while the model is busy wait in a queue; the next call takes all of them (up to `max_batch`) as
one batch. A lone request never waits for company unless `max_wait_s` asks it to, so batching costs nothing at low
load and, under load, trades one forward pass per image for one per batch (per TTA view).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np

from pneumolab.errors import SettingError


class MicroBatcher:
    """Collects uint8 S x S images from concurrent requests and runs them through `run_batch` together.

    Args:
        run_batch: uint8 N x S x S -> N probabilities; runs in `executor`, one call at a time.
        max_batch: Most images in one call (1 turns batching off).
        max_wait_s: How long the first image of a batch waits for more (0: take only what is already queued).
    """

    def __init__(
        self,
        run_batch: Callable[[np.ndarray], np.ndarray],
        executor: Executor,
        *,
        max_batch: int = 16,
        max_wait_s: float = 0.0,
    ) -> None:
        if max_batch < 1:
            raise SettingError(f"max_batch: must be at least 1, got {max_batch}")
        self._run_batch, self._executor = run_batch, executor
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[float]]] | None = None
        self._worker: asyncio.Task[None] | None = None
        # the sizes of the latest calls (bounded: a service runs for months), for statistics and the tests
        self.batch_sizes: deque[int] = deque(maxlen=10_000)

    async def probability(self, image: np.ndarray) -> float:
        """The image's probability, computed in whichever batch it joins."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.get_loop() is not loop or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._serve(self._queue), name="pneumolab-micro-batcher")
        assert self._queue is not None
        future: asyncio.Future[float] = loop.create_future()
        await self._queue.put((image, future))
        return await future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)

    async def _next_batch(self, queue: asyncio.Queue) -> list[tuple[np.ndarray, asyncio.Future[float]]]:
        batch = [await queue.get()]
        if self.max_wait_s > 0:
            await asyncio.sleep(self.max_wait_s)
        while len(batch) < self.max_batch and not queue.empty():
            batch.append(queue.get_nowait())
        return [(image, future) for image, future in batch if not future.done()]  # done: its request timed out

    async def _serve(self, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch(queue)
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            images = np.stack([image for image, _ in batch])
            try:
                probabilities = await loop.run_in_executor(self._executor, self._run_batch, images)
            except Exception as error:  # each waiting request answers with the failure (a 500)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), probability in zip(batch, probabilities, strict=True):
                if not future.done():
                    future.set_result(float(probability))
