"""Topics and their subscriptions, categories, and segments."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, Field
from sqlalchemy import func, select

from whistle_web.api import bp
from whistle_web.api.framework import Out, Schema, current_actor, endpoint, page
from whistle_web.audiences import services
from whistle_web.audiences.models import Segment, Subscription, Topic
from whistle_web.channels.kinds import Channel
from whistle_web.extensions import db
from whistle_web.preferences.models import Category
from whistle_web.preferences.services import get_recipient
from whistle_web.recipients.models import Recipient

TOPICS = ["Topics"]
CATEGORIES = ["Categories"]
SEGMENTS = ["Segments"]

# --- shared field types (also used by the preferences and templates resources) -----------

KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,99}$"


def no_nul(value: str) -> str:
    """PostgreSQL cannot store NUL characters: refuse them as invalid input."""
    if "\x00" in value:
        raise ValueError("NUL characters are not allowed.")
    return value


def storable_json(value: Any) -> Any:
    """Refuse what PostgreSQL's JSONB cannot hold: NUL characters in keys and strings, and
    NaN or infinite numbers (Python's JSON parser accepts them)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            no_nul(item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError("Numbers must be finite.")
        elif isinstance(item, dict):
            for key, child in item.items():
                no_nul(str(key))
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)
    return value


Text = Annotated[str, AfterValidator(no_nul)]
Key = Annotated[
    str,
    Field(
        pattern=KEY_PATTERN,
        description="Letters, digits, `_ . : -`; at most 100 characters.",
        examples=["product-updates"],
    ),
]
Name = Annotated[Text, Field(min_length=1, max_length=200)]
Description = Annotated[Text, Field(max_length=2000)]
ExternalId = Annotated[Text, Field(min_length=1, max_length=255)]
JsonObject = Annotated[dict[str, Any], AfterValidator(storable_json)]


class PageQuery(Schema):
    limit: int = Field(default=50, ge=1, le=200)
    cursor: str | None = None


# --- topics -----------------------------------------------------------------------------


class TopicIn(Schema):
    key: Key
    name: Name
    description: Description = ""


class TopicPatch(Schema):
    name: Name = None  # type: ignore[assignment]  (optional, but never null)
    description: Description = None  # type: ignore[assignment]


class TopicOut(Out):
    key: str
    name: str
    description: str
    subscribers: int
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, topic: Topic, subscribers: int | None = None) -> TopicOut:
        if subscribers is None:
            subscribers = subscriber_counts([topic.id]).get(topic.id, 0)
        return cls(
            key=topic.key,
            name=topic.name,
            description=topic.description or "",
            subscribers=subscribers,
            created_at=topic.created_at,
            updated_at=topic.updated_at,
        )


class TopicPage(Out):
    data: list[TopicOut]
    next_cursor: str | None


class SubscriptionsIn(Schema):
    recipients: list[ExternalId] = Field(
        min_length=1, max_length=1000, description="External ids of existing recipients."
    )


class SubscribeOut(Out):
    topic: str
    added: int = Field(description="Subscriptions created (already subscribed ones are kept).")


class UnsubscribeOut(Out):
    topic: str
    removed: int


class SubscriberOut(Out):
    external_id: str
    subscribed_at: datetime


class SubscriberPage(Out):
    data: list[SubscriberOut]
    next_cursor: str | None


class RecipientSubscriptionOut(Out):
    topic: str
    name: str
    subscribed_at: datetime


class RecipientSubscriptionPage(Out):
    data: list[RecipientSubscriptionOut]
    next_cursor: str | None


def subscriber_counts(topic_ids: list[int]) -> dict[int, int]:
    if not topic_ids:
        return {}
    rows = db.session.execute(
        select(Subscription.topic_id, func.count())
        .where(Subscription.topic_id.in_(topic_ids))
        .group_by(Subscription.topic_id)
    ).all()
    return {topic_id: int(count) for topic_id, count in rows}


@endpoint(
    bp,
    "POST",
    "/topics",
    summary="Create a topic",
    tags=TOPICS,
    scope="audiences:write",
    body=TopicIn,
    response=TopicOut,
    status=201,
    idempotent=True,
    errors=[409],
)
def create_topic(body: TopicIn) -> TopicOut:
    """A 409 when the key is taken."""
    topic = services.create_topic(body.key, body.name, body.description, actor=current_actor())
    return TopicOut.of(topic, 0)


