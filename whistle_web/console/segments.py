"""Segments: the list, the rule builder with its live count and sample, save, rename, delete.

The builder is server-rendered: structural changes (add a condition or a group, remove one,
change what a condition looks at) post the form to ``segment_builder``, which answers with
the builder again; typing posts it to ``segment_preview`` (debounced by htmx), which answers
with the count, the first matching recipients and each condition's message. Without
JavaScript the same buttons submit the page and get it back changed.
"""

from __future__ import annotations

from typing import Any

from flask import abort, flash, redirect, render_template, request, url_for

from whistle_web.audiences import services
from whistle_web.audiences.models import Segment
from whistle_web.audiences.segments import describe_rules, validate_rules
from whistle_web.console import segments_builder as builder
from whistle_web.console.access import actor, render, requires
from whistle_web.console.views import bp
from whistle_web.errors import Conflict, NotFound, ValidationError
from whistle_web.extensions import htmx

MAX_NAME = 200
MAX_DESCRIPTION = 2000
LIST_COUNT_TIMEOUT_MS = 2000


def _segment(segment_id: int) -> Segment:
    """The segment, or a 404 page (ids of other organizations included)."""
    try:
        return services.get_segment(segment_id)
    except NotFound:
        abort(404)


def _summary(segment: Segment) -> str:
    if validate_rules(segment.rules):
        return "Invalid rules: open the segment to fix them."
    return describe_rules(segment.rules, services.campaign_names(segment.rules))


# --- list -------------------------------------------------------------------------------


@bp.get("/segments")
@requires("view")
def segments() -> Any:
    rows = [(segment, _summary(segment)) for segment in services.list_segments()]
    return render_template("console/segments/index.html", rows=rows)


@bp.get("/segments/<int:segment_id>/count")
@requires("view")
def segment_count(segment_id: int) -> Any:
    """The segment's count for its list row or page (cached for a minute)."""
    count = services.cached_segment_count(_segment(segment_id).id, timeout_ms=LIST_COUNT_TIMEOUT_MS)
    return render_template("console/segments/_count.html", count=count)


# --- show, rename, delete ---------------------------------------------------------------


@bp.get("/segments/<int:segment_id>")
@requires("view")
def segment_show(segment_id: int) -> Any:
    segment = _segment(segment_id)
    return _show(segment)


def _show(segment: Segment, *, error: str | None = None, status: int = 200, **extra: Any) -> Any:
    preview = None
    if not validate_rules(segment.rules):
        preview = services.preview_rules(segment.rules)
    return render(
        "console/segments/show.html",
        status=status,
        segment=segment,
        summary=_summary(segment),
        preview=preview,
        error=error,
        **extra,
    )


@bp.post("/segments/<int:segment_id>/rename")
@requires("edit")
def segment_rename(segment_id: int) -> Any:
    segment = _segment(segment_id)
    name = request.form.get("name", "").strip()
    problem = _name_problem(name)
    if problem is None:
        try:
            segment = services.update_segment(segment.id, {"name": name}, actor=actor())
        except Conflict as exc:
            problem = exc.detail
    if problem is not None:
        context = {"segment": segment, "rename_error": problem, "rename_value": name}
        if htmx:
            return render_template("console/segments/_name.html", **context), 422
        return _show(segment, status=422, rename_error=problem, rename_value=name)
    if htmx:
        return render_template("console/segments/_name.html", segment=segment)
    flash(f"Renamed to {segment.name}.", "info")
    return redirect(url_for("console.segment_show", segment_id=segment.id), 303)


@bp.post("/segments/<int:segment_id>/delete")
@requires("edit")
def segment_delete(segment_id: int) -> Any:
    segment = _segment(segment_id)
    try:
        services.delete_segment(segment.id, actor=actor())
    except Conflict as exc:
        return _show(segment, error=f"Not deleted: {exc.detail}", status=409)
    flash(f"Segment {segment.name} deleted.", "info")
    if htmx:
        return "", 200, {"HX-Redirect": url_for("console.segments")}
    return redirect(url_for("console.segments"), 303)


# --- the builder: new and edit ----------------------------------------------------------


def _name_problem(name: str) -> str | None:
    if not name:
        return "Give the segment a name."
    if len(name) > MAX_NAME:
        return f"At most {MAX_NAME} characters."
    if "\x00" in name:
        return "The name cannot contain NUL characters."
    return None


def _editor(
    template: str,
    root: builder.Node,
    *,
    segment: Segment | None = None,
    status: int = 200,
    focus: str | None = None,
    **context: Any,
) -> Any:
    preview, general = _preview_of(root)
    return render(
        template,
        None,
        status=status,
        root=root,
        nodes=builder.walk(root),
        segment=segment,
        preview=preview,
        general_errors=general,
        focus=focus,
        **_builder_context(),
        **context,
    )


