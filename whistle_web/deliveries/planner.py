"""The planner: turn a send request into notifications and deliveries, batch by batch.

The audience is walked in batches keyed on recipient id (``id > cursor``, never OFFSET),
bounded by the id snapshot taken at launch so recipients created later are left out.
For each recipient and channel the rules apply in this order, each recorded as a
``suppressed`` delivery with its reason: global unsubscribe, suppression list, category
and channel preferences (critical categories bypass unsubscribe and preferences), missing
address or device, frequency cap. Quiet hours and local-time sends delay, never drop.

One batch is written in one transaction together with the new cursor, so a planner that
dies mid-way resumes exactly where the last committed batch ended.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import (
    BigInteger,
    Text,
    any_,
    bindparam,
    cast,
    func,
    literal,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import load_only

from whistle_web.audiences.models import Segment, Subscription
from whistle_web.audiences.segments import compile_rules
from whistle_web.campaigns.models import Campaign, CampaignStatus
from whistle_web.channels.in_app import encode_json, inbox_channel, notification_frame
from whistle_web.channels.kinds import PUSH_DEVICE_KINDS, Channel
from whistle_web.channels.models import Provider
from whistle_web.deliveries.dispatch import (
    ChannelContext,
    publish_stored,
    render_context,
    stored_provider,
)
from whistle_web.deliveries.models import BatchStatus, Delivery, DeliveryBatch
from whistle_web.deliveries.status import DeliveryStatus, SuppressionCause
from whistle_web.extensions import db
from whistle_web.message_templates.models import Template, TemplateVersion
from whistle_web.message_templates.rendering import RenderError
from whistle_web.notifications.models import SendRequest, SendRequestStatus
from whistle_web.organizations.models import Organization
from whistle_web.preferences.models import Category, Preference, Suppression
from whistle_web.recipients.models import Device, Recipient
from whistle_web.tenancy import require_organization_id

# Recipients per planner transaction, and so deliveries per channel job. Big enough that the
# per-batch work (look-ups, the commit, the enqueue, a job) is small next to the per-row
# work; small enough that a pause or a crash costs little.
BATCH_SIZE = 5000
# At most this many deliveries per channel job for channels that wait on a provider for every
# message, so that several workers share a send of a few thousand; in-app (no round trip per
# message) takes a whole planner batch in one job.
CHANNEL_BATCH_SIZE = {
    Channel.EMAIL: 1000,
    Channel.SMS: 1000,
    Channel.PUSH: 1000,
    Channel.WEBHOOK: 500,
}
ADDRESSED = {Channel.EMAIL: "email", Channel.SMS: "phone"}
PrefKey = tuple[int | None, str | None]  # (category id or None, channel or None)


def audience_condition(request: SendRequest) -> Any:
    """The WHERE condition selecting the request's recipients."""
    audience = request.audience
    kind = audience.get("type")
    if kind == "recipients":
        return Recipient.id.in_(audience["ids"])
    if kind == "topic":
        return Recipient.id.in_(
            select(Subscription.recipient_id).where(Subscription.topic_id == audience["id"])
        )
    if kind == "segment":
        segment = db.session.get(Segment, audience["id"])
        if segment is None:
            raise LookupError(f"segment {audience['id']} no longer exists")
        return compile_rules(segment.rules)
    if kind == "list":
        return Recipient.external_id.in_(audience["external_ids"])
    if kind == "all":
        return true()
    raise ValueError(f"unknown audience type {kind!r}")


def resolve_channels(
    request: SendRequest, version: TemplateVersion, category: Category | None
) -> list[Channel]:
    """The request's channels, else the template's narrowed to the category's defaults."""
    if request.channels:
        return [Channel(c) for c in request.channels]
    available = [Channel(c) for c in version.content if c in Channel.__members__.values()]
    if category is not None and category.default_channels:
        narrowed = [c for c in available if c in category.default_channels]
        return narrowed or available
    return available


def id_array(ids: Iterable[int]) -> Any:
    """Ids as one array parameter, for ``col == any_(id_array(ids))``.

    Thousands of ``IN`` parameters cost more to render and bind than the query costs to run.
    """
    return cast(literal("{" + ",".join(map(str, ids)) + "}", Text), ARRAY(BigInteger))


def text_array(values: Iterable[Any]) -> str:
    """A PostgreSQL array literal of text (NULL for None), to bind as one parameter."""
    return (
        "{"
        + ",".join(
            "NULL" if v is None else '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
            for v in values
        )
        + "}"
    )


