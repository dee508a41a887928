"""Alembic owns the schema: an empty database upgrades to head, the result
matches the tables the store queries with, and it downgrades cleanly."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from scheduler.store import Store, downgrade
from scheduler.store.schema import metadata


def test_upgrade_from_empty_matches_the_schema_module(db_url: str) -> None:
    store = Store(db_url)
    try:
        assert sa.inspect(store.engine).get_table_names() == []
        store.migrate()
        tables = set(sa.inspect(store.engine).get_table_names())
        assert tables == {"alembic_version", *metadata.tables}
        with store.engine.connect() as conn:
            assert (
                conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == "0001"
            )
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
