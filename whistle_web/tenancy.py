"""The one mechanism that scopes tenant data to the current organization.

Every model carrying rows of one organization inherits :class:`TenantScoped`. While an
organization is active (:func:`organization_scope`), every ORM SELECT, UPDATE and DELETE
that touches such a model gets ``organization_id = <current>`` added by a session event,
``Session.get`` refuses identities of other organizations, and flushes refuse to write rows
of another organization. Without an active organization, tenant-scoped queries raise
:class:`TenantScopeError` unless the statement was marked with :func:`unscoped` on purpose
(sign-in, API key look-up, system ticks that work across organizations).

Query tenant tables through their ORM classes (``select(Recipient)``,
``select(func.count()).select_from(Recipient)``): the criteria attach to ORM entities, so
a Core ``Table`` object would bypass them. Bulk INSERTs are not filtered; they take
``organization_id`` from :func:`require_organization_id`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

from flask_sqlalchemy.session import Session as FlaskSession
from sqlalchemy import BigInteger, ForeignKey, bindparam, event, inspect
from sqlalchemy.orm import (
    Mapped,
    ORMExecuteState,
    declared_attr,
    mapped_column,
    with_loader_criteria,
)
from sqlalchemy.sql import Executable, visitors

UNSCOPED_OPTION = "whistle_unscoped"

_current_organization: ContextVar[int | None] = ContextVar("whistle_organization", default=None)

E = TypeVar("E", bound=Executable)


class TenantScopeError(RuntimeError):
    """Raised when tenant data is touched without, or across, an organization scope."""


class TenantScoped:
    """Mixin for rows that belong to exactly one organization.

    Tables whose own composite index already leads with ``organization_id`` set
    ``__tenant_index__ = False`` to skip the redundant single-column index. The highest-volume
    tables (notifications, deliveries), whose rows already hang off their organization
    through a cascading parent, set ``__tenant_fk__ = False``: the parent chain enforces the
    reference, and the per-row foreign-key check is not paid on every insert.
    """

    __tenant_index__: bool = True
    __tenant_fk__: bool = True

    @declared_attr
    def organization_id(cls) -> Mapped[int]:
        if not cls.__tenant_fk__:
            return mapped_column(BigInteger, index=cls.__tenant_index__)
        return mapped_column(
            ForeignKey("organizations.id", ondelete="CASCADE"), index=cls.__tenant_index__
        )


def current_organization_id() -> int | None:
    """Return the id of the active organization, or None outside any scope."""
    return _current_organization.get()


def require_organization_id() -> int:
    """Return the active organization id.

    Raises:
        TenantScopeError: no organization is active.
    """
    org_id = _current_organization.get()
    if org_id is None:
        raise TenantScopeError("no organization is active")
    return org_id


@contextmanager
def organization_scope(organization_id: int) -> Iterator[int]:
    """Make ``organization_id`` the active organization inside the block."""
    token = _current_organization.set(int(organization_id))
    try:
        yield int(organization_id)
    finally:
        _current_organization.reset(token)


def activate(organization_id: int | None) -> Any:
    """Activate an organization without a block; pass the result to :func:`deactivate`."""
    return _current_organization.set(None if organization_id is None else int(organization_id))


def deactivate(token: Any) -> None:
    _current_organization.reset(token)


def unscoped(statement: E) -> E:
    """Mark a statement as deliberately reading across organizations."""
    return statement.execution_options(**{UNSCOPED_OPTION: True})


_tables_cache: tuple[int, frozenset[Any]] = (-1, frozenset())


def _tenant_tables() -> frozenset[Any]:
    global _tables_cache
    from whistle_web.extensions import db

    mappers = db.Model.registry.mappers
    if _tables_cache[0] != len(mappers):
        tables = frozenset(m.local_table for m in mappers if issubclass(m.class_, TenantScoped))
        _tables_cache = (len(mappers), tables)
    return _tables_cache[1]


def _touches_tenant_tables(state: ORMExecuteState) -> bool:
    if any(issubclass(m.class_, TenantScoped) for m in state.all_mappers):
        return True
    # all_mappers misses entities that only appear in select_from(), joins or subqueries.
    tables = _tenant_tables()
    return any(
        element in tables
        for element in visitors.iterate(state.statement)
        if getattr(element, "__visit_name__", None) == "table"
    )


@event.listens_for(FlaskSession, "do_orm_execute")
def _scope_statement(state: ORMExecuteState) -> None:
    if not (state.is_select or state.is_update or state.is_delete):
        return
    # Refreshing attributes of an already loaded identity re-reads that row by primary key.
    if state.is_column_load:
        return
    if state.execution_options.get(UNSCOPED_OPTION):
        return
    if not _touches_tenant_tables(state):
        return
    if _current_organization.get() is None:
        raise TenantScopeError(
            "tenant-scoped query outside an organization scope; "
            "use organization_scope() or mark the statement with unscoped()"
        )
    state.statement = state.statement.options(_TENANT_CRITERIA)


# Built once: the organization id is a bound parameter read when the statement executes, so
# the criteria (and every statement's compiled form) stay cacheable across organizations.
_ORGANIZATION_PARAM = bindparam("whistle_organization_id", callable_=require_organization_id)
_TENANT_CRITERIA = with_loader_criteria(
    TenantScoped,
    lambda cls: cls.organization_id == _ORGANIZATION_PARAM,
    include_aliases=True,
    track_closure_variables=False,
)


class TenantSession(FlaskSession):
    """Flask-SQLAlchemy's session, with identity-map reads checked against the scope."""

    def get(self, entity: Any, ident: Any, **kwargs: Any) -> Any:
        obj = super().get(entity, ident, **kwargs)
        if obj is None or not isinstance(obj, TenantScoped):
            return obj
        options = kwargs.get("execution_options") or {}
        if options.get(UNSCOPED_OPTION):
            return obj
        org_id = _current_organization.get()
        if org_id is None:
            raise TenantScopeError("tenant-scoped get() outside an organization scope")
        # The identity map may hold a row loaded under another scope; never hand it out.
        return obj if obj.organization_id == org_id else None


@event.listens_for(FlaskSession, "transient_to_pending")
def _stamp_new_row(session: Any, obj: Any) -> None:
    """Give a new row the active organization, or refuse one of another organization."""
    if not isinstance(obj, TenantScoped):
        return
    org_id = _current_organization.get()
    if org_id is None:
        raise TenantScopeError(f"cannot create {type(obj).__name__} outside an organization")
    if obj.organization_id is None:
        obj.organization_id = org_id
    elif obj.organization_id != org_id:
        raise TenantScopeError(f"cannot create {type(obj).__name__} in another organization")


@event.listens_for(FlaskSession, "before_flush")
def _guard_flush(session: Any, flush_context: Any, instances: Any) -> None:
    """Refuse to move rows between organizations or to change another organization's rows.

    Rows can only be loaded through a scope, so a flush outside any scope (a service that
    commits after its ``organization_scope`` block) writes rows of the scope they came from.
    """
    org_id = _current_organization.get()
    for obj in list(session.dirty) + list(session.deleted):
        if not isinstance(obj, TenantScoped):
            continue
        if _organization_changed(obj):
            raise TenantScopeError(f"cannot move {type(obj).__name__} to another organization")
        if org_id is not None and obj.organization_id != org_id:
            raise TenantScopeError(f"cannot change {type(obj).__name__} of another organization")


def _organization_changed(obj: Any) -> bool:
    history = inspect(obj).attrs.organization_id.history
    return bool(history.deleted) and bool(history.added) and history.deleted[0] != history.added[0]