# Notifications and deliveries of one batch in one statement: the arrays are bound once,
# notifications already planned by an earlier run of this batch are skipped (and so are their
# deliveries), the funnel counters are bumped by what was written, and that comes back
# aggregated for the batch sizes, with the ids of the in-app items written as sent (to
# publish them after the commit).
_INSERT_BATCH = text(
    """
WITH n AS (
    INSERT INTO notifications
        (organization_id, send_request_id, campaign_id, template_id, category_id,
         recipient_id, data)
    SELECT :org, :request, :campaign, :template, :category, r.id, CAST(:data AS jsonb)
    FROM unnest(CAST(:recipients AS bigint[])) AS r(id)
    ON CONFLICT (send_request_id, recipient_id) DO NOTHING
    RETURNING id, recipient_id
), d AS (
    INSERT INTO deliveries
        (id, organization_id, notification_id, recipient_id, campaign_id, template_id,
         batch_id, channel, status, suppression_reason, address, not_before,
         provider_id, rendered, attempts, sent_at, inbox_seq)
    SELECT coalesce(v.id, nextval('deliveries_id_seq')), :org, n.id, v.recipient_id,
           :campaign, :template, v.batch_id, v.channel, v.status, v.reason, v.address,
           v.not_before,
           CASE WHEN v.status = 'sent' THEN CAST(:provider AS bigint) END,
           nullif(v.rendered, 'null'),
           CASE WHEN v.status = 'sent' THEN 1 ELSE 0 END,
           CASE WHEN v.status = 'sent' THEN now() END,
           CASE WHEN v.status = 'sent' THEN nextval('inbox_seq') END
    FROM ROWS FROM (
        unnest(CAST(:d_recipients AS bigint[])),
        unnest(CAST(:d_channels AS text[])),
        unnest(CAST(:d_statuses AS text[])),
        unnest(CAST(:d_reasons AS text[])),
        unnest(CAST(:d_addresses AS text[])),
        unnest(CAST(:d_not_before AS timestamptz[])),
        unnest(CAST(:d_batches AS bigint[])),
        unnest(CAST(:d_ids AS bigint[])),
        jsonb_array_elements(CAST(:d_rendered AS jsonb))
    ) WITH ORDINALITY AS v(recipient_id, channel, status, reason, address, not_before,
                           batch_id, id, rendered, ord)
    JOIN n ON n.recipient_id = v.recipient_id
    ORDER BY v.ord
    RETURNING id, notification_id, recipient_id, channel, status, suppression_reason,
              batch_id, inbox_seq, created_at
), g AS (
    SELECT channel, status, suppression_reason, batch_id, count(*) AS n,
           array_agg(id) FILTER (WHERE status = 'sent') AS sent_ids,
           array_agg(notification_id) FILTER (WHERE status = 'sent') AS sent_notifications,
           array_agg(recipient_id) FILTER (WHERE status = 'sent') AS sent_recipients,
           array_agg(inbox_seq) FILTER (WHERE status = 'sent') AS sent_seqs,
           min(created_at) AS created_at
    FROM d GROUP BY 1, 2, 3, 4
), counted AS (
    -- Every delivery written is targeted, then suppressed (and why) or queued, and sent
    -- when written sent: ledger.bump_counters' metrics, from what was written.
    SELECT g.channel, m.metric, sum(g.n) AS n
    FROM g CROSS JOIN LATERAL (VALUES
        ('targeted'),
        (CASE WHEN g.status = 'suppressed' THEN 'suppressed' ELSE 'queued' END),
        (CASE WHEN g.status = 'suppressed' THEN 'suppressed:' || g.suppression_reason END),
        (CASE WHEN g.status = 'sent' THEN 'sent' END)
    ) AS m(metric)
    WHERE m.metric IS NOT NULL
    GROUP BY 1, 2
), bumped AS (
    INSERT INTO delivery_stats AS s
        (organization_id, scope, scope_id, channel, metric, bucket, value)
    SELECT :org, f.scope, f.scope_id, c.channel, c.metric, CAST(:bucket AS timestamptz), c.n
    FROM counted c
    CROSS JOIN (VALUES ('organization', CAST(:org AS bigint)),
                       ('campaign', CAST(:campaign AS bigint)),
                       ('template', CAST(:template AS bigint))) AS f(scope, scope_id)
    WHERE f.scope_id IS NOT NULL
    -- bump_counters' order (byte order, as Python sorts): writers lock counter rows alike.
    ORDER BY f.scope COLLATE "C", f.scope_id, c.channel COLLATE "C", c.metric COLLATE "C"
    ON CONFLICT ON CONSTRAINT uq_delivery_stats_key DO UPDATE SET value = s.value + EXCLUDED.value
)
SELECT channel, status, batch_id, n, sent_ids, sent_notifications, sent_recipients, sent_seqs,
       created_at
FROM g
"""
)
# What the rules need of each recipient.
PLANNING_COLUMNS = (
    Recipient.id,
    Recipient.email,
    Recipient.phone,
    Recipient.timezone,
    Recipient.unsubscribed_at,
    Recipient.quiet_hours_start,
    Recipient.quiet_hours_end,
)
# What rendering an in-app item needs of each recipient besides PLANNING_COLUMNS.
# The attributes come as JSON text, parsed once per distinct value of a batch (recipients
# often share them; the driver's JSONB loader cost ~2.4 us a row).
RENDER_COLUMNS = (
    Recipient.external_id,
    Recipient.name,
    Recipient.locale,
    cast(Recipient.attributes, Text).label("attributes_json"),
)


# Recipients being planned are read FOR KEY SHARE: an erasure (which deletes the row) waits
# for the planner's commit and then anonymises what it wrote. The ledger has no per-row
# foreign keys to recipients (migration 0009): this lock is its guard, at a fraction of the
# cost.
HOLD: dict[str, Any] = {"read": True, "key_share": True, "of": Recipient}

# Triggers to this many listed recipients are sent by their planning job (see plan()).
INLINE_RECIPIENTS = 20


def sent_when_planned(audience: dict[str, Any] | None, listed: int) -> bool:
    """Whether a trigger's planning job sends it too: a list of at most
    :data:`INLINE_RECIPIENTS` recipients (``audience`` None: the listed ones, not yet
    written). The web process groups such triggers' planning into one job."""
    kind = "recipients" if audience is None else audience.get("type")
    return kind == "recipients" and listed <= INLINE_RECIPIENTS


@lru_cache(maxsize=256)
def _preferences_column(category_id: int | None) -> Any:
    """Each recipient's preferences that can apply to a send of this category, as a JSON
    array of [category id, channel, enabled] (NULL when there is none). Built once."""
    return (
        select(
            func.jsonb_agg(
                func.jsonb_build_array(
                    Preference.category_id, Preference.channel, Preference.enabled
                )
            )
        )
        .where(Preference.recipient_id == Recipient.id)
        .where((Preference.category_id.is_(None)) | (Preference.category_id == category_id))
        .scalar_subquery()
        .label("preferences")
    )


def next_batch(
    request: SendRequest,
    condition: Any,
    limit: int = BATCH_SIZE,
    columns: Sequence[Any] = PLANNING_COLUMNS,
) -> list[Any]:
    """The next recipients after the cursor (with what the rules need), in id order."""
    stmt = after_cursor(request, condition, *columns).limit(limit).with_for_update(**HOLD)
    return list(db.session.execute(stmt))


def after_cursor(request: SendRequest, condition: Any, *columns: Any) -> Any:
    """The audience still to plan, in id order: after the cursor, up to the id snapshot."""
    stmt = select(*columns).where(Recipient.id > request.cursor_recipient_id, condition)
    if request.max_recipient_id is not None:
        stmt = stmt.where(Recipient.id <= request.max_recipient_id)
    return stmt.order_by(Recipient.id)


@dataclass(slots=True)
class _RenderRow:
    """What :func:`~whistle_web.deliveries.dispatch.render_context` reads of a delivery."""

    id: int | None
    recipient_id: int
    external_id: str
    email: str | None
    phone: str | None
    name: str | None
    locale: str | None
    timezone: str | None
    attributes: dict[str, Any] | None


