"""Change topics, subscriptions, segments and categories (the audience building blocks).

Every function works in the current organization, takes plain arguments and the acting
:class:`~whistle_web.errors.Actor`, records an audit entry and commits once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg.errors import QueryCanceled
from redis.exceptions import RedisError
from sqlalchemy import delete, exists, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import OperationalError

from whistle_web import get_redis
from whistle_web.audiences.models import Segment, Subscription, Topic
from whistle_web.audiences.segments import ATTRIBUTE_KEY, compile_rules, validate_rules
from whistle_web.campaigns.models import Campaign
from whistle_web.channels.kinds import Channel
from whistle_web.errors import Actor, Conflict, FieldError, NotFound, ValidationError
from whistle_web.extensions import db
from whistle_web.notifications.models import SendRequest, SendRequestStatus
from whistle_web.organizations.services import record_audit
from whistle_web.preferences.models import Category
from whistle_web.recipients.models import Recipient
from whistle_web.tenancy import require_organization_id

MAX_SUBSCRIPTION_BATCH = 1000
MAX_ID = 2**63 - 1  # ids are bigint: a larger one names nothing (and must not reach SQL)


def _created_by(actor: Actor) -> int | None:
    return actor.id if actor.type == "user" else None


def _apply(obj: Any, changes: dict[str, Any]) -> dict[str, Any]:
    """Set the attributes that differ; return {name: new value} for the audit entry."""
    changed = {}
    for name, value in changes.items():
        if getattr(obj, name) != value:
            setattr(obj, name, value)
            changed[name] = value
    return changed


# --- topics -----------------------------------------------------------------------------


def get_topic(key: str) -> Topic:
    """Raises NotFound: no topic with this key in the current organization."""
    topic = None
    if "\x00" not in key:
        topic = db.session.scalar(select(Topic).where(Topic.key == key))
    if topic is None:
        raise NotFound(f"No topic {key!r}.")
    return topic


def create_topic(key: str, name: str, description: str = "", *, actor: Actor) -> Topic:
    """Raises Conflict: the key is taken."""
    if db.session.scalar(select(exists().where(Topic.key == key))):
        raise Conflict(f"A topic with key {key!r} already exists.")
    topic = Topic(key=key, name=name, description=description)
    db.session.add(topic)
    db.session.flush()
    record_audit(actor, "topic.created", "topic", topic.id, {"key": key, "name": name})
    db.session.commit()
    return topic


def update_topic(key: str, changes: dict[str, Any], *, actor: Actor) -> Topic:
    """Change ``name`` and/or ``description``. Raises NotFound."""
    topic = get_topic(key)
    changed = _apply(topic, {k: v for k, v in changes.items() if k in ("name", "description")})
    if changed:
        record_audit(actor, "topic.updated", "topic", topic.id, changed)
        db.session.commit()
    return topic


def delete_topic(key: str, *, actor: Actor) -> None:
    """Delete a topic and its subscriptions.

    Raises:
        NotFound: no such topic.
        Conflict: a campaign targets it.
    """
    topic = get_topic(key)
    if db.session.scalar(select(exists().where(Campaign.topic_id == topic.id))):
        raise Conflict(f"Topic {key!r} is the audience of a campaign; change the campaign first.")
    db.session.execute(delete(Topic).where(Topic.id == topic.id))
    record_audit(actor, "topic.deleted", "topic", topic.id, {"key": key})
    db.session.commit()


def _recipient_ids(external_ids: Sequence[str], field_name: str) -> list[int]:
    """Map external ids to recipient ids, in order.

    Raises:
        ValidationError: ``field_name[i]`` for each unknown id.
    """
    if len(external_ids) > MAX_SUBSCRIPTION_BATCH:
        raise ValidationError.single(field_name, f"At most {MAX_SUBSCRIPTION_BATCH} per call.")
    clean = [e for e in external_ids if "\x00" not in e]
    found = dict(
        db.session.execute(
            select(Recipient.external_id, Recipient.id).where(Recipient.external_id.in_(clean))
        ).all()
    )
    errors = [
        FieldError(f"{field_name}[{i}]", f"No recipient {external_id!r}.")
        for i, external_id in enumerate(external_ids)
        if external_id not in found
    ]
    if errors:
        raise ValidationError(errors)
    return list(dict.fromkeys(found[e] for e in external_ids))


def subscribe(key: str, external_ids: Sequence[str], *, actor: Actor) -> int:
    """Subscribe recipients to a topic; already subscribed ones are left alone.

    Returns:
        How many subscriptions were added.

    Raises:
        NotFound: no such topic.
        ValidationError: ``recipients[i]`` is not a known recipient.
    """
    topic = get_topic(key)
    ids = _recipient_ids(external_ids, "recipients")
    org_id = require_organization_id()
    added = 0
    if ids:
        result = db.session.execute(
            insert(Subscription)
            .values(
                [{"organization_id": org_id, "topic_id": topic.id, "recipient_id": i} for i in ids]
            )
            .on_conflict_do_nothing(index_elements=["topic_id", "recipient_id"])
            .returning(Subscription.id)
        )
        added = len(result.all())
    record_audit(
        actor, "topic.subscribed", "topic", topic.id, {"recipients": len(ids), "added": added}
    )
    db.session.commit()
    return added


def unsubscribe(key: str, external_ids: Sequence[str], *, actor: Actor) -> int:
    """Remove recipients from a topic; ones not subscribed are left alone.

    Returns:
        How many subscriptions were removed.

    Raises:
        NotFound: no such topic.
        ValidationError: ``recipients[i]`` is not a known recipient.
    """
    topic = get_topic(key)
    ids = _recipient_ids(external_ids, "recipients")
    removed = 0
    if ids:
        result = db.session.execute(
            delete(Subscription)
            .where(Subscription.topic_id == topic.id, Subscription.recipient_id.in_(ids))
            .returning(Subscription.id)
        )
        removed = len(result.all())
    record_audit(
        actor, "topic.unsubscribed", "topic", topic.id, {"recipients": len(ids), "removed": removed}
    )
    db.session.commit()
    return removed


# --- categories -------------------------------------------------------------------------


def get_category(key: str) -> Category:
    """Raises NotFound: no category with this key in the current organization."""
    category = None
    if "\x00" not in key:
        category = db.session.scalar(select(Category).where(Category.key == key))
    if category is None:
        raise NotFound(f"No category {key!r}.")
    return category


def _channels(channels: Sequence[str]) -> list[str]:
    """Known channels, deduplicated in the order given.

    Raises:
        ValidationError: ``default_channels[i]`` is not a channel.
    """
    known = set(Channel.__members__.values())
    errors = [
        FieldError(f"default_channels[{i}]", f"Unknown channel {c!r}.")
        for i, c in enumerate(channels)
        if c not in known
    ]
    if errors:
        raise ValidationError(errors)
    return list(dict.fromkeys(str(Channel(c)) for c in channels))


def create_category(
    key: str,
    name: str,
    *,
    description: str = "",
    default_channels: Sequence[str] = (),
    critical: bool = False,
    actor: Actor,
) -> Category:
    """Raises Conflict (the key is taken) or ValidationError (an unknown channel)."""
    channels = _channels(default_channels)
    if db.session.scalar(select(exists().where(Category.key == key))):
        raise Conflict(f"A category with key {key!r} already exists.")
    category = Category(
        key=key,
        name=name,
        description=description,
        default_channels=channels,
        critical=critical,
    )
    db.session.add(category)
    db.session.flush()
    record_audit(
        actor,
        "category.created",
        "category",
        category.id,
        {"key": key, "name": name, "default_channels": channels, "critical": critical},
    )
    db.session.commit()
    return category


def update_category(key: str, changes: dict[str, Any], *, actor: Actor) -> Category:
    """Change ``name``, ``description``, ``default_channels`` and/or ``critical``."""
    category = get_category(key)
    allowed = {k: v for k, v in changes.items() if k in ("name", "description", "default_channels")}
    if "critical" in changes:
        allowed["critical"] = bool(changes["critical"])
    if "default_channels" in allowed:
        allowed["default_channels"] = _channels(allowed["default_channels"] or [])
    changed = _apply(category, allowed)
    if changed:
        record_audit(actor, "category.updated", "category", category.id, changed)
        db.session.commit()
    return category


def delete_category(key: str, *, actor: Actor) -> None:
    """Delete a category: its templates lose their category, its preferences go."""
    category = get_category(key)
    db.session.execute(delete(Category).where(Category.id == category.id))
    record_audit(actor, "category.deleted", "category", category.id, {"key": key})
    db.session.commit()


# --- segments ---------------------------------------------------------------------------


def get_segment(segment_id: int) -> Segment:
    """Raises NotFound: no such segment in the current organization."""
    segment = None
    if 0 < segment_id <= MAX_ID:
        segment = db.session.scalar(select(Segment).where(Segment.id == segment_id))
    if segment is None:
        raise NotFound(f"No segment {segment_id}.")
    return segment


def _check_rules(rules: Any) -> dict[str, Any]:
    errors = validate_rules(rules) or _out_of_range(rules, "rules") or _unknown_campaigns(rules)
    if errors:
        raise ValidationError(errors)
    return rules


def _unknown_campaigns(rules: dict[str, Any]) -> list[FieldError]:
    """Engagement conditions naming a campaign this organization does not have."""
    named = [(path, node["campaign_id"]) for path, node in _conditions(rules, "rules")]
    named = [(path, cid) for path, cid in named if cid is not None]
    if not named:
        return []
    known = set(
        db.session.scalars(select(Campaign.id).where(Campaign.id.in_({c for _, c in named})))
    )
    return [
        FieldError(f"{path}.campaign_id", f"No campaign {cid}.")
        for path, cid in named
        if cid not in known
    ]


def _conditions(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, node) for each engagement condition of a valid tree."""
    if "rules" in node:
        for i, child in enumerate(node["rules"]):
            yield from _conditions(child, f"{path}.rules[{i}]")
    elif "engagement" in node:
        yield path, node


