"""Segment rules: validate a rule tree and compile it to one parameterised SQL condition.

A rule tree is ``{"op": "and"|"or", "rules": [<condition or group>, ...]}`` (an empty group
matches everyone). A condition is one of:

- ``{"field": F, "operator": O, "value": V}``: F is a recipient column (text: ``email``,
  ``phone``, ``external_id``, ``name``, ``locale``, ``timezone``; date: ``created_at``;
  boolean: ``unsubscribed``) or ``attributes.<key>``;
- ``{"topic": "<key>", "operator": "subscribed"|"not_subscribed"}``;
- ``{"engagement": "received"|"opened"|"clicked", "operator": "did"|"did_not",
  "campaign_id": N | null, "days": N | null}``: a delivery (of that campaign, else any) was
  sent / seen or opened / clicked, within the last ``days`` days (else ever).

Operators by type:

- text: ``eq``, ``neq``, ``in``, ``not_in`` (a list), ``contains``, ``starts_with``
  (case-insensitive), ``exists``, ``not_exists``;
- number (attributes holding JSON numbers): ``eq``, ``neq``, ``in``, ``not_in`` with number
  values, ``lt``, ``lte``, ``gt``, ``gte``, ``between`` ``[low, high]``;
- boolean: ``is_true``, ``is_false`` (attributes: JSON ``true``/``false`` or those strings);
- date: ``before``, ``after``, ``between`` (ISO dates), ``in_last_days``,
  ``more_than_days_ago``, ``not_in_last_days`` (a number of days). Attributes hold ISO 8601
  strings and compare by their date (``YYYY-MM-DD`` prefix); ``created_at`` compares as a
  timestamp (a bare date means that whole UTC day).

Every condition is two-valued (never SQL NULL): a missing attribute, a JSON null and a value
of another type simply do not match (``neq``, ``not_in``, ``not_in_last_days`` and
``not_exists`` do). Values only ever become bound parameters; field names are checked
against a fixed list or a strict attribute-key pattern and attribute keys are bound too, so
nothing from a user becomes raw SQL. Equality on attributes compiles to JSONB containment
(``attributes @> {"plan": "pro"}``) wherever that is exact, so the GIN index serves it.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Numeric,
    and_,
    case,
    cast,
    exists,
    false,
    func,
    literal,
    not_,
    or_,
    select,
    true,
)

from whistle_web.audiences.models import Subscription, Topic
from whistle_web.deliveries.models import Delivery
from whistle_web.errors import FieldError, ValidationError
from whistle_web.recipients.models import Recipient

MAX_DEPTH = 5
MAX_CONDITIONS = 50
MAX_LIST = 500
MAX_DAYS = 36500
MAX_ID = 2**63 - 1
ATTRIBUTE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,63}")
COLUMNS = {
    "email": Recipient.email,
    "phone": Recipient.phone,
    "external_id": Recipient.external_id,
    "name": Recipient.name,
    "locale": Recipient.locale,
    "timezone": Recipient.timezone,
    "created_at": Recipient.created_at,
    "unsubscribed": Recipient.unsubscribed_at,
}
COLUMN_TYPES = {name: "text" for name in COLUMNS} | {
    "created_at": "date",
    "unsubscribed": "boolean",
}
TEXT_OPERATORS = {"eq", "neq", "in", "not_in", "contains", "starts_with", "exists", "not_exists"}
NUMBER_OPERATORS = {"gt", "gte", "lt", "lte", "between"}
DATE_OPERATORS = {
    "before",
    "after",
    "between",
    "in_last_days",
    "not_in_last_days",
    "more_than_days_ago",
}
DAYS_OPERATORS = {"in_last_days", "not_in_last_days", "more_than_days_ago"}
BOOLEAN_OPERATORS = {"is_true", "is_false"}
OPERATORS = TEXT_OPERATORS | NUMBER_OPERATORS | DATE_OPERATORS | BOOLEAN_OPERATORS
OPERATORS_BY_TYPE = {
    "text": TEXT_OPERATORS,
    "date": DATE_OPERATORS | {"exists", "not_exists"},
    "boolean": BOOLEAN_OPERATORS,
}
TOPIC_OPERATORS = ("subscribed", "not_subscribed")
ENGAGEMENT_EVENTS = ("received", "opened", "clicked")
ENGAGEMENT_OPERATORS = ("did", "did_not")
# The ledger stamps every step a delivery passes, so each event has one timestamp column.
ENGAGEMENT_COLUMNS = {
    "received": Delivery.sent_at,
    "opened": Delivery.seen_at,
    "clicked": Delivery.clicked_at,
}
# Text that a JSON number, boolean, array or object also reads as (``->>``); a string value
# outside these compares exactly by containment.
_NON_STRING_TEXT = re.compile(r"-?[0-9]+(\.[0-9]+)?|true|false|[\[{].*", re.DOTALL)
ISO_DATE_PREFIX = "^[0-9]{4}-[0-9]{2}-[0-9]{2}"
_DATE_ONLY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


# --- validation -------------------------------------------------------------------------


def validate_rules(rules: Any) -> list[FieldError]:
    """Return every problem in a rule tree, with the JSON path of each."""
    errors: list[FieldError] = []
    count = [0]
    if not isinstance(rules, dict) or "rules" not in rules:
        return [FieldError("rules", "Expected a group: {op, rules}.")]
    _validate(rules, "rules", 0, errors, count)
    return errors


def _validate(node: Any, path: str, depth: int, errors: list[FieldError], count: list[int]) -> None:
    if not isinstance(node, dict):
        errors.append(FieldError(path, "Expected an object."))
        return
    if "rules" in node:
        if node.get("op") not in ("and", "or"):
            errors.append(FieldError(f"{path}.op", "Use 'and' or 'or'."))
        if depth >= MAX_DEPTH:
            errors.append(FieldError(path, f"Groups nest at most {MAX_DEPTH} deep."))
            return
        if not isinstance(node["rules"], list):
            errors.append(FieldError(f"{path}.rules", "Expected a list."))
            return
        for i, child in enumerate(node["rules"]):
            _validate(child, f"{path}.rules[{i}]", depth + 1, errors, count)
        return
    count[0] += 1
    if count[0] > MAX_CONDITIONS:
        errors.append(FieldError(path, f"A segment has at most {MAX_CONDITIONS} conditions."))
        return
    if "topic" in node:
        _validate_topic(node, path, errors)
    elif "engagement" in node:
        _validate_engagement(node, path, errors)
    else:
        _validate_field(node, path, errors)


def _validate_topic(node: dict[str, Any], path: str, errors: list[FieldError]) -> None:
    topic = node["topic"]
    if not isinstance(topic, str) or not topic.strip() or len(topic) > 100 or "\x00" in topic:
        errors.append(FieldError(f"{path}.topic", "Choose a topic."))
    if node.get("operator") not in TOPIC_OPERATORS:
        errors.append(FieldError(f"{path}.operator", "Use 'subscribed' or 'not_subscribed'."))


def _validate_engagement(node: dict[str, Any], path: str, errors: list[FieldError]) -> None:
    if node["engagement"] not in ENGAGEMENT_EVENTS:
        errors.append(FieldError(f"{path}.engagement", "Use 'received', 'opened' or 'clicked'."))
    if node.get("operator") not in ENGAGEMENT_OPERATORS:
        errors.append(FieldError(f"{path}.operator", "Use 'did' or 'did_not'."))
    campaign_id = node.get("campaign_id")
    if campaign_id is not None and not (_is_int(campaign_id) and 0 < campaign_id <= MAX_ID):
        errors.append(FieldError(f"{path}.campaign_id", "Choose a campaign, or any message."))
    days = node.get("days")
    if days is not None and not (_is_int(days) and 0 < days <= MAX_DAYS):
        errors.append(FieldError(f"{path}.days", f"Enter a number of days from 1 to {MAX_DAYS}."))


def _validate_field(node: dict[str, Any], path: str, errors: list[FieldError]) -> None:
    field_name = node.get("field")
    operator = node.get("operator")
    if not isinstance(field_name, str) or not field_ok(field_name):
        errors.append(FieldError(f"{path}.field", f"Unknown field {field_name!r}."))
        field_name = None
    if operator not in OPERATORS:
        errors.append(FieldError(f"{path}.operator", f"Unknown operator {operator!r}."))
        return
    kind = COLUMN_TYPES.get(field_name or "")
    if kind is not None and operator not in OPERATORS_BY_TYPE[kind]:
        message = (
            "Only attributes can be compared as numbers."
            if operator in NUMBER_OPERATORS - DATE_OPERATORS
            else f"{field_name} is a {kind} field: {operator!r} does not apply."
        )
        errors.append(FieldError(f"{path}.operator", message))
        return
    problem = _value_problem(operator, node.get("value"), date_field=kind == "date")
    if problem:
        errors.append(FieldError(f"{path}.value", problem))


def _value_problem(operator: str, value: Any, *, date_field: bool) -> str | None:
    if operator in ("exists", "not_exists", "is_true", "is_false"):
        return None
    if operator in ("in", "not_in"):
        if not isinstance(value, list) or not value:
            return "Expected a list of values."
        if len(value) > MAX_LIST:
            return f"At most {MAX_LIST} values."
        if not all(_scalar_ok(v) for v in value):
            return "Expected a list of plain values (text or numbers)."
        return None
    if operator == "between":
        if isinstance(value, list) and len(value) == 2:
            if all(_is_number(v) for v in value) and not date_field:
                return None
            if all(_parse_datetime(v) is not None for v in value):
                return None
        if date_field:
            return "Expected [from, to] dates."
        return "Expected [low, high] numbers (or [from, to] dates)."
    if operator in ("gt", "gte", "lt", "lte"):
        return None if _is_number(value) else "Expected a number."
    if operator in DAYS_OPERATORS:
        if _is_int(value) and 0 < value <= MAX_DAYS:
            return None
        return f"Expected a number of days from 1 to {MAX_DAYS}."
    if operator in ("before", "after"):
        return None if _parse_datetime(value) is not None else "Expected an ISO 8601 date."
    if operator in ("contains", "starts_with"):
        if isinstance(value, str) and "\x00" in value:
            return "Text cannot contain NUL characters."
        if not _scalar_ok(value) or str(value) == "":
            return "Enter some text."
        return None
    # eq, neq
    if not _scalar_ok(value):
        return "Expected a single value."
    return None


def _scalar_ok(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" not in value and len(value) <= 1000
    if isinstance(value, bool):
        return True
    return _is_number(value)


def field_ok(name: str) -> bool:
    """A recipient column the rules may name, or ``attributes.<key>`` with a safe key."""
    if name in COLUMNS:
        return True
    prefix, _, key = name.partition(".")
    return prefix == "attributes" and bool(ATTRIBUTE_KEY.fullmatch(key))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_datetime(value: Any) -> datetime | None:
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def is_date_only(value: str) -> bool:
    return bool(_DATE_ONLY.fullmatch(value))


# --- compilation ------------------------------------------------------------------------


def compile_rules(rules: dict[str, Any], *, now: datetime | None = None) -> ColumnElement[bool]:
    """Compile a validated rule tree to a WHERE condition on ``recipients``.

    Raises:
        ValidationError: the tree is invalid (see :func:`validate_rules`).
    """
    errors = validate_rules(rules)
    if errors:
        raise ValidationError(errors)
    return _compile(rules, now or datetime.now(UTC))


def _compile(node: dict[str, Any], now: datetime) -> ColumnElement[bool]:
    if "rules" in node:
        parts = [_compile(child, now) for child in node["rules"]]
        if not parts:
            return true()  # an empty group matches everyone
        return and_(*parts) if node["op"] == "and" else or_(*parts)
    if "topic" in node:
        member = exists(
            select(Subscription.id)
            .join(Topic, Topic.id == Subscription.topic_id)
            .where(Subscription.recipient_id == Recipient.id, Topic.key == node["topic"])
        )
        return member if node["operator"] == "subscribed" else not_(member)
    if "engagement" in node:
        return _engagement(node, now)
    return _condition(node["field"], node["operator"], node.get("value"), now)


def _engagement(node: dict[str, Any], now: datetime) -> ColumnElement[bool]:
    """A delivery to the recipient reached the step; one index probe per candidate row
    (``ix_deliveries_recipient``), or the campaign's rows (``ix_deliveries_campaign``)."""
    stamp = ENGAGEMENT_COLUMNS[node["engagement"]]
    days = node.get("days")
    when = stamp >= now - timedelta(days=days) if days else stamp.is_not(None)
    query = select(Delivery.id).where(Delivery.recipient_id == Recipient.id, when)
    if node.get("campaign_id") is not None:
        query = query.where(Delivery.campaign_id == node["campaign_id"])
    happened = exists(query)
    return happened if node["operator"] == "did" else not_(happened)


