"""A token bucket per provider in Redis, shared by every worker process.

The bucket refills at ``rate`` tokens a second up to ``burst`` tokens. The refill uses
Redis's own clock (``TIME``) so workers on different machines agree. A small burst (a
tenth of a second's worth) keeps the measured rate within a few percent of the limit.
"""

from __future__ import annotations

import math
import time

from redis import Redis

_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local requested = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
local granted = math.min(requested, math.floor(tokens))
tokens = tokens - granted
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
local wait = 0
if granted < requested then
  wait = math.ceil((math.min(requested - granted, burst) - tokens) * 1000 / rate)
end
return {granted, wait}
"""


class TokenBucket:
    def __init__(self, redis: Redis, key: str, rate: float, burst: float | None = None) -> None:
        if not math.isfinite(rate) or rate <= 0:
            raise ValueError("rate must be positive and finite")
        self.redis = redis
        self.key = f"whistle:ratelimit:{key}"
        self.rate = float(rate)
        self.burst = max(1.0, burst if burst is not None else rate / 10)
        self._script = redis.register_script(_SCRIPT)

    def try_acquire(self, tokens: int) -> tuple[int, float]:
        """Take up to ``tokens`` now. Returns (granted, seconds to wait for more)."""
        granted, wait_ms = self._script(keys=[self.key], args=[self.rate, self.burst, tokens])
        return int(granted), int(wait_ms) / 1000

    def acquire(self, tokens: int, *, max_wait: float = 30.0) -> int:
        """Block until at least one token is granted; return how many (at most ``tokens``).

        Returns 0 only when ``max_wait`` passes without a token (the caller requeues).
        """
        deadline = time.monotonic() + max_wait
        while True:
            granted, wait = self.try_acquire(tokens)
            if granted:
                return granted
            if time.monotonic() + wait > deadline:
                return 0
            time.sleep(max(wait, 0.001))


def bucket_for_provider(redis: Redis, provider_id: int, rate: float | None) -> TokenBucket | None:
    return None if rate is None else TokenBucket(redis, f"provider:{provider_id}", rate)