def _out_of_range(node: dict[str, Any], path: str) -> list[FieldError]:
    """Numbers beyond 64-bit integers, which the compiled query cannot bind (JSONB also
    turns a large float like 1e300 into a huge integer), in a valid tree."""
    if "rules" in node:
        return [
            error
            for i, child in enumerate(node["rules"])
            for error in _out_of_range(child, f"{path}.rules[{i}]")
        ]
    value = node.get("value")
    values = value if isinstance(value, list) else [value]
    if any(
        isinstance(v, int | float) and not isinstance(v, bool) and not -MAX_ID <= v <= MAX_ID
        for v in values
    ):
        return [FieldError(f"{path}.value", f"Numbers between {-MAX_ID} and {MAX_ID}.")]
    return []


def _check_name_free(name: str, segment_id: int | None = None) -> None:
    stmt = select(exists().where(Segment.name == name, Segment.id != (segment_id or 0)))
    if db.session.scalar(stmt):
        raise Conflict(f"A segment named {name!r} already exists.")


def create_segment(
    name: str, rules: dict[str, Any], *, description: str = "", actor: Actor
) -> Segment:
    """Raises ValidationError (``rules...`` paths) or Conflict (the name is taken)."""
    _check_rules(rules)
    _check_name_free(name)
    segment = Segment(
        name=name, description=description, rules=rules, created_by_id=_created_by(actor)
    )
    db.session.add(segment)
    db.session.flush()
    record_audit(actor, "segment.created", "segment", segment.id, {"name": name, "rules": rules})
    db.session.commit()
    return segment


