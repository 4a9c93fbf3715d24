"""Schemathesis against the generated OpenAPI document, every operation, authenticated.

For each operation a bounded number of generated requests (valid and invalid ones, a fixed
seed, no shrinking) runs against the app as an organization's API key with every scope (the
inbox operations as a recipient's token); each answer must be no server error, have a documented status code and content type, and
match the documented schema. Provider test sends are stubbed so no generated provider
configuration reaches the network.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import whistle_web.api.resources  # noqa: F401  (registers every endpoint)
from tests.pipeline.conftest import CONTENT
from whistle_web.api.openapi import build_document
from whistle_web.channels import services as channel_services
from whistle_web.extensions import db
from whistle_web.preferences.services import issue_recipient_token

# WHISTLE_SCHEMATHESIS_EXAMPLES=200 for a deeper (slower) run.
MAX_EXAMPLES = int(os.environ.get("WHISTLE_SCHEMATHESIS_EXAMPLES", "15"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]

schema = schemathesis.openapi.from_dict(build_document())


def test_the_tested_document_is_the_one_the_app_serves(client):
    served = client.get("/api/schema/openapi.json")
    assert served.status_code == 200
    assert served.json == build_document()


@pytest.fixture
def seeded(app, org, make_api, make_template, make_recipient, redis, monkeypatch):  # type: ignore[no-untyped-def]
    """An organization with a template and a recipient, and an all-scopes API key."""
    monkeypatch.setitem(app.config, "WHISTLE_API_RATE_LIMIT", "1000000 per minute")
    monkeypatch.setattr(
        channel_services,
        "send_with_budget",
        lambda *args, **kwargs: channel_services.ProbeOutcome(False, error="stubbed"),
    )
    make_template(org, "welcome", CONTENT)
    make_recipient(org, "u-1", name="Ada")
    client = make_api(org)
    # The inbox operations take the widget's recipient token instead of an API key.
    client.recipient_token = issue_recipient_token(org.id, "u-1")[0]
    db.session.commit()  # kept when a request's leftovers are rolled back below
    return client


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_api_matches_its_openapi_document(case: Any, seeded: Any, app: Any) -> None:
    recipient = case.operation.definition.raw.get("security") == [{"recipientToken": []}]
    token = seeded.recipient_token if recipient else seeded.token
    try:
        case.call_and_validate(app=app, headers={"Authorization": f"Bearer {token}"}, checks=CHECKS)
    finally:
        # What the end of a real request does (tests share one app context): a request
        # that failed must not leave an aborted transaction to the next one.
        db.session.rollback()
