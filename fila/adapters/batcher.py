"""Group commit: many requests' events saved in one transaction, each caller released after it.

One ``save()`` is one transaction holding a table lock (~700/s), but ~100 requests in one
``save()`` go ~10x further. Callers on the event loop hand their events to ``commit()`` and
await; one writer thread takes whatever is queued (up to ``max_size``), waits up to
``max_wait`` for more only while there is concurrency (the previous batch held more than one
request, so a lone request at light load is never delayed), saves, and resolves every
caller's future. If the batch fails, it is split in halves until the bad entries are
isolated: one bad entry fails only its own caller. This is the one seam where the async
HTTP side meets the synchronous event store (reads go through ``run``, on the same thread
pool's reader).

The express lane: at light load a lone commit pays two thread wake-ups for nothing (the writer
thread's, then the event loop's when the writer hands the result back): at 50 req/s here, 0.37 ms
of a cache hit's p50 and 0.14 ms of an upstream call's (``bench_light.py --variant
FILA_BATCH_EXPRESS=false``). So when the writer is idle (nothing queued, no save under way,
its last batch held one request) and the store can write from asyncio (PostgreSQL), the caller's
events are committed on the event loop's own connection instead, the same statement in one
round trip. Concurrent requests keep going to the writer thread meanwhile; the table lock
orders the two writers' commits. A lost connection there is retried on a reader thread through
the store's own retry, which recognises a write that did land.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from eventsourcing.application import Application
from eventsourcing.persistence import InterfaceError, OperationalError, Recording

T = TypeVar("T")
_STOP = object()


class BatcherClosed(RuntimeError):
    pass


class Batcher:
    def __init__(self, store: Application, *, max_size: int = 200, max_wait: float = 0.002,
                 readers: int = 2, express: bool = True) -> None:
        self.store = store
        self.max_size = max_size
        self.max_wait = max_wait
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._readers = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="fila-read")
        self._express = express and bool(getattr(store, "records_async", False))
        self._express_busy = False      # the express lane's one commit is under way
        self._writer_busy = False       # the writer thread is saving
        self._concurrent = False        # the writer's last batch held more than one request
        self._counts = threading.Lock()
        self.batches = 0
        self.committed = 0
        self.express_commits = 0
        self.last_notification_id = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fila-batcher", daemon=True)
            self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=10)
            self._thread = None
        self._readers.shutdown(wait=True)

    async def commit(self, *objs: Any) -> list[Recording]:
        """Save these aggregates' pending events (or these events) durably; return the recordings."""
        if self._thread is None:
            raise BatcherClosed("the batcher is not running")
        events = []
        for obj in objs:
            if hasattr(obj, "collect_events"):
                events.extend(obj.collect_events())
            else:
                events.append(obj)
        if (self._express and not self._express_busy and not self._writer_busy and not self._concurrent
                and self._queue.empty()):
            return await self._commit_express(events)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((events, future, loop))
        return await future

    async def _commit_express(self, events: list) -> list[Recording]:
        self._express_busy = True
        try:
            recordings = await self.store.record_async(events)
        except (InterfaceError, OperationalError):
            # the connection went: the write may have landed; the store's retry tells
            recordings = await self.run(_record_after_lost_connection, self.store, events)
        finally:
            self._express_busy = False
        self._count(1, len(events), recordings)
        self.express_commits += 1
        return recordings

    def _count(self, batches: int, events: int, recordings: list[Recording]) -> None:
        with self._counts:    # the loop's express lane and the writer thread both count
            self.batches += batches
            self.committed += events
            if recordings:
                self.last_notification_id = max(self.last_notification_id, recordings[-1].notification.id)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a synchronous store read off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._readers, fn, *args)

    # -- writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            self._writer_busy = True
            batch = [first]
            stop = self._drain(batch, wait=self.max_wait if self._concurrent else 0.0)
            self._concurrent = len(batch) > 1
            try:
                self._save(batch)
            finally:
                self._writer_busy = False
            if stop:
                return

    def _drain(self, batch: list, wait: float) -> bool:
        deadline = time.monotonic() + wait
        while len(batch) < self.max_size:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    return False
            if item is _STOP:
                return True
            batch.append(item)
        return False

    def _save(self, batch: Sequence[tuple]) -> None:
        events = [event for item in batch for event in item[0]]
        try:
            recordings = self.store.record(events)
        except Exception as error:  # the store's errors are many; each caller gets its own
            if len(batch) == 1:
                self._resolve(batch, None, error)
                return
            middle = len(batch) // 2
            self._save(batch[:middle])
            self._save(batch[middle:])
            return
        self._count(1, len(events), recordings)
        self._resolve(batch, recordings, None)

    @staticmethod
    def _resolve(batch: Sequence[tuple], recordings: list[Recording] | None,
                 error: BaseException | None) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        position = 0
        for events, future, loop in batch:
            mine = None if recordings is None else recordings[position:position + len(events)]
            position += len(events)
            by_loop.setdefault(loop, []).append((future, mine))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, items, error)
            except RuntimeError:  # the loop has closed: nobody is waiting any more
                pass


def _record_after_lost_connection(store: Any, events: list) -> list[Recording]:
    return store.record(events, after_lost_connection=True)


def _settle(items: list, error: BaseException | None) -> None:
    for future, recordings in items:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(recordings)