def update_segment(segment_id: int, changes: dict[str, Any], *, actor: Actor) -> Segment:
    """Change ``name``, ``description`` and/or ``rules``."""
    segment = get_segment(segment_id)
    allowed = {k: v for k, v in changes.items() if k in ("name", "description", "rules")}
    if "rules" in allowed:
        _check_rules(allowed["rules"])
    if "name" in allowed:
        _check_name_free(allowed["name"], segment.id)
    changed = _apply(segment, allowed)
    if changed:
        record_audit(actor, "segment.updated", "segment", segment.id, changed)
        db.session.commit()
    return segment


def segment_in_use(segment_id: int) -> bool:
    """A campaign targets the segment, or a trigger waiting to be planned does."""
    if db.session.scalar(select(exists().where(Campaign.segment_id == segment_id))):
        return True
    waiting = select(SendRequest.id).where(
        SendRequest.status.in_([SendRequestStatus.PENDING, SendRequestStatus.PLANNING]),
        SendRequest.audience["type"].astext == "segment",
        SendRequest.audience["id"].as_integer() == segment_id,
    )
    return bool(db.session.scalar(select(exists(waiting))))


def delete_segment(segment_id: int, *, actor: Actor) -> None:
    """Raises NotFound, or Conflict while a campaign or a pending send uses the segment."""
    segment = get_segment(segment_id)
    if segment_in_use(segment.id):
        raise Conflict(_in_use_message(segment))
    db.session.execute(delete(Segment).where(Segment.id == segment.id))
    record_audit(actor, "segment.deleted", "segment", segment.id, {"name": segment.name})
    db.session.commit()


