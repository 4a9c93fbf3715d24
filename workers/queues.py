"""Queue names, highest priority first, and helpers to reach them."""

from __future__ import annotations

from redis import Redis
from rq import Queue

HIGH = "high"  # transactional triggers, in-app, provider callbacks
DEFAULT = "default"  # campaign batches
LOW = "low"  # maintenance, rollups, imports
QUEUES: tuple[str, ...] = (HIGH, DEFAULT, LOW)


def queue(name: str, connection: Redis) -> Queue:
    if name not in QUEUES:
        raise ValueError(f"unknown queue {name!r}")
    return Queue(name, connection=connection)
