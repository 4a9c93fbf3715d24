"""Why a delivery failed or bounced: a small, stable vocabulary, and the funnel counters of it.

Every writer that moves a delivery to ``failed`` or ``bounced`` stores the reason in
``deliveries.failure_reason`` and bumps ``failed:<reason>`` / ``bounced:<reason>`` beside
the total, as the planner does with ``suppressed:<reason>``; ``rebuild_stats`` recounts
them from the column. The names are stored and exported (CSV): add new ones, never rename.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from whistle_web.channels.base import SendResult
from whistle_web.channels.kinds import Channel
from whistle_web.tenancy import TenantScopeError

if TYPE_CHECKING:
    from whistle_web.deliveries.ledger import CounterRow


class FailureReason(enum.StrEnum):
    """Why a delivery ended ``failed`` (before a provider took it) or ``bounced`` (after)."""

    # failed: found before asking a provider
    TEMPLATE_ERROR = "template_error"  # the template or the email layout did not render
    NO_ADDRESS = "no_address"  # no email, phone, active device or URL at send time
    RECIPIENT_DELETED = "recipient_deleted"  # deleted between planning and sending
    NO_PROVIDER = "no_provider"  # no enabled provider for the channel
    # failed: the provider's answer
    INVALID_ADDRESS = "invalid_address"  # the address or device token is dead
    PROVIDER_REJECTED = "provider_rejected"  # any other permanent error
    GAVE_UP = "gave_up"  # transient errors until the attempts ran out
    # failed: the worker died mid-send (the sweeper; never resent, to avoid a duplicate)
    INTERRUPTED = "interrupted"
    # bounced: reported by the provider after it accepted the message
    HARD_BOUNCE = "hard_bounce"  # permanent: the mailbox or number does not exist
    PROVIDER_SUPPRESSED = "provider_suppressed"  # the provider's own list (SES, Twilio STOP)
    SOFT_BOUNCE = "soft_bounce"  # a bounce event that calls itself transient
    # failures recorded before reasons were kept, and anything unrecognised
    OTHER = "other"


FAILED_REASONS = frozenset(
    {
        FailureReason.TEMPLATE_ERROR,
        FailureReason.NO_ADDRESS,
        FailureReason.RECIPIENT_DELETED,
        FailureReason.NO_PROVIDER,
        FailureReason.INVALID_ADDRESS,
        FailureReason.PROVIDER_REJECTED,
        FailureReason.GAVE_UP,
        FailureReason.INTERRUPTED,
        FailureReason.OTHER,
    }
)
BOUNCED_REASONS = frozenset(
    {
        FailureReason.HARD_BOUNCE,
        FailureReason.PROVIDER_SUPPRESSED,
        FailureReason.SOFT_BOUNCE,
        FailureReason.OTHER,
    }
)

# The texts dispatch gives failures found before any provider is asked (``_render_all``,
# ``_send``): change them together. tests/deliveries/test_failures.py sends through the
# template-error and no-provider paths; the other two are checked against these texts only.
_BEFORE_SENDING = (
    ("the recipient was deleted", FailureReason.RECIPIENT_DELETED),
    ("template error:", FailureReason.TEMPLATE_ERROR),
    ("no active device or address", FailureReason.NO_ADDRESS),
)
# SES bounce subtypes and Twilio error codes meaning "the provider's own list refused it".
SES_SUPPRESSED = frozenset({"Suppressed", "OnAccountSuppressionList"})
TWILIO_OPTED_OUT = frozenset({"21610"})  # the number replied STOP


def failure_reason(result: SendResult) -> FailureReason:
    """The reason of a send that failed for good (a transient error failed for good when
    its attempts ran out)."""
    if result.transient:
        return FailureReason.GAVE_UP
    if result.invalid_address:
        return FailureReason.INVALID_ADDRESS
    error = result.error or ""
    for prefix, reason in _BEFORE_SENDING:
        if error.startswith(prefix):
            return reason
    if error.startswith("no enabled ") and error.endswith(" provider"):
        return FailureReason.NO_PROVIDER
    return FailureReason.PROVIDER_REJECTED


def bounce_reason(data: dict[str, Any]) -> FailureReason:
    """The reason of a ``bounced`` event from its data (SES and Twilio callbacks)."""
    if data.get("bounce_sub_type") in SES_SUPPRESSED or data.get("error_code") in TWILIO_OPTED_OUT:
        return FailureReason.PROVIDER_SUPPRESSED
    if data.get("bounce_type", "permanent") != "permanent":
        return FailureReason.SOFT_BOUNCE
    return FailureReason.HARD_BOUNCE


def reason_counters(
    rows: Iterable[tuple[int | None, int | None, Channel | str, str | None, int]],
    status: str,
    at: datetime,
) -> list[CounterRow]:
    """Counter increments for (campaign, template, channel, reason, n) rows: ``status`` and
    ``status:<reason>`` for each."""
    from whistle_web.deliveries.ledger import CounterRow  # ledger imports this module

    counters = []
    for campaign_id, template_id, channel, reason, count in rows:
        metric = f"{status}:{reason or FailureReason.OTHER.value}"
        counters.append(CounterRow(campaign_id, template_id, channel, status, at, count))
        counters.append(CounterRow(campaign_id, template_id, channel, metric, at, count))
    return counters


def counted_failures(
    rows: Iterable[tuple[int, int | None, int | None, Channel | str, str | None, int]],
    org_id: int,
    at: datetime,
) -> list[CounterRow]:
    """Counter increments from a failing UPDATE's (organization, campaign, template,
    channel, reason, n) rows: ``failed`` and ``failed:<reason>``.

    Raises:
        TenantScopeError: a row of another organization was changed (rolls back the chunk).
    """
    rows = list(rows)
    if any(row[0] != org_id for row in rows):
        raise TenantScopeError(f"a chunk of organization {org_id} reached another's rows")
    return reason_counters((row[1:] for row in rows), "failed", at)
