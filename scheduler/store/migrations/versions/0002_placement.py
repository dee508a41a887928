"""Placement: why each attempt went where it did and what it was expected to
need, and the VRAM figures learned from measured peaks.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(sa.Column("node_name", sa.String(128), nullable=False, server_default=""))
        batch.add_column(sa.Column("placement", sa.Text, nullable=False, server_default=""))
        batch.add_column(sa.Column("vram_estimate_bytes", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("queued_seconds", sa.Float, nullable=True))
    op.create_table(
        "vram_estimates",
        sa.Column("model", sa.String(128), primary_key=True),
        sa.Column("size_bucket", sa.Integer, primary_key=True),
        sa.Column("batch_size", sa.Integer, primary_key=True),
        sa.Column("memory_mode", sa.String(32), primary_key=True),
        sa.Column("peak_bytes", sa.BigInteger, nullable=False),
        sa.Column("pixels", sa.BigInteger, nullable=False),  # of the job the peak came from
        sa.Column("updated_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("vram_estimates")
    with op.batch_alter_table("attempts") as batch:
        for column in ("queued_seconds", "vram_estimate_bytes", "placement", "node_name"):
            batch.drop_column(column)
