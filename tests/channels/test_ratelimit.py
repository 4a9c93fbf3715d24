"""The Redis token bucket that paces each provider, against a real Redis server."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from redis import Redis

from whistle_web.channels.ratelimit import TokenBucket, bucket_for_provider

_keys = iter(range(1_000_000))


def key() -> str:
    return f"test:{time.time_ns()}:{next(_keys)}"


def test_a_full_bucket_grants_its_burst_then_refills_at_the_rate(redis):
    bucket = TokenBucket(redis, key(), rate=20, burst=4)
    granted, wait = bucket.try_acquire(10)
    assert granted == 4  # a new bucket starts full
    assert 0 < wait <= 0.2 + 0.01  # the time to refill the burst (4 tokens at 20/s)
    assert bucket.try_acquire(1)[0] == 0

    time.sleep(0.11)  # about two tokens' worth
    granted, _ = bucket.try_acquire(10)
    assert 2 <= granted <= 3

    time.sleep(0.4)  # twice a full refill: capped at the burst, nothing saved up
    assert bucket.try_acquire(10)[0] == 4


def test_acquire_paces_callers_at_the_rate(redis):
    bucket = TokenBucket(redis, key(), rate=25)  # burst max(1, 2.5) = 2.5
    assert bucket.burst == 2.5
    started = time.monotonic()
    granted = 0
    while time.monotonic() - started < 0.8:
        granted += bucket.acquire(1)
    elapsed = time.monotonic() - started
    # Two tokens up front, then 25 a second.
    assert 2 + 25 * (elapsed - 0.1) <= granted <= 3 + 25 * elapsed, (granted, elapsed)


def test_the_default_burst_is_a_tenth_of_a_second_but_at_least_one_token(redis):
    assert TokenBucket(redis, key(), rate=100).burst == 10
    assert TokenBucket(redis, key(), rate=5).burst == 1
    assert TokenBucket(redis, key(), rate=0.5).burst == 1
    assert TokenBucket(redis, key(), rate=5, burst=0).burst == 1
    assert TokenBucket(redis, key(), rate=5, burst=3).burst == 3


def _clients(app: Any, n: int) -> list[Redis]:
    """Separate connections, as separate worker processes would have."""
    return [Redis.from_url(app.config["REDIS_URL"]) for _ in range(n)]


def test_buckets_on_the_same_key_in_two_threads_share_one_budget(app, redis):
    rate, burst, duration = 20.0, 2.0, 1.0
    name = key()
    clients = _clients(app, 2)
    granted = [0, 0]
    start = threading.Barrier(2)

    def work(index: int) -> None:
        bucket = TokenBucket(clients[index], name, rate, burst)
        start.wait()
        end = time.monotonic() + duration
        while (left := end - time.monotonic()) > 0:
            granted[index] += bucket.acquire(1, max_wait=left)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    for client in clients:
        client.close()

    total = sum(granted)
    # One budget: the burst plus a second's refill, not twice that.
    assert rate * duration + burst - 4 <= total <= rate * duration + burst + 1, granted
    assert min(granted) >= 3, granted  # both threads got a share


def test_acquire_gives_up_after_max_wait(redis):
    bucket = TokenBucket(redis, key(), rate=5)  # one token every 200 ms
    assert bucket.acquire(3) == 1  # the burst of one

    started = time.monotonic()
    assert bucket.acquire(1, max_wait=0.05) == 0
    assert time.monotonic() - started < 0.05  # no pointless sleep when it cannot make it

    started = time.monotonic()
    assert bucket.acquire(1, max_wait=1.0) == 1
    assert 0.12 <= time.monotonic() - started < 0.5


def test_the_bucket_key_expires_when_idle(redis):
    bucket = TokenBucket(redis, "provider:ttl", rate=10, burst=1)
    bucket.try_acquire(1)
    ttl = redis.pttl("whistle:ratelimit:provider:ttl")
    assert 0 < ttl <= 1100  # a refill (100 ms) plus a second


@pytest.mark.parametrize("rate", [0, -1, -0.5])
def test_the_rate_must_be_positive(redis, rate):
    with pytest.raises(ValueError, match="rate must be positive and finite"):
        TokenBucket(redis, key(), rate)


@pytest.mark.parametrize("rate", [float("nan"), float("inf")])
def test_a_rate_that_is_not_a_finite_number_is_refused(redis, rate):
    with pytest.raises(ValueError):
        TokenBucket(redis, key(), rate)


def test_providers_without_a_rate_limit_have_no_bucket(redis):
    assert bucket_for_provider(redis, 1, None) is None
    bucket = bucket_for_provider(redis, 7, 5)
    assert bucket is not None
    assert (bucket.key, bucket.rate, bucket.burst) == ("whistle:ratelimit:provider:7", 5.0, 1.0)
