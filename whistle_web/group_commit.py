"""Group commit: concurrent callers share one round trip instead of taking one each.

A caller that submits while no batch is running runs one at once, holding only its own
item: under light load nothing waits. Items submitted while a batch runs queue up, and
when it ends one of their callers runs them all as the next batch while the others wait
for their outcomes. The batch size follows the load by itself, with no timer and no
thread of its own, so it works the same under gevent (the primitives are the monkey-
patched ones), with threads, and in a single-threaded test.

Every caller gets the outcome of its own item: a result, or the exception raised for it.

One batch runs at a time, and the next starts when its callers have their outcomes.
Measured with bench/api.py (triggers, whose batch is a statement and a Redis pipeline):
letting two or four batches run at once made them smaller (4.2 -> 2.7 -> 1.5 items) and
cost more CPU per item, and throughput and p99 both got worse; so did starting the next
batch after the statement, before the pipeline (4.5 items instead of 5.8-5.9, p99 no better).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class _Slot(Generic[T, R]):
    __slots__ = ("done", "error", "item", "lead", "result")

    def __init__(self, item: T) -> None:
        self.item = item
        self.done = threading.Event()
        self.lead = False  # woken to run the next batch rather than with an outcome
        self.result: R | None = None
        self.error: BaseException | None = None

    def outcome(self) -> R:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


class GroupCommit(Generic[T, R]):
    """Run ``run`` over the items submitted concurrently, ``max_batch`` at most at a time.

    ``run`` gets the items in submission order and returns one outcome per item, in the
    same order: a result, or an exception instance to raise in that item's caller. If it
    raises, every item of the batch gets that exception.
    """

    def __init__(
        self, run: Callable[[list[T]], Sequence[R | BaseException]], *, max_batch: int = 64
    ) -> None:
        self._run = run
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: list[_Slot[T, R]] = []  # waiting for the next batch
        self._running = False
        self.batches = 0  # how many batches ran, and with how many items: for tests
        self.items = 0  # and benchmarks to see how much grouping the load gave

    def submit(self, item: T) -> R:
        """Run ``item`` in a batch and return its result (or raise its exception)."""
        slot: _Slot[T, R] = _Slot(item)
        with self._lock:
            lead = not self._running
            if lead:
                self._running = True
            else:
                self._queue.append(slot)
        if not lead:
            slot.done.wait()
            if not slot.lead:
                return slot.outcome()
        self._lead(slot)
        return slot.outcome()

    def _lead(self, own: _Slot[T, R]) -> None:
        """Run this caller's slot with the queue's head as one batch, then hand over."""
        with self._lock:
            batch = [own, *self._queue[: self._max_batch - 1]]
            del self._queue[: self._max_batch - 1]
        try:
            outcomes = self._run([slot.item for slot in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"{len(outcomes)} outcomes for a batch of {len(batch)}")
        except BaseException as error:  # the callers must hear of it, even of a kill
            outcomes = [error] * len(batch)
        finally:
            self.batches += 1
            self.items += len(batch)
            # Whatever happened, the queue gets a new leader (or the group goes idle), so
            # no caller waits for a batch nobody runs.
            with self._lock:
                successor = self._queue[0] if self._queue else None
                if successor is None:
                    self._running = False
                else:
                    del self._queue[0]
            if successor is not None:
                successor.lead = True
                successor.done.set()
        for slot, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                slot.error = outcome
            else:
                slot.result = outcome
            slot.done.set()