def _condition(field_name: str, operator: str, value: Any, now: datetime) -> ColumnElement[bool]:
    if field_name in COLUMNS:
        return _column_condition(field_name, operator, value, now)
    key = field_name.partition(".")[2]
    text = Recipient.attributes[key].astext
    present = text.is_not(None)
    if operator == "exists":
        return present
    if operator == "not_exists":
        return not_(present)
    if operator in ("is_true", "is_false"):
        return and_(present, text == ("true" if operator == "is_true" else "false"))
    if operator in ("eq", "in", "neq", "not_in"):
        values = value if isinstance(value, list) else [value]
        match = or_(*[_attribute_equals(key, text, v) for v in values])
        return match if operator in ("eq", "in") else not_(match)
    if operator == "contains":
        return and_(present, text.icontains(str(value), autoescape=True))
    if operator == "starts_with":
        return and_(present, text.istartswith(str(value), autoescape=True))
    if operator in ("gt", "gte", "lt", "lte") or (
        operator == "between" and all(_is_number(v) for v in value)
    ):
        return _never_null(_number_compare(_attribute_number(key), operator, value))
    return _attribute_date(key, text, operator, value, now)


def _attribute_equals(key: str, text: Any, value: Any) -> ColumnElement[bool]:
    """Equality that the GIN (jsonb_path_ops) index serves when containment is exact."""
    if _is_number(value):
        # JSONB compares numbers as numbers: 5 contains-matches 5.0.
        return Recipient.attributes.contains({key: value})
    as_text = _as_text(value)
    if isinstance(value, str) and not _NON_STRING_TEXT.fullmatch(value):
        # No number, boolean, array or object reads as this text: only the string does.
        return Recipient.attributes.contains({key: value})
    return and_(text.is_not(None), text == as_text)