def count_segment(segment_id: int) -> int:
    """How many recipients of the current organization match the segment now."""
    segment = get_segment(segment_id)
    return count_rules(segment.rules)


def count_rules(rules: dict[str, Any]) -> int:
    """Raises ValidationError: the rules are invalid."""
    stmt = select(func.count()).select_from(Recipient).where(compile_rules(rules))
    return int(db.session.scalar(stmt) or 0)


def recipient_topics(recipient_id: int, *, limit: int = 500) -> list[tuple[Topic, bool]]:
    """The organization's topics by name, each with whether the recipient is subscribed."""
    subscribed = (
        select(Subscription.id)
        .where(Subscription.topic_id == Topic.id, Subscription.recipient_id == recipient_id)
        .exists()
    )
    rows = db.session.execute(
        select(Topic, subscribed).order_by(Topic.name, Topic.id).limit(limit)
    ).all()
    return [(topic, bool(is_subscribed)) for topic, is_subscribed in rows]


# --- segments: the console's builder, previews and counts ---------------------------------

COUNT_CACHE_SECONDS = 60
PREVIEW_TIMEOUT_MS = 3000


@dataclass(frozen=True)
class RulePreview:
    """What a rule tree matches now: the count (None when counting took too long) and the
    first recipients by id."""

    count: int | None
    sample: list[Recipient]
    timed_out: bool = False


def list_segments() -> list[Segment]:
    """The organization's segments, most recently edited first."""
    return list(db.session.scalars(select(Segment).order_by(Segment.updated_at.desc(), Segment.id)))


def _in_use_message(segment: Segment) -> str:
    campaigns = db.session.execute(
        select(Campaign.name, Campaign.status)
        .where(Campaign.segment_id == segment.id)
        .order_by(Campaign.id)
        .limit(4)
    ).all()
    if not campaigns:
        return f"{segment.name!r} is the audience of a send waiting to be planned; try again later."
    named = ", ".join(f"{name!r} ({status})" for name, status in campaigns[:3])
    more = " and others" if len(campaigns) > 3 else ""
    return (
        f"{segment.name!r} is the audience of campaign {named}{more}: "
        "change the campaign's audience or delete the campaign first."
    )


def preview_rules(
    rules: dict[str, Any], *, sample_size: int = 10, timeout_ms: int = PREVIEW_TIMEOUT_MS
) -> RulePreview:
    """Count the recipients the rules match and read the first ``sample_size`` of them, each
    query stopped after ``timeout_ms`` (then the count is None).

    Raises:
        ValidationError: the rules are invalid.
    """
    _check_rules(rules)
    condition = compile_rules(rules)
    try:
        with statement_timeout(timeout_ms):
            count = db.session.scalar(select(func.count()).select_from(Recipient).where(condition))
    except QueryTimeout:
        count = None
    try:
        with statement_timeout(timeout_ms):
            sample = list(
                db.session.scalars(
                    select(Recipient).where(condition).order_by(Recipient.id).limit(sample_size)
                )
            )
    except QueryTimeout:
        sample = []
    return RulePreview(None if count is None else int(count), sample, timed_out=count is None)


def cached_segment_count(segment_id: int, *, timeout_ms: int = PREVIEW_TIMEOUT_MS) -> int | None:
    """The segment's count, from Redis when counted in the last minute; None when counting
    takes longer than ``timeout_ms``. A Redis outage only costs the cache."""
    segment = get_segment(segment_id)
    digest = hashlib.sha256(json.dumps(segment.rules, sort_keys=True).encode()).hexdigest()[:16]
    key = f"whistle:segment-count:{segment.organization_id}:{segment.id}:{digest}"
    redis = get_redis()
    try:
        cached = redis.get(key)
    except RedisError:
        cached = None
    if cached is not None:
        return int(cached)
    try:
        with statement_timeout(timeout_ms):
            count = count_rules(segment.rules)
    except QueryTimeout:
        return None
    with contextlib.suppress(RedisError):
        redis.set(key, count, ex=COUNT_CACHE_SECONDS)
    return count


