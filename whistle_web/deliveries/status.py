"""The delivery ledger's states and the only moves allowed between them.

Progress runs one way: ``queued → sending → sent → delivered → seen → read → clicked``; any
step may be skipped (an in-app message is seen without a "delivered", an email link is
clicked without the pixel loading). ``sending → queued`` is the one move back: a worker
releases a delivery it has not handed to a provider (transient error, shutdown). Failure
and suppression happen before the provider accepted the message; a bounce after. Final
states never change. A trigger in PostgreSQL (migration 0001) enforces the same table, so
bulk SQL updates obey it too; a test checks that both agree on every pair.
"""

from __future__ import annotations

import enum


class DeliveryStatus(enum.StrEnum):
    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    DELIVERED = "delivered"
    SEEN = "seen"
    READ = "read"
    CLICKED = "clicked"
    SUPPRESSED = "suppressed"
    FAILED = "failed"
    BOUNCED = "bounced"
    CANCELLED = "cancelled"


PROGRESS: tuple[DeliveryStatus, ...] = (
    DeliveryStatus.QUEUED,
    DeliveryStatus.SENDING,
    DeliveryStatus.SENT,
    DeliveryStatus.DELIVERED,
    DeliveryStatus.SEEN,
    DeliveryStatus.READ,
    DeliveryStatus.CLICKED,
)
FINAL: frozenset[DeliveryStatus] = frozenset(
    {
        DeliveryStatus.SUPPRESSED,
        DeliveryStatus.FAILED,
        DeliveryStatus.BOUNCED,
        DeliveryStatus.CANCELLED,
    }
)
NOT_YET_SENT: frozenset[DeliveryStatus] = frozenset({DeliveryStatus.QUEUED, DeliveryStatus.SENDING})
ACCEPTED_BY_PROVIDER: frozenset[DeliveryStatus] = frozenset(
    {DeliveryStatus.SENDING, DeliveryStatus.SENT, DeliveryStatus.DELIVERED}
)


class SuppressionCause(enum.StrEnum):
    """Why the planner or a worker kept a delivery from being sent."""

    UNSUBSCRIBED = "unsubscribed"
    SUPPRESSION_LIST = "suppression_list"
    PREFERENCE = "preference"
    NO_ADDRESS = "no_address"
    FREQUENCY_CAP = "frequency_cap"
    DUPLICATE = "duplicate"


def can_transition(old: DeliveryStatus | str, new: DeliveryStatus | str) -> bool:
    """Return True when the ledger may move from ``old`` to ``new``."""
    old, new = DeliveryStatus(old), DeliveryStatus(new)
    if old == new:
        return True
    if old in FINAL:
        return False
    if new in PROGRESS:
        if old == DeliveryStatus.SENDING and new == DeliveryStatus.QUEUED:
            return True
        return PROGRESS.index(new) > PROGRESS.index(old)
    if new in {DeliveryStatus.FAILED, DeliveryStatus.SUPPRESSED, DeliveryStatus.CANCELLED}:
        return old in NOT_YET_SENT
    if new == DeliveryStatus.BOUNCED:
        return old in ACCEPTED_BY_PROVIDER
    return False


def predecessors(new: DeliveryStatus | str) -> list[DeliveryStatus]:
    """Statuses from which a bulk update may move rows to ``new`` (exclusive of ``new``)."""
    return [s for s in DeliveryStatus if s != new and can_transition(s, new)]