def _attribute_number(key: str) -> Any:
    """The attribute as a number, or NULL when it holds something else (never a cast error)."""
    return case(
        (
            func.jsonb_typeof(Recipient.attributes[key]) == "number",
            cast(Recipient.attributes[key].astext, Numeric),
        ),
        else_=None,
    )


def _number_compare(number: Any, operator: str, value: Any) -> ColumnElement[bool]:
    if operator == "between":
        low, high = (_numeric(v) for v in sorted(value))
        return number.between(low, high)
    bound = _numeric(value)
    compare = {"gt": number > bound, "gte": number >= bound, "lt": number < bound}
    return compare.get(operator, number <= bound)


def _numeric(value: float | int) -> Any:
    # Bound as an exact NUMERIC (the decimal the JSON text spells), not a float.
    return literal(Decimal(repr(value)) if isinstance(value, float) else Decimal(value), Numeric)


def _never_null(condition: ColumnElement[bool]) -> ColumnElement[bool]:
    return func.coalesce(condition, false())


def _attribute_date(
    key: str, text: Any, operator: str, value: Any, now: datetime
) -> ColumnElement[bool]:
    """Attributes hold ISO 8601 strings: compare their ``YYYY-MM-DD`` prefix as text."""
    day = case(
        (
            and_(
                func.jsonb_typeof(Recipient.attributes[key]) == "string",
                text.regexp_match(ISO_DATE_PREFIX),
            ),
            func.substr(text, 1, 10),
        ),
        else_=None,
    )
    if operator in DAYS_OPERATORS:
        since = (now - timedelta(days=int(value))).date().isoformat()
        if operator == "in_last_days":
            return _never_null(day >= since)
        if operator == "more_than_days_ago":
            return _never_null(day < since)
        return not_(_never_null(day >= since))
    if operator == "between":
        low, high = sorted(_as_date(v).isoformat() for v in value)
        return _never_null(day.between(low, high))
    bound = _as_date(value).isoformat()
    return _never_null(day < bound if operator == "before" else day > bound)


