"""Bridge a blocking generator (engine thread) to an async iterator (HTTP), without buffering."""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Callable, Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


class StreamCut(Exception):
    """The worker is stopping and its drain time is up: the stream ends here, with this message."""


# One entry per running stream: called on the event loop, it ends that stream with StreamCut.
_LIVE_STREAMS: set[Callable[[str], None]] = set()


def cut_streams(message: str) -> int:
    """End every running stream with StreamCut(message); returns how many. Call on the event loop."""
    cuts = list(_LIVE_STREAMS)
    for cut in cuts:
        cut(message)
    return len(cuts)


async def iterate_in_thread(make_iterator: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """Run `make_iterator()` in a thread and yield its items as they come.

    If the consumer stops early (client disconnected, or cut_streams), the producer is told to stop
    and the engine generator is closed, so generation does not run on for nobody.
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

    cut_message: list[str] = []

    def cut(message: str) -> None:
        stop.set()
        cut_message.append(message)
        queue.put_nowait(_DONE)  # wakes the consumer if it waits for the engine

    thread = threading.Thread(target=produce, daemon=True, name="engine-stream")
    thread.start()
    _LIVE_STREAMS.add(cut)
    try:
        while True:
            item = await queue.get()
            if cut_message:  # before any piece still queued: a cut stream ends now
                raise StreamCut(cut_message[0])
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        _LIVE_STREAMS.discard(cut)
        stop.set()