@dataclass
class PlannedBatch:
    batch_ids: list[int]
    recipients: int
    # In-app items written as sent, (channel, frame) pairs flattened: to publish once the
    # transaction has committed (dispatch.publish_stored).
    published: list[str] = field(default_factory=list)


@dataclass
class Planned:
    """What :func:`plan` did."""

    batch_ids: list[int]  # channel batches or planning slices, enqueued already
    # False for a trigger: its request has nothing to close once planned
    # (dispatch.check_completion), so the job does not read it again to find that out.
    campaign_run: bool


class Planner:
    """Plans one send request inside its organization's scope.

    In-app deliveries due now are rendered here and written ``sent`` in the planning
    statement itself when the in-app provider is the plain unlimited one: the row is the
    inbox item (DESIGN.md: "stored, then published"), so a channel job would only read it
    back, render it and update it. They are published after the caller's commit
    (``PlannedBatch.published``). A delivery whose template fails to render is queued as
    usual, and its channel job records the error. ``write_in_app_sent=False`` queues them
    all for the channel jobs instead (the broadcast benchmark's one-job-per-recipient
    baseline needs them queued). ``in_app_providers``: the enabled in-app providers by
    priority, when the caller loaded them already.
    """

    def __init__(
        self,
        request: SendRequest,
        now: datetime | None = None,
        *,
        write_in_app_sent: bool = True,
        in_app_providers: list[Provider] | None = None,
    ) -> None:
        self.request = request
        self.now = now or datetime.now(UTC)
        self.template = db.session.get(Template, request.template_id)
        self.version = db.session.get(TemplateVersion, request.template_version_id)
        self.category = (
            db.session.get(Category, self.template.category_id)
            if self.template and self.template.category_id
            else None
        )
        self.critical = bool(self.category and self.category.critical)
        self.channels = resolve_channels(request, self.version, self.category)
        organization = db.session.get(Organization, request.organization_id)
        cap = (organization.settings or {}).get("frequency_cap_per_day")
        self.frequency_cap = int(cap) if isinstance(cap, int) and cap > 0 else None
        self.condition = audience_condition(request)
        self._push_device_kinds: set[str] | None = None  # loaded when first needed
        self.in_app: ChannelContext | None = None
        self.in_app_provider_id: int | None = None
        if write_in_app_sent and Channel.IN_APP in self.channels:
            context = ChannelContext.load(request, Channel.IN_APP, in_app_providers)
            provider = stored_provider(context)
            if provider is not None:
                self.in_app, self.in_app_provider_id = context, provider.id
        self.columns = PLANNING_COLUMNS + (RENDER_COLUMNS if self.in_app else ())
        # A request naming a few recipients (the common trigger) reads their preferences
        # with them, one statement fewer; a batch of thousands looks them up in one query.
        listed = _listed(request)
        self.preferences_in_rows = listed is not None and listed <= INLINE_RECIPIENTS
        if self.preferences_in_rows:
            self.columns += (_preferences_column(self.category.id if self.category else None),)

    def plan_batch(self, recipient_ids: list[int]) -> PlannedBatch:
        """Write notifications, deliveries and channel batches for these recipients."""
        recipients = db.session.execute(
            select(*self.columns)
            .where(Recipient.id == any_(id_array(recipient_ids)))
            .order_by(Recipient.id)
            .with_for_update(**HOLD)
        ).all()
        return self.plan_recipients(recipients)

    def plan_recipients(self, recipients: Sequence[Any]) -> PlannedBatch:
        """Plan recipient rows (``self.columns``): one statement writes everything."""
        if not recipients:
            return PlannedBatch([], 0)
        recipient_ids = [r.id for r in recipients]
        disabled = (
            self._preferences_of(recipients)
            if self.preferences_in_rows
            else self._disabled_preferences(recipient_ids)
        )
        suppressed = self._suppressed_addresses(recipients)
        with_device = self._recipients_with_devices(recipient_ids)
        sent_today = self._sent_today(recipient_ids)

        # One entry per delivery, column by column (bound as arrays).
        d_recipients: list[int] = []
        d_channels: list[str] = []
        d_statuses: list[str] = []
        d_reasons: list[str | None] = []
        d_addresses: list[str | None] = []
        d_not_before: list[str | None] = []
        d_batched: list[tuple[Channel, int] | None] = []  # (channel, job number)
        # In-app deliveries due now, to render here: (entry index, recipient row).
        in_app_now: list[tuple[int, Any]] = []
        addressed = [(c, ADDRESSED.get(c)) for c in self.channels]
        queued, suppressed_status = DeliveryStatus.QUEUED.value, DeliveryStatus.SUPPRESSED.value
        for recipient in recipients:
            not_before: datetime | None = None
            timed = False  # _not_before is computed once per recipient, when first needed
            for channel, field_name in addressed:
                reason = self._suppression(
                    recipient, channel, disabled, suppressed, with_device, sent_today
                )
                d_recipients.append(recipient.id)
                d_channels.append(channel.value)
                d_addresses.append(getattr(recipient, field_name) if field_name else None)
                if reason is not None:
                    d_statuses.append(suppressed_status)
                    d_reasons.append(reason.value)
                    d_not_before.append(None)
                    d_batched.append(None)
                    continue
                if not timed:
                    not_before, timed = self._not_before(recipient), True
                d_statuses.append(queued)
                d_reasons.append(None)
                d_batched.append(None)  # set below for those that go to a channel job
                if not_before is None:
                    d_not_before.append(None)
                    if channel == Channel.IN_APP and self.in_app is not None:
                        in_app_now.append((len(d_batched) - 1, recipient))
                    else:
                        d_batched[-1] = (channel, 0)
                else:
                    d_not_before.append(not_before.isoformat())

        d_ids: list[int | None] = [None] * len(d_recipients)
        d_rendered: list[dict[str, Any] | None] = [None] * len(d_recipients)
        contents = self._render_in_app(in_app_now, d_ids, d_rendered, d_statuses, d_batched)

        # Channel jobs of at most CHANNEL_BATCH_SIZE deliveries each, in entry order.
        batched: Counter[Channel] = Counter()
        job_size = {c: CHANNEL_BATCH_SIZE.get(c, BATCH_SIZE) for c in self.channels}
        for index, entry in enumerate(d_batched):
            if entry is not None:
                channel = entry[0]
                d_batched[index] = (channel, batched[channel] // job_size[channel])
                batched[channel] += 1
        batches: dict[tuple[Channel, int], DeliveryBatch] = {}
        for channel, count in batched.items():
            size = job_size[channel]
            for number in range((count + size - 1) // size):
                batches[(channel, number)] = DeliveryBatch(
                    send_request_id=self.request.id,
                    channel=channel,
                    size=min(size, count - number * size),
                )
                db.session.add(batches[(channel, number)])
        if batches:
            db.session.flush()  # batch ids
        batch_of = {key: str(b.id) for key, b in batches.items()}
        category_id = self.category.id if self.category else None
        written = db.session.execute(
            _INSERT_BATCH,
            {
                "org": require_organization_id(),
                "request": self.request.id,
                "campaign": self.request.campaign_id,
                "template": self.request.template_id,
                "category": category_id,
                "data": json.dumps(self.request.data or {}),
                "provider": self.in_app_provider_id,
                "recipients": "{" + ",".join(map(str, recipient_ids)) + "}",
                "d_recipients": "{" + ",".join(map(str, d_recipients)) + "}",
                "d_channels": "{" + ",".join(d_channels) + "}",
                "d_statuses": "{" + ",".join(d_statuses) + "}",
                "d_reasons": "{" + ",".join(r or "NULL" for r in d_reasons) + "}",
                "d_addresses": text_array(d_addresses),
                "d_not_before": "{" + ",".join(t or "NULL" for t in d_not_before) + "}",
                "d_batches": "{" + ",".join(batch_of[k] if k else "NULL" for k in d_batched) + "}",
                "d_ids": "{" + ",".join("NULL" if i is None else str(i) for i in d_ids) + "}",
                "d_rendered": json.dumps(d_rendered, separators=(",", ":")),
                # The hour bump_counters adds an increment at self.now to.
                "bucket": self.now.astimezone(UTC).replace(minute=0, second=0, microsecond=0),
            },
        ).all()

        sizes: Counter[int] = Counter()
        published: list[str] = []
        for _channel, status, batch_id, count, *sent_rows in written:
            if status == DeliveryStatus.SENT.value:
                published += self._in_app_frames(sent_rows, contents)
            if batch_id is not None:
                sizes[batch_id] += count
        created = []
        for batch in batches.values():
            size = sizes.get(batch.id, 0)
            if size == 0:  # everything in it was planned by an earlier run of this batch
                db.session.delete(batch)
                continue
            if size != batch.size:
                batch.size = size
            created.append(batch.id)
        return PlannedBatch(created, len(recipients), published)

    # --- in-app items written as sent -------------------------------------------------
    def _render_in_app(
        self,
        entries: list[tuple[int, Any]],
        d_ids: list[int | None],
        d_rendered: list[dict[str, Any] | None],
        d_statuses: list[str],
        d_batched: list[tuple[Channel, int] | None],
    ) -> dict[int, dict[str, Any]]:
        """Render in-app items due now into the entry columns; mark them sent.

        Returns:
            recipient id → content, for the published frames. An item that
            fails to render goes to a channel job instead, which records the error.
        """
        context = self.in_app
        if context is None or not entries:
            return {}
        ids: list[int | None] = [None] * len(entries)
        template = context.channel_template
        if template is None or template.uses_unsubscribe_url:  # the link names the delivery
            ids = list(
                db.session.scalars(
                    text("SELECT nextval('deliveries_id_seq') FROM generate_series(1, :n)"),
                    {"n": len(entries)},
                )
            )
        data = self.request.data or {}
        sent = DeliveryStatus.SENT.value
        contents: dict[int, dict[str, Any]] = {}
        # Shared by the recipients with the same attributes: templates cannot change them.
        attributes: dict[str | None, dict[str, Any]] = {None: {}}
        for (index, r), delivery_id in zip(entries, ids, strict=True):
            parsed = attributes.get(r.attributes_json)
            if parsed is None:
                parsed = attributes[r.attributes_json] = json.loads(r.attributes_json) or {}
            row = _RenderRow(
                delivery_id,
                r.id,
                r.external_id,
                r.email,
                r.phone,
                r.name,
                r.locale,
                r.timezone,
                parsed,
            )
            try:
                content = context.render(render_context(row, context, data))
            except RenderError:
                d_batched[index] = (Channel.IN_APP, 0)
                continue
            d_ids[index] = delivery_id
            d_rendered[index] = content
            d_statuses[index] = sent
            contents[r.id] = content
        return contents

    def _in_app_frames(
        self, sent_rows: Sequence[Any], contents: dict[int, dict[str, Any]]
    ) -> list[str]:
        """The (channel, frame) pairs to publish for the in-app rows written as sent."""
        delivery_ids, notification_ids, recipient_ids, seqs, created_at = sent_rows
        org_id = require_organization_id()
        data_json = encode_json(self.request.data or {})
        created = created_at.isoformat()
        frames: list[str] = []
        for delivery_id, notification_id, recipient_id, seq in zip(
            delivery_ids, notification_ids, recipient_ids, seqs, strict=True
        ):
            frames.append(inbox_channel(org_id, recipient_id))
            frames.append(
                notification_frame(
                    delivery_id,
                    notification_id,
                    seq,
                    contents[recipient_id],
                    data_json,
                    created,
                )
            )
        return frames

    # --- rules ------------------------------------------------------------------------
    def _suppression(
        self,
        recipient: Any,
        channel: Channel,
        disabled: dict[int, dict[PrefKey, bool]],
        suppressed: set[tuple[str, str]],
        with_device: set[int],
        sent_today: dict[tuple[int, str], int],
    ) -> SuppressionCause | None:
        if not self.critical and recipient.unsubscribed_at is not None:
            return SuppressionCause.UNSUBSCRIBED
        address = getattr(recipient, ADDRESSED[channel]) if channel in ADDRESSED else None
        if address and (channel.value, address.lower()) in suppressed:
            return SuppressionCause.SUPPRESSION_LIST
        if not self.critical and not self._allowed(disabled.get(recipient.id, {}), channel):
            return SuppressionCause.PREFERENCE
        if channel in ADDRESSED and not address:
            return SuppressionCause.NO_ADDRESS
        if channel == Channel.PUSH and recipient.id not in with_device:
            return SuppressionCause.NO_ADDRESS
        if (
            self.frequency_cap is not None
            and not self.critical
            and sent_today.get((recipient.id, channel.value), 0) >= self.frequency_cap
        ):
            return SuppressionCause.FREQUENCY_CAP
        return None

    def _allowed(self, prefs: dict[PrefKey, bool], channel: Channel) -> bool:
        """The most specific preference wins; with none, the channel is on."""
        key = self._deciding_preference(prefs, channel)
        return True if key is None else prefs[key]

    def _deciding_preference(self, prefs: dict[PrefKey, bool], channel: Channel) -> PrefKey | None:
        """The most specific preference that applies (category and channel, category,
        channel, all), or None when there is none; "why not" names it."""
        category_id = self.category.id if self.category else None
        keys: list[PrefKey] = []
        if category_id is not None:
            keys += [(category_id, channel.value), (category_id, None)]
        keys += [(None, channel.value), (None, None)]
        for key in keys:
            if key in prefs:
                return key
        return None

    def _not_before(self, recipient: Any) -> datetime | None:
        """When a delivery may go: local send time, then quiet hours (never for critical)."""
        quiet = not self.critical and recipient.quiet_hours_start and recipient.quiet_hours_end
        if self.request.local_send_time is None and not quiet:
            return None
        zone = _zone(recipient.timezone)
        at: datetime | None = None
        if self.request.local_send_time is not None:
            at = next_local_time(
                max(self.now, self.request.send_at), self.request.local_send_time, zone
            )
        if quiet:
            end = quiet_hours_end(
                at or self.now, recipient.quiet_hours_start, recipient.quiet_hours_end, zone
            )
            if end is not None:
                at = end
        return at if at is not None and at > self.now else None

    # --- look-ups for a whole batch ----------------------------------------------------
    def _preferences_of(self, recipients: Sequence[Any]) -> dict[int, dict[PrefKey, bool]]:
        """:meth:`_disabled_preferences` of rows read with :func:`_preferences_column`."""
        prefs: dict[int, dict[PrefKey, bool]] = defaultdict(dict)
        for recipient in recipients:
            for cat, channel, enabled in recipient.preferences or ():
                prefs[recipient.id][(cat, channel)] = enabled
        return prefs

    def _disabled_preferences(self, ids: list[int]) -> dict[int, dict[PrefKey, bool]]:
        category_id = self.category.id if self.category else None
        rows = db.session.execute(
            select(
                Preference.recipient_id,
                Preference.category_id,
                Preference.channel,
                Preference.enabled,
            )
            .where(Preference.recipient_id == any_(id_array(ids)))
            .where((Preference.category_id.is_(None)) | (Preference.category_id == category_id))
        ).all()
        prefs: dict[int, dict[PrefKey, bool]] = defaultdict(dict)
        for recipient_id, cat, channel, enabled in rows:
            prefs[recipient_id][(cat, channel.value if channel else None)] = enabled
        return prefs

    def _suppressed_addresses(self, recipients: list[Any]) -> set[tuple[str, str]]:
        addresses = {
            getattr(r, ADDRESSED[c]).lower()
            for r in recipients
            for c in self.channels
            if c in ADDRESSED and getattr(r, ADDRESSED[c])
        }
        if not addresses:
            return set()
        rows = db.session.execute(
            select(Suppression.channel, Suppression.address).where(
                Suppression.address == any_(cast(literal(text_array(addresses), Text), ARRAY(Text)))
            )
        ).all()
        return {(channel.value, address) for channel, address in rows}

    def _recipients_with_devices(self, ids: list[int]) -> set[int]:
        """Recipients with an active device that an enabled push provider can reach.

        With no push provider at all, any device counts: the deliveries are queued and
        fail with "no enabled push provider", which tells staff what to configure.
        """
        if Channel.PUSH not in self.channels:
            return set()
        if self._push_device_kinds is None:
            self._push_device_kinds = {
                PUSH_DEVICE_KINDS[kind]
                for kind in db.session.scalars(
                    select(Provider.kind).where(
                        Provider.channel == Channel.PUSH, Provider.enabled.is_(True)
                    )
                )
                if kind in PUSH_DEVICE_KINDS
            }
        query = select(Device.recipient_id).where(
            Device.recipient_id == any_(id_array(ids)), Device.disabled_at.is_(None)
        )
        if self._push_device_kinds:
            query = query.where(Device.kind.in_(self._push_device_kinds))
        return set(db.session.scalars(query.distinct()))

    def _sent_today(self, ids: list[int]) -> dict[tuple[int, str], int]:
        if self.frequency_cap is None or self.critical:
            return {}
        rows = db.session.execute(
            select(Delivery.recipient_id, Delivery.channel, func.count())
            .where(
                Delivery.recipient_id == any_(id_array(ids)),
                Delivery.created_at > self.now - timedelta(days=1),
                Delivery.status.not_in([DeliveryStatus.SUPPRESSED, DeliveryStatus.CANCELLED]),
            )
            .group_by(Delivery.recipient_id, Delivery.channel)
        ).all()
        return {(rid, channel.value): n for rid, channel, n in rows}


# --- counting without planning (the console's pre-launch check) -----------------------------
# Above this many recipients the check extrapolates from a sample instead of counting all.
EXACT_COUNT_LIMIT = 200_000
COUNT_SAMPLE_SIZE = 20_000
COUNT_SECONDS = 3.0


@dataclass
class AudienceCount:
    """What the planner would do with an audience, without writing anything.

    ``channels`` maps each channel to how many deliveries would be queued and how many
    suppressed per reason; ``reachable`` counts recipients queued on at least one channel.
    ``exact`` is False when the numbers were extrapolated from a sample (say "about");
    ``recipients`` is None when even the sample did not finish in time.
    """

    recipients: int | None
    reachable: int | None
    channels: dict[str, dict[str, Any]]
    exact: bool


def _reason_column(planner: Planner, channel: Channel, org_id: int) -> Any:
    """SQL giving the planner's suppression cause for one channel (NULL: queued).

    The rules and their order are :meth:`Planner._suppression`'s, written set-based.
    """
    from sqlalchemy import and_, case, exists, not_

    field_name = ADDRESSED.get(channel)
    address = getattr(Recipient, field_name) if field_name else None
    has_address = func.coalesce(address, "") != "" if address is not None else None
    whens: list[tuple[Any, str]] = []
    if not planner.critical:
        whens.append((Recipient.unsubscribed_at.is_not(None), SuppressionCause.UNSUBSCRIBED.value))
    if address is not None:
        listed = exists().where(
            Suppression.organization_id == org_id,
            Suppression.channel == channel,
            Suppression.address == func.lower(address),
        )
        whens.append((and_(has_address, listed), SuppressionCause.SUPPRESSION_LIST.value))
    if not planner.critical:
        category_id = planner.category.id if planner.category else None
        # The most specific preference wins: category and channel, category, channel, all.
        category_match = (
            Preference.category_id.is_(None)
            if category_id is None
            else (Preference.category_id.is_(None) | (Preference.category_id == category_id))
        )
        chosen = (
            select(Preference.enabled)
            .where(
                Preference.recipient_id == Recipient.id,
                category_match,
                Preference.channel.is_(None) | (Preference.channel == channel),
            )
            .order_by(
                Preference.category_id.is_(None).asc(),
                Preference.channel.is_(None).asc(),
            )
            .limit(1)
            .scalar_subquery()
        )
        allowed = func.coalesce(chosen, true())
        whens.append((not_(allowed), SuppressionCause.PREFERENCE.value))
    if address is not None:
        whens.append((not_(has_address), SuppressionCause.NO_ADDRESS.value))
    if channel == Channel.PUSH:
        kinds = {
            PUSH_DEVICE_KINDS[kind]
            for kind in db.session.scalars(
                select(Provider.kind).where(
                    Provider.channel == Channel.PUSH, Provider.enabled.is_(True)
                )
            )
            if kind in PUSH_DEVICE_KINDS
        }
        device = exists().where(
            Device.organization_id == org_id,
            Device.recipient_id == Recipient.id,
            Device.disabled_at.is_(None),
            *([Device.kind.in_(kinds)] if kinds else []),
        )
        whens.append((not_(device), SuppressionCause.NO_ADDRESS.value))
    if planner.frequency_cap is not None and not planner.critical:
        sent_today = (
            select(func.count())
            .select_from(Delivery)
            .where(
                Delivery.organization_id == org_id,
                Delivery.recipient_id == Recipient.id,
                Delivery.channel == channel,
                Delivery.created_at > planner.now - timedelta(days=1),
                Delivery.status.not_in([DeliveryStatus.SUPPRESSED, DeliveryStatus.CANCELLED]),
            )
            .scalar_subquery()
        )
        whens.append((sent_today >= planner.frequency_cap, SuppressionCause.FREQUENCY_CAP.value))
    if not whens:
        return literal(None, Text)
    return case(*whens, else_=literal(None, Text))


def _timed(seconds: float, run: Any) -> Any:
    """Run ``run()`` with a statement timeout; None when PostgreSQL cancelled it."""
    from psycopg import errors as pg_errors
    from sqlalchemy.exc import DBAPIError

    savepoint = db.session.begin_nested()
    try:
        previous = db.session.scalar(text("SELECT current_setting('statement_timeout')"))
        db.session.execute(
            text("SELECT set_config('statement_timeout', :value, true)"),
            {"value": f"{max(1, int(seconds * 1000))}ms"},
        )
        result = run()
        db.session.execute(
            text("SELECT set_config('statement_timeout', :value, true)"), {"value": previous}
        )
    except DBAPIError as error:
        savepoint.rollback()  # also undoes the timeout setting
        if isinstance(error.orig, pg_errors.QueryCanceled):
            return None
        raise
    savepoint.commit()
    return result


def count_audience(
    request: SendRequest,
    *,
    seconds: float = COUNT_SECONDS,
    exact_limit: int | None = None,
    sample_size: int | None = None,
) -> AudienceCount:
    """Count what planning ``request`` would queue and suppress, per channel and reason.

    Set-based (one grouped query), read-only, with the planner's rules and audience; quiet
    hours and local send times only delay, so they do not count. Audiences above
    ``exact_limit`` recipients, and counts that take longer than ``seconds``, are
    extrapolated from the first ``sample_size`` recipients by id (``exact`` False).
    The request may be transient (never added to the session).
    """
    exact_limit = EXACT_COUNT_LIMIT if exact_limit is None else exact_limit
    sample_size = COUNT_SAMPLE_SIZE if sample_size is None else sample_size
    org_id = require_organization_id()
    planner = Planner(request)
    condition = planner.condition
    if request.max_recipient_id is not None:
        condition = condition & (Recipient.id <= request.max_recipient_id)
    channels = list(planner.channels)
    columns = [_reason_column(planner, c, org_id).label(f"c{i}") for i, c in enumerate(channels)]

    def grouped(where: Any) -> list[Any]:
        inner = select(*columns).where(where).subquery()
        outer_columns = [inner.c[f"c{i}"] for i in range(len(channels))]
        return list(
            db.session.execute(select(*outer_columns, func.count()).group_by(*outer_columns))
        )

    capped = _timed(
        seconds,
        lambda: db.session.scalar(
            select(func.count()).select_from(
                select(Recipient.id).where(condition).limit(exact_limit + 1).subquery()
            )
        ),
    )
    rows = None
    scale = 1.0
    exact = True
    if capped is not None and capped <= exact_limit:
        rows = _timed(seconds, lambda: grouped(condition))
    if rows is None:
        exact = False
        sample = (
            select(Recipient.id).where(condition).order_by(Recipient.id).limit(sample_size)
        ).subquery()
        last = _timed(seconds, lambda: db.session.scalar(select(func.max(sample.c.id))))
        rows = (
            _timed(seconds, lambda: grouped(Recipient.id.in_(select(sample.c.id))))
            if last is not None
            else None
        )
        if rows is None:
            return AudienceCount(None, None, {c.value: {} for c in channels}, exact=False)
        sampled = sum(row[-1] for row in rows)
        if sampled < sample_size:
            exact = True  # the sample was the whole audience
        else:
            first, top = db.session.execute(
                select(func.min(Recipient.id), func.max(Recipient.id))
            ).one()
            if request.max_recipient_id is not None:
                top = min(top, request.max_recipient_id)
            # Recipient ids grow with time; the audience is assumed spread evenly over them.
            scale = (top - first + 1) / max(1, last - first + 1)

    def scaled(n: int) -> int:
        return n if exact else round(n * scale)

    result: dict[str, dict[str, Any]] = {
        c.value: {"queued": 0, "suppressed": 0, "reasons": {}} for c in channels
    }
    recipients = reachable = 0
    for row in rows:
        *reasons, count = row
        recipients += count
        if any(r is None for r in reasons):
            reachable += count
        for channel, reason in zip(channels, reasons, strict=True):
            entry = result[channel.value]
            if reason is None:
                entry["queued"] += count
            else:
                entry["suppressed"] += count
                entry["reasons"][reason] = entry["reasons"].get(reason, 0) + count
    for entry in result.values():
        entry["queued"] = scaled(entry["queued"])
        entry["suppressed"] = scaled(entry["suppressed"])
        entry["reasons"] = {k: scaled(v) for k, v in sorted(entry["reasons"].items())}
    return AudienceCount(scaled(recipients), scaled(reachable), result, exact=exact)


def _zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name) if name else ZoneInfo("UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def next_local_time(after: datetime, at: time, zone: ZoneInfo) -> datetime:
    """The first moment at or after ``after`` when the clock in ``zone`` shows ``at``."""
    local = after.astimezone(zone)
    candidate = datetime.combine(local.date(), at, tzinfo=zone)
    if candidate < local:
        candidate = datetime.combine(local.date() + timedelta(days=1), at, tzinfo=zone)
    return candidate.astimezone(UTC)


def quiet_hours_end(moment: datetime, start: time, end: time, zone: ZoneInfo) -> datetime | None:
    """If ``moment`` falls in the quiet window (which may span midnight), when it ends."""
    local = moment.astimezone(zone)
    clock = local.time().replace(tzinfo=None)
    if start <= end:
        inside = start <= clock < end
        end_day = local.date()
    else:  # e.g. 22:00 -> 07:00
        inside = clock >= start or clock < end
        end_day = local.date() + timedelta(days=1) if clock >= start else local.date()
    if not inside:
        return None
    return datetime.combine(end_day, end, tzinfo=zone).astimezone(UTC)


def plan(
    send_request_id: int,
    *,
    batch_size: int | None = None,
    max_batches: int | None = None,
    run_inline: Callable[[list[int]], None] | None = None,
) -> Planned:
    """Plan a send request from its cursor to the end (or a pause). Commits per batch.

    An audience of more than one batch is cut into planning slices instead (see
    :func:`cut_slices`), planned by all workers at once. A smaller one is planned here,
    one batch per transaction; its in-app items written as sent are published after each
    commit.

    With ``run_inline``, a trigger to at most :data:`INLINE_RECIPIENTS` listed recipients
    has its channel batches handed to ``run_inline`` after the commit instead of being
    enqueued: the planning job sends them itself, one job hop (and its latency) fewer for
    the common one-recipient trigger. The batches are in PostgreSQL like any other, so the
    sweeper still finishes them if the job dies.

    Returns:
        The channel batches (or planning slices) created, enqueued already, and whether
        the request is a campaign run.
    """
    # Kept to the end: the identity map holds what they loaded weakly (see _load_locked).
    loaded = _load_locked(send_request_id)
    if not loaded:
        return Planned([], campaign_run=False)
    request = loaded[0].SendRequest
    # Read once: the commits below expire the request, and reading it again is a query.
    request_id, campaign_id = request.id, request.campaign_id
    campaign_run = campaign_id is not None
    if request.status in (
        SendRequestStatus.CANCELLED,
        SendRequestStatus.FAILED,
        SendRequestStatus.PLANNED,
    ) or request.send_at > datetime.now(UTC):
        db.session.commit()  # releases the lock
        return Planned([], campaign_run)
    in_app_providers = [row.Provider for row in loaded if row.Provider is not None]
    planner = Planner(request, in_app_providers=in_app_providers)
    request.status = SendRequestStatus.PLANNING
    size = batch_size or BATCH_SIZE
    listed = _listed(request)
    if (listed is None or listed > size) and _more_than(request, planner.condition, size):
        slices = cut_slices(request, planner.condition, size, max_slices=max_batches)
        return Planned(slices, campaign_run)
    inline = run_inline is not None and _small_trigger(request)
    created: list[int] = []
    done = 0
    while max_batches is None or done < max_batches:
        # A trigger's status was read just above; a campaign may have been paused since.
        if (done or campaign_id is not None) and _campaign_halted(request):
            db.session.commit()
            return Planned(created, campaign_run)
        # The request's changes go in one UPDATE at the commit, not one per query before it.
        with db.session.no_autoflush:
            recipients = next_batch(request, planner.condition, size, planner.columns)
            # A short batch is the last one: planned in the same commit, no query to prove it.
            last = len(recipients) < size
            if last:
                request.status = SendRequestStatus.PLANNED
                request.planned_at = datetime.now(UTC)
            if not recipients:
                db.session.commit()
                return Planned(created, campaign_run)
            result = planner.plan_recipients(recipients)
            request.cursor_recipient_id = recipients[-1].id
            request.planned_count += result.recipients
            request.heartbeat_at = datetime.now(UTC)
        db.session.commit()
        publish_stored(result.published, f"send request {request_id}")
        created += result.batch_ids
        if result.batch_ids:
            if inline:
                run_inline(result.batch_ids)  # type: ignore[misc]
            else:
                from workers.sending import enqueue_batches

                enqueue_batches(result.batch_ids, campaign=campaign_id is not None)
        done += 1
        if last:
            return Planned(created, campaign_run)
    return Planned(created, campaign_run)


# The request, locked, with what planning reads of it and the organization's enabled in-app
# providers by priority (a row per provider, or one row with None for none). Built once.
# Only the columns planning reads of the others: the driver describes every column of the
# result on every execution (a column not loaded here is read if something asks for it).
_LOAD = (
    select(SendRequest, Template, TemplateVersion, Category, Organization, Provider)
    .join(Organization, Organization.id == SendRequest.organization_id)
    .outerjoin(Template, Template.id == SendRequest.template_id)
    .outerjoin(TemplateVersion, TemplateVersion.id == SendRequest.template_version_id)
    .outerjoin(Category, Category.id == Template.category_id)
    .outerjoin(
        Provider,
        (Provider.organization_id == SendRequest.organization_id)
        & (Provider.channel == Channel.IN_APP)
        & Provider.enabled.is_(True),
    )
    .where(SendRequest.id == bindparam("send_request_id"))
    .order_by(Provider.priority, Provider.id)
    .with_for_update(of=SendRequest, key_share=True)
    .options(
        load_only(Template.organization_id, Template.key, Template.category_id),
        load_only(TemplateVersion.organization_id, TemplateVersion.content),
        load_only(
            Category.organization_id,
            Category.key,
            Category.name,
            Category.critical,
            Category.default_channels,
        ),
        load_only(Organization.name, Organization.settings),
        load_only(
            Provider.organization_id,
            Provider.channel,
            Provider.kind,
            Provider.name,
            Provider.rate_limit_per_second,
        ),
    )
)


def _load_locked(send_request_id: int) -> list[Any]:
    """The request, locked until the next commit, with its template, version, category,
    organization and in-app providers, in one statement (no rows: no such request).

    :class:`Planner` and :class:`ChannelContext` then find them in the session's identity map
    (``Session.get`` of a loaded object runs no query) while the caller holds the rows. The
    lock is the one the planner's UPDATE of the request takes anyway, taken at the read: a
    cancel either committed before it, and planning sees it, or waits for planning's commit.
    """
    return db.session.execute(_LOAD, {"send_request_id": send_request_id}).all()


def _listed(request: SendRequest) -> int | None:
    """How many recipients a listed audience names (None: not a list)."""
    audience = request.audience or {}
    if audience.get("type") == "recipients":
        return len(audience.get("ids") or ())
    if audience.get("type") == "list":
        return len(audience.get("external_ids") or ())
    return None


# Planning slices created per transaction (and enqueued together after it).
SLICES_PER_COMMIT = 10


def _more_than(request: SendRequest, condition: Any, size: int) -> bool:
    """Whether more than ``size`` recipients are left after the cursor."""
    stmt = after_cursor(request, condition, Recipient.id).offset(size).limit(1)
    return db.session.scalar(stmt) is not None


def cut_slices(
    request: SendRequest, condition: Any, size: int, *, max_slices: int | None = None
) -> list[int]:
    """Cut the rest of the audience into planning slices of ``size`` recipients, enqueued
    as they are committed; the request is ``planned`` once the last one is cut.

    Each slice is a :class:`DeliveryBatch` without a channel holding a recipient id range;
    its job (:func:`plan_slice`) applies the rules to the recipients in that range and
    writes them in one transaction, so slices are planned in parallel by every worker and
    each one is planned exactly once. The cursor moves in the transaction that records the
    slices: a slicer that dies resumes after the last committed slice.

    Returns:
        Ids of the slices created.
    """
    from workers.sending import enqueue_batches

    created: list[int] = []
    while max_slices is None or len(created) < max_slices:
        if _campaign_halted(request):
            db.session.commit()
            return created
        slices: list[DeliveryBatch] = []
        finished = False
        for _ in range(SLICES_PER_COMMIT):
            window = after_cursor(request, condition, Recipient.id).limit(size).subquery()
            last, count = db.session.execute(
                select(func.max(window.c.id), func.count()).select_from(window)
            ).one()
            if last is None:
                finished = True
                break
            slices.append(
                DeliveryBatch(
                    send_request_id=request.id,
                    channel=None,
                    first_recipient_id=request.cursor_recipient_id,
                    last_recipient_id=last,
                    size=count,
                )
            )
            request.cursor_recipient_id = last
            if max_slices is not None and len(created) + len(slices) >= max_slices:
                break
        db.session.add_all(slices)
        request.heartbeat_at = datetime.now(UTC)
        if finished:
            request.status = SendRequestStatus.PLANNED
            request.planned_at = datetime.now(UTC)
        db.session.flush()
        ids_created = [s.id for s in slices]
        db.session.commit()
        created += ids_created
        enqueue_batches(ids_created, campaign=request.campaign_id is not None)
        if finished:
            break
    return created


def plan_slice(batch: DeliveryBatch, request: SendRequest) -> str:
    """Plan one slice's recipients in one transaction (with the slice marked done), then
    publish its in-app items and enqueue its channel batches.

    All or nothing: a job that dies before the commit leaves the slice open for the
    sweeper, and planning it again writes it once (nothing was written).
    """
    planner = Planner(request)
    recipients = db.session.execute(
        select(*planner.columns)
        .where(
            Recipient.id > batch.first_recipient_id,
            Recipient.id <= batch.last_recipient_id,
            planner.condition,
        )
        .order_by(Recipient.id)
        .with_for_update(**HOLD)
    ).all()
    result = planner.plan_recipients(recipients)
    batch.status = BatchStatus.DONE
    batch.finished_at = datetime.now(UTC)
    # Last before the commit: concurrent slices wait on the request's row only briefly.
    db.session.execute(
        update(SendRequest)
        .where(SendRequest.id == request.id)
        .values(planned_count=SendRequest.planned_count + result.recipients)
        .execution_options(synchronize_session=False)
    )
    db.session.commit()
    publish_stored(result.published, f"slice {batch.id}")
    if result.batch_ids:
        from workers.sending import enqueue_batches

        enqueue_batches(result.batch_ids, campaign=request.campaign_id is not None)
    return f"planned {len(recipients)} recipients; {len(result.batch_ids)} channel batches"


def _small_trigger(request: SendRequest) -> bool:
    return (
        request.campaign_id is None
        and request.audience is not None
        and sent_when_planned(request.audience, _listed(request) or 0)
    )


def _campaign_halted(request: SendRequest) -> bool:
    if request.campaign_id is None:
        db.session.refresh(request, ["status"])
        return request.status == SendRequestStatus.CANCELLED
    status = db.session.scalar(select(Campaign.status).where(Campaign.id == request.campaign_id))
    return status in (CampaignStatus.PAUSED, CampaignStatus.CANCELLED)