def _as_date(value: str) -> date:
    parsed = _parse_datetime(value)
    assert parsed is not None
    return parsed.date()


def _column_condition(
    field_name: str, operator: str, value: Any, now: datetime
) -> ColumnElement[bool]:
    column: Any = COLUMNS[field_name]
    present = column.is_not(None)
    if field_name == "unsubscribed":
        return present if operator == "is_true" else not_(present)
    if operator == "exists":
        return present
    if operator == "not_exists":
        return not_(present)
    if field_name == "created_at":
        return _timestamp_condition(column, operator, value, now)
    if operator in ("eq", "in", "neq", "not_in"):
        values = [_as_text(v) for v in (value if isinstance(value, list) else [value])]
        match = and_(present, column.in_(values) if len(values) > 1 else column == values[0])
        return match if operator in ("eq", "in") else not_(match)
    if operator == "contains":
        return and_(present, column.icontains(str(value), autoescape=True))
    return and_(present, column.istartswith(str(value), autoescape=True))


def day_bounds(value: str) -> tuple[datetime, datetime]:
    """The instant a date value starts and the instant after it ends (a bare date is a
    whole UTC day; a date with a time is that instant)."""
    parsed = _parse_datetime(value)
    assert parsed is not None
    if is_date_only(value):
        return parsed, parsed + timedelta(days=1)
    return parsed, parsed


