"""Run an iterator in a background thread, a bounded number of items ahead of its consumer.

The one prefetch loop of the data layer: the streaming loader prepares batches ahead of the training
step with it, and the pinned-copy path (devicecache) packs the next batches into page-locked memory
with it while the device works.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any, Iterable, Iterator, TypeVar

T = TypeVar("T")
_END = object()


def in_background(items: Iterable[T], depth: int, name: str = "prefetch", join_timeout_s: float = 30.0) -> Iterator[T]:
    """Yield what ``items`` yields, produced by a daemon thread at most ``depth`` items ahead.

    An exception raised by ``items`` is re-raised in the consumer, after the items before it. A
    consumer that stops early (``close()``, garbage collection) stops the thread at its next item; the
    thread is then waited for at most ``join_timeout_s`` (it may be inside a slow read)."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(x: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as err:  # re-raised in the consumer
            put(err)
        finally:
            put(_END)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while True:
            x = q.get()
            if x is _END:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                q.get_nowait()
        thread.join(timeout=join_timeout_s)
