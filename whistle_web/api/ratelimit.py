"""The API's moving-window rate limit in one Redis round trip per request.

Flask-Limiter's moving window takes two: one script records the hit, and another reads the
window back for the ``RateLimit-*`` headers after the view. Here one script does both and
the window it returns is kept for the headers of the same request.
"""

from __future__ import annotations

import time
from typing import Any

from flask import g, has_request_context
from limits import RateLimitItem
from limits.strategies import MovingWindowRateLimiter, WindowStats

# limits' acquire_moving_window.lua and moving_window.lua, run as one script. The list holds
# one timestamp per hit, newest first, at most `limit` of them.
HIT_AND_READ = """
local key = KEYS[1]
local now = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local expiry = tonumber(ARGV[3])
local amount = tonumber(ARGV[4])
local acquired = 0

if amount <= limit then
    local entry = redis.call('lindex', key, limit - amount)
    if not (entry and tonumber(entry) >= now - expiry) then
        local entries = {}
        for i = 1, amount do
            entries[i] = now
        end
        for i = 1, #entries, 5000 do
            redis.call('lpush', key, unpack(entries, i, math.min(i + 4999, #entries)))
        end
        redis.call('ltrim', key, 0, limit - 1)
        redis.call('expire', key, expiry)
        acquired = 1
    end
end

-- The oldest entry still inside the window (binary search: entries are newest first).
local target = now - expiry
local low, high, found = 0, redis.call('llen', key) - 1, nil
while low <= high do
    local mid = math.floor((low + high) / 2)
    local value = tonumber(redis.call('lindex', key, mid))
    if value and value >= target then
        found = mid
        low = mid + 1
    else
        high = mid - 1
    end
end
if found then
    return {acquired, tostring(redis.call('lindex', key, found)), found + 1}
end
return {acquired, tostring(now), 0}
"""


class OneTripMovingWindow(MovingWindowRateLimiter):
    """``moving-window`` whose hit also returns the window the headers need."""

    def __init__(self, storage: Any) -> None:
        super().__init__(storage)
        self._script = storage.get_connection().register_script(HIT_AND_READ)

    def hit(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool:
        key = item.key_for(*identifiers)
        expiry = item.get_expiry()
        acquired, oldest, count = self._script(
            [self.storage.prefixed_key(key)], [time.time(), item.amount, expiry, cost]
        )
        if has_request_context():
            windows = g.setdefault("whistle_rate_windows", {})
            windows[key] = WindowStats(float(oldest) + expiry, item.amount - int(count))
        return bool(acquired)

    def get_window_stats(self, item: RateLimitItem, *identifiers: str) -> WindowStats:
        if has_request_context():
            windows = g.get("whistle_rate_windows") or {}
            found = windows.get(item.key_for(*identifiers))
            if found is not None:
                return found
        return super().get_window_stats(item, *identifiers)
