"""Recipients to and from CSV: an all-or-nothing import and a streamed export.

Columns: ``external_id`` (required), the profile fields (email, phone, name, locale,
timezone), ``attributes`` (a JSON object); any other column becomes a text attribute. An
empty cell leaves the field as it is. The export writes the same columns, so an exported
file imports back unchanged.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from whistle_web.errors import Actor
from whistle_web.extensions import db
from whistle_web.organizations.services import record_audit
from whistle_web.recipients.models import Recipient
from whistle_web.recipients.services import (
    PROFILE_FIELDS,
    ids_for_external_ids,
    iter_recipients,
    upsert_recipients,
    validate_profile,
)

MAX_IMPORT_ROWS = 100_000
MAX_REPORTED_ERRORS = 500
CHUNK = 500
EXPORT_COLUMNS = ("external_id", *PROFILE_FIELDS, "attributes", "unsubscribed", "created_at")
# A spreadsheet runs a cell starting with these as a formula; the export defuses them.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class RowError:
    line: int
    field: str
    message: str


def _no_progress(phase: str, done: int, total: int) -> None:
    return None


def _cell(value: str) -> str:
    value = value.strip()
    if len(value) > 1 and value[0] == "'" and value[1] in FORMULA_STARTS:
        return value[1:]  # undo the export's formula guard
    return value


def parse_import(
    data: bytes, progress: Progress = _no_progress
) -> tuple[list[dict[str, Any]], list[RowError]]:
    """Read and validate every row; the profiles are only usable when no error came back.

    Line numbers count the header as line 1.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return [], [RowError(1, "file", "The file is not UTF-8 text.")]
    if "\x00" in text:
        return [], [RowError(1, "file", "The file is not a CSV text file.")]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip() for h in (reader.fieldnames or [])]
    if "external_id" not in header:
        return [], [RowError(1, "external_id", "The first line must name an external_id column.")]
    reader.fieldnames = header
    total = max(text.count("\n") - 1, 1)
    profiles: list[dict[str, Any]] = []
    errors: list[RowError] = []
    try:
        for number, row in enumerate(reader, start=1):
            line = reader.line_num
            if number > MAX_IMPORT_ROWS:
                errors.append(RowError(line, "file", f"At most {MAX_IMPORT_ROWS:,} rows a file."))
                break
            profile, row_errors = _profile(row, line)
            errors.extend(row_errors)
            profiles.append(profile)
            if number % CHUNK == 0:
                progress("validating", number, total)
    except csv.Error as exc:
        errors.append(RowError(reader.line_num, "file", f"Unreadable CSV: {exc}."))
    if not profiles and not errors:
        errors.append(RowError(2, "file", "The file has no rows."))
    progress("validating", len(profiles), len(profiles))
    return profiles, errors


def _profile(row: dict[str | None, Any], line: int) -> tuple[dict[str, Any], list[RowError]]:
    errors: list[RowError] = []
    if row.get(None):
        errors.append(RowError(line, "file", "More values than columns."))
    profile: dict[str, Any] = {"external_id": _cell(row.get("external_id") or "")}
    attributes: dict[str, Any] = {}
    for column, raw in row.items():
        if column in (None, "external_id") or raw is None:
            continue
        value = _cell(raw)
        if not value:
            continue
        if column in PROFILE_FIELDS:
            profile[column] = value
        elif column == "attributes":
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                errors.append(RowError(line, "attributes", "Expected a JSON object."))
            else:
                attributes.update(parsed)
        elif column:
            attributes[column] = value
    if attributes:
        profile["attributes"] = attributes
    errors += [RowError(line, e.field, e.message) for e in validate_profile(profile)]
    return profile, errors


def apply_import(
    profiles: list[dict[str, Any]], *, actor: Actor, progress: Progress = _no_progress
) -> dict[str, int]:
    """Upsert every profile in one transaction, audited; commits once (or not at all)."""
    created = 0
    total = len(profiles)
    try:
        for start in range(0, total, CHUNK):
            chunk = profiles[start : start + CHUNK]
            existing = ids_for_external_ids([p["external_id"] for p in chunk])
            ids = upsert_recipients(chunk)
            created += len(set(ids) - set(existing))
            progress("importing", min(start + CHUNK, total), total)
        counts = {"rows": total, "created": created, "updated": total - created}
        record_audit(actor, "recipients.imported", "recipient", None, counts)
        db.session.commit()
    except BaseException:
        db.session.rollback()
        raise
    return counts


def _export_value(value: str) -> str:
    if value.startswith(FORMULA_STARTS) and not value.lstrip("+-").replace(".", "").isdigit():
        return "'" + value
    return value


def export_rows(recipient: Recipient) -> list[str]:
    return [
        _export_value(value)
        for value in (
            recipient.external_id,
            *(getattr(recipient, field) or "" for field in PROFILE_FIELDS),
            json.dumps(recipient.attributes, ensure_ascii=False) if recipient.attributes else "",
            "yes" if recipient.unsubscribed_at else "",
            recipient.created_at.isoformat() if recipient.created_at else "",
        )
    ]


def export_csv(*conditions: Any, chunk: int = CHUNK) -> Iterator[str]:
    """The header, then the matching recipients of the current organization in pieces."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(EXPORT_COLUMNS)
    for n, recipient in enumerate(iter_recipients(*conditions), start=1):
        writer.writerow(export_rows(recipient))
        if n % chunk == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()
