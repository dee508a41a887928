"""Persistence: the job store, remembered nodes and models, and migrations."""

from scheduler.store.database import Database
from scheduler.store.engine import DatabaseUnreachable, downgrade, migrate
from scheduler.store.nodes import NodeRegistry
from scheduler.store.store import Store

__all__ = ["Database", "DatabaseUnreachable", "NodeRegistry", "Store", "downgrade", "migrate"]
