"""Settings: categories (default channels, critical) and topics, through audiences.services."""

from __future__ import annotations

import re
from typing import Any

from flask import abort, flash, redirect, request, url_for
from sqlalchemy import select

from whistle_web.audiences.models import Topic
from whistle_web.audiences.services import (
    create_category,
    create_topic,
    delete_category,
    delete_topic,
    get_category,
    get_topic,
    update_category,
    update_topic,
)
from whistle_web.channels.kinds import Channel
from whistle_web.console.access import actor, render, requires
from whistle_web.console.settings import CHANNEL_LABELS, errors_by_field
from whistle_web.console.views import bp
from whistle_web.errors import Conflict, FieldError, NotFound, ValidationError
from whistle_web.extensions import db
from whistle_web.preferences.models import Category

# The API's key rule (whistle_web.api.resources.audiences.KEY_PATTERN).
KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,99}$")


def _text(
    name: str, limit: int, label: str, errors: list[FieldError], required: bool = True
) -> str:
    value = request.form.get(name, "").replace("\x00", "").strip()
    if required and not value:
        errors.append(FieldError(name, f"Give the {label}."))
    elif len(value) > limit:
        errors.append(FieldError(name, f"Use at most {limit} characters."))
    return value


def _key(errors: list[FieldError]) -> str:
    key = request.form.get("key", "").strip()
    if not KEY.match(key):
        errors.append(
            FieldError(
                "key", "Letters, digits and _ . : - (starting with a letter or digit), at most 100."
            )
        )
    return key


def _category_or_404(key: str) -> Category:
    try:
        return get_category(key)
    except NotFound:
        abort(404)


def _topic_or_404(key: str) -> Topic:
    try:
        return get_topic(key)
    except NotFound:
        abort(404)


# --- categories ----------------------------------------------------------------------------


def _categories_page(
    errors: dict[str, list[str]] | None = None,
    values: dict[str, Any] | None = None,
    status: int = 200,
    editing: Category | None = None,
) -> Any:
    return render(
        "console/settings/categories.html",
        categories=list(db.session.scalars(select(Category).order_by(Category.name, Category.key))),
        channels=list(Channel),
        channel_labels=CHANNEL_LABELS,
        errors=errors or {},
        values=values or {"default_channels": []},
        editing=editing,
        status=status,
    )


def _category_form() -> tuple[dict[str, Any], list[FieldError]]:
    errors: list[FieldError] = []
    channels = request.form.getlist("default_channels")
    if set(channels) - {c.value for c in Channel}:
        errors.append(FieldError("default_channels", "Choose channels from the list."))
    values = {
        "name": _text("name", 200, "category a name", errors),
        "description": _text("description", 2000, "description", errors, required=False),
        "default_channels": channels,
        "critical": request.form.get("critical") == "on",
    }
    return values, errors


@bp.get("/settings/categories")
@requires("view")
def settings_categories() -> Any:
    """Categories of notification with their default channels."""
    return _categories_page()


@bp.post("/settings/categories")
@requires("manage")
def settings_category_create() -> Any:
    values, errors = _category_form()
    values["key"] = _key(errors)
    try:
        if errors:
            raise ValidationError(errors)
        create_category(
            values["key"],
            values["name"],
            description=values["description"],
            default_channels=values["default_channels"],
            critical=values["critical"],
            actor=actor(),
        )
    except ValidationError as exc:
        return _categories_page(errors_by_field(exc), values, 422)
    except Conflict as exc:
        return _categories_page({"key": [exc.detail]}, values, 422)
    flash(f"Category {values['name']} created.", "info")
    return redirect(url_for("console.settings_categories"), 303)


@bp.route("/settings/categories/<key>", methods=["GET", "POST"])
@requires("manage")
def settings_category_edit(key: str) -> Any:
    category = _category_or_404(key)
    if request.method == "GET":
        values = {
            "name": category.name,
            "description": category.description,
            "default_channels": list(category.default_channels or []),
            "critical": category.critical,
        }
        return render(
            "console/settings/category_edit.html",
            category=category,
            values=values,
            errors={},
            channels=list(Channel),
            channel_labels=CHANNEL_LABELS,
        )
    values, errors = _category_form()
    try:
        if errors:
            raise ValidationError(errors)
        update_category(category.key, values, actor=actor())
    except ValidationError as exc:
        return render(
            "console/settings/category_edit.html",
            category=category,
            values=values,
            errors=errors_by_field(exc),
            channels=list(Channel),
            channel_labels=CHANNEL_LABELS,
            status=422,
        )
    flash(f"Category {values['name']} saved.", "info")
    return redirect(url_for("console.settings_categories"), 303)


@bp.post("/settings/categories/<key>/delete")
@requires("manage")
def settings_category_delete(key: str) -> Any:
    category = _category_or_404(key)
    delete_category(category.key, actor=actor())
    flash(f"Category {category.name} deleted.", "info")
    return redirect(url_for("console.settings_categories"), 303)


# --- topics --------------------------------------------------------------------------------


def _topics_page(
    errors: dict[str, list[str]] | None = None,
    values: dict[str, Any] | None = None,
    status: int = 200,
) -> Any:
    return render(
        "console/settings/topics.html",
        topics=list(db.session.scalars(select(Topic).order_by(Topic.name, Topic.key))),
        errors=errors or {},
        values=values or {},
        status=status,
    )


@bp.get("/settings/topics")
@requires("view")
def settings_topics() -> Any:
    """Topics recipients can subscribe to."""
    return _topics_page()


@bp.post("/settings/topics")
@requires("manage")
def settings_topic_create() -> Any:
    errors: list[FieldError] = []
    values = {
        "key": _key(errors),
        "name": _text("name", 200, "topic a name", errors),
        "description": _text("description", 2000, "description", errors, required=False),
    }
    try:
        if errors:
            raise ValidationError(errors)
        create_topic(values["key"], values["name"], values["description"], actor=actor())
    except ValidationError as exc:
        return _topics_page(errors_by_field(exc), values, 422)
    except Conflict as exc:
        return _topics_page({"key": [exc.detail]}, values, 422)
    flash(f"Topic {values['name']} created.", "info")
    return redirect(url_for("console.settings_topics"), 303)


@bp.route("/settings/topics/<key>", methods=["GET", "POST"])
@requires("manage")
def settings_topic_edit(key: str) -> Any:
    topic = _topic_or_404(key)
    if request.method == "GET":
        values = {"name": topic.name, "description": topic.description}
        return render("console/settings/topic_edit.html", topic=topic, values=values, errors={})
    errors: list[FieldError] = []
    values = {
        "name": _text("name", 200, "topic a name", errors),
        "description": _text("description", 2000, "description", errors, required=False),
    }
    if errors:
        return render(
            "console/settings/topic_edit.html",
            topic=topic,
            values=values,
            errors=errors_by_field(ValidationError(errors)),
            status=422,
        )
    update_topic(topic.key, values, actor=actor())
    flash(f"Topic {values['name']} saved.", "info")
    return redirect(url_for("console.settings_topics"), 303)


@bp.post("/settings/topics/<key>/delete")
@requires("manage")
def settings_topic_delete(key: str) -> Any:
    topic = _topic_or_404(key)
    try:
        delete_topic(topic.key, actor=actor())
    except Conflict as exc:
        flash(exc.detail, "error")
        return redirect(url_for("console.settings_topics"), 303)
    flash(f"Topic {topic.name} deleted.", "info")
    return redirect(url_for("console.settings_topics"), 303)
