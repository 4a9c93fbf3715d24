"""GroupCommit: concurrent callers share a batch, each gets its own outcome, and the group
never stalls, with threads here and with gevent greenlets (the web process) in a subprocess."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from whistle_web.group_commit import GroupCommit


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.001)


class Held:
    """A ``run`` whose first batch waits until released, so that callers queue behind it;
    its ``fail``-th batch raises."""

    def __init__(
        self, outcome: Callable[[int], Any] = lambda item: item * 10, fail: int = 0
    ) -> None:
        self.release = threading.Event()
        self.batches: list[list[int]] = []
        self.outcome = outcome
        self.fail = fail

    def __call__(self, items: list[int]) -> list[Any]:
        self.batches.append(list(items))
        if len(self.batches) == 1:
            assert self.release.wait(5)
        if len(self.batches) == self.fail:
            raise RuntimeError("connection lost")
        return [self.outcome(item) for item in items]


def submit_all(
    group: GroupCommit[int, Any], items: list[int]
) -> tuple[dict[int, Any], list[threading.Thread]]:
    """Submit each item from its own thread: item -> result or exception, and the threads."""
    outcomes: dict[int, Any] = {}

    def call(item: int) -> None:
        try:
            outcomes[item] = group.submit(item)
        except Exception as error:  # the outcome under test
            outcomes[item] = error

    threads = [threading.Thread(target=call, args=(item,)) for item in items]
    for thread in threads:
        thread.start()
    return outcomes, threads


def behind_a_held_batch(
    run: Held, group: GroupCommit[int, Any], first: int, rest: list[int]
) -> tuple[Any, dict[int, Any]]:
    """Submit ``first``, hold its batch until all of ``rest`` have queued behind it, then
    let it go. Returns the outcome of ``first`` and of each of ``rest``."""
    first_outcome, first_threads = submit_all(group, [first])
    wait_for(lambda: len(run.batches) == 1)
    outcomes, threads = submit_all(group, rest)
    wait_for(lambda: len(group._queue) == len(rest))
    run.release.set()
    for thread in first_threads + threads:
        thread.join(5)
    return first_outcome[first], outcomes


def test_a_lone_caller_runs_its_item_at_once() -> None:
    calls: list[list[int]] = []
    group: GroupCommit[int, int] = GroupCommit(lambda items: calls.append(items) or items)
    assert group.submit(7) == 7
    assert group.submit(8) == 8
    assert calls == [[7], [8]]


def test_callers_arriving_during_a_batch_share_the_next_one() -> None:
    run = Held()
    group: GroupCommit[int, int] = GroupCommit(run)
    first, rest = behind_a_held_batch(run, group, 1, list(range(2, 12)))
    assert first == 10
    assert rest == {item: item * 10 for item in range(2, 12)}
    assert [sorted(batch) for batch in run.batches] == [[1], list(range(2, 12))]
    assert (group.batches, group.items) == (2, 11)
    assert not group._running and not group._queue


def test_each_caller_gets_its_own_exception() -> None:
    def outcome(item: int) -> Any:
        return ValueError(f"bad {item}") if item % 2 else item

    run = Held(outcome)
    group: GroupCommit[int, int] = GroupCommit(run)
    _, outcomes = behind_a_held_batch(run, group, 0, [1, 2, 3, 4])
    assert outcomes[2] == 2 and outcomes[4] == 4
    assert [str(outcomes[i]) for i in (1, 3)] == ["bad 1", "bad 3"]
    assert len(run.batches) == 2


def test_a_failing_batch_fails_its_callers_and_the_next_batch_still_runs() -> None:
    run = Held(fail=2)
    group: GroupCommit[int, int] = GroupCommit(run)
    first, failed = behind_a_held_batch(run, group, 0, [1, 2, 3])
    assert first == 0
    assert {item: str(error) for item, error in failed.items()} == {
        1: "connection lost",
        2: "connection lost",
        3: "connection lost",
    }
    assert group.submit(4) == 40  # the group is idle again, not stuck


def test_a_run_returning_the_wrong_number_of_outcomes_is_an_error() -> None:
    group: GroupCommit[int, int] = GroupCommit(lambda items: [])
    with pytest.raises(RuntimeError, match="0 outcomes for a batch of 1"):
        group.submit(1)
    assert not group._running


def test_batches_hold_at_most_max_batch_items_and_the_rest_follow() -> None:
    run = Held()
    group: GroupCommit[int, int] = GroupCommit(run, max_batch=4)
    _, outcomes = behind_a_held_batch(run, group, 0, list(range(1, 11)))
    assert outcomes == {item: item * 10 for item in range(1, 11)}
    assert [len(batch) for batch in run.batches] == [1, 4, 4, 2]


GEVENT_SCRIPT = textwrap.dedent(
    """
    from gevent import monkey

    monkey.patch_all()

    import gevent
    from whistle_web.group_commit import GroupCommit

    batches = []

    def run(items):
        batches.append(len(items))
        gevent.sleep(0.01)  # a round trip: the other greenlets run and queue up
        return [item * 10 for item in items]

    group = GroupCommit(run)
    greenlets = [gevent.spawn(group.submit, item) for item in range(200)]
    gevent.joinall(greenlets, timeout=10, raise_error=True)
    assert [g.value for g in greenlets] == [item * 10 for item in range(200)]
    assert sum(batches) == 200
    print(len(batches), max(batches))
    """
)


def test_greenlets_under_gevent_are_grouped() -> None:
    """The web process's case: monkey-patched locks and events, one OS thread."""
    out = subprocess.run(
        [sys.executable, "-c", GEVENT_SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    batches, largest = map(int, out.stdout.split())
    # 200 greenlets submit at once: the first runs alone, the rest queue behind it and go
    # in batches of at most 64.
    assert batches == 5 and largest == 64
