"""Runs the synchronous store on a small thread pool for the async services.

SQLite gets one thread: it has one writer anyway, and a single thread keeps
its transactions from ever waiting on each other. PostgreSQL gets a few.
State changes go through `write`, which commits those that arrive together
in one transaction.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from scheduler.store.group import GroupCommit
from scheduler.store.store import Store

P = ParamSpec("P")
T = TypeVar("T")


class Database:
    def __init__(self, store: Store) -> None:
        self.store = store
        workers = 1 if store.url.startswith("sqlite") else 4
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="db")
        self._writes: GroupCommit[Callable[[], Any], Any] = GroupCommit(self, store.write_many)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def write(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Runs a store write; writes that arrive together share one
        transaction (group commit), and each caller is answered after it
        commits."""
        result: T = await self._writes(functools.partial(fn, *args, **kwargs))
        return result

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.store.close()