@endpoint(
    bp,
    "GET",
    "/topics",
    summary="List topics, newest first",
    tags=TOPICS,
    scope="audiences:read",
    query=PageQuery,
    response=TopicPage,
)
def list_topics(query: PageQuery) -> TopicPage:
    rows, cursor = page(select(Topic), Topic.id, limit=query.limit, cursor=query.cursor)
    counts = subscriber_counts([t.id for t in rows])
    return TopicPage(data=[TopicOut.of(t, counts.get(t.id, 0)) for t in rows], next_cursor=cursor)


@endpoint(
    bp,
    "GET",
    "/topics/{key}",
    summary="Get a topic",
    tags=TOPICS,
    scope="audiences:read",
    response=TopicOut,
)
def show_topic(key: str) -> TopicOut:
    return TopicOut.of(services.get_topic(key))


@endpoint(
    bp,
    "PATCH",
    "/topics/{key}",
    summary="Rename or describe a topic",
    tags=TOPICS,
    scope="audiences:write",
    body=TopicPatch,
    response=TopicOut,
)
def update_topic(key: str, body: TopicPatch) -> TopicOut:
    """Only the fields sent change; the key cannot change."""
    topic = services.update_topic(key, body.model_dump(exclude_unset=True), actor=current_actor())
    return TopicOut.of(topic)


@endpoint(
    bp,
    "DELETE",
    "/topics/{key}",
    summary="Delete a topic and its subscriptions",
    tags=TOPICS,
    scope="audiences:write",
    status=204,
    errors=[409],
)
def delete_topic(key: str) -> None:
    """A 409 while a campaign targets the topic."""
    services.delete_topic(key, actor=current_actor())


@endpoint(
    bp,
    "POST",
    "/topics/{key}/subscriptions",
    summary="Subscribe recipients to a topic",
    tags=TOPICS,
    scope="audiences:write",
    body=SubscriptionsIn,
    response=SubscribeOut,
    idempotent=True,
)
def subscribe_to_topic(key: str, body: SubscriptionsIn) -> SubscribeOut:
    """Up to 1,000 external ids; unknown ones are a 422 naming `recipients[i]`, and nothing
    changes. Recipients already subscribed stay subscribed."""
    added = services.subscribe(key, body.recipients, actor=current_actor())
    return SubscribeOut(topic=key, added=added)


@endpoint(
    bp,
    "DELETE",
    "/topics/{key}/subscriptions",
    summary="Unsubscribe recipients from a topic",
    tags=TOPICS,
    scope="audiences:write",
    body=SubscriptionsIn,
    response=UnsubscribeOut,
)
def unsubscribe_from_topic(key: str, body: SubscriptionsIn) -> UnsubscribeOut:
    """Same body as subscribing; recipients that were not subscribed are ignored."""
    removed = services.unsubscribe(key, body.recipients, actor=current_actor())
    return UnsubscribeOut(topic=key, removed=removed)


@endpoint(
    bp,
    "GET",
    "/topics/{key}/subscriptions",
    summary="List a topic's subscribers, newest first",
    tags=TOPICS,
    scope="audiences:read",
    query=PageQuery,
    response=SubscriberPage,
)
def list_topic_subscribers(key: str, query: PageQuery) -> SubscriberPage:
    topic = services.get_topic(key)
    rows, cursor = page(
        select(Subscription).where(Subscription.topic_id == topic.id),
        Subscription.id,
        limit=query.limit,
        cursor=query.cursor,
    )
    external_ids = _external_ids([s.recipient_id for s in rows])
    return SubscriberPage(
        data=[
            SubscriberOut(external_id=external_ids[s.recipient_id], subscribed_at=s.created_at)
            for s in rows
        ],
        next_cursor=cursor,
    )


def _external_ids(recipient_ids: list[int]) -> dict[int, str]:
    if not recipient_ids:
        return {}
    rows = db.session.execute(
        select(Recipient.id, Recipient.external_id).where(Recipient.id.in_(recipient_ids))
    ).all()
    return dict(rows)  # type: ignore[arg-type]


