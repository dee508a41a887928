"""Persistence: the job store, remembered nodes and models, and migrations."""

from scheduler.store.nodes import NodeRegistry
from scheduler.store.store import Store, migrate

__all__ = ["NodeRegistry", "Store", "migrate"]
