"""The segment builder's state: a tree of nodes read from form fields and rendered back.

The builder posts its state as plain form fields, one set per node, named by the node's
path (``r`` is the root group, ``r.0`` its first child, ``r.0.2`` ...): ``node`` lists the
paths in document order, a group has ``<path>.op``, a condition ``<path>.kind`` and the
fields its kind needs. The server reads them into :class:`Node` objects (keeping whatever
was typed, valid or not), applies a structural action (add a condition or a group, remove a
node) and renders the builder again; :func:`to_rules` turns the nodes into the rule tree the
domain validates and compiles. Nothing here builds SQL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from werkzeug.datastructures import MultiDict

from whistle_web.audiences.segments import (
    COLUMN_TYPES,
    DAYS_OPERATORS,
    ENGAGEMENT_EVENTS,
    MAX_CONDITIONS,
    MAX_DEPTH,
)
from whistle_web.errors import FieldError

ROOT = "r"
MAX_NODES = MAX_CONDITIONS * 2 + 10
PATH = re.compile(r"r(\.[0-9]{1,3}){0,6}")

KINDS = (
    ("email", "Email"),
    ("phone", "Phone"),
    ("external_id", "External id"),
    ("name", "Name"),
    ("locale", "Locale"),
    ("timezone", "Timezone"),
    ("created_at", "Created"),
    ("unsubscribed", "Unsubscribed from everything"),
    ("attribute", "Attribute…"),
    ("topic", "Topic membership"),
    ("engagement", "Engagement"),
)
KIND_NAMES = {k for k, _ in KINDS}
TYPES = (("text", "text"), ("number", "number"), ("boolean", "yes/no"), ("date", "date"))
TYPE_NAMES = {t for t, _ in TYPES}
OPERATORS = {
    "text": (
        ("eq", "equals"),
        ("neq", "does not equal"),
        ("contains", "contains"),
        ("starts_with", "starts with"),
        ("in", "is one of"),
        ("not_in", "is none of"),
        ("exists", "is set"),
        ("not_exists", "is not set"),
    ),
    "number": (
        ("eq", "="),
        ("neq", "≠"),
        ("lt", "<"),
        ("lte", "≤"),
        ("gt", ">"),
        ("gte", "≥"),
        ("between", "between"),
        ("exists", "is set"),
        ("not_exists", "is not set"),
    ),
    "boolean": (("is_true", "is true"), ("is_false", "is false")),
    "date": (
        ("in_last_days", "in the last … days"),
        ("more_than_days_ago", "more than … days ago"),
        ("before", "before"),
        ("after", "after"),
        ("between", "between"),
    ),
    "topic": (("subscribed", "is subscribed to"), ("not_subscribed", "is not subscribed to")),
    "engagement": (("did", "did"), ("did_not", "did not")),
}
PRESENCE = (("exists", "is set"), ("not_exists", "is not set"))
EVENTS = (("received", "receive"), ("opened", "open"), ("clicked", "click in"))


@dataclass
class Node:
    """A group (``children``, ``op``) or a condition (``kind`` and its fields), as typed."""

    path: str
    group: bool = False
    op: str = "and"
    children: list[Node] = field(default_factory=list)
    kind: str = "email"
    key: str = ""
    type: str = "text"
    operator: str = "exists"
    value: str = ""
    value2: str = ""
    topic: str = ""
    event: str = "received"
    campaign: str = ""
    days: str = ""
    error: str = ""

    @property
    def dom(self) -> str:
        return self.path.replace(".", "-")

    @property
    def depth(self) -> int:
        return self.path.count(".")

    @property
    def value_type(self) -> str:
        """text, number, boolean or date: what the value means (drives the operators)."""
        if self.kind == "attribute":
            return self.type
        return COLUMN_TYPES.get(self.kind, self.kind)

    def operators(self) -> tuple[tuple[str, str], ...]:
        choices = OPERATORS.get(self.value_type, OPERATORS["text"])
        if self.kind == "attribute" and self.type in ("boolean", "date"):
            choices = choices + PRESENCE
        return choices

    @property
    def needs_value(self) -> bool:
        return self.kind not in ("topic", "engagement", "unsubscribed") and self.operator not in (
            "exists",
            "not_exists",
            "is_true",
            "is_false",
        )

    @property
    def input_type(self) -> str:
        if self.operator in DAYS_OPERATORS:
            return "number"
        if self.value_type == "date":
            return "date"
        return "text"

    @property
    def value_hint(self) -> str:
        if self.operator in ("in", "not_in"):
            return "values, separated by commas"
        if self.operator in DAYS_OPERATORS:
            return "days"
        if self.value_type == "number":
            return "a number"
        return "value"


def _path_ok(path: str) -> bool:
    return bool(PATH.fullmatch(path))


def from_form(form: MultiDict[str, str]) -> Node:
    """The builder's nodes as posted; unknown or malformed paths are ignored."""
    root = Node(ROOT, group=True, op=_choice(form.get("r.op"), ("and", "or"), "and"))
    nodes = {ROOT: root}
    for path in form.getlist("node")[:MAX_NODES]:
        if path == ROOT or not _path_ok(path) or path in nodes:
            continue
        parent = nodes.get(path.rsplit(".", 1)[0])
        if parent is None or not parent.group:
            continue
        node = _node_from_form(path, form)
        parent.children.append(node)
        nodes[path] = node
    return renumber(root)


