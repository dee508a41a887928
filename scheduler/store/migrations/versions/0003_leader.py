"""Failover: the leader lease that replicas sharing one database contend
for. One row; its epoch rises with every change of leader, and every write
checks it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    leader = op.create_table(
        "leader",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.Column("holder", sa.String(64), nullable=False),
        sa.Column("address", sa.String(255), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),  # the database's clock
    )
    op.bulk_insert(leader, [{"id": 1, "epoch": 0, "holder": "", "address": "", "expires_at": 0.0}])


def downgrade() -> None:
    op.drop_table("leader")
