"""One organization can never read or change another's rows through the ORM."""

from __future__ import annotations

import pytest
from sqlalchemy import delete, func, select, update

from whistle_web.extensions import db
from whistle_web.models import Device, DeviceKind, Recipient, Topic
from whistle_web.tenancy import (
    TenantScopeError,
    current_organization_id,
    organization_scope,
    unscoped,
)


@pytest.fixture
def rows(org, other_org, make_recipient):
    mine = make_recipient(org, "same-id", email="a@example.com")
    theirs = make_recipient(other_org, "same-id", email="b@example.com")
    return mine, theirs


def test_select_sees_only_the_current_organization(org, other_org, rows):
    mine, theirs = rows
    with organization_scope(org.id):
        found = db.session.scalars(select(Recipient)).all()
        assert [r.id for r in found] == [mine.id]
        assert db.session.scalar(select(func.count()).select_from(Recipient)) == 1
        assert db.session.scalar(select(Recipient).where(Recipient.id == theirs.id)) is None
    with organization_scope(other_org.id):
        assert [r.id for r in db.session.scalars(select(Recipient))] == [theirs.id]


def test_get_of_a_foreign_id_is_none_even_from_the_identity_map(org, rows):
    mine, theirs = rows
    # ``theirs`` sits in this session's identity map: get() must still refuse it.
    with organization_scope(org.id):
        assert db.session.get(Recipient, theirs.id) is None
        assert db.session.get(Recipient, mine.id) is mine
    db.session.expunge_all()
    with organization_scope(org.id):
        assert db.session.get(Recipient, theirs.id) is None


def test_bulk_update_and_delete_touch_only_the_current_organization(org, other_org, rows):
    _mine, theirs = rows
    with organization_scope(org.id):
        result = db.session.execute(update(Recipient).values(name="renamed"))
        assert result.rowcount == 1
        result = db.session.execute(delete(Recipient).where(Recipient.id == theirs.id))
        assert result.rowcount == 0
    db.session.expire_all()
    with organization_scope(other_org.id):
        still_there = db.session.get(Recipient, theirs.id)
        assert still_there is not None and still_there.name is None


def test_joins_and_subqueries_are_scoped_too(org, other_org, rows):
    _mine, theirs = rows
    with organization_scope(other_org.id):
        db.session.add(Device(recipient_id=theirs.id, kind=DeviceKind.FCM, token="t1"))
        db.session.flush()
    with organization_scope(org.id):
        joined = db.session.execute(select(Recipient.id, Device.id).join(Device)).all()
        assert joined == []
        sub = select(Device.recipient_id).scalar_subquery()
        assert db.session.scalars(select(Recipient).where(Recipient.id.in_(sub))).all() == []


def test_relationship_loads_are_scoped(org, other_org, rows):
    mine, theirs = rows
    with organization_scope(other_org.id):
        db.session.add(Device(recipient_id=theirs.id, kind=DeviceKind.FCM, token="t2"))
        db.session.flush()
    db.session.expunge_all()
    with organization_scope(org.id):
        # Even a (wrongly) forged foreign key in our org cannot pull in their devices.
        mine = db.session.get(Recipient, mine.id)
        assert mine.devices == []


def test_changing_a_foreign_row_is_refused(org, other_org, rows):
    _mine, theirs = rows
    theirs.name = "hijacked"
    with organization_scope(org.id), pytest.raises(TenantScopeError):
        db.session.flush()
    db.session.rollback()


def test_deleting_a_foreign_row_is_refused(org, rows):
    _mine, theirs = rows
    db.session.delete(theirs)
    with organization_scope(org.id), pytest.raises(TenantScopeError):
        db.session.flush()
    db.session.rollback()


def test_moving_a_row_to_another_organization_is_refused(org, other_org, rows):
    mine, _ = rows
    with organization_scope(org.id):
        mine.organization_id = other_org.id
        with pytest.raises(TenantScopeError):
            db.session.flush()
    db.session.rollback()


def test_new_rows_take_the_current_organization(org):
    with organization_scope(org.id):
        topic = Topic(key="news", name="News")
        db.session.add(topic)
        db.session.flush()
    assert topic.organization_id == org.id


def test_new_rows_of_another_organization_are_refused(org, other_org):
    with organization_scope(org.id), pytest.raises(TenantScopeError):
        db.session.add(Topic(key="news", name="News", organization_id=other_org.id))


def test_tenant_data_outside_any_scope_is_refused(org, rows):
    assert current_organization_id() is None
    with pytest.raises(TenantScopeError):
        db.session.scalars(select(Recipient)).all()
    with pytest.raises(TenantScopeError):
        db.session.get(Recipient, rows[0].id)
    with pytest.raises(TenantScopeError):
        db.session.add(Topic(key="x", name="x"))


def test_unscoped_reads_across_organizations_on_purpose(rows):
    found = db.session.scalars(unscoped(select(Recipient).order_by(Recipient.id))).all()
    assert [r.id for r in found] == [r.id for r in rows]


def test_scopes_nest_and_restore(org, other_org):
    with organization_scope(org.id):
        with organization_scope(other_org.id):
            assert current_organization_id() == other_org.id
        assert current_organization_id() == org.id
    assert current_organization_id() is None