class QueryTimeout(Exception):
    """A query ran past its statement timeout (and was cancelled by PostgreSQL)."""


@contextlib.contextmanager
def statement_timeout(timeout_ms: int) -> Iterator[None]:
    """Run the block's queries in a savepoint with a statement timeout; a cancelled query
    rolls back to the savepoint (the request's transaction stays usable).

    Raises:
        QueryTimeout: a query took longer than ``timeout_ms``.
    """
    previous = db.session.scalar(select(func.current_setting("statement_timeout")))
    savepoint = db.session.begin_nested()
    try:
        db.session.execute(
            select(func.set_config("statement_timeout", f"{int(timeout_ms)}ms", True))
        )
        yield
    except OperationalError as exc:
        savepoint.rollback()
        if isinstance(exc.orig, QueryCanceled):
            raise QueryTimeout(str(exc.orig)) from None
        raise
    else:
        savepoint.commit()
        db.session.execute(select(func.set_config("statement_timeout", previous, True)))


def attribute_keys(*, scan: int = 1000, limit: int = 200) -> list[str]:
    """Attribute keys seen on the newest ``scan`` recipients, for the builder's suggestions."""
    newest = (
        select(Recipient.attributes).order_by(Recipient.id.desc()).limit(scan).subquery("newest")
    )
    key = func.jsonb_object_keys(newest.c.attributes).label("key")
    stmt = (
        select(key)
        .where(func.jsonb_typeof(newest.c.attributes) == "object")
        .distinct()
        .order_by(key)
        .limit(limit)
    )
    return [k for k in db.session.scalars(stmt) if ATTRIBUTE_KEY.fullmatch(k)]


def builder_choices() -> dict[str, list[tuple[Any, str]]]:
    """Topics (key, name) and campaigns (id, name) the builder's conditions can name."""
    topics = db.session.execute(select(Topic.key, Topic.name).order_by(Topic.name).limit(500))
    campaigns = db.session.execute(
        select(Campaign.id, Campaign.name).order_by(Campaign.id.desc()).limit(500)
    )
    return {
        "topics": [(key, name) for key, name in topics],
        "campaigns": [(cid, name) for cid, name in campaigns],
    }


def campaign_names(rules: dict[str, Any]) -> dict[int, str]:
    """Names of the campaigns a rule tree's engagement conditions name."""
    ids = {node["campaign_id"] for _, node in _conditions(rules, "rules")} - {None}
    if not ids or validate_rules(rules):
        return {}
    return dict(db.session.execute(select(Campaign.id, Campaign.name).where(Campaign.id.in_(ids))))


def set_subscription(key: str, recipient_id: int, subscribed: bool, *, actor: Actor) -> bool:
    """Subscribe one recipient to a topic or unsubscribe them, audited on the recipient;
    commits.

    Returns:
        Whether anything changed.

    Raises:
        NotFound: no such topic or recipient in the current organization.
    """
    topic = get_topic(key)
    if not 0 < recipient_id <= MAX_ID or not db.session.scalar(
        select(exists().where(Recipient.id == recipient_id))
    ):
        raise NotFound(f"No recipient {recipient_id}.")
    if subscribed:
        stmt: Any = (
            insert(Subscription)
            .values(
                organization_id=require_organization_id(),
                topic_id=topic.id,
                recipient_id=recipient_id,
            )
            .on_conflict_do_nothing(index_elements=["topic_id", "recipient_id"])
            .returning(Subscription.id)
        )
    else:
        stmt = (
            delete(Subscription)
            .where(Subscription.topic_id == topic.id, Subscription.recipient_id == recipient_id)
            .returning(Subscription.id)
        )
    changed = bool(db.session.execute(stmt).all())
    if changed:
        action = "recipient.subscribed" if subscribed else "recipient.unsubscribed"
        record_audit(actor, action, "recipient", recipient_id, {"topic": key})
    db.session.commit()
    return changed
