"""Segment rules compile to one parameterised condition; bad trees are refused by path."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from tests.factories import SYSTEM
from tests.pipeline.conftest import CONTENT
from whistle_web.audiences.models import Segment, Subscription, Topic
from whistle_web.audiences.segments import compile_rules, validate_rules
from whistle_web.errors import ValidationError
from whistle_web.extensions import db
from whistle_web.models import Recipient
from whistle_web.notifications.services import trigger
from whistle_web.tenancy import organization_scope


@pytest.fixture
def people(org, make_recipient):
    now = datetime.now(UTC)
    rows = {
        "ada": dict(email="ada@example.com", attributes={"plan": "pro", "seats": 12, "beta": True, "signed_up_at": (now - timedelta(days=3)).date().isoformat()}),
        "bob": dict(email="bob@corp.example.com", attributes={"plan": "free", "seats": 1, "beta": False, "signed_up_at": (now - timedelta(days=90)).date().isoformat()}),
        "cy": dict(phone="+14155550123", attributes={"plan": "enterprise", "seats": "many"}),
        "di": dict(email="di@example.com", locale="de", attributes={}),
    }  # fmt: skip
    made = {key: make_recipient(org, key, **fields) for key, fields in rows.items()}
    with organization_scope(org.id):
        topic = Topic(key="beta-news", name="Beta news")
        db.session.add(topic)
        db.session.flush()
        db.session.add(Subscription(topic_id=topic.id, recipient_id=made["di"].id))
        db.session.flush()
    return made


def _match(org, rules) -> set[str]:
    with organization_scope(org.id):
        return set(db.session.scalars(select(Recipient.external_id).where(compile_rules(rules))))


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        ({"op": "and", "rules": []}, {"ada", "bob", "cy", "di"}),
        ({"op": "and", "rules": [{"field": "attributes.plan", "operator": "eq", "value": "pro"}]}, {"ada"}),
        ({"op": "and", "rules": [{"field": "attributes.plan", "operator": "in", "value": ["pro", "enterprise"]}]}, {"ada", "cy"}),
        ({"op": "and", "rules": [{"field": "attributes.plan", "operator": "neq", "value": "pro"}]}, {"bob", "cy", "di"}),
        ({"op": "and", "rules": [{"field": "attributes.seats", "operator": "gte", "value": 10}]}, {"ada"}),  # "many" is not a number
        ({"op": "and", "rules": [{"field": "attributes.seats", "operator": "between", "value": [1, 5]}]}, {"bob"}),
        ({"op": "and", "rules": [{"field": "attributes.beta", "operator": "is_true"}]}, {"ada"}),
        ({"op": "and", "rules": [{"field": "attributes.plan", "operator": "not_exists"}]}, {"di"}),
        ({"op": "and", "rules": [{"field": "email", "operator": "contains", "value": "CORP"}]}, {"bob"}),
        ({"op": "and", "rules": [{"field": "email", "operator": "contains", "value": "%"}]}, set()),  # no wildcards
        ({"op": "and", "rules": [{"field": "phone", "operator": "exists"}]}, {"cy"}),
        ({"op": "and", "rules": [{"field": "attributes.signed_up_at", "operator": "in_last_days", "value": 30}]}, {"ada"}),
        ({"op": "and", "rules": [{"field": "created_at", "operator": "in_last_days", "value": 1}]}, {"ada", "bob", "cy", "di"}),
        ({"op": "and", "rules": [{"topic": "beta-news", "operator": "subscribed"}]}, {"di"}),
        ({"op": "or", "rules": [
            {"field": "locale", "operator": "eq", "value": "de"},
            {"op": "and", "rules": [
                {"field": "attributes.plan", "operator": "eq", "value": "free"},
                {"topic": "beta-news", "operator": "not_subscribed"},
            ]},
        ]}, {"bob", "di"}),
    ],
)  # fmt: skip
def test_rules_select_the_right_recipients(org, people, rules, expected):
    assert _match(org, rules) == expected


def test_values_are_bound_never_inlined(org):
    rules = {
        "op": "and",
        "rules": [{"field": "attributes.plan", "operator": "eq", "value": "x' OR 1=1 --"}],
    }
    compiled = str(compile_rules(rules).compile())
    assert "OR 1=1" not in compiled


@pytest.mark.parametrize(
    ("rules", "path"),
    [
        ({"op": "xor", "rules": []}, "rules.op"),
        ({"op": "and", "rules": [{"field": "password_hash", "operator": "eq", "value": "x"}]}, "rules.rules[0].field"),
        ({"op": "and", "rules": [{"field": "attributes.a;drop", "operator": "eq", "value": "x"}]}, "rules.rules[0].field"),
        ({"op": "and", "rules": [{"field": "email", "operator": "gte", "value": 3}]}, "rules.rules[0].operator"),
        ({"op": "and", "rules": [{"field": "attributes.n", "operator": "between", "value": [1]}]}, "rules.rules[0].value"),
        ({"op": "and", "rules": [{"op": "or", "rules": [{"field": "email", "operator": "in", "value": "x"}]}]}, "rules.rules[0].rules[0].value"),
        ({"op": "and", "rules": [{"topic": "", "operator": "subscribed"}]}, "rules.rules[0].topic"),
    ],
)  # fmt: skip
def test_invalid_trees_name_the_path(rules, path):
    assert path in [e.field for e in validate_rules(rules)]
    with pytest.raises(ValidationError):
        compile_rules(rules)


def test_trigger_to_a_segment(org, people, make_template, redis):
    from tests.pipeline.conftest import run_jobs
    from whistle_web.deliveries.models import Delivery

    make_template(org, "welcome", CONTENT)
    with organization_scope(org.id):
        segment = Segment(
            name="Paying",
            rules={
                "op": "and",
                "rules": [
                    {"field": "attributes.plan", "operator": "in", "value": ["pro", "enterprise"]}
                ],
            },
        )
        db.session.add(segment)
        db.session.flush()
        trigger("welcome", segment_id=segment.id, channels=["in_app"], actor=SYSTEM)
    run_jobs(redis)
    with organization_scope(org.id):
        sent_to = set(
            db.session.scalars(
                select(Recipient.external_id).join(Delivery, Delivery.recipient_id == Recipient.id)
            )
        )
    assert sent_to == {"ada", "cy"}


def test_numbers_beyond_64_bits_compare_as_numeric(org, people):
    rules = {
        "op": "and",
        "rules": [{"field": "attributes.seats", "operator": "lt", "value": 1e300}],
    }
    assert _match(org, rules) == {"ada", "bob"}