@endpoint(
    bp,
    "GET",
    "/recipients/{external_id}/subscriptions",
    summary="List a recipient's topics, newest subscription first",
    tags=TOPICS,
    scope="audiences:read",
    query=PageQuery,
    response=RecipientSubscriptionPage,
)
def list_recipient_subscriptions(external_id: str, query: PageQuery) -> RecipientSubscriptionPage:
    recipient = get_recipient(external_id)
    rows, cursor = page(
        select(Subscription).where(Subscription.recipient_id == recipient.id),
        Subscription.id,
        limit=query.limit,
        cursor=query.cursor,
    )
    topics = {
        t.id: t
        for t in db.session.scalars(select(Topic).where(Topic.id.in_([s.topic_id for s in rows])))
    }
    return RecipientSubscriptionPage(
        data=[
            RecipientSubscriptionOut(
                topic=topics[s.topic_id].key,
                name=topics[s.topic_id].name,
                subscribed_at=s.created_at,
            )
            for s in rows
        ],
        next_cursor=cursor,
    )


# --- categories -------------------------------------------------------------------------


class CategoryIn(Schema):
    key: Key
    name: Name
    description: Description = ""
    default_channels: list[Channel] = Field(
        default_factory=list,
        max_length=len(Channel),
        description="Channels a template of this category sends on when a send names none.",
    )
    critical: bool = Field(
        default=False,
        description="Critical messages (security, receipts) ignore preferences and unsubscribe.",
    )


class CategoryPatch(Schema):
    name: Name = None  # type: ignore[assignment]
    description: Description = None  # type: ignore[assignment]
    default_channels: list[Channel] = Field(default=None, max_length=len(Channel))  # type: ignore[assignment]
    critical: bool = None  # type: ignore[assignment]


class CategoryOut(Out):
    key: str
    name: str
    description: str
    default_channels: list[str]
    critical: bool
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, category: Category) -> CategoryOut:
        return cls(
            key=category.key,
            name=category.name,
            description=category.description or "",
            default_channels=list(category.default_channels or []),
            critical=bool(category.critical),
            created_at=category.created_at,
            updated_at=category.updated_at,
        )


class CategoryPage(Out):
    data: list[CategoryOut]
    next_cursor: str | None


@endpoint(
    bp,
    "POST",
    "/categories",
    summary="Create a category",
    tags=CATEGORIES,
    scope="audiences:write",
    body=CategoryIn,
    response=CategoryOut,
    status=201,
    idempotent=True,
    errors=[409],
)
def create_category(body: CategoryIn) -> CategoryOut:
    """A 409 when the key is taken."""
    category = services.create_category(
        body.key,
        body.name,
        description=body.description,
        default_channels=[c.value for c in body.default_channels],
        critical=body.critical,
        actor=current_actor(),
    )
    return CategoryOut.of(category)


@endpoint(
    bp,
    "GET",
    "/categories",
    summary="List categories, newest first",
    tags=CATEGORIES,
    scope="audiences:read",
    query=PageQuery,
    response=CategoryPage,
)
def list_categories(query: PageQuery) -> CategoryPage:
    rows, cursor = page(select(Category), Category.id, limit=query.limit, cursor=query.cursor)
    return CategoryPage(data=[CategoryOut.of(c) for c in rows], next_cursor=cursor)


@endpoint(
    bp,
    "GET",
    "/categories/{key}",
    summary="Get a category",
    tags=CATEGORIES,
    scope="audiences:read",
    response=CategoryOut,
)
def show_category(key: str) -> CategoryOut:
    return CategoryOut.of(services.get_category(key))


@endpoint(
    bp,
    "PATCH",
    "/categories/{key}",
    summary="Change a category",
    tags=CATEGORIES,
    scope="audiences:write",
    body=CategoryPatch,
    response=CategoryOut,
)
def update_category(key: str, body: CategoryPatch) -> CategoryOut:
    """Only the fields sent change; the key cannot change."""
    changes = body.model_dump(exclude_unset=True)
    if "default_channels" in changes:
        changes["default_channels"] = [c.value for c in body.default_channels]
    return CategoryOut.of(services.update_category(key, changes, actor=current_actor()))


@endpoint(
    bp,
    "DELETE",
    "/categories/{key}",
    summary="Delete a category",
    tags=CATEGORIES,
    scope="audiences:write",
    status=204,
)
def delete_category(key: str) -> None:
    """Its templates keep working without a category; preferences about it are deleted."""
    services.delete_category(key, actor=current_actor())


# --- segments ---------------------------------------------------------------------------

