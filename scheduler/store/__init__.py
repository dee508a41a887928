"""Persistence: the job store, remembered nodes and models, and migrations."""

from scheduler.store.database import Database
from scheduler.store.nodes import NodeRegistry
from scheduler.store.store import Store, downgrade, migrate

__all__ = ["Database", "NodeRegistry", "Store", "downgrade", "migrate"]
