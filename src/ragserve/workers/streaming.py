"""Bridge a blocking generator (engine thread) to an async iterator (HTTP), without buffering."""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Callable, Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


async def iterate_in_thread(make_iterator: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """Run `make_iterator()` in a thread and yield its items as they come.

    If the consumer stops early (client disconnected), the producer is told to stop and the
    engine generator is closed, so generation does not run on for nobody.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def produce() -> None:
        iterator = None
        try:
            iterator = make_iterator()
            for item in iterator:
                loop.call_soon_threadsafe(queue.put_nowait, item)
                if stop.is_set():
                    break
        except BaseException as exc:  # delivered to the consumer, raised there
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            close = getattr(iterator, "close", None)
            if close:
                try:
                    close()
                except Exception:
                    pass
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)

    thread = threading.Thread(target=produce, daemon=True, name="engine-stream")
    thread.start()
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
