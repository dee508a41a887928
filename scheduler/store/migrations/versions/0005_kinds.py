"""Job kinds: models by kind and family, learned VRAM peaks by the job's
variant (kind, LoRAs, ControlNets), and uploaded input images.

`models` is a cache of what connected nodes last said, rewritten by every
hello, and `vram_estimates` is learned again from the next jobs: both are
recreated with their new keys rather than copied.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _models(kinds: bool) -> None:
    columns: list[sa.Column[Any]] = [
        sa.Column("node_id", sa.String(64), sa.ForeignKey("nodes.id"), primary_key=True),
        *([sa.Column("kind", sa.String(16), primary_key=True)] if kinds else []),
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("weight_bytes", sa.BigInteger, nullable=False),
        sa.Column("dtype", sa.String(32), nullable=False),
        *(
            [
                sa.Column("family", sa.String(32), nullable=False),
                sa.Column("sha256", sa.String(64), nullable=False),
            ]
            if kinds
            else []
        ),
        sa.Column("last_seen", sa.Float, nullable=False),
    ]
    op.create_table("models", *columns)


def _estimates(variants: bool) -> None:
    op.create_table(
        "vram_estimates",
        sa.Column("model", sa.String(128), primary_key=True),
        sa.Column("size_bucket", sa.Integer, primary_key=True),
        sa.Column("batch_size", sa.Integer, primary_key=True),
        sa.Column("memory_mode", sa.String(32), primary_key=True),
        *([sa.Column("variant", sa.String(512), primary_key=True)] if variants else []),
        sa.Column("peak_bytes", sa.BigInteger, nullable=False),
        sa.Column("pixels", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )


def upgrade() -> None:
    op.drop_table("models")
    _models(kinds=True)
    op.drop_table("vram_estimates")
    _estimates(variants=True)
    op.create_table(
        "inputs",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(64), primary_key=True),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("format", sa.String(8), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_inputs_created_at", "inputs", ["created_at"])
    op.create_table(
        "job_inputs",
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id"), primary_key=True),
        sa.Column("sha256", sa.String(64), primary_key=True),
    )
    op.create_index("ix_job_inputs_sha256", "job_inputs", ["sha256"])


def downgrade() -> None:
    op.drop_index("ix_job_inputs_sha256", "job_inputs")
    op.drop_table("job_inputs")
    op.drop_index("ix_inputs_created_at", "inputs")
    op.drop_table("inputs")
    op.drop_table("vram_estimates")
    _estimates(variants=False)
    op.drop_table("models")
    _models(kinds=False)
