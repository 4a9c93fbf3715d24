"""Segment rules: validate a rule tree and compile it to one parameterised SQL condition.

A rule tree is ``{"op": "and"|"or", "rules": [<condition or group>, ...]}``. A condition is
``{"field": F, "operator": O, "value": V}`` where F is a recipient column (``email``,
``phone``, ``external_id``, ``name``, ``locale``, ``timezone``, ``created_at``) or
``attributes.<key>``, or ``{"topic": "<key>", "operator": "subscribed"|"not_subscribed"}``.
Values only ever become bound parameters; field names are checked against a fixed list or
a strict attribute-key pattern, so nothing from a user becomes raw SQL.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Numeric,
    and_,
    case,
    cast,
    exists,
    func,
    literal,
    not_,
    or_,
    select,
    true,
)

from whistle_web.audiences.models import Subscription, Topic
from whistle_web.errors import FieldError, ValidationError
from whistle_web.recipients.models import Recipient

MAX_DEPTH = 5
MAX_CONDITIONS = 50
ATTRIBUTE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$")
COLUMNS = {
    "email": Recipient.email,
    "phone": Recipient.phone,
    "external_id": Recipient.external_id,
    "name": Recipient.name,
    "locale": Recipient.locale,
    "timezone": Recipient.timezone,
    "created_at": Recipient.created_at,
}
TEXT_OPERATORS = {"eq", "neq", "in", "not_in", "contains", "starts_with", "exists", "not_exists"}
NUMBER_OPERATORS = {"gt", "gte", "lt", "lte", "between"}
DATE_OPERATORS = {"before", "after", "in_last_days", "not_in_last_days"}
OPERATORS = TEXT_OPERATORS | NUMBER_OPERATORS | DATE_OPERATORS | {"is_true", "is_false"}


def validate_rules(rules: Any) -> list[FieldError]:
    """Return every problem in a rule tree, with the JSON path of each."""
    errors: list[FieldError] = []
    count = [0]
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
    operator = node.get("operator")
    if "topic" in node:
        if not isinstance(node["topic"], str) or not node["topic"]:
            errors.append(FieldError(f"{path}.topic", "Name a topic key."))
        if operator not in ("subscribed", "not_subscribed"):
            errors.append(FieldError(f"{path}.operator", "Use 'subscribed' or 'not_subscribed'."))
        return
    field_name = node.get("field")
    if not isinstance(field_name, str) or not _field_ok(field_name):
        errors.append(FieldError(f"{path}.field", f"Unknown field {field_name!r}."))
    if operator not in OPERATORS:
        errors.append(FieldError(f"{path}.operator", f"Unknown operator {operator!r}."))
        return
    value = node.get("value")
    if operator in ("in", "not_in") and not isinstance(value, list):
        errors.append(FieldError(f"{path}.value", "Expected a list of values."))
    elif operator == "between" and not (
        isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value)
    ):
        errors.append(FieldError(f"{path}.value", "Expected [low, high] numbers."))
    elif operator in NUMBER_OPERATORS and field_name in COLUMNS:
        errors.append(FieldError(f"{path}.operator", "Only attributes can be compared as numbers."))
    elif operator in ("gt", "gte", "lt", "lte") and not _is_number(value):
        errors.append(FieldError(f"{path}.value", "Expected a number."))
    elif operator in ("in_last_days", "not_in_last_days") and not (
        isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 36500
    ):
        errors.append(FieldError(f"{path}.value", "Expected a number of days."))
    elif operator in ("before", "after") and _parse_datetime(value) is None:
        errors.append(FieldError(f"{path}.value", "Expected an ISO 8601 date."))
    elif operator in ("eq", "neq", "contains", "starts_with") and not isinstance(
        value, str | int | float | bool
    ):
        errors.append(FieldError(f"{path}.value", "Expected a single value."))


def _field_ok(name: str) -> bool:
    if name in COLUMNS:
        return True
    prefix, _, key = name.partition(".")
    return prefix == "attributes" and bool(ATTRIBUTE_KEY.match(key))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _parse_datetime(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


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
    return _condition(node["field"], node["operator"], node.get("value"), now)


def _condition(field_name: str, operator: str, value: Any, now: datetime) -> ColumnElement[bool]:
    if field_name in COLUMNS:
        column: Any = COLUMNS[field_name]
        present = column.is_not(None)
        text = column
    else:
        key = field_name.partition(".")[2]
        column = Recipient.attributes[key]
        present = Recipient.attributes.has_key(key)
        text = Recipient.attributes[key].astext
    if operator == "exists":
        return present
    if operator == "not_exists":
        return not_(present)
    if operator in ("is_true", "is_false"):
        return and_(present, text == ("true" if operator == "is_true" else "false"))
    if operator in ("eq", "neq", "in", "not_in"):
        values = value if isinstance(value, list) else [value]
        as_text = [_as_text(v) for v in values]
        match = text.in_(as_text) if len(as_text) != 1 else text == as_text[0]
        if operator in ("eq", "in"):
            return and_(present, match)
        return or_(not_(present), not_(match))
    if operator == "contains":
        return text.icontains(str(value), autoescape=True)
    if operator == "starts_with":
        return text.istartswith(str(value), autoescape=True)
    if operator in NUMBER_OPERATORS:
        number = _number(field_name)
        if operator == "between":
            low, high = (literal(v, Numeric) for v in sorted(value))
            return number.between(low, high)
        # Bound as NUMERIC: JSON numbers may exceed 64-bit integers.
        bound = literal(value, Numeric)
        compare = {"gt": number > bound, "gte": number >= bound, "lt": number < bound}
        return compare.get(operator, number <= bound)
    # Dates: created_at is a timestamp; attributes hold ISO 8601 strings.
    moment = column if field_name in COLUMNS else text
    if operator in ("in_last_days", "not_in_last_days"):
        since = now - timedelta(days=int(value))
        bound = since if field_name in COLUMNS else since.date().isoformat()
        recent = and_(present, moment >= bound)
        return recent if operator == "in_last_days" else or_(not_(present), not_(recent))
    when = _parse_datetime(value)
    assert when is not None
    bound = when if field_name in COLUMNS else when.date().isoformat()
    return and_(present, moment < bound if operator == "before" else moment > bound)


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _number(field_name: str) -> Any:
    """The attribute as a number, or NULL when it holds something else (never a cast error)."""
    if field_name in COLUMNS:
        raise ValidationError.single("field", f"{field_name} is not a number.")
    key = field_name.partition(".")[2]
    return case(
        (
            func.jsonb_typeof(Recipient.attributes[key]) == "number",
            cast(Recipient.attributes[key].astext, Numeric),
        ),
        else_=None,
    )
