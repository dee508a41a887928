"""Table definitions the store queries with. Alembic migrations own the
schema in the database; a test checks that these match the migrated schema."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("owner", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("request_id", sa.String(128), nullable=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("failures", sa.Integer, nullable=False),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("node_id", sa.String(64), nullable=True),
    sa.Column("node_name", sa.String(128), nullable=True),
    sa.Column("gpu_index", sa.Integer, nullable=True),
    sa.Column("memory_mode", sa.String(32), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("last_seq", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float, nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.UniqueConstraint("owner", "request_id", name="uq_jobs_owner_request_id"),
    sa.Index("ix_jobs_state_priority_created", "state", "priority", "created_at"),
    sa.Index("ix_jobs_created_at", "created_at"),
    sa.Index("ix_jobs_finished_at", "finished_at"),
)

attempts = sa.Table(
    "attempts",
    metadata,
    sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id"), primary_key=True),
    sa.Column("attempt", sa.Integer, primary_key=True),
    sa.Column("node_id", sa.String(64), nullable=False),
    sa.Column("node_name", sa.String(128), nullable=False, server_default=""),
    sa.Column("gpu_index", sa.Integer, nullable=False),
    sa.Column("memory_mode", sa.String(32), nullable=False),
    sa.Column("placement", sa.Text, nullable=False, server_default=""),
    sa.Column("vram_estimate_bytes", sa.BigInteger, nullable=True),
    sa.Column("queued_seconds", sa.Float, nullable=True),
    sa.Column("outcome", sa.String(16), nullable=True),  # None while it runs
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("counted_failure", sa.Boolean, nullable=False),
    sa.Column("assigned_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float, nullable=True),
    sa.Column("ended_at", sa.Float, nullable=True),
    sa.Column("load_seconds", sa.Float, nullable=True),
    sa.Column("mean_step_seconds", sa.Float, nullable=True),
    sa.Column("peak_vram_bytes", sa.BigInteger, nullable=True),
)

job_events = sa.Table(
    "job_events",
    metadata,
    sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id"), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

images = sa.Table(
    "images",
    metadata,
    sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id"), primary_key=True),
    sa.Column("idx", sa.Integer, primary_key=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("seed", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("width", sa.Integer, nullable=False),
    sa.Column("height", sa.Integer, nullable=False),
    sa.Column("path", sa.Text, nullable=False),  # relative to the image root
    sa.Column("created_at", sa.Float, nullable=False),
)

nodes = sa.Table(
    "nodes",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("hostname", sa.String(255), nullable=False),
    sa.Column("agent_version", sa.String(64), nullable=False),
    sa.Column("labels", sa.JSON, nullable=False),
    sa.Column("devices", sa.JSON, nullable=False),
    sa.Column("first_seen", sa.Float, nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False),
)

models = sa.Table(
    "models",
    metadata,
    sa.Column("node_id", sa.String(64), sa.ForeignKey("nodes.id"), primary_key=True),
    sa.Column("kind", sa.String(16), primary_key=True),  # sdmesh.kinds.ModelKind
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("weight_bytes", sa.BigInteger, nullable=False),
    sa.Column("dtype", sa.String(32), nullable=False),
    sa.Column("family", sa.String(32), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False),
)

vram_estimates = sa.Table(
    "vram_estimates",
    metadata,
    sa.Column("model", sa.String(128), primary_key=True),
    sa.Column("size_bucket", sa.Integer, primary_key=True),
    sa.Column("batch_size", sa.Integer, primary_key=True),
    sa.Column("memory_mode", sa.String(32), primary_key=True),
    # The kind and what it adds: "" for plain txt2img (scheduler.estimator)
    sa.Column("variant", sa.String(512), primary_key=True),
    sa.Column("peak_bytes", sa.BigInteger, nullable=False),
    sa.Column("pixels", sa.BigInteger, nullable=False),  # of the job the peak came from
    sa.Column("updated_at", sa.Float, nullable=False),
)

# Input images (init images, masks, control images), stored content-addressed
# by sha256 under <data-dir>/inputs (scheduler.inputs). A row per owner who
# uploaded it: a user may name only their own uploads.
inputs = sa.Table(
    "inputs",
    metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(64), primary_key=True),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("width", sa.Integer, nullable=False),
    sa.Column("height", sa.Integer, nullable=False),
    sa.Column("format", sa.String(8), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Index("ix_inputs_created_at", "created_at"),
)

# Which jobs name which inputs: an input goes when its last job does.
job_inputs = sa.Table(
    "job_inputs",
    metadata,
    sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id"), primary_key=True),
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Index("ix_job_inputs_sha256", "sha256"),
)

leader = sa.Table(
    "leader",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("epoch", sa.BigInteger, nullable=False),
    sa.Column("holder", sa.String(64), nullable=False),
    sa.Column("address", sa.String(255), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),  # the database's clock
)

# ---- security (see scheduler.store.credentials) ----

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(16), primary_key=True),
    sa.Column("user_name", sa.String(64), nullable=False),
    sa.Column("admin", sa.Boolean, nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=True),
    sa.Column("revoked_at", sa.Float, nullable=True),
)

join_tokens = sa.Table(
    "join_tokens",
    metadata,
    sa.Column("id", sa.String(16), primary_key=True),
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("reusable", sa.Boolean, nullable=False),
    sa.Column("labels", sa.JSON, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("used_at", sa.Float, nullable=True),
    sa.Column("revoked_at", sa.Float, nullable=True),
)

node_credentials = sa.Table(
    "node_credentials",
    metadata,
    sa.Column("node_id", sa.String(64), primary_key=True),
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("token_id", sa.String(16), nullable=False),
    sa.Column("labels", sa.JSON, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
    sa.Index("ix_node_credentials_revoked_at", "revoked_at"),
)

audit = sa.Table(
    "audit",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("actor", sa.String(80), nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("target", sa.String(128), nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Index("ix_audit_at", "at"),
)
