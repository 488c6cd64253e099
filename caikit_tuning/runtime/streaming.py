"""The bridge from a module's stream (a blocking iterator) to the HTTP server's event
loop, which lets go of everything when the client does.

caikit 0.29 runs `for item in stream: queue.put(item).result()` on a server thread.
When a client drops its stream, nothing reads that queue again: the thread blocks
forever, and about `server_thread_pool_size` dropped streams stop all inference.
Here the reading thread never waits on the client: it hands items over with a
bounded wait that notices the client is gone, and the event loop's side cancels the
stream itself (TokenStream.cancel), which frees the batch row at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Executor

# Items produced but not yet sent; the producer waits for room (flow control).
_DEPTH = 2
_POLL_SECONDS = 0.1
_END = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def async_iterate(iterator: Iterator, pool: Executor | None = None) -> AsyncIterator:
    """`iterator` read on a `pool` thread, as an async iterator for the event loop.

    Closing (or cancelling) the async side stops the reading thread within
    `_POLL_SECONDS` of its next item, and cancels the iterator if it can be cancelled.
    """
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()
    room = threading.Semaphore(_DEPTH)
    gone = threading.Event()

    def hand_over(item) -> None:
        try:
            loop.call_soon_threadsafe(items.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is stopping
            gone.set()

    def produce() -> None:
        try:
            for item in iterator:
                while not room.acquire(timeout=_POLL_SECONDS):
                    if gone.is_set():
                        return
                if gone.is_set():
                    return
                hand_over(item)
        except Exception as err:  # noqa: BLE001  (raised on the event loop's side)
            hand_over(_Failed(err))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
            hand_over(_END)

    async def consume() -> AsyncIterator:
        try:
            while True:
                item = await items.get()
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.error
                room.release()
                yield item
        finally:
            # Normal end, error, or a client that went away (cancellation lands here).
            gone.set()
            cancel = getattr(iterator, "cancel", None)
            if cancel is not None:
                cancel()

    loop.run_in_executor(pool, produce)
    return consume()
