"""Micro-batching: concurrent requests share one model call.

Each request submits its images (n, C, H, W) and awaits its own rows of the result. One worker
task takes the first waiting request, waits up to ``max_wait_s`` for more until ``max_batch``
images are gathered (a request's images are never split), runs the model on a single dedicated
thread (so the event loop keeps accepting requests meanwhile, and they form the next batch), and
hands each request back its rows in order. ``max_batch=1`` turns batching off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

POLL_S = 0.0005  # how often the gathering step looks for more requests while it waits


class MicroBatcher:
    def __init__(
        self, run: Callable[[torch.Tensor], torch.Tensor], max_batch: int, max_wait_s: float
    ) -> None:
        self.run, self.max_batch, self.max_wait_s = run, max_batch, max_wait_s
        self.queue: asyncio.Queue = asyncio.Queue()  # bounded upstream by the server's admission
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="cnnkit-model")
        self.task: asyncio.Task | None = None
        self.batches = 0  # model calls made
        self.images = 0  # images through the model

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.executor.shutdown(wait=True)

    async def submit(self, images: torch.Tensor) -> torch.Tensor:
        """Model output rows for ``images`` (n, C, H, W), computed in some shared batch."""
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((images, future))
        return await future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._gather(loop)
            items = [item for item in items if not item[1].done()]  # their callers gave up
            if not items:
                continue
            batch = torch.cat([images for images, _ in items])
            try:
                out = await loop.run_in_executor(self.executor, self.run, batch)
            except Exception as e:  # noqa: BLE001 - every waiting request gets the error
                for _, future in items:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.batches += 1
            self.images += len(batch)
            start = 0
            for images, future in items:
                if not future.done():
                    future.set_result(out[start : start + len(images)])
                start += len(images)

    async def _gather(self, loop) -> list:
        """The first waiting request plus whoever arrives within ``max_wait_s``.

        Polls with ``get_nowait`` rather than ``wait_for(queue.get())``, which can lose an item
        when its timeout fires just as the item arrives."""
        items = [await self.queue.get()]
        count, deadline = len(items[0][0]), loop.time() + self.max_wait_s
        while count < self.max_batch:
            try:
                items.append(self.queue.get_nowait())
                count += len(items[-1][0])
            except asyncio.QueueEmpty:
                if loop.time() >= deadline:
                    break
                await asyncio.sleep(POLL_S)
        return items
