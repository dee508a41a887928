"""The blocking SDK's bridge to its event loop: streams end cleanly however
the caller leaves them (a break, an error, Ctrl-C)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

import pytest

from client._sync import _LoopThread


@pytest.fixture
def runner() -> Iterator[_LoopThread]:
    loop_thread = _LoopThread()
    yield loop_thread
    loop_thread.close()


def stream(closed: threading.Event, count: int | None = None) -> AsyncIterator[int]:
    async def numbers() -> AsyncIterator[int]:
        try:
            n = 0
            while count is None or n < count:
                yield n
                n += 1
                await asyncio.sleep(0.001)  # a network stream waits between items
            await asyncio.Event().wait()  # then blocks, as a live stream does
        finally:
            closed.set()

    return numbers()


def test_a_break_closes_the_stream(runner: _LoopThread) -> None:
    closed = threading.Event()
    for number in runner.iterate(stream(closed)):
        if number == 3:
            break
    assert closed.wait(5)


def test_ctrl_c_while_waiting_closes_the_stream_and_propagates(runner: _LoopThread) -> None:
    closed = threading.Event()
    seen: list[int] = []

    def watch() -> None:
        for number in runner.iterate(stream(closed, count=2)):
            seen.append(number)
            if number == 1:
                raise KeyboardInterrupt  # as if Ctrl-C came while the stream blocks

    with pytest.raises(KeyboardInterrupt):
        watch()
    assert seen == [0, 1]
    assert closed.wait(5)


def test_errors_from_the_stream_reach_the_caller(runner: _LoopThread) -> None:
    async def failing() -> AsyncIterator[int]:
        yield 1
        raise ValueError("broken stream")

    got: list[int] = []
    with pytest.raises(ValueError, match="broken stream"):
        got.extend(runner.iterate(failing()))
    assert got == [1]