def _builder_context() -> dict[str, Any]:
    """What the builder's selects offer."""
    return {
        "kinds": builder.KINDS,
        "types": builder.TYPES,
        "events": builder.EVENTS,
        "choices": services.builder_choices(),
        "attribute_keys": services.attribute_keys(),
    }


def _preview_of(root: builder.Node) -> tuple[services.RulePreview | None, list[str]]:
    """The preview of the builder's rules, or None with the errors put on their nodes."""
    rules = builder.to_rules(root)
    try:
        return services.preview_rules(rules), []
    except ValidationError as exc:
        return None, builder.attach_errors(root, exc.errors)


def _form_fields() -> tuple[str, str, list[str]]:
    name = request.form.get("name", "").strip()
    description = request.form.get("description", "").strip()
    problems = []
    if (problem := _name_problem(name)) is not None:
        problems.append(problem)
    if len(description) > MAX_DESCRIPTION:
        problems.append(f"The description has at most {MAX_DESCRIPTION} characters.")
    return name, description, problems


@bp.route("/segments/new", methods=["GET", "POST"])
@requires("edit")
def segment_new() -> Any:
    if request.method == "GET":
        root = builder.from_rules({"op": "and", "rules": []})
        return _editor("console/segments/form.html", root, name="", description="")
    root = builder.from_form(request.form)
    name, description, problems = _form_fields()
    action = request.form.get("action", "")
    if action:  # a builder button pressed without JavaScript
        root, focus = builder.apply_action(root, action)
        return _editor(
            "console/segments/form.html", root, name=name, description=description, focus=focus
        )
    rules = builder.to_rules(root)
    if not problems:
        try:
            segment = services.create_segment(name, rules, description=description, actor=actor())
        except (ValidationError, Conflict) as exc:
            problems.extend(_save_problems(root, exc))
        else:
            flash(f"Segment {segment.name} saved.", "info")
            return redirect(url_for("console.segment_show", segment_id=segment.id), 303)
    return _editor(
        "console/segments/form.html",
        root,
        status=422,
        name=name,
        description=description,
        problems=problems,
    )


def _save_problems(root: builder.Node, exc: ValidationError | Conflict) -> list[str]:
    if isinstance(exc, Conflict):
        return [exc.detail]
    unplaced = builder.attach_errors(root, exc.errors)
    return ["Some conditions need attention (see the messages beside them).", *unplaced]


@bp.route("/segments/<int:segment_id>/edit", methods=["GET", "POST"])
@requires("edit")
def segment_edit(segment_id: int) -> Any:
    segment = _segment(segment_id)
    if request.method == "GET":
        root = builder.from_rules(segment.rules if not validate_rules(segment.rules) else {})
        return _editor(
            "console/segments/form.html",
            root,
            segment=segment,
            name=segment.name,
            description=segment.description or "",
        )
    root = builder.from_form(request.form)
    name, description, problems = _form_fields()
    action = request.form.get("action", "")
    if action:
        root, focus = builder.apply_action(root, action)
        return _editor(
            "console/segments/form.html",
            root,
            segment=segment,
            name=name,
            description=description,
            focus=focus,
        )
    if not problems:
        changes = {"name": name, "description": description, "rules": builder.to_rules(root)}
        try:
            services.update_segment(segment.id, changes, actor=actor())
        except (ValidationError, Conflict) as exc:
            problems.extend(_save_problems(root, exc))
        else:
            flash(f"Segment {name} saved.", "info")
            return redirect(url_for("console.segment_show", segment_id=segment.id), 303)
    return _editor(
        "console/segments/form.html",
        root,
        segment=segment,
        status=422,
        name=name,
        description=description,
        problems=problems,
    )


@bp.post("/segments/builder")
@requires("edit")
def segment_builder() -> Any:
    """The builder again after a structural change (htmx); the preview comes with it
    out of band when the change was a button (a select's change re-previews by itself)."""
    root = builder.from_form(request.form)
    root, focus = builder.apply_action(root, request.form.get("action", ""))
    structural = bool(request.form.get("action"))
    preview, general = _preview_of(root) if structural else (None, [])
    return render_template(
        "console/segments/_builder_response.html",
        root=root,
        nodes=builder.walk(root),
        preview=preview,
        general_errors=general,
        preview_oob=structural,
        focus=focus,
        **_builder_context(),
    )


@bp.post("/segments/preview")
@requires("edit")
def segment_preview() -> Any:
    """Count and sample for the rules as typed, and each condition's message."""
    root = builder.from_form(request.form)
    preview, general = _preview_of(root)
    context = {"root": root, "nodes": builder.walk(root), "preview": preview}
    context["general_errors"] = general
    if htmx:
        return render_template("console/segments/_preview_response.html", **context)
    return render_template("console/segments/_preview.html", **context)
