"""Group commit: concurrent writes of one kind share one transaction.

Each caller hands its item and waits; one writer at a time takes every item
waiting and writes them in one call of `write_many` (one transaction), and
each caller is answered only after that commit. While a batch commits, the
next one gathers, so the batch grows with the load and a lone caller waits
for nothing. A batch that fails is written again one item at a time, so one
bad item fails only its own caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from scheduler.store.database import Database

T = TypeVar("T")
R = TypeVar("R")

MAX_BATCH = 512


class GroupCommit(Generic[T, R]):
    def __init__(
        self, db: Database, write_many: Callable[[Sequence[T]], list[R]], max_batch: int = MAX_BATCH
    ) -> None:
        self._db = db
        self._write_many = write_many
        self._max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.batches = 0  # how many transactions carried the items, for tests and benchmarks

    async def __call__(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name="group-commit")
        return await future

    async def _write(self) -> None:
        while self._pending:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            items = [item for item, _ in batch]
            try:
                results = await self._db.run(self._write_many, items)
                self.batches += 1
            except Exception as exc:
                if len(batch) == 1:
                    _settle(batch[0][1], exception=exc)
                    continue
                for item, future in batch:  # one by one: a bad item fails alone
                    try:
                        (result,) = await self._db.run(self._write_many, [item])
                        self.batches += 1
                    except Exception as one:
                        _settle(future, exception=one)
                    else:
                        _settle(future, result)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                _settle(future, result)


def _settle(
    future: asyncio.Future[R], result: R | None = None, exception: BaseException | None = None
) -> None:
    if future.done():  # its caller gave up (cancelled); the write stands
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)  # type: ignore[arg-type]