def _choice(value: str | None, allowed: Any, default: str) -> str:
    return value if value in allowed else default


def _node_from_form(path: str, form: MultiDict[str, str]) -> Node:
    get = lambda name: (form.get(f"{path}.{name}") or "")[:1000]  # noqa: E731
    if form.get(f"{path}.group"):
        return Node(path, group=True, op=_choice(get("op"), ("and", "or"), "and"))
    node = Node(
        path,
        kind=_choice(get("kind"), KIND_NAMES, "email"),
        key=get("key").strip(),
        type=_choice(get("type"), TYPE_NAMES, "text"),
        value=get("value"),
        value2=get("value2"),
        topic=get("topic"),
        event=_choice(get("event"), ENGAGEMENT_EVENTS, "received"),
        campaign=get("campaign").strip(),
        days=get("days").strip(),
    )
    allowed = [name for name, _ in node.operators()]
    node.operator = _choice(get("operator"), allowed, allowed[0])
    return node


def renumber(node: Node, path: str = ROOT) -> Node:
    """Give each node the path of its position (after adds and removes)."""
    node.path = path
    for i, child in enumerate(node.children):
        renumber(child, f"{path}.{i}")
    return node


def find(root: Node, path: str) -> Node | None:
    if root.path == path:
        return root
    for child in root.children:
        if path == child.path or path.startswith(child.path + "."):
            return find(child, path)
    return None


def count_conditions(node: Node) -> int:
    if not node.group:
        return 1
    return sum(count_conditions(child) for child in node.children)


def apply_action(root: Node, action: str) -> tuple[Node, str | None]:
    """Apply ``add-condition:<path>``, ``add-group:<path>`` or ``remove:<path>``.

    Returns:
        The tree and the path of the node to focus next (None when nothing changed).
    """
    verb, _, path = action.partition(":")
    target = find(root, path) if _path_ok(path) else None
    if target is None:
        return root, None
    if verb in ("add-condition", "add-group") and target.group:
        if count_conditions(root) >= MAX_CONDITIONS:
            target.error = f"A segment has at most {MAX_CONDITIONS} conditions."
            return root, None
        if verb == "add-group":
            if target.depth + 1 >= MAX_DEPTH:
                target.error = f"Groups nest at most {MAX_DEPTH} deep."
                return root, None
            child = Node("", group=True, op="or" if target.op == "and" else "and")
            child.children.append(Node(""))
        else:
            child = Node("")
        target.children.append(child)
        renumber(root)
        return root, child.path
    if verb == "remove" and target is not root:
        parent = find(root, path.rsplit(".", 1)[0])
        if parent is not None:
            parent.children = [c for c in parent.children if c is not target]
            renumber(root)
            return root, parent.path
    return root, None


# --- nodes <-> rules --------------------------------------------------------------------


