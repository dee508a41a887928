"""Alembic owns the schema: an empty database upgrades to head, the result
matches the tables the store queries with, and it downgrades cleanly."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from scheduler.store import Store, downgrade, migrate
from scheduler.store.schema import metadata
from sdmesh.spec import MemoryMode
from tests.factories import make_spec

HEAD = "0005"


def test_upgrade_from_empty_matches_the_schema_module(db_url: str) -> None:
    store = Store(db_url)
    try:
        assert sa.inspect(store.engine).get_table_names() == []
        store.migrate()
        tables = set(sa.inspect(store.engine).get_table_names())
        assert tables == {"alembic_version", *metadata.tables}
        with store.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == HEAD
            differences = compare_metadata(MigrationContext.configure(conn), metadata)
        assert differences == []
        store.migrate()  # a second run changes nothing
    finally:
        store.close()


def test_downgrade_to_base_removes_everything(db_url: str) -> None:
    store = Store(db_url)
    try:
        store.migrate()
        downgrade(store.engine, "base")
        assert set(sa.inspect(store.engine).get_table_names()) <= {"alembic_version"}
        store.migrate()
        assert set(metadata.tables) <= set(sa.inspect(store.engine).get_table_names())
    finally:
        store.close()


def test_a_database_made_at_0001_upgrades_with_its_jobs(db_url: str) -> None:
    store = Store(db_url)
    try:
        migrate(store.engine, "0001")
        with store.engine.begin() as conn:  # a job and an attempt, as 0001 stored them
            conn.execute(
                sa.text(
                    "INSERT INTO jobs (id, owner, state, priority, model, spec, attempt, failures,"
                    " max_attempts, memory_mode, reason, last_seq, created_at, updated_at)"
                    " VALUES ('old', 'alice', 'ASSIGNED', 0, 'tiny', :spec, 1, 0, 3, 'full', '', 2,"
                    " 1.0, 2.0)"
                ),
                {"spec": __import__("json").dumps(make_spec().to_dict())},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO attempts (job_id, attempt, node_id, gpu_index, memory_mode,"
                    " reason, counted_failure, assigned_at) VALUES ('old', 1, 'n1', 0, 'full', '',"
                    " false, 2.0)"
                )
            )
        store.migrate()
        job = store.get_job("old")
        assert job is not None
        assert job.spec == make_spec()
        [attempt] = store.attempts("old")
        assert (attempt.node_id, attempt.placement, attempt.memory_mode) == (
            "n1",
            "",
            MemoryMode.FULL,
        )
        assert store.estimates.load() == {}
    finally:
        store.close()
