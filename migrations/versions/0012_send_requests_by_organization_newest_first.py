"""send requests by organization, newest first

The single-column organization index becomes (organization_id, id): the same number of
indexes to maintain on every trigger's insert, and GET /notifications reads an
organization's newest send requests off it instead of walking the primary key backwards
through every organization's rows.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-24 20:39:32.424211

"""

from alembic import op

# revision identifiers, used by Alembic.
revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade():
    # Built concurrently (outside a transaction): triggers go on writing meanwhile. The new
    # index exists before the old one goes, so no query is ever left without one.
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_send_requests_organization_id_id",
            "send_requests",
            ["organization_id", "id"],
            unique=False,
            postgresql_concurrently=True,
            if_not_exists=True,
        )
        op.drop_index(
            "ix_send_requests_organization_id",
            table_name="send_requests",
            postgresql_concurrently=True,
            if_exists=True,
        )


def downgrade():
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_send_requests_organization_id",
            "send_requests",
            ["organization_id"],
            unique=False,
            postgresql_concurrently=True,
            if_not_exists=True,
        )
        op.drop_index(
            "ix_send_requests_organization_id_id",
            table_name="send_requests",
            postgresql_concurrently=True,
            if_exists=True,
        )
