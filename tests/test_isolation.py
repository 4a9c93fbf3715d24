"""Each test's writes, committed or not, are gone before the next test starts."""

from __future__ import annotations

from sqlalchemy import func, select

from whistle_web.extensions import db
from whistle_web.models import Organization
from whistle_web.organizations.services import create_organization


def test_a_commit_inside_a_test(db):
    create_organization("Committed Inc")
    db.session.commit()
    assert db.session.scalar(select(func.count()).select_from(Organization)) == 1


def test_is_rolled_back_before_the_next_one():
    assert db.session.scalar(select(func.count()).select_from(Organization)) == 0
