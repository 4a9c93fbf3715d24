"""The audience bound of a launch: the organization's own newest recipient, never another's."""

from __future__ import annotations

from whistle_web.recipients.services import newest_recipient_id
from whistle_web.tenancy import organization_scope


def test_the_newest_recipient_is_the_organizations_own(org, other_org, make_org, make_recipient):  # type: ignore[no-untyped-def]
    empty = make_org("Initech")
    old = make_recipient(org, "a-1")
    newest_of_org = make_recipient(org, "a-2")
    newest_overall = make_recipient(other_org, "b-1")  # a larger id, another organization
    assert newest_overall.id > newest_of_org.id > old.id
    with organization_scope(org.id):
        assert newest_recipient_id() == newest_of_org.id
    with organization_scope(other_org.id):
        assert newest_recipient_id() == newest_overall.id
    with organization_scope(empty.id):  # none at all, and the largest organization id
        assert newest_recipient_id() == 0
