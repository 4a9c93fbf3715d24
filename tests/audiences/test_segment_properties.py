"""Property tests: a random rule tree compiled to SQL selects exactly the recipients that the
same rules, evaluated in plain Python on the same rows, select.

The Python evaluator below is the specification of the rules' meaning (see the docstring of
``whistle_web.audiences.segments``), written independently of the compiler: the compiler's
shortcuts (JSONB containment for equality, the date prefix, two-valued NULL handling) have
to agree with it on recipients with missing, null, mistyped and odd attribute values.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from whistle_web.audiences.models import Subscription, Topic
from whistle_web.audiences.segments import compile_rules, validate_rules
from whistle_web.channels.kinds import Channel
from whistle_web.deliveries.models import Delivery
from whistle_web.extensions import db
from whistle_web.notifications.models import Notification
from whistle_web.recipients.models import Recipient
from whistle_web.tenancy import organization_scope

NOW = datetime.now(UTC).replace(microsecond=0)
TOPICS = ("news", "beta")
CAMPAIGNS = (7001, 7002)
KEYS = ("plan", "seats", "signed_up")
TEXTS = (
    "pro", "free", "PRO", "Pro plan", "de", "DE", "5", "5.0", "-2", "true", "false", "",
    "a%b", "a_b", "x/y", "[1, 2]", "{}", "2024-03-01", "2024-03-01T10:00:00Z", "2023-12-31x",
)  # fmt: skip
MISSING = object()


def days_ago(days: int, *, with_time: bool = False) -> str:
    day = (NOW - timedelta(days=days)).date().isoformat()
    return f"{day}T06:30:00+00:00" if with_time else day


# --- data -------------------------------------------------------------------------------

# Small pools, so that rules and rows meet often (1 and 1.0, "5" and 5, "pro" and "PRO").
numbers = st.sampled_from([0, 1, 1.0, 2, 2.5, -1, 0.25, 3, 5])
dates = st.builds(days_ago, st.integers(0, 400), with_time=st.booleans())
attribute_values = st.one_of(
    st.sampled_from(TEXTS),
    numbers,
    st.booleans(),
    st.none(),
    dates,
    st.lists(st.integers(0, 3), max_size=2),
)
small_text = st.text(alphabet="abAB%_/.@5", max_size=6)
recipients = st.lists(
    st.fixed_dictionaries(
        {
            "email": st.one_of(st.none(), small_text, st.sampled_from(TEXTS)),
            "phone": st.one_of(st.none(), st.sampled_from(["+4915", "5", "+1"])),
            "name": st.one_of(st.none(), small_text),
            "locale": st.sampled_from([None, "de", "en", "en-GB", "DE"]),
            "timezone": st.sampled_from([None, "UTC", "Europe/Berlin"]),
            "created_days": st.integers(0, 400),
            "created_seconds": st.integers(0, 86399),
            "unsubscribed": st.booleans(),
            "attributes": st.dictionaries(
                st.sampled_from(KEYS), attribute_values, min_size=1, max_size=3
            ),
            "topics": st.sets(st.sampled_from(TOPICS)),
            "deliveries": st.lists(
                st.fixed_dictionaries(
                    {
                        "campaign_id": st.sampled_from([*CAMPAIGNS, None]),
                        "sent": st.one_of(st.none(), st.integers(0, 400)),
                        "seen": st.one_of(st.none(), st.integers(0, 400)),
                        "clicked": st.one_of(st.none(), st.integers(0, 400)),
                    }
                ),
                max_size=3,
            ),
        }
    ),
    min_size=6,
    max_size=15,
)

# --- rules ------------------------------------------------------------------------------

TEXT_FIELDS = ("email", "phone", "name", "locale", "timezone", "external_id")
attribute_field = st.sampled_from([f"attributes.{k}" for k in KEYS])
rule_texts = st.one_of(st.sampled_from(TEXTS), small_text)
scalar_values = st.one_of(rule_texts, numbers, st.booleans())


def condition(field: Any, operator: Any, value: Any = None) -> Any:
    if value is None:
        return st.builds(lambda f, o: {"field": f, "operator": o}, field, operator)
    return st.builds(
        lambda f, o, v: {"field": f, "operator": o, "value": v}, field, operator, value
    )


text_conditions = st.one_of(
    condition(st.sampled_from(TEXT_FIELDS), st.sampled_from(["eq", "neq"]), rule_texts | numbers),
    condition(attribute_field, st.sampled_from(["eq", "neq"]), scalar_values),
    condition(
        attribute_field | st.sampled_from(TEXT_FIELDS),
        st.sampled_from(["in", "not_in"]),
        st.lists(scalar_values, min_size=1, max_size=3),
    ),
    condition(
        attribute_field | st.sampled_from(TEXT_FIELDS),
        st.sampled_from(["contains", "starts_with"]),
        rule_texts.filter(bool) | numbers,
    ),
    condition(
        attribute_field | st.sampled_from(TEXT_FIELDS), st.sampled_from(["exists", "not_exists"])
    ),
)
number_conditions = st.one_of(
    condition(attribute_field, st.sampled_from(["eq", "neq"]), numbers),
    condition(
        attribute_field,
        st.sampled_from(["in", "not_in"]),
        st.lists(numbers, min_size=1, max_size=3),
    ),
    condition(attribute_field, st.sampled_from(["gt", "gte", "lt", "lte"]), numbers),
    condition(attribute_field, st.just("between"), st.lists(numbers, min_size=2, max_size=2)),
)
boolean_conditions = condition(
    attribute_field | st.just("unsubscribed"), st.sampled_from(["is_true", "is_false"])
)
date_conditions = st.one_of(
    condition(
        attribute_field | st.just("created_at"),
        st.sampled_from(["in_last_days", "not_in_last_days", "more_than_days_ago"]),
        st.integers(1, 400),
    ),
    condition(attribute_field | st.just("created_at"), st.sampled_from(["before", "after"]), dates),
    condition(
        attribute_field | st.just("created_at"),
        st.just("between"),
        st.lists(dates, min_size=2, max_size=2),
    ),
)
topic_conditions = st.builds(
    lambda t, o: {"topic": t, "operator": o},
    st.sampled_from([*TOPICS, "ghost"]),
    st.sampled_from(["subscribed", "not_subscribed"]),
)
engagement_conditions = st.builds(
    lambda e, o, c, d: {"engagement": e, "operator": o, "campaign_id": c, "days": d},
    st.sampled_from(["received", "opened", "clicked"]),
    st.sampled_from(["did", "did_not"]),
    st.sampled_from([*CAMPAIGNS, None]),
    st.one_of(st.none(), st.integers(1, 400)),
)
conditions = st.one_of(
    text_conditions,
    number_conditions,
    boolean_conditions,
    date_conditions,
    topic_conditions,
    engagement_conditions,
)
trees = st.builds(
    lambda op, rules: {"op": op, "rules": rules},
    st.sampled_from(["and", "or"]),
    st.lists(
        st.recursive(
            conditions,
            lambda children: st.builds(
                lambda op, rules: {"op": op, "rules": rules},
                st.sampled_from(["and", "or"]),
                st.lists(children, max_size=3),
            ),
            max_leaves=6,
        ),
        max_size=3,
    ),
)
# One condition alone: the sharpest check of each operator's meaning.
single = st.builds(lambda rule: {"op": "and", "rules": [rule]}, conditions)

# --- the specification, in Python --------------------------------------------------------


def astext(raw: Any) -> str | None:
    """What PostgreSQL's ``attributes->>key`` reads for a JSON value."""
    if raw is MISSING or raw is None:
        return None
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, str):
        return raw
    if isinstance(raw, int | float):
        return repr(raw)
    return json.dumps(raw)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def number(value: Any) -> Decimal:
    return Decimal(repr(value))


