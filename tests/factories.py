"""Factory fixtures that return callables (``make_org("Acme")``), as indico does."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest

from whistle_web.accounts.models import Role, User
from whistle_web.accounts.services import add_member, create_user
from whistle_web.errors import Actor
from whistle_web.extensions import db
from whistle_web.models import (
    Campaign,
    Organization,
    Recipient,
    SendRequest,
    SendRequestKind,
    Template,
    TemplateVersion,
    VersionState,
)
from whistle_web.organizations.services import create_organization
from whistle_web.tenancy import organization_scope

PASSWORD = "correct horse battery staple"
SYSTEM = Actor.system("tests")
DEFAULT_CONTENT = {"email": {"subject": "Hi", "text": "Hello", "html": "<p>Hello</p>"}}
_counter = itertools.count(1)

__all__ = [
    "make_org",
    "make_recipient",
    "make_send_request",
    "make_template",
    "make_user",
    "org",
    "other_org",
]


@pytest.fixture
def make_org() -> Callable[..., Organization]:
    def make(name: str | None = None) -> Organization:
        return create_organization(name or f"Org {next(_counter)}")

    return make


@pytest.fixture
def make_user() -> Callable[..., User]:
    def make(
        email: str | None = None,
        *,
        org: Organization | None = None,
        role: Role = Role.OWNER,
        password: str = PASSWORD,
    ) -> User:
        user = create_user(email or f"user{next(_counter)}@example.com", password)
        if org is not None:
            with organization_scope(org.id):
                add_member(user, role, actor=SYSTEM)
        db.session.flush()
        return user

    return make


@pytest.fixture
def make_recipient() -> Callable[..., Recipient]:
    def make(org: Organization, external_id: str | None = None, **fields: Any) -> Recipient:
        with organization_scope(org.id):
            recipient = Recipient(external_id=external_id or f"ext-{next(_counter)}", **fields)
            db.session.add(recipient)
            db.session.flush()
        return recipient

    return make


@pytest.fixture
def make_template() -> Callable[..., Template]:
    def make(
        org: Organization, key: str | None = None, content: dict[str, Any] | None = None
    ) -> Template:
        """A template with one published version."""
        with organization_scope(org.id):
            template = Template(key=key or f"tpl-{next(_counter)}", name="Template")
            db.session.add(template)
            db.session.flush()
            version = TemplateVersion(
                template_id=template.id,
                version=1,
                state=VersionState.PUBLISHED,
                content=content
                or {"email": {"subject": "Hi", "text": "Hello", "html": "<p>Hello</p>"}},
            )
            db.session.add(version)
            db.session.flush()
            template.published_version_id = version.id
            db.session.flush()
        return template

    return make


@pytest.fixture
def make_send_request(make_template: Callable[..., Template]) -> Callable[..., SendRequest]:
    def make(
        org: Organization,
        *,
        template: Template | None = None,
        campaign: Campaign | None = None,
        audience: dict[str, Any] | None = None,
    ) -> SendRequest:
        template = template or make_template(org)
        with organization_scope(org.id):
            request = SendRequest(
                kind=SendRequestKind.CAMPAIGN if campaign else SendRequestKind.TRIGGER,
                campaign_id=campaign.id if campaign else None,
                template_id=template.id,
                template_version_id=template.published_version_id,
                audience=audience or {"type": "all"},
            )
            db.session.add(request)
            db.session.flush()
        return request

    return make


@pytest.fixture
def org(make_org: Callable[..., Organization]) -> Organization:
    return make_org("Acme")


@pytest.fixture
def other_org(make_org: Callable[..., Organization]) -> Organization:
    return make_org("Globex")