def _timestamp_condition(column: Any, operator: str, value: Any, now: datetime) -> Any:
    """``created_at`` is never NULL, so these comparisons are two-valued as they stand."""
    if operator in DAYS_OPERATORS:
        since = now - timedelta(days=int(value))
        return column >= since if operator == "in_last_days" else column < since
    if operator == "before":
        return column < day_bounds(value)[0]
    if operator == "after":
        start, end = day_bounds(value)
        return column >= end if end != start else column > start
    (low, _), (high_start, high_end) = sorted((day_bounds(v) for v in value), key=lambda b: b[0])
    upper = column < high_end if high_end != high_start else column <= high_start
    return and_(column >= low, upper)


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# --- description ------------------------------------------------------------------------

OPERATOR_LABELS = {
    "eq": "is",
    "neq": "is not",
    "in": "is one of",
    "not_in": "is none of",
    "contains": "contains",
    "starts_with": "starts with",
    "exists": "is set",
    "not_exists": "is not set",
    "gt": ">",
    "gte": "≥",
    "lt": "<",
    "lte": "≤",
    "between": "is between",
    "before": "is before",
    "after": "is after",
    "in_last_days": "is in the last",
    "not_in_last_days": "is not in the last",
    "more_than_days_ago": "is more than",
    "is_true": "is true",
    "is_false": "is false",
}


def describe_rules(rules: dict[str, Any], campaign_names: dict[int, str] | None = None) -> str:
    """A one-line, human reading of a (valid) rule tree, e.g. ``plan is pro and (...)``."""
    text = _describe(rules, campaign_names or {}, top=True)
    return text or "Everyone"


def _describe(node: dict[str, Any], names: dict[int, str], *, top: bool = False) -> str:
    if "rules" in node:
        parts = [_describe(child, names) for child in node["rules"]]
        parts = [p for p in parts if p]
        if not parts:
            return "" if top else "everyone"
        joined = f" {node.get('op', 'and')} ".join(parts)
        return joined if top or len(parts) == 1 else f"({joined})"
    if "topic" in node:
        verb = "subscribed to" if node.get("operator") == "subscribed" else "not subscribed to"
        return f"{verb} topic {node.get('topic')}"
    if "engagement" in node:
        event = node.get("engagement")
        verb = {"received": "received", "opened": "opened", "clicked": "clicked in"}.get(event)
        campaign_id = node.get("campaign_id")
        what = (
            f"campaign {names.get(campaign_id, f'#{campaign_id}')}"
            if campaign_id is not None
            else "any message"
        )
        days = node.get("days")
        window = f" in the last {days} days" if days else ""
        prefix = "" if node.get("operator") == "did" else "did not "
        return f"{prefix}{verb} {what}{window}"
    field_name = str(node.get("field", ""))
    label = field_name.removeprefix("attributes.")
    operator = node.get("operator", "")
    value = node.get("value")
    said = OPERATOR_LABELS.get(operator, operator)
    if operator in ("exists", "not_exists", "is_true", "is_false"):
        return f"{label} {said}"
    if operator in DAYS_OPERATORS:
        suffix = " ago" if operator == "more_than_days_ago" else ""
        return f"{label} {said} {value} days{suffix}"
    if operator == "between" and isinstance(value, list) and len(value) == 2:
        return f"{label} {said} {_say(value[0])} and {_say(value[1])}"
    if isinstance(value, list):
        return f"{label} {said} {', '.join(_say(v) for v in value)}"
    return f"{label} {said} {_say(value)}"


def _say(value: Any) -> str:
    if isinstance(value, str):
        return value
    return _as_text(value)