def as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def date_only(value: str) -> bool:
    return bool(re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value))


def matches(rule: dict[str, Any], person: dict[str, Any]) -> bool:
    if "rules" in rule:
        results = [matches(child, person) for child in rule["rules"]]
        if not results:
            return True
        return all(results) if rule["op"] == "and" else any(results)
    if "topic" in rule:
        member = rule["topic"] in person["topics"]
        return member if rule["operator"] == "subscribed" else not member
    if "engagement" in rule:
        column = {"received": "sent", "opened": "seen", "clicked": "clicked"}[rule["engagement"]]
        happened = any(
            d[column] is not None
            and (rule["campaign_id"] is None or d["campaign_id"] == rule["campaign_id"])
            and (rule["days"] is None or d[column] <= rule["days"])
            for d in person["deliveries"]
        )
        return happened if rule["operator"] == "did" else not happened
    field, op, value = rule["field"], rule["operator"], rule.get("value")
    if field.startswith("attributes."):
        return attribute_matches(person["attributes"].get(field[11:], MISSING), op, value)
    return column_matches(field, person, op, value)


def attribute_matches(raw: Any, op: str, value: Any) -> bool:
    text = astext(raw)
    if op == "exists":
        return text is not None
    if op == "not_exists":
        return text is None
    if op in ("is_true", "is_false"):
        return text == ("true" if op == "is_true" else "false")
    if op in ("eq", "neq", "in", "not_in"):
        values = value if isinstance(value, list) else [value]
        hit = any(
            (is_number(raw) and number(raw) == number(v))
            if is_number(v)
            else (text is not None and text == as_text(v))
            for v in values
        )
        return hit if op in ("eq", "in") else not hit
    if op == "contains":
        return text is not None and str(value).lower() in text.lower()
    if op == "starts_with":
        return text is not None and text.lower().startswith(str(value).lower())
    if op in ("gt", "gte", "lt", "lte") or (op == "between" and all(map(is_number, value))):
        if not is_number(raw):
            return False
        n = number(raw)
        if op == "between":
            low, high = sorted(number(v) for v in value)
            return low <= n <= high
        bound = number(value)
        return {"gt": n > bound, "gte": n >= bound, "lt": n < bound, "lte": n <= bound}[op]
    day = (
        raw[:10] if isinstance(raw, str) and re.match(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", raw) else None
    )
    if op in ("in_last_days", "more_than_days_ago", "not_in_last_days"):
        since = (NOW - timedelta(days=value)).date().isoformat()
        if op == "in_last_days":
            return day is not None and day >= since
        if op == "more_than_days_ago":
            return day is not None and day < since
        return not (day is not None and day >= since)
    if day is None:
        return False
    if op == "between":
        low, high = sorted(parse(v).date().isoformat() for v in value)
        return low <= day <= high
    bound = parse(value).date().isoformat()
    return day < bound if op == "before" else day > bound


def column_matches(field: str, person: dict[str, Any], op: str, value: Any) -> bool:
    if field == "unsubscribed":
        return person["unsubscribed"] == (op == "is_true")
    if field == "created_at":
        created = person["created_at"]
        if op == "exists":
            return True
        if op == "not_exists":
            return False
        if op == "in_last_days":
            return created >= NOW - timedelta(days=value)
        if op in ("more_than_days_ago", "not_in_last_days"):
            return created < NOW - timedelta(days=value)

        def end(v: str) -> datetime:
            return parse(v) + timedelta(days=1) if date_only(v) else parse(v)

        if op == "before":
            return created < parse(value)
        if op == "after":
            return created >= end(value) if date_only(value) else created > parse(value)
        low, high = sorted(value, key=parse)
        upper = created < end(high) if date_only(high) else created <= parse(high)
        return created >= parse(low) and upper
    text = person[field]
    if op == "exists":
        return text is not None
    if op == "not_exists":
        return text is None
    if op in ("eq", "neq", "in", "not_in"):
        values = [as_text(v) for v in (value if isinstance(value, list) else [value])]
        hit = text is not None and text in values
        return hit if op in ("eq", "in") else not hit
    if op == "contains":
        return text is not None and str(value).lower() in text.lower()
    return text is not None and text.lower().startswith(str(value).lower())


# --- the test ---------------------------------------------------------------------------


@pytest.fixture
def world(org, make_template, make_send_request):  # type: ignore[no-untyped-def]
    template = make_template(org)
    requests = [make_send_request(org, template=template) for _ in range(3)]
    with organization_scope(org.id):
        topics = {}
        for key in TOPICS:
            topic = Topic(key=key, name=key.title())
            db.session.add(topic)
            db.session.flush()
            topics[key] = topic.id
    return {"org": org, "requests": [r.id for r in requests], "topics": topics}


def insert_people(world: dict[str, Any], people: list[dict[str, Any]]) -> None:
    for i, person in enumerate(people):
        person["external_id"] = f"p{i}"
        person["created_at"] = NOW - timedelta(
            days=person["created_days"], seconds=person["created_seconds"]
        )
        recipient = Recipient(
            external_id=person["external_id"],
            email=person["email"],
            phone=person["phone"],
            name=person["name"],
            locale=person["locale"],
            timezone=person["timezone"],
            created_at=person["created_at"],
            unsubscribed_at=NOW if person["unsubscribed"] else None,
            attributes=person["attributes"],
        )
        db.session.add(recipient)
        db.session.flush()
        for key in person["topics"]:
            db.session.add(Subscription(topic_id=world["topics"][key], recipient_id=recipient.id))
        for request_id, delivery in zip(world["requests"], person["deliveries"], strict=False):
            notification = Notification(
                send_request_id=request_id,
                recipient_id=recipient.id,
                campaign_id=delivery["campaign_id"],
            )
            db.session.add(notification)
            db.session.flush()
            stamps = {
                f"{step}_at": None
                if delivery[step] is None
                else NOW - timedelta(days=delivery[step])
                for step in ("sent", "seen", "clicked")
            }
            db.session.add(
                Delivery(
                    notification_id=notification.id,
                    recipient_id=recipient.id,
                    campaign_id=delivery["campaign_id"],
                    channel=Channel.EMAIL,
                    **stamps,
                )
            )
    db.session.flush()


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(
    people=recipients,
    # Queries are cheap next to inserting rows: many rules per set of rows.
    singles=st.lists(single, min_size=20, max_size=40),
    nested=st.lists(trees, min_size=3, max_size=8),
)
def test_sql_selects_what_the_rules_say(world, people, singles, nested):
    rule_trees = singles + nested
    with organization_scope(world["org"].id):
        savepoint = db.session.begin_nested()
        try:
            insert_people(world, people)
            for tree in rule_trees:
                assert validate_rules(tree) == [], tree
                condition = compile_rules(tree, now=NOW)
                found = set(db.session.scalars(select(Recipient.external_id).where(condition)))
                expected = {p["external_id"] for p in people if matches(tree, p)}
                assert found == expected, json.dumps(tree)
        finally:
            savepoint.rollback()


@settings(max_examples=200, deadline=None)
@given(tree=trees)
def test_generated_trees_are_valid_and_compile_without_inlining_values(tree):
    assert validate_rules(tree) == []
    compiled = str(compile_rules(tree, now=NOW).compile())
    for text in TEXTS:
        if len(text) > 3:
            assert f"'{text}'" not in compiled


# Rows and rules where a shortcut in the compiler would most likely go wrong, checked always
# (random generation meets each of them only now and then).
EDGE_VALUES = [MISSING, None, "5", 5, 5.0, 1, 1.0, "1.0", True, "true", False, "false", "pro",
               "PRO", [1, 2], "[1, 2]", "{}", "", "2024-03-01", "2024-03-01T23:00:00Z",
               "2024-03-01x", "20240301", "a%b", "a_b"]  # fmt: skip
EDGE_RULES = [
    ("eq", 5), ("eq", 1), ("eq", 1.0), ("eq", "5"), ("eq", "1.0"), ("eq", True), ("eq", "true"),
    ("eq", "pro"), ("eq", "[1, 2]"), ("eq", "{}"), ("eq", ""), ("neq", "pro"), ("neq", 5),
    ("in", ["pro", 5, True]), ("not_in", ["PRO", 1.0]), ("contains", "%"), ("contains", "_"),
    ("contains", "PR"), ("starts_with", "2024"), ("exists", None), ("not_exists", None),
    ("is_true", None), ("is_false", None), ("gt", 1), ("lte", 1.0), ("between", [1, 5]),
    ("before", "2024-03-02"), ("after", "2024-03-01"), ("after", "2024-02-29T10:00:00+00:00"),
    ("between", ["2024-03-01", "2024-03-01"]), ("in_last_days", 30),
    ("not_in_last_days", 30), ("more_than_days_ago", 30),
]  # fmt: skip


def test_edge_values_against_every_operator(world):
    base = {
        "email": None, "phone": None, "name": None, "locale": None, "timezone": None,
        "created_days": 1, "created_seconds": 0, "unsubscribed": False, "topics": set(),
        "deliveries": [],
    }  # fmt: skip
    people = [
        dict(base, attributes={} if value is MISSING else {"k": value}) for value in EDGE_VALUES
    ]
    with organization_scope(world["org"].id):
        insert_people(world, people)
        for operator, value in EDGE_RULES:
            rule = {"field": "attributes.k", "operator": operator}
            if value is not None:
                rule["value"] = value
            tree = {"op": "and", "rules": [rule]}
            found = set(
                db.session.scalars(
                    select(Recipient.external_id).where(compile_rules(tree, now=NOW))
                )
            )
            expected = {p["external_id"] for p in people if matches(tree, p)}
            assert found == expected, (operator, value)
