"""request hash of keyed send requests

A trigger made through the API with an Idempotency-Key keeps the request's fingerprint on
its send request, which is then the key's only record: a retry is compared with it, and no
API idempotency record is claimed and answered around the trigger. A nullable column
without a default: adding it rewrites nothing.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-24 20:46:20.856676

"""

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("send_requests", sa.Column("request_hash", sa.String(length=64), nullable=True))


def downgrade():
    op.drop_column("send_requests", "request_hash")