def to_rules(node: Node) -> dict[str, Any]:
    """The rule tree the nodes describe; malformed values are passed on for the domain's
    validation to name (a number field holding ``abc`` stays the string ``"abc"``)."""
    if node.group:
        return {"op": node.op, "rules": [to_rules(child) for child in node.children]}
    if node.kind == "topic":
        return {"topic": node.topic, "operator": node.operator}
    if node.kind == "engagement":
        return {
            "engagement": node.event,
            "operator": node.operator,
            "campaign_id": _number(node.campaign) if node.campaign else None,
            "days": _number(node.days) if node.days else None,
        }
    field_name = f"attributes.{node.key}" if node.kind == "attribute" else node.kind
    rule: dict[str, Any] = {"field": field_name, "operator": node.operator}
    if not node.needs_value:
        return rule
    kind = node.value_type
    if node.operator in DAYS_OPERATORS:
        rule["value"] = _number(node.value.strip())
    elif node.operator == "between":
        parse = _number if kind == "number" else str.strip
        rule["value"] = [parse(node.value.strip()), parse(node.value2.strip())]
    elif node.operator in ("in", "not_in"):
        items = [v.strip() for v in node.value.split(",") if v.strip()]
        rule["value"] = [_number(v) for v in items] if kind == "number" else items
    elif kind == "number":
        rule["value"] = _number(node.value.strip())
    elif kind == "date":
        rule["value"] = node.value.strip()
    else:
        rule["value"] = node.value
    return rule


def _number(text: str) -> Any:
    """An int or float when the text is one, else the text (for validation to refuse)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return text
    return value if text.strip().lower() not in ("nan", "inf", "-inf", "infinity") else text


def from_rules(rules: dict[str, Any]) -> Node:
    """Nodes for a saved (valid) rule tree."""
    return renumber(_from_rule(rules, ROOT))


def _from_rule(rule: dict[str, Any], path: str) -> Node:
    if "rules" in rule:
        return Node(
            path,
            group=True,
            op=rule.get("op", "and"),
            children=[_from_rule(child, path) for child in rule.get("rules", [])],
        )
    if "topic" in rule:
        return Node(path, kind="topic", operator=rule["operator"], topic=str(rule["topic"]))
    if "engagement" in rule:
        campaign, days = rule.get("campaign_id"), rule.get("days")
        return Node(
            path,
            kind="engagement",
            event=rule["engagement"],
            operator=rule["operator"],
            campaign="" if campaign is None else str(campaign),
            days="" if days is None else str(days),
        )
    field_name, operator, value = rule["field"], rule["operator"], rule.get("value")
    node = Node(path, operator=operator)
    if field_name.startswith("attributes."):
        node.kind, node.key = "attribute", field_name.partition(".")[2]
        node.type = _attribute_type(operator, value)
    else:
        node.kind = field_name
    if isinstance(value, list):
        if operator == "between":
            node.value, node.value2 = (_show(v) for v in value)
        else:
            node.value = ", ".join(_show(v) for v in value)
    elif value is not None:
        node.value = _show(value)
    return node


def _attribute_type(operator: str, value: Any) -> str:
    values = value if isinstance(value, list) else [value]
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if operator in ("is_true", "is_false"):
        return "boolean"
    if operator in ("gt", "gte", "lt", "lte") or (operator == "between" and numbers):
        return "number"
    if operator in ("eq", "neq", "in", "not_in") and numbers and value is not None:
        return "number"
    if operator in DAYS_OPERATORS or operator in ("before", "after", "between"):
        return "date"
    return "text"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# --- errors -----------------------------------------------------------------------------

_ERROR_PATH = re.compile(r"rules((?:\.rules\[[0-9]+\])*)(?:\.([a-z_]+))?")


def attach_errors(root: Node, errors: list[FieldError]) -> list[str]:
    """Put each validation error on the node it names; return the ones that name none."""
    unplaced = []
    for error in errors:
        match = _ERROR_PATH.fullmatch(error.field)
        node = None
        if match:
            indexes = re.findall(r"\[([0-9]+)\]", match.group(1))
            node = find(root, ".".join([ROOT, *indexes]))
        if node is None:
            unplaced.append(error.message)
            continue
        message = error.message
        if match and match.group(2) == "field" and node.kind == "attribute":
            message = "Name the attribute: letters, digits, _ and -, starting with a letter or _."
        if message not in node.error:  # a save and its re-rendered preview both report it
            node.error = f"{node.error} {message}".strip()
    return unplaced


def walk(node: Node) -> list[Node]:
    """Every node, depth first."""
    return [node] + [n for child in node.children for n in walk(child)]
