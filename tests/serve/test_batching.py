"""MicroBatcher: concurrent requests share calls, each gets its own image's answer, failures reach every waiter."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from pneumolab.serve.batching import MicroBatcher


def _brightness(images: list[np.ndarray]) -> np.ndarray:
    """A per-image answer that tells the images apart, so a mix-up within a batch would show."""
    return np.stack(images).reshape(len(images), -1).mean(axis=1) / 255


def _images(n: int) -> list[np.ndarray]:
    return [np.full((8, 8), 10 * i, dtype=np.uint8) for i in range(n)]


async def _ask_all(batcher: MicroBatcher, images: list[np.ndarray]) -> list[float]:
    try:
        return await asyncio.gather(*(batcher.submit(image) for image in images))
    finally:
        await batcher.close()


def test_waiting_requests_are_answered_in_shared_calls_of_at_most_max_batch():
    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(_brightness, pool, max_batch=4)
        images = _images(10)
        answers = asyncio.run(_ask_all(batcher, images))
    assert answers == pytest.approx([float(_brightness([image])[0]) for image in images])
    assert list(batcher.batch_sizes) == [4, 4, 2]


def test_a_lone_request_runs_alone_and_a_wait_gathers_later_arrivals():
    async def staggered(batcher: MicroBatcher) -> list[float]:
        async def later(image: np.ndarray, delay: float) -> float:
            await asyncio.sleep(delay)
            return await batcher.submit(image)

        try:
            return await asyncio.gather(*(later(image, 0.1 * i) for i, image in enumerate(_images(3))))
        finally:
            await batcher.close()

    with ThreadPoolExecutor(1) as pool:
        alone = MicroBatcher(_brightness, pool, max_batch=8)
        asyncio.run(staggered(alone))
        patient = MicroBatcher(_brightness, pool, max_batch=8, max_wait_s=0.5)
        answers = asyncio.run(staggered(patient))
    assert list(alone.batch_sizes) == [1, 1, 1]
    assert list(patient.batch_sizes) == [3] and answers == pytest.approx([0, 10 / 255, 20 / 255])


def test_a_failing_call_fails_every_request_of_its_batch():
    def broken(images: list[np.ndarray]) -> np.ndarray:
        raise RuntimeError("model exploded")

    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(broken, pool, max_batch=4)
        with pytest.raises(RuntimeError, match="model exploded"):
            asyncio.run(_ask_all(batcher, _images(3)))
    assert list(batcher.batch_sizes) == [3]


def test_a_request_that_gave_up_is_left_out_of_the_next_call():
    async def one_gives_up(batcher: MicroBatcher) -> float:
        images = _images(2)
        hurried = asyncio.ensure_future(asyncio.wait_for(batcher.submit(images[0]), 0.01))
        with pytest.raises(TimeoutError):
            await hurried  # cancelled while the batcher still waits for company
        try:
            return await batcher.submit(images[1])
        finally:
            await batcher.close()

    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(_brightness, pool, max_batch=8, max_wait_s=0.1)
        answer = asyncio.run(one_gives_up(batcher))
    assert answer == pytest.approx(10 / 255) and list(batcher.batch_sizes) == [1]


def test_max_batch_below_one_is_refused():
    with ThreadPoolExecutor(1) as pool, pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(_brightness, pool, max_batch=0)