RULES_DESCRIPTION = (
    '`{"op": "and"|"or", "rules": [...]}` (groups nest). A condition is one of: '
    '`{"field", "operator", "value"}` with fields email, phone, external_id, name, locale, '
    "timezone (text), created_at (date), unsubscribed (boolean) or attributes.<key>; "
    '`{"topic": "<key>", "operator": "subscribed"|"not_subscribed"}`; '
    '`{"engagement": "received"|"opened"|"clicked", "operator": "did"|"did_not", '
    '"campaign_id": N|null, "days": N|null}`. Operators: text eq, neq, in, not_in, contains, '
    "starts_with, exists, not_exists; number (attributes) eq, neq, in, not_in, lt, lte, gt, "
    "gte, between [low, high]; boolean is_true, is_false; date before, after, between, "
    "in_last_days, not_in_last_days, more_than_days_ago."
)


class SegmentIn(Schema):
    name: Name
    description: Description = ""
    rules: JsonObject = Field(
        description=RULES_DESCRIPTION,
        examples=[
            {"op": "and", "rules": [{"field": "attributes.plan", "operator": "eq", "value": "pro"}]}
        ],
    )


class SegmentPatch(Schema):
    name: Name = None  # type: ignore[assignment]
    description: Description = None  # type: ignore[assignment]
    rules: JsonObject = Field(default=None, description=RULES_DESCRIPTION)  # type: ignore[assignment]


class SegmentOut(Out):
    id: int
    name: str
    description: str
    rules: dict[str, Any]
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, segment: Segment) -> SegmentOut:
        return cls(
            id=segment.id,
            name=segment.name,
            description=segment.description or "",
            rules=segment.rules,
            created_at=segment.created_at,
            updated_at=segment.updated_at,
        )


class SegmentPage(Out):
    data: list[SegmentOut]
    next_cursor: str | None


class SegmentCountOut(Out):
    count: int


@endpoint(
    bp,
    "POST",
    "/segments",
    summary="Create a segment",
    tags=SEGMENTS,
    scope="audiences:write",
    body=SegmentIn,
    response=SegmentOut,
    status=201,
    idempotent=True,
    errors=[409],
)
def create_segment(body: SegmentIn) -> SegmentOut:
    """Invalid rules are a 422 naming each problem (`rules.rules[0].field`); a 409 when the
    name is taken."""
    segment = services.create_segment(
        body.name, body.rules, description=body.description, actor=current_actor()
    )
    return SegmentOut.of(segment)


@endpoint(
    bp,
    "GET",
    "/segments",
    summary="List segments, newest first",
    tags=SEGMENTS,
    scope="audiences:read",
    query=PageQuery,
    response=SegmentPage,
)
def list_segments(query: PageQuery) -> SegmentPage:
    rows, cursor = page(select(Segment), Segment.id, limit=query.limit, cursor=query.cursor)
    return SegmentPage(data=[SegmentOut.of(s) for s in rows], next_cursor=cursor)


@endpoint(
    bp,
    "GET",
    "/segments/{id}",
    summary="Get a segment",
    tags=SEGMENTS,
    scope="audiences:read",
    response=SegmentOut,
)
def show_segment(id: int) -> SegmentOut:
    return SegmentOut.of(services.get_segment(id))


@endpoint(
    bp,
    "PATCH",
    "/segments/{id}",
    summary="Change a segment",
    tags=SEGMENTS,
    scope="audiences:write",
    body=SegmentPatch,
    response=SegmentOut,
    errors=[409],
)
def update_segment(id: int, body: SegmentPatch) -> SegmentOut:
    """Only the fields sent change; `rules` replaces the whole tree."""
    segment = services.update_segment(
        id, body.model_dump(exclude_unset=True), actor=current_actor()
    )
    return SegmentOut.of(segment)


@endpoint(
    bp,
    "DELETE",
    "/segments/{id}",
    summary="Delete a segment",
    tags=SEGMENTS,
    scope="audiences:write",
    status=204,
    errors=[409],
)
def delete_segment(id: int) -> None:
    """A 409 while a campaign (or a send waiting to be planned) uses the segment."""
    services.delete_segment(id, actor=current_actor())


@endpoint(
    bp,
    "POST",
    "/segments/{id}/count",
    summary="Count the recipients a segment matches now",
    tags=SEGMENTS,
    scope="audiences:read",
    response=SegmentCountOut,
)
def count_segment(id: int) -> SegmentCountOut:
    return SegmentCountOut(count=services.count_segment(id))
